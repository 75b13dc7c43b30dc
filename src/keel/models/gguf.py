"""Read a GGUF file's header without loading the native library.

The metadata key/value section is parsed (scalars kept, arrays skipped), which
is enough to tell a real GGUF file from garbage and to estimate the memory a
model needs: weights (the file size) plus the KV cache for the configured
context; then the tensor table, whose offsets say how long the file must be (a
truncated file, an interrupted copy, is refused here rather than by the engine).
Tensor data is never read.

Format: magic ``GGUF``, u32 version (2 or 3), u64 tensor count, u64 key/value
count, then per key a u64-length string, a u32 value type and the value; then
per tensor a name, u32 dimension count, u64 dimensions, u32 type and u64 offset
into the data, which begins at the next multiple of ``general.alignment`` (32).
"""

from __future__ import annotations

import functools
import os
import re
import struct
from pathlib import Path
from typing import BinaryIO

from keel.errors import MissingDependency

MAGIC = b"GGUF"

_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING = 8
_ARRAY = 9
_MAX_KEYS = 1 << 16
_MAX_STRING = 1 << 24
_LAYOUTS: dict[str, struct.Struct] = {}


class _Reader:
    """The header's values in order, read through a buffer: a header holds ~100,000
    vocabulary strings, and a file read per value took 0.11 s for the embedded model's
    (a worker's start, ``keel models list``); from a buffer, a fraction of that."""

    CHUNK = 1 << 20

    def __init__(self, file: BinaryIO, path: Path) -> None:
        self.file = file
        self.path = path
        self._data = b""
        self._at = 0
        self._start = 0
        """The file offset of ``_data``'s first byte."""
        self.size = os.fstat(file.fileno()).st_size

    def tell(self) -> int:
        return self._start + self._at

    def _fill(self, size: int) -> None:
        """Make the buffer hold at least ``size`` bytes from the current offset."""
        if self._at + size > len(self._data):
            self._start += self._at
            self._data = self._data[self._at :] + self.file.read(max(size, self.CHUNK))
            self._at = 0
            if size > len(self._data):
                raise MissingDependency(f"{self.path}: truncated GGUF header")

    def take(self, size: int) -> bytes:
        self._fill(size)
        data = self._data[self._at : self._at + size]
        self._at += size
        return data

    def unpack(self, fmt: str) -> object:
        layout = _LAYOUTS.get(fmt) or _LAYOUTS.setdefault(fmt, struct.Struct(fmt))
        value: object = layout.unpack(self.take(layout.size))[0]
        return value

    def u64(self) -> int:
        value = self.unpack("<Q")
        assert isinstance(value, int)
        return value

    def u32(self) -> int:
        value = self.unpack("<I")
        assert isinstance(value, int)
        return value

    def string(self) -> str:
        length = self.u64()
        if length > _MAX_STRING:
            raise MissingDependency(f"{self.path}: corrupt GGUF header (string of {length} bytes)")
        return self.take(length).decode("utf-8", errors="replace")

    def strings_among(
        self, wanted: frozenset[str], every: list[bytes] | None = None
    ) -> tuple[int, list[str]]:
        """Read an array (its type and count follow): its length, and the strings in it
        that are in ``wanted`` (with ``every``: all of them, undecoded, put there)."""
        item_kind, count = self.u32(), self.u64()
        return count, self._array(item_kind, count, wanted, every)

    def ints(self) -> tuple[int, ...]:
        """Read an array of 32-bit integers (its type and count follow); () if it is not one."""
        item_kind, count = self.u32(), self.u64()
        if item_kind not in (4, 5):
            self._array(item_kind, count)
            return ()
        if 4 * count > self.size - self.tell():
            raise MissingDependency(f"{self.path}: truncated GGUF header")
        return struct.unpack(f"<{count}{_SCALARS[item_kind][1]}", self.take(4 * count))

    def _array(
        self,
        kind: int,
        count: int,
        wanted: frozenset[str] = frozenset(),
        every: list[bytes] | None = None,
    ) -> list[str]:
        """Pass over an array's items: the strings among them in ``wanted``."""
        if kind in _SCALARS:
            size = count * struct.calcsize(_SCALARS[kind])
            if size > self.size - self.tell():  # a corrupt count: no read of that size
                raise MissingDependency(f"{self.path}: truncated GGUF header")
            self.take(size)
            return []
        if kind != _STRING:
            for _ in range(count):
                self.value(kind)
            return []
        encoded = {text.encode(): text for text in wanted}
        found: list[str] = []
        left = count
        while left:  # one loop over the buffer: ~100,000 strings in a vocabulary
            self._fill(8)
            data, at, end = self._data, self._at, len(self._data)
            while left and at + 8 <= end:
                length = int.from_bytes(data[at : at + 8], "little")
                if length > _MAX_STRING:
                    raise MissingDependency(
                        f"{self.path}: corrupt GGUF header (string of {length} bytes)"
                    )
                if at + 8 + length > end:
                    break
                item = data[at + 8 : at + 8 + length]
                if encoded and (text := encoded.get(item)):
                    found.append(text)
                if every is not None:
                    every.append(item)
                at += 8 + length
                left -= 1
            self._at = at
            if left and at + 8 <= end:  # the next string runs past the buffer
                self._fill(8 + int.from_bytes(data[at : at + 8], "little"))
        return found

    def value(self, kind: int) -> object:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.u32(), self.u64()
            self._array(item_kind, count)
            return None  # arrays (the tokenizer's vocabulary) are skipped
        raise MissingDependency(f"{self.path}: corrupt GGUF header (value type {kind})")


