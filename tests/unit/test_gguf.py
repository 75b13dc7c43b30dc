"""The GGUF header reader against files written here: values, the vocabulary's FIM
markers and size, arrays longer than the reader's buffer, truncation anywhere."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from keel.errors import MissingDependency
from keel.models import gguf

STRING, ARRAY, U32, F32 = 8, 9, 4, 6


def string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def strings(items: list[str]) -> bytes:
    return struct.pack("<IQ", STRING, len(items)) + b"".join(string(item) for item in items)


def gguf_file(vocabulary: list[str], merges: list[str], tensor_end: int) -> bytes:
    """A GGUF v3 file: a few values, the vocabulary, merges, an int array, one tensor
    whose data ends ``tensor_end`` bytes after the (32-aligned) data start."""
    values = [
        ("general.architecture", struct.pack("<I", STRING) + string("llama")),
        ("llama.block_count", struct.pack("<II", U32, 30)),
        ("llama.rope.freq_base", struct.pack("<If", F32, 0.5)),
        ("tokenizer.ggml.tokens", struct.pack("<I", ARRAY) + strings(vocabulary)),
        ("tokenizer.ggml.merges", struct.pack("<I", ARRAY) + strings(merges)),
        (
            "tokenizer.ggml.token_type",
            struct.pack("<IIQ", ARRAY, U32, len(vocabulary))
            + b"\x01\x00\x00\x00" * len(vocabulary),
        ),
        ("general.name", struct.pack("<I", STRING) + string("tiny ✓")),
    ]
    out = b"GGUF" + struct.pack("<IQQ", 3, 1, len(values))
    for key, value in values:
        out += string(key) + value
    out += string("token_embd.weight") + struct.pack("<IQQIQ", 2, 4, 4, 0, tensor_end - 64)
    out += b"\0" * (-len(out) % 32)
    return out + b"\0" * tensor_end


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, bytes]:
    # ~1.6 MB of strings: the merges cross the reader's 1 MiB buffer more than once.
    vocabulary = [f"tok{i}" for i in range(40_000)] + ["<fim_prefix>", "<fim_suffix>"]
    vocabulary += ["<fim_middle>", "é" * 300]
    merges = [f"m {i} {'x' * (i % 50)}" for i in range(40_000)]
    data = gguf_file(vocabulary, merges, tensor_end=256)
    path = tmp_path / "tiny.gguf"
    path.write_bytes(data)
    return path, data


def test_values_vocabulary_and_fim_markers_are_read(model: tuple[Path, bytes]) -> None:
    path, _ = model
    metadata, vocabulary = gguf.read_header(path)
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == 30
    assert metadata["llama.rope.freq_base"] == 0.5
    assert metadata["general.name"] == "tiny ✓"
    assert metadata[gguf.VOCABULARY_SIZE] == 40_004
    assert metadata[gguf.LONGEST_TOKEN] == 600  # "é" * 300, in bytes: an input's cut
    assert metadata["tokenizer.ggml.merges"] is None  # arrays are skipped
    assert vocabulary == {"<fim_prefix>", "<fim_suffix>", "<fim_middle>"}
    assert gguf.fim_tokens(metadata, vocabulary) == "<fim_prefix> <fim_suffix> <fim_middle>"


@pytest.mark.parametrize("keep", [0.3, 0.55, 0.9, 0.999])
def test_a_file_cut_anywhere_is_refused(model: tuple[Path, bytes], keep: float) -> None:
    path, data = model
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(MissingDependency, match="truncated"):
        gguf.read_metadata(path)


def test_the_file_must_reach_its_last_tensor(model: tuple[Path, bytes]) -> None:
    path, data = model
    path.write_bytes(data[:-200])  # the header is whole; the tensor data is not
    with pytest.raises(MissingDependency, match="its tensors reach past"):
        gguf.read_metadata(path)


@pytest.mark.parametrize("count", [2**40, 2**62])
def test_an_array_count_past_the_file_is_refused_not_read(tmp_path: Path, count: int) -> None:
    """A downloaded file is untrusted: its counts must not size a read (a MemoryError, an
    OverflowError)."""
    values = string("general.architecture") + struct.pack("<I", STRING) + string("llama")
    values += string("floats") + struct.pack("<IIQ", ARRAY, F32, count)
    path = tmp_path / "crafted.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + values + b"\0" * 64)
    with pytest.raises(MissingDependency, match="truncated"):
        gguf.read_metadata(path)


def test_a_file_written_anew_is_read_anew(tmp_path: Path) -> None:
    """Headers are read once a file (keel's start read the embedded model's once a role);
    a file replaced at its path (a pull, an edit) is read again."""
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf_file(["a", "b"], [], tensor_end=64))
    first, _ = gguf.read_header(path)
    first["general.name"] = "changed by a caller"
    assert gguf.read_metadata(path)["general.name"] == "tiny ✓"  # the cache's is its own
    assert gguf.read_metadata(path)[gguf.VOCABULARY_SIZE] == 2
    path.write_bytes(gguf_file(["a", "b", "c", "<fim_prefix>"], [], tensor_end=64))
    metadata, markers = gguf.read_header(path)
    assert metadata[gguf.VOCABULARY_SIZE] == 4 and markers == {"<fim_prefix>"}
