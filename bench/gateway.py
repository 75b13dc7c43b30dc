"""Gateway overhead: the same load direct to a fast fake upstream, through keel,
and through LiteLLM's proxy, side by side in one run.

Setup: ``bench/upstream.py`` (raw asyncio on uvloop, keep-alive, 8 tokens per
answer) in one process; keel (``keel serve``, one process) in another, with
its DEFAULT config apart from the backend's address (no ``rate_limit``, default
admission: a default that caps throughput shows here as a failed row);
LiteLLM's proxy (``bench/.venv-peers``, one worker, default settings) in a
third; ``bench/loadgen.py`` in a fourth. The request is ``POST
/v1/chat/completions`` with a short message, plain or ``"stream": true``, at
concurrency 1, 4, 16, 32 and 64 (the throughput-versus-p99 curve). Scenarios
run target after target back to back, so a noisy neighbour hits all alike.

Then the issue's own setup for the throughput ratio: the same c=32 runs against
a Starlette upstream (``bench/upstream.py --starlette``, what the issue measured
direct at 5,091 req/s), direct, through a second default-config keel, and through
the two thinnest Python gateways (``bench/floor_proxy.py``): one that relays bytes,
and one that, as keel does, always asks the upstream for a stream and re-encodes
the answer. They say how much of keel's cost is keel's and how much is Python's
and the design's. The raw upstream answers ~14x faster than any Python web
framework, so a ratio against it measures Python against prebuilt bytes, not the
gateway; the curve keeps it, for added latency, and the ratio row uses the
framework's floor.

Then the "no cap" run: default-config keel at concurrency 32 for 10,000
requests with no warm-up, its latency in completion order; a limiter that
empties after a burst (Tabby's default 1,200/min did: 50 ms per request after
the first 1,200) shows as a step between the first and the last requests.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import common
from common import CHAT_BODY, Process, Processes, log

CONCURRENCY = (1, 4, 16, 32, 64)
MODES = (False, True)
SCENARIOS = [(c, stream) for stream in MODES for c in CONCURRENCY]
NO_CAP_REQUESTS = 10_000
NO_CAP_CONCURRENCY = 32


def scenario_name(concurrency: int, stream: bool) -> str:
    return f"c={concurrency} {'stream' if stream else 'plain'}"


def keel_default_config(upstream_url: str) -> str:
    """keel's defaults, only the backend's address given; the completion role
    skips the embedded last resort so no local model loads for a chat bench."""
    parts = []
    for role, kind in (("completion", "openai/completion"), ("chat", "openai/chat")):
        parts.append(f"[model.{role}]\nembedded_last_resort = false\n")
        parts.append(f"[model.{role}.http]\n{common.http_provider(kind, upstream_url)}")
    return "\n".join(parts)


def litellm_binary() -> Path | None:
    binary = common.PEERS_VENV / "bin" / "litellm"
    return binary if binary.exists() else None


def litellm_version() -> str | None:
    python = common.PEERS_VENV / "bin" / "python"
    if not python.exists():
        return None
    import subprocess

    out = subprocess.run(
        [str(python), "-c", "from importlib.metadata import version; print(version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or None


def start_litellm(group: Processes, upstream_url: str) -> Process:
    binary = litellm_binary()
    if binary is None:
        raise RuntimeError("not installed (run `make bench-peers`)")
    config = group.workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: fake-model\n"
        "    litellm_params:\n"
        "      model: openai/fake-model\n"
        f"      api_base: {upstream_url}/v1\n"
        "      api_key: sk-bench\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    port = common.free_port()
    env = {
        # Offline: no fetch of the model cost map, no telemetry.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "NO_DOCKER": "1",
    }
    argv = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    process = group.start("litellm", [*argv, "--num_workers", "1"], env=env)
    process.url = f"http://127.0.0.1:{port}"
    common.wait_http(f"{process.url}/health/liveliness", process, 120)
    return process


def run(duration: float = 3.0, *, peers: bool = True) -> dict[str, Any]:
    result: dict[str, Any] = {
        "setup": {
            "request": "POST /v1/chat/completions, 1 short user message, 8-token answer",
            "duration_s": duration,
            "warmup_s": 1.0,
            "concurrency": list(CONCURRENCY),
            "upstream": "bench/upstream.py (asyncio+uvloop, keep-alive)",
            "keel": "one process, default config (no rate_limit, admission 8/64)",
            "litellm": litellm_version(),
        },
        "targets": {},
        "not_run": {},
    }
    with common.processes("gateway") as group:
        upstream = common.start_upstream(group)
        targets: dict[str, Process] = {"direct": upstream}
        targets["keel"] = common.start_keel(group, keel_default_config(upstream.url))
        if peers:
            try:
                targets["litellm"] = start_litellm(group, upstream.url)
            except (RuntimeError, TimeoutError, OSError) as exc:
                result["not_run"]["litellm"] = str(exc).splitlines()[0][:300]
                log(f"litellm not run: {result['not_run']['litellm']}")
        else:
            result["not_run"]["litellm"] = "skipped (--no-peers)"
        for name in targets:
            result["targets"][name] = {}
        for concurrency, stream in SCENARIOS:
            scenario = scenario_name(concurrency, stream)
            for name, process in targets.items():
                log(f"gateway {scenario} -> {name}")
                figures = common.loadgen(
                    process.url,
                    path="/v1/chat/completions",
                    body={**CHAT_BODY, "stream": stream},
                    concurrency=concurrency,
                    duration=duration,
                )
                result["targets"][name][scenario] = figures
        result["starlette"] = starlette_ratio(group, duration)
        log(f"gateway no cap: keel c={NO_CAP_CONCURRENCY} x {NO_CAP_REQUESTS} requests")
        result["no_cap"] = no_cap(targets["keel"])
        for name, process in targets.items():
            result.setdefault("rss_kib", {})[name] = common.rss_kib(process.popen.pid)
        result["upstream_stats"] = common.upstream_counts(upstream)
    result["summary"] = summarize(result)
    return result


FLOORS = {"floor": "relay", "floor-stream-up": "stream-up"}
"""The thinnest Python gateways (``bench/floor_proxy.py``), by the mode each runs in."""


def start_floor(group: Processes, name: str, upstream_url: str) -> Process:
    port = common.free_port()
    argv = [common.PYTHON, str(common.BENCH / "floor_proxy.py"), "--port", str(port)]
    process = group.start(name, [*argv, "--upstream", upstream_url, "--mode", FLOORS[name]])
    process.url = f"http://127.0.0.1:{port}"
    common.wait_http(f"{process.url}/_bench/stats", process, 15)
    return process


def starlette_ratio(group: Processes, duration: float) -> dict[str, Any]:
    """c=32, plain and streamed, direct to a Starlette upstream, through the two
    thinnest Python gateways and through keel."""
    upstream = common.start_upstream(group, name="upstream-starlette", starlette=True)
    targets = {"direct": upstream}
    targets.update((name, start_floor(group, name, upstream.url)) for name in FLOORS)
    targets["keel"] = common.start_keel(
        group, keel_default_config(upstream.url), name="keel-starlette"
    )
    figures: dict[str, Any] = {name: {} for name in targets}
    for stream in MODES:
        scenario = scenario_name(NO_CAP_CONCURRENCY, stream)
        for name, process in targets.items():
            log(f"gateway {scenario} -> {name} (Starlette upstream)")
            figures[name][scenario] = common.loadgen(
                process.url,
                path="/v1/chat/completions",
                body={**CHAT_BODY, "stream": stream},
                concurrency=NO_CAP_CONCURRENCY,
                duration=duration,
            )
    return figures


def no_cap(keel: Process) -> dict[str, Any]:
    """10,000 requests at c=32 from a cold start, latency of the first and last 2,000."""
    figures = common.loadgen(
        keel.url,
        path="/v1/chat/completions",
        body=CHAT_BODY,
        concurrency=NO_CAP_CONCURRENCY,
        duration=300.0,
        warmup=0.0,
        max_requests=NO_CAP_REQUESTS,
    )
    samples = figures.pop("samples_ms")  # in completion order: the run keeps them all
    share = len(samples) // 5
    first, last = sorted(samples[:share]), sorted(samples[-share:])

    def p(ordered: list[float], q: float) -> float | None:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

    return {
        "requests": figures["requests"],
        "ok": figures["ok"],
        "rps": figures["rps"],
        "statuses": figures["statuses"],
        "errors": figures["errors"],
        "latency_ms": figures["latency_ms"],
        "first_p50_ms": p(first, 0.5),
        "first_p99_ms": p(first, 0.99),
        "last_p50_ms": p(last, 0.5),
        "last_p99_ms": p(last, 0.99),
        "timeline": figures["timeline"],
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Added latency (p50, p99) and throughput ratio of each gateway against direct."""
    direct = result["targets"].get("direct", {})
    summary: dict[str, Any] = {}
    for name, scenarios in result["targets"].items():
        for scenario, figures in scenarios.items():
            base = direct.get(scenario)
            latency = figures["latency_ms"]
            row = {
                "rps": figures["rps"],
                "p50_ms": latency["p50"],
                "p99_ms": latency["p99"],
                "errors": sum(figures["errors"].values())
                + sum(v for k, v in figures["statuses"].items() if k != "200")
                + figures.get("stream_errors", 0),
            }
            if base and base["latency_ms"]["p50"] is not None and latency["p50"] is not None:
                row["added_p50_ms"] = latency["p50"] - base["latency_ms"]["p50"]
                row["added_p99_ms"] = latency["p99"] - base["latency_ms"]["p99"]
                row["rps_vs_direct"] = figures["rps"] / base["rps"] if base["rps"] else None
            summary.setdefault(name, {})[scenario] = row
    return summary