def read_metadata(path: Path) -> dict[str, object]:
    """The header's scalar and string values by key; raises MissingDependency when
    the file is not a GGUF file or its header is damaged, OSError when unreadable."""
    return read_header(path)[0]


FIM_TOKEN_SETS: dict[str, tuple[str, ...]] = {
    "starcoder": ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    "qwen2.5-coder / codegemma": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    "deepseek-coder": ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    "codellama": ("▁<PRE>", "▁<SUF>", "▁<MID>"),
    "codestral": ("[PREFIX]", "[SUFFIX]"),
}
"""The fill-in-the-middle markers of each model family, as vocabulary entries."""
_FIM_TOKENS = frozenset(token for tokens in FIM_TOKEN_SETS.values() for token in tokens)
_FIM_ID_KEYS = (
    ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id"),
    ("tokenizer.ggml.prefix_token_id", "tokenizer.ggml.suffix_token_id"),
)


def fim_family(vocabulary: frozenset[str]) -> str | None:
    """The family (a :data:`FIM_TOKEN_SETS` key) whose FIM markers the vocabulary has."""
    for family, tokens in FIM_TOKEN_SETS.items():
        if all(token in vocabulary for token in tokens):
            return family
    return None


def fim_tokens(metadata: dict[str, object], vocabulary: frozenset[str]) -> str | None:
    """The FIM markers a model has (one family's, joined), or None, from
    :func:`read_header`'s two parts.

    Read from the vocabulary itself, as llama.cpp does when it loads a model, so
    that an older GGUF without the ``fim_*_token_id`` keys is still recognised.
    """
    if (family := fim_family(vocabulary)) is not None:
        return " ".join(FIM_TOKEN_SETS[family])
    for prefix_key, suffix_key in _FIM_ID_KEYS:
        if isinstance(metadata.get(prefix_key), int) and isinstance(metadata.get(suffix_key), int):
            return f"{prefix_key.rsplit('.', 1)[-1]}, {suffix_key.rsplit('.', 1)[-1]}"
    return None


def read_header(path: Path) -> tuple[dict[str, object], frozenset[str]]:
    """The header's scalar and string values, and which FIM markers the vocabulary
    (``tokenizer.ggml.tokens``) holds. Errors as :func:`read_metadata`.

    Read once for a file as it is (its size and modification time): keel's start read
    the embedded model's three times, once a role, ~30 ms of CPU each."""
    stat = path.stat()
    metadata, found = _read_header(path, stat.st_size, stat.st_mtime_ns)
    return dict(metadata), found


@functools.lru_cache(maxsize=16)
def _read_header(
    path: Path, _size: int, _modified: int
) -> tuple[dict[str, object], frozenset[str]]:
    found: set[str] = set()
    with path.open("rb") as file:
        reader = _Reader(file, path)
        if reader.take(4) != MAGIC:
            raise MissingDependency(f"{path}: not a GGUF file (no GGUF magic)")
        version = reader.u32()
        if version not in (2, 3):
            raise MissingDependency(f"{path}: unsupported GGUF version {version}")
        tensors = reader.u64()
        count = reader.u64()
        if count > _MAX_KEYS:
            raise MissingDependency(f"{path}: corrupt GGUF header ({count} keys)")
        metadata: dict[str, object] = {}
        tokens: list[bytes] = []
        types: tuple[int, ...] = ()
        for _ in range(count):
            key = reader.string()
            kind = reader.u32()
            if key == "tokenizer.ggml.tokens" and kind == _ARRAY:
                size, markers = reader.strings_among(_FIM_TOKENS, tokens)
                found.update(markers)
                metadata[key] = None
                metadata[VOCABULARY_SIZE] = size
            elif key == "tokenizer.ggml.token_type" and kind == _ARRAY:
                types = reader.ints()
                metadata[key] = None
            else:
                metadata[key] = reader.value(kind)
        metadata[LONGEST_TOKEN] = max(map(len, tokens), default=0)
        metadata[CONTROL_TOKENS] = frozenset(
            token.decode("utf-8", errors="replace")
            for token, kind in zip(tokens, types, strict=False)
            if kind in CONTROL_TOKEN_TYPES and token
        )
        _check_length(reader, tensors, metadata)
        return metadata, frozenset(found)


CONTROL_TOKEN_TYPES = frozenset({2, 3})
"""``tokenizer.ggml.token_type`` values llama.cpp reads in a prompt's text only where it
parses special tokens: UNKNOWN and CONTROL (a USER_DEFINED token is read everywhere)."""
CONTROL_TOKENS = "keel.control_tokens"
"""The texts of the vocabulary's control tokens (``<|endoftext|>``, ``<|im_start|>``, a FIM
marker), a frozenset: what llama.cpp reads in a prompt's text as the token itself where it
parses special tokens, as it does a ``/completion`` prompt's."""


