"""Tabby's model registry names, mapped to the files Tabby downloads for them.

``tabby download --model StarCoder-1B`` reads TabbyML/registry-tabby's
``models.json``: per model a name, the URLs of its GGUF file (Hugging Face
first) and the file's sha256. keel carries the Hugging Face part of the
single-file entries here (all of them, as of registry-tabby's Qwen3 entries:
chat and embedding models too; Tabby's quickstart chat model, Qwen2-1.5B-Instruct,
was missing), so ``keel models pull TabbyML/StarCoder-1B`` fetches
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
    # name, Hugging Face repo, file, sha256 (from registry-tabby's models.json, in its order)
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
        "Mistral-7B",
        "TheBloke/Mistral-7B-Instruct-v0.1-GGUF",
        "mistral-7b-instruct-v0.1.Q8_0.gguf",
        "ab634d1d552dc60533e486cbcc73ad9b01358994dabf2453230e7fcd77308dc8",
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
        "CodeGemma-7B-Instruct",
        "TabbyML/models",
        "codegemma-7b-it.Q8_0.gguf",
        "3f0fd0cc522f22590630e6c912e24178b088839ec015ab9fa04cbb018ea72eb6",
    ),
    (
        "CodeQwen-7B",
        "bartowski/CodeQwen1.5-7B-GGUF",
        "CodeQwen1.5-7B-Q8_0.gguf",
        "d9722be0758027d6da9e50df1ec5b2e69e5a3cc1b1851201abb8da07fad0d26d",
    ),
    (
        "CodeQwen-7B-Chat",
        "Qwen/CodeQwen1.5-7B-Chat-GGUF",
        "codeqwen-1_5-7b-chat-q8_0.gguf",
        "aeec5c76f5d914ffc5b93cf7197b914be97c1580592a6eb368dc36c8c0c12f28",
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
        "Qwen2-1.5B-Instruct",
        "Qwen/Qwen2-1.5B-Instruct-GGUF",
        "qwen2-1_5b-instruct-q8_0.gguf",
        "1fabf28bda17e96824bacc29e43b09ec4ba8a82d190f700cbdd1286586a05311",
    ),
    (
        "Qwen3-0.6B",
        "Qwen/Qwen3-0.6B-GGUF",
        "Qwen3-0.6B-Q8_0.gguf",
        "9465e63a22add5354d9bb4b99e90117043c7124007664907259bd16d043bb031",
    ),
    (
        "Qwen3-1.7B",
        "Qwen/Qwen3-1.7B-GGUF",
        "Qwen3-1.7B-Q8_0.gguf",
        "061b54daade076b5d3362dac252678d17da8c68f07560be70818cace6590cb1a",
    ),
    (
        "Qwen3-4B",
        "Qwen/Qwen3-4B-GGUF",
        "Qwen3-4B-Q8_0.gguf",
        "8c2f07f26af9747e41988551106f149b03eb9b5cb6df636027b6bf6278473300",
    ),
    (
        "Qwen3-8B",
        "Qwen/Qwen3-8B-GGUF",
        "Qwen3-8B-Q8_0.gguf",
        "408b955510e196121c1c375201744783b5c9a43c7956d73fc78df54c66e883d6",
    ),
    (
        "Qwen3-14B",
        "Qwen/Qwen3-14B-GGUF",
        "Qwen3-14B-Q8_0.gguf",
        "a0dfe649137410b7d82f06a209240508e218f32f5b6fd81b69d6932160cfcd9d",
    ),
    (
        "Qwen3-32B",
        "Qwen/Qwen3-32B-GGUF",
        "Qwen3-32B-Q8_0.gguf",
        "2c50eb8aad05047dbf24fa014eb621adf552e14176cabe0c5db4ef38c91e2169",
    ),
    (
        "Qwen3-30B-A3B",
        "Qwen/Qwen3-30B-A3B-GGUF",
        "Qwen3-30B-A3B-Q8_0.gguf",
        "4ad960d180b16f56024f5b704697e5dd5b0837167c2e515ef0569abfc599743c",
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
    (
        "DeepSeek-Coder-V2-Lite",
        "bartowski/DeepSeek-Coder-V2-Lite-Base-GGUF",
        "DeepSeek-Coder-V2-Lite-Base-Q8_0.gguf",
        "22cef614d5b3e1d00ece317ded91c48046f1a6f24618639dea110fbc22e5f86c",
    ),
    (
        "Jina-Embeddings-V2-Code",
        "wsxiaoys/jina-embeddings-v2-base-code-Q8_0-GGUF",
        "jina-embeddings-v2-base-code-q8_0.gguf",
        "a31e5c2a10b5820b7e8a7bd9764495b3c7de1366f37ccff5ed9408116fc522d8",
    ),
    (
        "Yi-Coder-9B-Chat",
        "wsxiaoys/Yi-Coder-9B-Chat-Q8_0-GGUF",
        "yi-coder-9b-chat-q8_0.gguf",
        "23b4408c9a621bc563ed9f998a7929776ba50f5102ed2c2436b2f917404b05e7",
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
