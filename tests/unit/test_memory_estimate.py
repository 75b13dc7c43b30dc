"""What a worker is estimated to need, read from the embedded model's real header."""

from __future__ import annotations

from keel.models import gguf
from keel.models.manager import OVERHEAD_BYTES, memory_needed
from keel.models.registry import embedded_model_path
from keel.workers.supervisor import WorkerSpec


def test_the_vocabulary_size_is_read_from_the_token_list() -> None:
    metadata = gguf.read_metadata(embedded_model_path())
    assert metadata[gguf.VOCABULARY_SIZE] == metadata["llama.vocab_size"] == 49152


def test_an_embedding_worker_needs_its_batch_buffers_on_top() -> None:
    """An embedding engine reads an input in one batch of its context: a logits row and an
    embedding row per token, twice (~200 MB at 512 tokens for the embedded model, which
    measured +196 MB of RSS after a 500-token input)."""
    path = str(embedded_model_path())
    metadata = gguf.read_metadata(embedded_model_path())
    batch = gguf.embedding_batch_bytes(metadata, 512)
    assert batch == 512 * (49152 + 576) * 8
    generating = memory_needed(WorkerSpec(path, context_size=512, slots=1))
    embedding = memory_needed(WorkerSpec(path, context_size=512, slots=1, embedding=True))
    cache = gguf.prompt_cache_bytes(gguf.kv_cache_bytes(metadata, 512))
    assert embedding - (generating - cache) == batch  # and no prompt cache
    assert gguf.embedding_batch_bytes({"general.architecture": "llama"}, 512) is None


def test_a_generating_worker_needs_its_prompt_cache_on_top() -> None:
    """The engine sets prompts aside in host memory when another takes their slot: it
    was 1 GiB for every model and left out of the estimate (the embedded model's worker
    grew to ~1 GB after ~50 prompts of ~850 tokens, against an estimate of 312 MiB). Now
    room for four whole contexts, at most 1 GiB, counted."""
    path = str(embedded_model_path())
    metadata = gguf.read_metadata(embedded_model_path())
    context = gguf.kv_cache_bytes(metadata, 2048)
    assert context == 30 * 3 * (64 + 64) * 2 * 2048  # 45 MiB: 30 layers, 3 KV heads of 64
    assert gguf.prompt_cache_bytes(context) == 4 * context
    assert gguf.prompt_cache_bytes(None) == gguf.prompt_cache_bytes(1 << 40) == 1 << 30
    needed = memory_needed(WorkerSpec(path, context_size=2048, slots=2))
    weights = embedded_model_path().stat().st_size
    assert needed == weights + 2 * context + 4 * context + OVERHEAD_BYTES