Row = tuple[str, str, str, str, str, str, str]


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def rows(result: dict[str, Any]) -> list[Row]:
    """The issue's targets: added latency at c=1, throughput at c=32 against direct
    and against LiteLLM, and no cap over 10,000 requests."""
    table: list[Row] = []
    summary = result["summary"]
    ours, peer, direct = (summary.get(n, {}) for n in ("keel", "litellm", "direct"))
    for stream in MODES:
        mode = "stream" if stream else "plain"
        one = ours.get(scenario_name(1, stream), {})
        base = direct.get(scenario_name(1, stream), {})
        p50, p99 = one.get("added_p50_ms"), one.get("added_p99_ms")
        table.append(
            (
                "gateway",
                f"c=1 {mode}: keel added latency",
                f"+{_ms(p50)} p50, +{_ms(p99)} p99",
                f"direct {_ms(base.get('p50_ms'))} p50, {_ms(base.get('p99_ms'))} p99",
                f"{one.get('errors', '-')} errors",
                "p50 <= 1.0 ms, p99 <= 2.0 ms",
                _met(p50 is not None and p99 is not None and p50 <= 1.0 and p99 <= 2.0),
            )
        )
    for concurrency in CONCURRENCY:
        for stream in MODES:
            scenario = scenario_name(concurrency, stream)
            mine, base = ours.get(scenario), direct.get(scenario)
            if not mine or not base:
                continue
            ratio = mine.get("rps_vs_direct")
            versus = peer.get(scenario)
            times = mine["rps"] / versus["rps"] if versus and versus["rps"] else None
            target, ok = "-", None
            if concurrency == NO_CAP_CONCURRENCY:
                target = ">= 10x LiteLLM"
                ok = (times is None or times >= 10) and not mine["errors"]
            measured = f"{mine['rps']:,.0f} req/s, p99 {_ms(mine['p99_ms'])}"
            if mine["errors"]:
                measured += f", {mine['errors']} errors"
            litellm = "-" if not versus else f"LiteLLM {versus['rps']:,.0f} req/s"
            table.append(
                (
                    "gateway",
                    f"{scenario} keel",
                    measured,
                    f"direct {base['rps']:,.0f} req/s; {litellm}",
                    f"{ratio:.2f}x direct" + ("" if times is None else f", {times:.1f}x LiteLLM"),
                    target,
                    _met(ok),
                )
            )
    table.extend(starlette_rows(result.get("starlette")))
    cap = result.get("no_cap")
    if cap:
        first, last = cap.get("first_p99_ms"), cap.get("last_p99_ms")
        step = last / first if first and last else None
        failed = cap["requests"] - cap["ok"]
        table.append(
            (
                "gateway",
                f"no cap: default keel, c={NO_CAP_CONCURRENCY} x {NO_CAP_REQUESTS:,}",
                f"p99 first 20% {_ms(first)}, last 20% {_ms(last)}, {failed} failed",
                f"{cap['rps']:,.0f} req/s",
                "-" if step is None else f"last/first p99 {step:.2f}",
                "no step (last/first p99 <= 2), none failed",
                _met(step is not None and step <= 2.0 and failed == 0),
            )
        )
    for name, why in result.get("not_run", {}).items():
        table.append(("gateway", name, f"not run ({why})", "-", "-", "-", "-"))
    return table


