"""The quality gate: a small ``keel eval`` sample that ``make test`` runs.

``make test`` runs it as a check of its own beside pytest, in Linux's idle scheduling
class, as it does mypy: it uses the cores the tests leave idle while they
wait on sockets and timers (about a sixth of pytest's time on 2 cores), instead
of holding one of pytest's two workers for 35-40 s.

Twenty cursor positions (ten in httpx, ten in click, half rest-of-line, half
next-block) are completed with the embedded model as keel serves them (the
prompt builder, the language's stop words, postprocessing), greedily. The
samples are stored beside the figures (``gate_samples.json``, cut from the
packages installed when they were recorded): drawn from whatever httpx a fresh
install brings, they changed with its releases, and so did the figures. Exact
match and edit similarity are compared with the figures recorded in
``gate_baseline.json``; the run fails when either falls below its record by
more than the sample's noise, one standard error of the recorded mean (for a
rate ``sqrt(p(1 - p) / n)``, for similarity the spread of the per-sample
scores over ``sqrt(n)``). Generation is deterministic, so an unchanged
pipeline scores as recorded; a change that moves a figure by less than the
noise is not one twenty samples can tell apart.

Re-record after a deliberate change (a better postprocessing step, a new
default model) on the stored samples, or on samples drawn again from the
installed packages::

    .venv/bin/python -m keel.eval.gate --rescore
    .venv/bin/python -m keel.eval.gate --record
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from keel.config import EMBEDDED_MODEL_ID, LocalModelConfig, Paths
from keel.eval.harness import package_root
from keel.eval.samples import Sample, sample_repository
from keel.eval.scoring import Score, Summary
from keel.pipeline.completion import build_prompt, read_until_stop
from keel.pipeline.languages import get_language, stop_words
from keel.pipeline.postprocess import postprocess
from keel.pipeline.prompt import split_lines
from keel.providers.base import CompletionProvider, GenerationParams

BASELINE = Path(__file__).with_name("gate_baseline.json")
SAMPLES = Path(__file__).with_name("gate_samples.json")
REPOSITORIES = ("httpx", "click")
SAMPLES_PER_REPOSITORY = 10
MAX_INPUT_LENGTH = 384
MAX_DECODING_TOKENS = 32
"""A small prompt and the local default decoding budget: 20 generations in 31-41 s on
one core."""
THREADS = 1
"""The engine's threads, fixed so that the figures do not depend on the machine's cores."""


@dataclass(frozen=True, slots=True)
class GateFigures:
    count: int
    exact_match: float
    edit_similarity: float
    exact_match_noise: float
    edit_similarity_noise: float

    @classmethod
    def of(cls, scores: Sequence[Score]) -> GateFigures:
        summary = Summary.of(scores)
        n = max(1, summary.count)
        p = summary.exact_match
        spread = statistics.pstdev([s.similarity for s in scores]) if scores else 0.0
        return cls(
            count=summary.count,
            exact_match=p,
            edit_similarity=summary.edit_similarity,
            exact_match_noise=math.sqrt(p * (1 - p) / n),
            edit_similarity_noise=spread / math.sqrt(n),
        )

    def regressions(self, recorded: GateFigures) -> list[str]:
        """What fell below ``recorded`` by more than its noise, or a sample of another
        size (empty: the gate passes)."""
        found = []
        if self.count != recorded.count:
            found.append(f"{self.count} samples scored, {recorded.count} recorded")
        for name in ("exact_match", "edit_similarity"):
            now, then = getattr(self, name), getattr(recorded, name)
            noise = getattr(recorded, f"{name}_noise")
            if now < then - noise:
                found.append(f"{name} {now:.3f} < recorded {then:.3f} - noise {noise:.3f}")
        return found


STORED_LINES = 60
"""Of the file before and after each cursor, the lines a stored sample keeps: the prompt
takes its :data:`MAX_INPUT_LENGTH` tokens from the 10-30 lines nearest the cursor."""


def gate_samples() -> list[Sample]:
    """The stored samples."""
    return [Sample(**row) for row in json.loads(SAMPLES.read_text("utf-8"))]


def draw_samples() -> list[Sample]:
    """Samples drawn again from the installed packages' files, cut to :data:`STORED_LINES`
    lines either side of the cursor, and stored."""
    drawn = [
        sample
        for name in REPOSITORIES
        for sample in sample_repository(name, package_root(name), SAMPLES_PER_REPOSITORY, seed=0)
    ]
    kept = [
        replace(
            sample,
            prefix="".join(split_lines(sample.prefix)[-STORED_LINES:]),
            suffix="".join(split_lines(sample.suffix)[:STORED_LINES]),
        )
        for sample in drawn
    ]
    rows = [asdict(sample) for sample in kept]
    SAMPLES.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", "utf-8")
    return kept


async def score_samples(provider: CompletionProvider, samples: Sequence[Sample]) -> list[Score]:
    """Complete every sample as keel's pipeline does and score what the editor would show."""
    language = get_language("python")
    params = GenerationParams(
        max_tokens=MAX_DECODING_TOKENS,
        temperature=0.0,
        stop=tuple(stop_words(language, provider.stop_words)),
        seed=0,
    )
    scores = []
    for sample in samples:
        built = await build_prompt(
            provider, language, sample.prefix, sample.suffix, [], MAX_INPUT_LENGTH
        )
        call = built.call(params)
        raw = await read_until_stop(built.generated(provider.stream_completion(call)), params.stop)
        shown = postprocess(raw, prefix=sample.prefix, suffix=sample.suffix, language=language)
        scores.append(Score.of(shown, sample.target))
    return scores


async def run_gate(model_id: str = EMBEDDED_MODEL_ID, *, record: bool = False) -> GateFigures:
    """The gate's figures for ``model_id`` (a local model, started and stopped here) on the
    stored samples; ``record``: on samples drawn again, which are then stored."""
    from keel.models.registry import resolve_model
    from keel.providers.catalog import build_local_provider

    config = LocalModelConfig(model_id=model_id, context_size=1024, parallelism=1, threads=THREADS)
    path = resolve_model(model_id, Paths.from_env())
    # Patient: at the lowest priority beside the tests, loading can wait its turn.
    provider = build_local_provider("completion", config, path, ready_timeout=600.0)
    await provider.start()
    try:
        samples = draw_samples() if record else gate_samples()
        return GateFigures.of(await score_samples(provider, samples))
    finally:
        await provider.aclose()


def recorded() -> GateFigures:
    return GateFigures(**json.loads(BASELINE.read_text("utf-8")))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="keel's completion quality gate")
    parser.add_argument(
        "--record",
        action="store_true",
        help=f"draw the samples again; write {SAMPLES.name} and {BASELINE.name}",
    )
    parser.add_argument(
        "--rescore", action="store_true", help=f"score the stored samples; write {BASELINE.name}"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    figures = asyncio.run(run_gate(record=args.record))
    if args.record or args.rescore:
        BASELINE.write_text(json.dumps(asdict(figures), indent=2) + "\n", "utf-8")
        print(json.dumps(asdict(figures), indent=2))
        return 0
    then = recorded()
    failed = figures.regressions(then)
    print(
        f"quality gate: {'FAILED' if failed else 'passed'} in {time.monotonic() - started:.0f} s,"
        f" exact match {figures.exact_match:.3f} (recorded {then.exact_match:.3f}"
        f" ± {then.exact_match_noise:.3f}), edit similarity {figures.edit_similarity:.3f}"
        f" (recorded {then.edit_similarity:.3f} ± {then.edit_similarity_noise:.3f}),"
        f" {figures.count} samples"
    )
    for line in failed:
        print(f"regression: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