def _check_length(reader: _Reader, tensors: int, metadata: dict[str, object]) -> None:
    """Raise MissingDependency when the file ends before its last tensor begins."""
    furthest = 0
    for _ in range(tensors):
        reader.string()  # name
        dimensions = reader.u32()
        if dimensions > 8:
            raise MissingDependency(f"{reader.path}: corrupt GGUF tensor table")
        for _ in range(dimensions):
            reader.u64()
        reader.u32()  # type
        furthest = max(furthest, reader.u64())
    alignment = _int(metadata, "general.alignment") or 32
    start = -(-reader.tell() // alignment) * alignment
    size = reader.path.stat().st_size
    if tensors and start + furthest >= size:
        raise MissingDependency(
            f"{reader.path}: truncated ({size / 2**20:,.1f} MiB, where its tensors reach past "
            f"{(start + furthest) / 2**20:,.1f} MiB): an interrupted copy or download? "
            "copy or pull it again"
        )


LONGEST_TOKEN = "keel.longest_token"
"""The bytes of the vocabulary's longest token: ``n`` tokens of a text are within its
first ``n`` times that many characters."""

VOCABULARY_SIZE = "keel.vocabulary_size"
"""The length of ``tokenizer.ggml.tokens``, which the header's values leave out."""


def embedding_batch_bytes(metadata: dict[str, object], batch: int) -> int | None:
    """Bytes an embedding engine's buffers take for a ``batch``-token input: a logits row
    and an embedding row per token, held twice (llama.cpp's output buffer, and the graph's
    tensor for a model with an output head). Measured with the embedded model: +196 MB
    at 512 tokens (this says 204), +794 MB at 2,048 (814). None without the shape."""
    vocabulary = _int(metadata, VOCABULARY_SIZE)
    width = _int(metadata, f"{metadata.get('general.architecture')}.embedding_length")
    if not (vocabulary and width):
        return None
    return batch * (vocabulary + width) * 4 * 2


def _int(metadata: dict[str, object], key: str) -> int | None:
    value = metadata.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


PROMPT_CACHE_CONTEXTS = 4
PROMPT_CACHE_LIMIT = 1 << 30


def prompt_cache_bytes(context_kv: int | None) -> int:
    """Host memory for the prompts a generating engine sets aside when another takes
    their slot (llama.cpp's ``cache_ram``), from the KV cache of one whole context: room
    for :data:`PROMPT_CACHE_CONTEXTS` of them, at most 1 GiB (1 GiB when the header does
    not tell). It was 1 GiB for every model, and left out of the memory estimate: the
    embedded model's worker grew to ~1 GB after ~50 prompts, three times the estimate."""
    if context_kv is None:
        return PROMPT_CACHE_LIMIT
    return min(PROMPT_CACHE_LIMIT, PROMPT_CACHE_CONTEXTS * context_kv)


def kv_cache_bytes(metadata: dict[str, object], context_size: int) -> int | None:
    """Bytes of an f16 KV cache for ``context_size`` tokens, or None if the header
    lacks the shape (then the caller must guess)."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        return None
    layers = _int(metadata, f"{arch}.block_count")
    width = _int(metadata, f"{arch}.embedding_length")
    heads = _int(metadata, f"{arch}.attention.head_count")
    if not (layers and width and heads):
        return None
    kv_heads = _int(metadata, f"{arch}.attention.head_count_kv") or heads
    key_width = _int(metadata, f"{arch}.attention.key_length") or width // heads
    value_width = _int(metadata, f"{arch}.attention.value_length") or width // heads
    per_token = layers * kv_heads * (key_width + value_width) * 2  # f16
    return per_token * context_size


def context_kv_bytes(metadata: dict[str, object] | None, context_size: int, weights: int) -> int:
    """:func:`kv_cache_bytes`, or a quarter of the weights where the header lacks the
    shape or is not read yet (a model not downloaded): the one guess the memory
    estimate and the worker's prompt cache both size by."""
    kv = kv_cache_bytes(metadata, context_size) if metadata is not None else None
    return kv if kv is not None else weights // 4


_FIRST_PART = re.compile(r"-00001-of-(\d{5})\.gguf$")


def weights_bytes(path: Path | str) -> int:
    """The size of a model's weights: its file's, or every part's where it is the first
    of a model stored in parts (``...-00001-of-00003.gguf``), which llama.cpp loads
    together (the first alone understated a 7B model's memory by two thirds)."""
    path = Path(path)
    parts = _FIRST_PART.search(path.name)
    if parts is None:
        return path.stat().st_size
    stem = path.name[: parts.start()]
    count = int(parts.group(1))
    names = (f"{stem}-{n:05d}-of-{count:05d}.gguf" for n in range(1, count + 1))
    return sum(part.stat().st_size for part in (path.with_name(n) for n in names) if part.is_file())