def starlette_rows(figures: dict[str, Any] | None) -> list[Row]:
    """The throughput ratio in the issue's setup: keel in front of a Starlette upstream,
    beside the thinnest Python gateways in front of it (what one process can reach)."""
    table: list[Row] = []
    for stream in MODES if figures else ():
        scenario = scenario_name(NO_CAP_CONCURRENCY, stream)
        direct = figures["direct"][scenario]["rps"]  # type: ignore[index]
        for name in FLOORS:
            floor = figures.get(name, {}).get(scenario)  # type: ignore[union-attr]
            if floor:
                table.append(
                    (
                        "gateway",
                        f"{scenario} {name} (bench/floor_proxy.py --mode {FLOORS[name]})",
                        f"{floor['rps']:,.0f} req/s, p99 {_ms(floor['latency_ms']['p99'])}",
                        f"direct {direct:,.0f} req/s",
                        f"{floor['rps'] / direct:.2f}x direct" if direct else "-",
                        "-",
                        "-",
                    )
                )
        mine = figures["keel"][scenario]  # type: ignore[index]
        errors = sum(mine["errors"].values()) + sum(
            v for k, v in mine["statuses"].items() if k != "200"
        )
        ratio = mine["rps"] / direct if direct else None
        versus = [
            f"{mine['rps'] / figures[name][scenario]['rps']:.2f}x {name}"  # type: ignore[index]
            for name in FLOORS
            if scenario in figures.get(name, {})  # type: ignore[union-attr]
        ]
        table.append(
            (
                "gateway",
                f"{scenario} keel, Starlette upstream",
                f"{mine['rps']:,.0f} req/s, p99 {_ms(mine['latency_ms']['p99'])}",
                f"direct {direct:,.0f} req/s",
                ", ".join(["-" if ratio is None else f"{ratio:.2f}x direct", *versus]),
                ">= 0.3x direct (stretch 0.5x)",
                _met(ratio is not None and ratio >= 0.3 and not errors),
            )
        )
    if figures:
        table.append(stream_ceiling(figures["direct"]))
    return table


