"""``keel eval``: completion quality on real repositories, configurations side by side.

The harness runs in-process against keel's real local worker (a child
process running the GGUF model through llama.cpp, as ``keel serve`` does),
not over HTTP: the configurations differ in steps *inside* the pipeline
(whether the suffix is used, whether postprocessing runs, whether
repository snippets are added), and in-process it can run one generation
and score it with and without postprocessing instead of paying for two. The
steps are the pipeline's own functions (:func:`build_prompt`, the stop
words, :func:`postprocess`, the index's retriever), in
:class:`~keel.serving.completion.CompletionServing`'s order.

Configurations, each adding one thing to the previous:

- ``prefix-only``: the prompt is the prefix; the raw generation is shown.
- ``fim``: the suffix is given to the prompt builder too. For a model with
  no FIM template (the embedded SmolLM2) the builder drops it, so this is
  the same prompt as ``prefix-only``; the table says so.
- ``+postprocess``: the ``fim`` generation, postprocessed.
- ``+repo context``: snippets retrieved from the repository's index (the
  file being completed excluded) go before the prefix; postprocessed.

Generation is greedy (temperature 0) with a fixed seed, and identical
prompts are generated once.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from keel.config import EMBEDDED_MODEL_ID, IndexConfig, LocalModelConfig, Paths, RepositoryConfig
from keel.errors import RequestError, UpstreamError
from keel.eval.arguments import DEFAULT_PACKAGES
from keel.eval.samples import Sample, sample_repository
from keel.eval.scoring import Score, Summary
from keel.index.retrieve import RepositoryRetriever
from keel.pipeline.completion import BuiltPrompt, build_prompt, cut_at_stop
from keel.pipeline.cut import Cut
from keel.pipeline.languages import Language, get_language, stop_words
from keel.pipeline.postprocess import postprocess
from keel.providers.base import CompletionProvider, GenerationParams, close_stream

CONFIGS = ("prefix-only", "fim", "+postprocess", "+repo context")
HEALING = "+token healing"
_WORD = re.compile(r"[A-Za-z0-9_]+$")
ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class EvalOptions:
    repositories: Sequence[tuple[str, Path]]
    samples: int = 40
    seed: int = 0
    max_input_length: int = 640
    max_decoding_tokens: int = 48
    output: Path = Path("bench/results")
    model_id: str = EMBEDDED_MODEL_ID
    threads: int | None = None
    min_score: float = IndexConfig().min_score
    max_snippets: int = IndexConfig().max_snippets
    token_healing: bool = False
    """Also score ``+token healing`` (see :func:`heal`)."""


@dataclass(slots=True)
class SampleResult:
    sample: Sample
    outputs: dict[str, str] = field(default_factory=dict)
    scores: dict[str, Score] = field(default_factory=dict)
    snippets: list[str] = field(default_factory=list)
    """Paths of the repository snippets that made it into the ``+repo context`` prompt."""


@dataclass(slots=True)
class EvalReport:
    options: EvalOptions
    model: str
    fim_used: bool
    results: list[SampleResult]
    seconds: float
    generations: int
    index_seconds: float
    failures: list[str] = field(default_factory=list)

    @property
    def configs(self) -> tuple[str, ...]:
        return (*CONFIGS, HEALING) if self.options.token_healing else CONFIGS

    def summary(self, repo: str | None = None, config: str = CONFIGS[0]) -> Summary:
        return Summary.of(
            r.scores[config] for r in self.results if repo is None or r.sample.repo == repo
        )


def package_root(name: str) -> Path:
    """The source directory of an installed Python package."""
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:  # "a.b" where there is no package a: a traceback
        spec = None
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        raise RequestError(
            f"--repo {name}: no package {name!r} is installed here; give --repo NAME=PATH"
        )
    return Path(next(iter(locations)))


def parse_repo(value: str) -> tuple[str, Path]:
    """``NAME=PATH`` or the name of an installed package. NAME is checked as
    ``[[repositories]] name`` is (it names the index's directory): an empty one
    (``--repo =/tmp``) ended in pydantic's traceback."""
    name, sep, path = value.partition("=")
    try:
        RepositoryConfig(name=name)
    except ValidationError:
        said = "an empty name" if not name else f"{name!r} is no repository name"
        raise RequestError(
            f"--repo {value!r}: {said}: write NAME=PATH or an installed package's name, "
            "NAME a letter or digit, then letters, digits, '.', '_' or '-' (64 at most)"
        ) from None
    if sep:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise RequestError(f"--repo {value!r}: {root} is not a directory")
        return name, root
    return name, package_root(name)


async def _generate(
    provider: CompletionProvider, built: BuiltPrompt, stops: Sequence[str], params: GenerationParams
) -> str:
    stream = built.generated(provider.stream_completion(built.call(params)))
    text = ""
    try:
        async for piece in stream:
            text, stopped = cut_at_stop(text + piece, stops)
            if stopped:
                break
    finally:
        await close_stream(stream)
    return text


async def heal(
    run: Callable[[BuiltPrompt], Awaitable[str]],
    provider: CompletionProvider,
    language: Language,
    sample: Sample,
    budget: int,
    *,
    unhealed: str,
) -> str:
    """Token healing: with the cursor inside a word (``retu|``), the prompt ends at the
    word's start, so the model sees whole tokens, and the generation must begin with
    the cut-off part, which is then dropped. The engine takes no constraint on the
    first token, so a generation that does not begin with it falls back to the
    unhealed completion (``unhealed``)."""
    cut = _WORD.search(sample.prefix)
    if cut is None:
        return unhealed
    fragment = cut.group()
    head = sample.prefix[: cut.start()]
    raw = await run(await build_prompt(provider, language, head, sample.suffix, [], budget))
    if not raw.startswith(fragment) or len(raw) == len(fragment):
        return unhealed
    return postprocess(
        raw[len(fragment) :], prefix=sample.prefix, suffix=sample.suffix, language=language
    )


async def evaluate(
    options: EvalOptions,
    provider: CompletionProvider,
    retriever: RepositoryRetriever,
    samples: Sequence[Sample],
    log: Any = sys.stderr,
) -> tuple[list[SampleResult], int, list[str]]:
    """Score every sample under every configuration.

    Returns the results, the number of distinct generations and the failed
    attempts (a generation that fails :data:`ATTEMPTS` times scores as empty).
    """
    language = get_language("python")
    stops = stop_words(language, provider.stop_words)
    params = GenerationParams(
        max_tokens=options.max_decoding_tokens, temperature=0.0, stop=tuple(stops), seed=0
    )
    roots = {repo.name: repo.root for repo in retriever.repositories}
    generated: dict[tuple[str, str | None, Cut], str] = {}
    failures: list[str] = []
    results = [SampleResult(sample) for sample in samples]
    budget = options.max_input_length

    async def run(built: BuiltPrompt) -> str:
        key = (built.prompt, built.suffix, built.cut)
        if key not in generated:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    generated[key] = await _generate(provider, built, stops, params)
                    break
                except UpstreamError as exc:  # a crashed worker restarts; the run goes on
                    failures.append(f"attempt {attempt}: {exc.message}")
                    log.write(f"generation failed ({exc.message}); attempt {attempt}\n")
                    await asyncio.sleep(2.0)
            else:
                generated[key] = ""
        return generated[key]

    # Two passes, context-free prompts first: consecutive prompts from one file then share
    # their beginning, which the local worker reuses from its cache.
    total = len(results)
    for number, result in enumerate(results, 1):
        s = result.sample
        started = time.monotonic()
        plain = await build_prompt(provider, language, s.prefix, "", [], budget)
        fim = await build_prompt(provider, language, s.prefix, s.suffix, [], budget)
        result.outputs["prefix-only"] = await run(plain)
        result.outputs["fim"] = await run(fim)
        result.outputs["+postprocess"] = postprocess(
            result.outputs["fim"], prefix=s.prefix, suffix=s.suffix, language=language
        )
        if options.token_healing:
            result.outputs[HEALING] = await heal(
                run, provider, language, s, budget, unhealed=result.outputs["+postprocess"]
            )
        log.write(
            f"[{number}/{total}] {s.repo} {s.relpath}:{s.line + 1} {s.kind} "
            f"{time.monotonic() - started:.1f}s\n"
        )
    for number, result in enumerate(results, 1):
        s = result.sample
        started = time.monotonic()
        filepath = str(roots[s.repo] / s.relpath)
        snippets = await retriever.retrieve(
            prefix=s.prefix, filepath=filepath, git_url=None, language=language.name
        )
        built = await build_prompt(provider, language, s.prefix, s.suffix, snippets, budget)
        result.snippets = [snippet.filepath for snippet in built.snippets]
        raw = await run(built)
        result.outputs["+repo context"] = postprocess(
            raw, prefix=s.prefix, suffix=s.suffix, language=language
        )
        log.write(
            f"[{number}/{total}] {s.repo} {s.relpath}:{s.line + 1} {s.kind} with "
            f"{len(built.snippets)} snippets {time.monotonic() - started:.1f}s\n"
        )
    for result in results:
        result.scores = {
            config: Score.of(output, result.sample.target)
            for config, output in result.outputs.items()
        }
    return results, len(generated), failures


def render_table(report: EvalReport) -> str:
    """The Markdown table of exact match / edit similarity per repository and configuration."""
    repos = list(dict.fromkeys(r.sample.repo for r in report.results))
    header = ["configuration"]
    for repo in [*repos, "all"]:
        n = report.summary(None if repo == "all" else repo).count
        header += [f"{repo} EM (n={n})", f"{repo} ES"]
    header.append("all first-line EM")
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for config in report.configs:
        label = config
        if config == "fim" and not report.fim_used:
            label = "fim (suffix unused: no FIM template, same prompt as prefix-only)"
        cells = [label]
        for name in [*repos, None]:
            summary = report.summary(name, config)
            cells += [f"{summary.exact_match:.1%}", f"{summary.edit_similarity:.3f}"]
        cells.append(f"{report.summary(None, config).first_line_match:.1%}")
        rows.append("| " + " | ".join(cells) + " |")
    with_snippets = sum(1 for r in report.results if r.snippets)
    shown = sum(len(r.snippets) for r in report.results)
    rows.append("")
    rows.append(
        f"model {report.model}, {len(report.results)} samples (half rest-of-line, half "
        f"next-block), {report.generations} generations in {report.seconds:.0f}s "
        f"(+{report.index_seconds:.1f}s indexing); repository snippets in "
        f"{with_snippets}/{len(report.results)} prompts ({shown} in all); "
        f"max_input_length {report.options.max_input_length}, "
        f"max_decoding_tokens {report.options.max_decoding_tokens}, seed {report.options.seed}."
    )
    if report.failures:
        rows.append(
            f"{len(report.failures)} failed generation attempts were retried: see eval.json."
        )
    return "\n".join(rows)


def write_plot(report: EvalReport, path: Path) -> bool:
    """Bar charts of both metrics; False when matplotlib is not installed (``keel[eval]``)."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    repos = [*dict.fromkeys(r.sample.repo for r in report.results), "all"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(repos)
    for axis, metric, title in (
        (axes[0], "exact_match", "exact match"),
        (axes[1], "edit_similarity", "edit similarity"),
    ):
        for offset, repo in enumerate(repos):
            values = [
                getattr(report.summary(None if repo == "all" else repo, config), metric)
                for config in report.configs
            ]
            positions = [
                i + (offset - (len(repos) - 1) / 2) * width for i in range(len(report.configs))
            ]
            axis.bar(positions, values, width, label=repo)
        axis.set_xticks(range(len(report.configs)), report.configs, rotation=15)
        axis.set_title(title)
        axis.set_ylim(0, 1)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend()
    figure.suptitle(f"keel eval: {report.model}, {len(report.results)} samples")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_json(report: EvalReport, path: Path) -> None:
    data = {
        "model": report.model,
        "fim_used": report.fim_used,
        "options": {
            **{k: v for k, v in asdict(report.options).items() if k != "repositories"},
            "output": str(report.options.output),
            "repositories": {name: str(root) for name, root in report.options.repositories},
        },
        "seconds": report.seconds,
        "index_seconds": report.index_seconds,
        "generations": report.generations,
        "failures": report.failures,
        "summary": {
            repo or "all": {
                config: asdict(report.summary(repo, config)) for config in report.configs
            }
            for repo in [*dict.fromkeys(r.sample.repo for r in report.results), None]
        },
        "samples": [
            {
                **{k: v for k, v in asdict(r.sample).items() if k not in ("prefix", "suffix")},
                "outputs": r.outputs,
                "scores": {config: asdict(score) for config, score in r.scores.items()},
                "snippets": r.snippets,
            }
            for r in report.results
        ],
    }
    path.write_text(json.dumps(data, indent=1) + "\n", "utf-8")


async def run_eval(options: EvalOptions, provider: CompletionProvider) -> EvalReport:
    """Index the repositories, sample, evaluate; the provider must be started."""
    samples = []
    for name, path in options.repositories:
        drawn = sample_repository(name, path, options.samples, options.seed)
        if not drawn:  # a table of zeros read as a measurement, with exit 0
            raise RequestError(
                f"repository {name} ({path}) has no Python code to sample: nothing to "
                "evaluate; give --repo NAME=PATH with a directory of Python files"
            )
        samples += drawn
    started = time.monotonic()
    root = options.output / "eval-root"
    retriever = RepositoryRetriever.from_settings(
        [RepositoryConfig(name=name, path=str(path)) for name, path in options.repositories],
        IndexConfig(min_score=options.min_score, max_snippets=options.max_snippets),
        Paths(root),
    )
    await asyncio.to_thread(retriever.update)
    index_seconds = time.monotonic() - started
    started = time.monotonic()
    results, generations, failures = await evaluate(options, provider, retriever, samples)
    return EvalReport(
        options=options,
        model=provider.name,
        fim_used=provider.prompt_template is not None or provider.supports_suffix,
        results=results,
        seconds=time.monotonic() - started,
        generations=generations,
        index_seconds=index_seconds,
        failures=failures,
    )


def _check_numbers(args: argparse.Namespace) -> None:
    """The numeric options, checked before anything loads: ``--threads 0`` ended in
    pydantic's traceback once the model was about to load."""
    if args.samples < 2:
        raise RequestError("--samples must be at least 2 (one of each kind)")
    if args.threads is not None and args.threads < 1:
        raise RequestError(
            f"--threads must be 1 or more (got {args.threads}); leave it out for the cores "
            "keel may run on"
        )
    for option, value in (
        ("--max-input-length", args.max_input_length),
        ("--max-decoding-tokens", args.max_decoding_tokens),
    ):
        if value < 1:
            raise RequestError(f"{option} must be 1 or more tokens (got {value})")
    context = _context_size(args.max_input_length, args.max_decoding_tokens)
    try:
        LocalModelConfig(context_size=context)
    except ValidationError:
        raise RequestError(
            f"--max-input-length {args.max_input_length} and --max-decoding-tokens "
            f"{args.max_decoding_tokens} need a context of {context:,} tokens, more than a "
            "local model takes (context_size): give smaller ones"
        ) from None


def _context_size(max_input_length: int, max_decoding_tokens: int) -> int:
    return max(2048, max_input_length + max_decoding_tokens + 64)


def _output(text: str) -> Path:
    """``--output``, made now: a file there ended in ``FileExistsError``'s traceback."""
    output = Path(text)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RequestError(
            f"--output {text}: {output} is a file, not a directory; name a directory for "
            "eval.md, eval.json and eval.png"
        ) from None
    except OSError as exc:
        raise RequestError(
            f"--output {text}: cannot make the directory ({exc.strerror or exc}); name one "
            "keel can write"
        ) from None
    return output


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The options of ``args``, each checked (a usage error names the option), and the
    output directory made: all before a model loads."""
    _check_numbers(args)
    repos = [parse_repo(value) for value in (args.repo or DEFAULT_PACKAGES)]
    return EvalOptions(
        repositories=repos,
        samples=args.samples,
        seed=args.seed,
        max_input_length=args.max_input_length,
        max_decoding_tokens=args.max_decoding_tokens,
        output=_output(args.output),
        model_id=args.model,
        threads=args.threads,
        token_healing=args.token_healing,
    )


async def _run_local(options: EvalOptions) -> EvalReport:
    from keel.models.registry import resolve_model
    from keel.providers.catalog import build_local_provider

    config = LocalModelConfig(
        model_id=options.model_id,
        context_size=_context_size(options.max_input_length, options.max_decoding_tokens),
        threads=options.threads,
        parallelism=1,
    )
    path = resolve_model(options.model_id, Paths.from_env())
    provider = build_local_provider("completion", config, path, ready_timeout=120.0)
    await provider.start()
    try:
        return await run_eval(options, provider)
    finally:
        await provider.aclose()


def run_from_args(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    report = asyncio.run(_run_local(options))
    table = render_table(report)
    (options.output / "eval.md").write_text(table + "\n", "utf-8")
    write_json(report, options.output / "eval.json")
    plotted = write_plot(report, options.output / "eval.png")
    print(table)
    written = "eval.md, eval.json" + (
        ", eval.png" if plotted else " (no plot: pip install matplotlib)"
    )
    print(f"\nwrote {options.output}/: {written}")
    return 0
