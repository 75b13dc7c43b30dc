"""``make bench``: every benchmark in one run, one table, JSON and plots.

Runs, in order, each in its own processes on loopback: gateway overhead
(direct, keel, keel with proposed fixes, LiteLLM), failover, local inference
(the raw engine, xllamacpp in process and over its own HTTP listener, versus
keel), the local engine under two clients (head-of-line blocking and
cancellation, ``bench/local_serving.py``),
the typing simulator (``bench/typing_sim.py``) and the soak. A benchmark that fails
is reported as "not run (why)" and the others still run. The bench reports;
it does not assert: the exit status is 0 unless the harness itself broke.

Figures go to ``bench/results/<name>.json`` (and ``summary.json`` with the
table and the machine), plots to ``bench/results/*.png``.

    .venv/bin/python bench/run.py [--quick] [--soak-seconds 60] [--only gateway,soak]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import failover  # noqa: E402
import gateway  # noqa: E402
import inference  # noqa: E402
import local_serving  # noqa: E402
import soak  # noqa: E402
from common import log  # noqa: E402

Row = tuple[str, str, str, str, str, str, str]
"""benchmark, scenario, measured, compared with, result, target, met"""

BENCHMARKS = ("gateway", "failover", "inference", "local_serving", "typing", "soak")


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"


def met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


# --- rows of the table, one function per benchmark ------------------------------


def gateway_rows(result: dict[str, Any]) -> list[Row]:
    return gateway.rows(result)


def failover_rows(result: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    targets = {"refuse": 50.0}
    for mode, figures in result["modes"].items():
        first = figures["first_p50_ms"]
        target = targets.get(mode)
        served = f"{figures['served_by_fallback']}/{figures['served'] + figures['failed']} served"
        rows.append(
            (
                "failover",
                f"primary {mode}: 1st request",
                f"p50 {ms(first)}, max {ms(figures['first_max_ms'])}",
                f"then routed around: p50 {ms(figures['routed_around_p50_ms'])}",
                served + " by fallback",
                f"p50 < {target:.0f} ms" if target else "(timeout 2 s, 2 attempts)",
                met(first is not None and first < target) if target else "-",
            )
        )
    breaker = result["breaker"]
    rows.append(
        (
            "failover",
            "breaker open: requests to primary",
            f"{breaker['sent_while_open']} sent while open",
            f"primary hit {breaker['primary_hits_total']}x in all; "
            f"opened at request {breaker['breaker_opened_at_request']}",
            f"{breaker['concurrent']['primary_hits']} hits under 16 clients",
            "0",
            met(breaker["sent_while_open"] == 0),
        )
    )
    return rows


def inference_rows(result: dict[str, Any]) -> list[Row]:
    rows = inference_pair(result)
    if "core_left" in result:
        rows += inference_pair(result["core_left"], " (a core left for keel)")
    return rows


def ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}x"


def inference_pair(result: dict[str, Any], note: str = "") -> list[Row]:
    raw, keel = result["raw"], result["keel"]
    setup = result["setup"]
    count = setup["threads"]
    threads = f"{count} thread{'s' if count != 1 else ''}"
    threads += "" if setup.get("threads_set") else " (default)"
    scenario = f"{setup['prompt_tokens']}-token cold prompt, {threads}{note}"
    decode, ttft = result["decode_ratio"], result["ttft_ratio"]
    return [
        (
            "inference",
            f"keel local vs raw engine: decode, {scenario}",
            f"{keel['decode_tps_p50']:.1f} tok/s",
            f"raw {raw['decode_tps_p50']:.1f} tok/s",
            f"{ratio_text(decode)} raw",
            ">= 0.95x raw",
            met(decode is not None and decode >= 0.95),
        ),
        (
            "inference",
            f"keel local vs raw engine: time to first token{note}",
            ms(keel["ttft_ms_p50"]),
            f"raw {ms(raw['ttft_ms_p50'])}",
            f"{ratio_text(ttft)} raw speed",
            ">= 0.95x raw",
            met(ttft is not None and ttft >= 0.95),
        ),
        (
            "inference",
            f"keel local vs the raw engine over its own HTTP listener (llama-server's API,"
            f" what runs without keel): decode / time to first token{note}",
            f"{keel['decode_tps_p50']:.1f} tok/s / {ms(keel['ttft_ms_p50'])}",
            f"raw over HTTP {result['raw_http']['decode_tps_p50']:.1f} tok/s"
            f" / {ms(result['raw_http']['ttft_ms_p50'])}",
            f"{ratio_text(result['decode_ratio_http'])} / {ratio_text(result['ttft_ratio_http'])}",
            "(for comparison)",
            "-",
        ),
    ]


def local_serving_rows(result: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    tokens = local_serving.LONG_TOKENS
    for key, what in (
        ("head_of_line", f"{tokens} tokens generate"),
        ("head_of_line_chats", f"two chat answers of {tokens} tokens run"),
    ):
        hol = result.get(key)
        if hol is None:
            continue
        ratio = hol["ratio"]
        note = "" if hol["all_overlapped"] else " (a generation ended first)"
        rows.append(
            (
                "local",
                f"head-of-line: Tabby completion while {what}",
                f"p50 {ms(hol['busy_ms_p50'])}",
                f"idle p50 {ms(hol['idle_ms_p50'])}",
                ("-" if ratio is None else f"{ratio:.2f}x idle") + note,
                "<= 2x idle",
                met(ratio is not None and ratio <= 2),
            )
        )
    beside = result["beside_embeddings"]
    ratio = beside["ratio"]
    rows.append(
        (
            "local",
            f"Tabby completion while {local_serving.EMBED_INPUTS} chunks are embedded"
            f" (batch {beside['embedding_status']} in {beside['embedding_seconds']:.0f} s)",
            f"p50 {ms(beside['busy_ms_p50'])}, max {ms(beside['busy_ms_max'])}",
            f"idle p50 {ms(beside['idle_ms_p50'])}",
            "-" if ratio is None else f"{ratio:.2f}x idle",
            "<= 2x idle",
            met(ratio is not None and ratio <= 2 and beside["embedding_status"] == 200),
        )
    )
    for case, figures in result["cancellation"].items():
        if not figures["cancelled"]:
            measured, outcome, ok = "not measured (keel did not cancel it)", "-", None
        else:
            measured = f"p50 {ms(figures['free_ms_p50'])}"
            outcome = f"max {ms(figures['free_ms_max'])}"
            ok = figures["free_ms_p50"] is not None and figures["free_ms_p50"] <= 100
        rows.append(
            (
                "local",
                f"cancellation ({case}): client close -> slot free",
                measured,
                f"{len(figures['runs'])} runs",
                outcome,
                "<= 100 ms",
                met(ok),
            )
        )
    return rows


def typing_rows(result: dict[str, Any]) -> list[Row]:
    ratio = result.get("warm_over_cold")
    paused = result.get("paused_latency_ms_p50")
    raw = result.get("raw_engine") or {}
    raw_text = (
        f"; raw engine, the same typing: {ms(raw.get('warm_first_token_ms_p50'))} / "
        f"{ms(raw.get('cold_first_token_ms_p50'))} ({ratio_text(raw.get('warm_over_cold'))})"
        if raw
        else ""
    )
    return [
        (
            "typing",
            "warm vs cold time to first token",
            f"warm {ms(result.get('warm_first_token_ms_p50'))}",
            f"cold {ms(result.get('cold_first_token_ms_p50'))}{raw_text}",
            f"{ratio_text(ratio)} cold",
            "<= 0.01x cold",
            met(ratio is not None and ratio <= 0.01),
        ),
        (
            "typing",
            "paused-request latency",
            f"p50 {ms(paused)}",
            f"p90 {ms(result.get('paused_latency_ms_p90'))}",
            f"{result.get('superseded')} of {result.get('keystroke_requests')} superseded, "
            f"{result.get('worker_cancelled')} cancelled in the worker; pauses answered by "
            + ", ".join(f"{k} {v}" for k, v in (result.get("paused_sources") or {}).items()),
            "p50 <= 140 ms",
            met(paused is not None and paused <= 140),
        ),
    ]


def soak_rows(result: dict[str, Any]) -> list[Row]:
    setup = result["setup"]
    growth = result["rss_growth"]
    rss = result["rss_kib"]
    scenario = f"{setup['clients']} clients, {setup['duration_s']:.0f} s"
    return [
        (
            "soak",
            f"{scenario}: errors",
            f"{result['unexpected_errors']} unexpected",
            f"{result['ok']:,} ok, {result['rejected_429']:,} designed 429",
            f"{result['ok_rps']:.0f} ok req/s, "
            f"p50 {ms(result['p50_ms'])} p99 {ms(result['p99_ms'])}",
            "0 errors besides 429",
            met(result["unexpected_errors"] == 0 and result["keel_alive_at_end"]),
        ),
        (
            "soak",
            f"{scenario}: keel RSS",
            f"end {rss['end'] / 1024:.1f} MiB",
            f"at {setup['settled_s']:.0f} s {rss['start'] / 1024:.1f} MiB "
            f"(at {setup['warmup_s']:.0f} s {rss['warm'] / 1024:.1f}, "
            f"idle {rss['idle'] / 1024:.1f})",
            "-" if growth is None else f"{growth * 100:+.1f}%",
            "growth < 10% from a third in",
            met(growth is not None and growth < 0.10),
        ),
    ]


# --- running -------------------------------------------------------------------


def run_typing(timeout: float) -> dict[str, Any]:
    script = common.BENCH / "typing_sim.py"
    if not script.exists():
        raise RuntimeError("bench/typing_sim.py not present")
    out = common.RESULTS / "typing.json"
    out.unlink(missing_ok=True)
    subprocess.run(
        [common.PYTHON, str(script), "--json", str(out)],
        check=True,
        timeout=timeout,
        cwd=common.ROOT,
    )
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def render(rows: list[Row]) -> str:
    header: Row = ("benchmark", "scenario", "measured", "compared with", "result", "target", "met")
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def line(row: Row) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak-seconds", type=float, default=60.0)
    parser.add_argument("--soak-clients", type=int, default=500)
    parser.add_argument("--gateway-seconds", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="short runs, to try the harness")
    parser.add_argument("--only", default=",".join(BENCHMARKS))
    args = parser.parse_args()
    if args.quick:
        args.soak_seconds, args.gateway_seconds = min(args.soak_seconds, 10), 2.0
    only = set(args.only.split(","))
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    machine = common.machine()
    log(f"machine: {machine['nproc']} x {machine['cpu']}, Python {machine['python']}")

    steps: list[tuple[str, Callable[[], dict[str, Any]], Callable[..., list[Row]], Any]] = [
        (
            "gateway",
            lambda: gateway.run(args.gateway_seconds),
            gateway_rows,
            gateway.plot,
        ),
        (
            "failover",
            lambda: failover.run(cycles=3 if args.quick else 6),
            failover_rows,
            failover.plot,
        ),
        (
            "inference",
            lambda: inference.run_with_a_core_left(prompts=2 if args.quick else inference.PROMPTS),
            inference_rows,
            None,
        ),
        (
            "local_serving",
            lambda: local_serving.run(repeats=2 if args.quick else 5),
            local_serving_rows,
            local_serving.plot,
        ),
        ("typing", lambda: run_typing(timeout=600), typing_rows, None),
        (
            "soak",
            lambda: soak.run(args.soak_clients, args.soak_seconds),
            soak_rows,
            soak.plot,
        ),
    ]
    rows: list[Row] = []
    timings: dict[str, float] = {}
    for name, execute, to_rows, plot in steps:
        if name not in only:
            continue
        log(f"== {name}")
        began = time.monotonic()
        try:
            result = execute()
            common.write_json(name, result)
            if plot is not None:
                try:
                    plot(result, common.RESULTS / f"{name}.png")
                except Exception as exc:  # noqa: BLE001 - a plot must not lose the figures
                    log(f"{name}: plot failed: {exc}")
            rows += to_rows(result)
        except Exception as exc:  # noqa: BLE001 - one benchmark failing must not stop the rest
            why = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            log(f"{name} failed: {traceback.format_exc()}")
            rows.append((name, "-", f"not run ({why})", "-", "-", "-", "-"))
        timings[name] = round(time.monotonic() - began, 1)

    table = render(rows)
    total = time.monotonic() - started
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    head = (
        f"keel bench: {machine['nproc']} cores ({machine['cpu']}), Python {machine['python']}, "
        f"{versions}; load average at start {machine['loadavg_at_start']}; "
        f"keel {machine['keel_commit']}; {machine['date']}; {total / 60:.1f} min"
    )
    common.write_json(
        "summary",
        {"machine": machine, "rows": rows, "timings_s": timings, "table": table, "head": head},
    )
    print()
    print(head)
    print(table)
    print(f"figures: {common.RESULTS}/*.json, plots: {common.RESULTS}/*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