def stream_ceiling(direct: dict[str, Any]) -> Row:
    """What a gateway that asks the upstream for a stream (keel does, for every plain
    request) cannot pass however little it costs: the upstream's own streamed rate, as a
    share of its plain one."""
    plain, streamed = (direct[scenario_name(NO_CAP_CONCURRENCY, s)]["rps"] for s in MODES)
    return (
        "gateway",
        f"{scenario_name(NO_CAP_CONCURRENCY, False)}: ceiling of a gateway asking for a stream",
        f"{streamed:,.0f} req/s (the Starlette upstream streaming, direct)",
        f"direct plain {plain:,.0f} req/s",
        f"{streamed / plain:.2f}x direct" if plain else "-",
        "-",
        "-",
    )


def plot(result: dict[str, Any], out: Path) -> Path | None:
    """Throughput against p99 per target, plain and streaming; points at c = 1..64."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for axis, stream in zip(axes, MODES, strict=True):
        for name, scenarios in result["targets"].items():
            points = [
                (c, scenarios[scenario_name(c, stream)])
                for c in CONCURRENCY
                if scenario_name(c, stream) in scenarios
            ]
            xs = [f["rps"] for _, f in points]
            ys = [f["latency_ms"]["p99"] or float("nan") for _, f in points]
            axis.plot(xs, ys, marker="o", label=name)
            for (c, _), x, y in zip(points, xs, ys, strict=True):
                axis.annotate(
                    f"c={c}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_title("streaming" if stream else "plain")
        axis.set_xlabel("throughput, req/s (log)")
        axis.set_ylabel("p99 latency, ms (log)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("Throughput vs p99: direct, keel (default config), LiteLLM; same fake upstream")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    result = run(args.duration, peers=not args.no_peers)
    common.write_json("gateway", result)
    plot(result, common.RESULTS / "gateway.png")
    for row in rows(result):
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
