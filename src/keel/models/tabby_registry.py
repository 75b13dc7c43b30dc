"""Tabby's model registry names, mapped to the files Tabby downloads for them.

``tabby download --model StarCoder-1B`` reads TabbyML/registry-tabby's
``models.json``: per model a name, the URLs of its GGUF file (Hugging Face
first) and the file's sha256. keel carries the Hugging Face part of the
single-file entries here, so ``keel models pull TabbyML/StarCoder-1B`` fetches
the same bytes through ``huggingface_hub`` and checks the same sha256, without
reaching GitHub at pull time. Entries split into several files (the 7B+
instruct models) are left out: keel loads one file per model.

A pulled registry model lands as ``<root>/models/TabbyML/<Name>.gguf``, so a
Tabby ``config.toml`` naming ``model_id = "TabbyML/StarCoder-1B"`` loads it
unchanged, and its FIM template follows from the name as for any model.
"""

from __future__ import annotations

from dataclasses import dataclass

REGISTRY_ORG = "TabbyML"


@dataclass(frozen=True, slots=True)
class RegistryModel:
    name: str
    repo: str
    filename: str
    sha256: str

    @property
    def model_id(self) -> str:
        return f"{REGISTRY_ORG}/{self.name}"


_ENTRIES: tuple[tuple[str, str, str, str], ...] = (
    # name, Hugging Face repo, file, sha256 (from registry-tabby's models.json)
    (
        "StarCoder-1B",
        "TabbyML/models",
        "starcoderbase-1B.Q8_0.gguf",
        "1bb6441486d102db03dac30c82d6b1029ee4f9f5d73f27444fa58cbfcd7cfa0f",
    ),
    (
        "StarCoder-3B",
        "TabbyML/models",
        "starcoderbase-3B.Q8_0.gguf",
        "9798b7cba84ade7c69ff9f033d60c954e16b18f4d01829993b5fe7e33a49ba81",
    ),
    (
        "StarCoder-7B",
        "TabbyML/models",
        "starcoderbase-7B.Q8_0.gguf",
        "33dfcc7e216f1a072b4e16cd3bb19a0e55f5874ed319416435c8fc99216b8bfa",
    ),
    (
        "StarCoder2-3B",
        "nold/starcoder2-3b-GGUF",
        "starcoder2-3b_Q8_0.gguf",
        "0499b8d046c56934c9741fd00c6206a5f7ca0eb42b59304ab7f4a20cd2f28ebf",
    ),
    (
        "StarCoder2-7B",
        "nold/starcoder2-7b-GGUF",
        "starcoder2-7b_Q8_0.gguf",
        "72a8a59486cdcc8549e5a17a5c5ec66b6ce5db71a9408a2800985791a40fbff0",
    ),
    (
        "CodeLlama-7B",
        "TheBloke/CodeLlama-7B-GGUF",
        "codellama-7b.Q8_0.gguf",
        "a4eaffa534306e0fc6be5a14cb7db02010546e21fefc32794f000c9b26822db3",
    ),
    (
        "CodeLlama-13B",
        "TheBloke/CodeLlama-13B-GGUF",
        "codellama-13b.Q8_0.gguf",
        "85763827a80d9067acdc1cb8ceafd2cd0a2644a87d0cf1cd4b75e8d7b8a2777d",
    ),
    (
        "DeepseekCoder-1.3B",
        "icycodes/deepseek-coder-1.3b-base-Q8_0-GGUF",
        "deepseek-coder-1.3b-base-q8_0.gguf",
        "f25baf6ed77e1f651af3b5359fadc4e77656621a7660f36624de70d631d110d2",
    ),
    (
        "DeepseekCoder-6.7B",
        "icycodes/deepseek-coder-6.7b-base-Q8_0-GGUF",
        "deepseek-coder-6.7b-base-q8_0.gguf",
        "9f9197a8ea01914e7f18f95b0d5d4782bebca4ba8b3e6cf3e5b2f369fa9b88ad",
    ),
    (
        "DeepSeek-Coder-V2-Lite",
        "bartowski/DeepSeek-Coder-V2-Lite-Base-GGUF",
        "DeepSeek-Coder-V2-Lite-Base-Q8_0.gguf",
        "22cef614d5b3e1d00ece317ded91c48046f1a6f24618639dea110fbc22e5f86c",
    ),
    (
        "CodeGemma-2B",
        "TabbyML/models",
        "codegemma-2b.Q8_0.gguf",
        "a5dc633538a2e152d8e9f69766135b4bffcc5611d6dd84200e280419f7dc1eba",
    ),
    (
        "CodeGemma-7B",
        "TabbyML/models",
        "codegemma-7b.Q8_0.gguf",
        "10c4f6a8429b00ae56b5ec444d403510789fcbc3b3e4cb585aef8f43313cdf40",
    ),
    (
        "Qwen2.5-Coder-0.5B",
        "ikw/Qwen2.5-Coder-0.5B-GGUF",
        "qwen2.5-coder-0.5b-q8_0.gguf",
        "a563b0822d92aa051118fe9e2a1bea30802ead74e464980cbeac058041daed6a",
    ),
    (
        "Qwen2.5-Coder-1.5B",
        "ikw/Qwen2.5-Coder-1.5B-GGUF",
        "qwen2.5-coder-1.5b-q8_0.gguf",
        "116f205cba3d96dfd6b6c1e37bef6149a6722c62687621200be218314eb2851b",
    ),
    (
        "Qwen2.5-Coder-3B",
        "ikw/Qwen2.5-Coder-3B-GGUF",
        "qwen2.5-coder-3b-q8_0.gguf",
        "db1141ead601b85a0a7acd00d318d83712201db89dc552f9b79952bf6cc89ab8",
    ),
    (
        "Qwen2.5-Coder-7B",
        "ikw/Qwen2.5-Coder-7B-GGUF",
        "qwen2.5-coder-7b-q8_0.gguf",
        "c80bf23d37f5e17f182c67302fdc4b141502ec50e10cf8464f22e522db3bd288",
    ),
    (
        "Qwen2.5-Coder-14B",
        "ikw/Qwen2.5-Coder-14B-GGUF",
        "qwen2.5-coder-14b-q8_0.gguf",
        "3d2abf8f771767667ff66cc10a5db27421b8f0891d8af42b7c18eba8b5c33eec",
    ),
    (
        "Qwen2.5-Coder-0.5B-Instruct",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
        "qwen2.5-coder-0.5b-instruct-q8_0.gguf",
        "e1a77721fa97d412f121878223eec81fb4ae6f271e18f922d746711f67b344d1",
    ),
    (
        "Qwen2.5-Coder-1.5B-Instruct",
        "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
        "qwen2.5-coder-1.5b-instruct-q8_0.gguf",
        "507de59046601282ba768a9789900e6ccf60ed93ddf346730b7c68eb0715bc47",
    ),
    (
        "Codestral-22B",
        "bartowski/Codestral-22B-v0.1-GGUF",
        "Codestral-22B-v0.1-Q8_0.gguf",
        "4f9ad7e24043cf3ec19002737019f0798ebe1cecbfecba2e047ea07b92721ac0",
    ),
    (
        "Nomic-Embed-Text",
        "nomic-ai/nomic-embed-text-v1.5-GGUF",
        "nomic-embed-text-v1.5.Q8_0.gguf",
        "3e24342164b3d94991ba9692fdc0dd08e3fd7362e0aacc396a9a5c54a544c3b7",
    ),
)

TABBY_REGISTRY: dict[str, RegistryModel] = {
    name.lower(): RegistryModel(name, repo, filename, sha256)
    for name, repo, filename, sha256 in _ENTRIES
}
"""Registry models by lower-cased name (Tabby's names, matched without case)."""


def lookup(spec: str, registry: dict[str, RegistryModel] | None = None) -> RegistryModel | None:
    """The registry model ``spec`` names (``TabbyML/StarCoder-1B`` or ``StarCoder-1B``),
    or None when it names none."""
    table = TABBY_REGISTRY if registry is None else registry
    org, slash, name = spec.rpartition("/")
    if slash and org.lower() != REGISTRY_ORG.lower():
        return None
    return table.get(name.lower())
