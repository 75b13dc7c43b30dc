"""What a worker is estimated to need, read from the embedded model's real header."""

from __future__ import annotations

from keel.models import gguf
from keel.models.manager import memory_needed
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
    assert embedding - generating == batch
    assert gguf.embedding_batch_bytes({"general.architecture": "llama"}, 512) is None
