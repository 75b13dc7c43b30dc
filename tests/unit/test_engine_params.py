"""The engine's parameters as the worker builds them from its command line (llama.cpp's
own ``CommonParams``; nothing is loaded)."""

from __future__ import annotations

import xllamacpp

from keel.providers.base import LLAMACPP_RANDOM_SEED, llamacpp_seed
from keel.workers.supervisor import WorkerSpec
from keel.workers.worker import PREFILL_BATCH, _engine_params, _parse_args


def params(*extra: str) -> xllamacpp.CommonParams:
    return _engine_params(xllamacpp, _parse_args(["--model", "m.gguf", *extra]), "key")


def test_prompts_are_read_in_keels_batches_unless_told_otherwise() -> None:
    default = params("--slots", "2")
    assert default.n_batch == default.n_ubatch == PREFILL_BATCH == 64
    assert default.n_parallel == 2
    assert default.n_ctx == 2 * 2048  # the engine splits its context among the slots
    chosen = params("--prefill-batch", "32")  # what bench/engine.py compares
    assert chosen.n_batch == chosen.n_ubatch == 32


def test_the_supervisor_passes_a_prefill_batch_only_when_given() -> None:
    default = WorkerSpec("m.gguf", slots=2).command()
    assert "--prefill-batch" not in default
    chosen = WorkerSpec("m.gguf", prefill_batch=32).command()
    argv = chosen[chosen.index("--model") :]
    assert _parse_args(argv).prefill_batch == 32


def test_a_seed_that_fits_llamacpp_is_kept_and_any_other_hashed_into_it() -> None:
    assert [llamacpp_seed(s) for s in (None, 0, 7, LLAMACPP_RANDOM_SEED - 1)] == [
        None,
        0,
        7,
        LLAMACPP_RANDOM_SEED - 1,
    ]
    hashed = [llamacpp_seed(s) for s in (LLAMACPP_RANDOM_SEED, -1, 2**32, 2**63 - 1, -(2**63))]
    assert all(0 <= s < LLAMACPP_RANDOM_SEED for s in hashed if s is not None), hashed
    assert len(set(hashed)) == len(hashed)
    assert llamacpp_seed(-1) == llamacpp_seed(-1)
