"""Gateway overhead: the same load direct to a fast fake upstream, through keel,
and through LiteLLM's proxy, side by side in one run.

Setup: ``bench/upstream.py`` (raw asyncio on uvloop, keep-alive, 8 tokens per
answer) in one process; keel (``keel serve``, one process, every role on the
upstream, no local worker, admission 256 wide, its per-backend rate limit
raised out of the way) in another; LiteLLM's proxy (``bench/.venv-peers``, one
worker, default settings) in a third; ``bench/loadgen.py`` in a fourth. The
request is ``POST /v1/chat/completions`` with a short message, plain or
``"stream": true``, at concurrency 1 and 32. Scenarios run target after
target back to back, so a noisy neighbour hits all targets alike.

``keel+fixes`` is the same keel started through ``bench/what_if.py``, with the
changes this bench proposes applied, to measure their gain in the same run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import common
from common import CHAT_BODY, Process, Processes, log

SCENARIOS = [(1, False), (1, True), (32, False), (32, True)]


def scenario_name(concurrency: int, stream: bool) -> str:
    return f"c={concurrency} {'stream' if stream else 'plain'}"


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


def run(duration: float = 5.0, *, what_if: bool = True, peers: bool = True) -> dict[str, Any]:
    result: dict[str, Any] = {
        "setup": {
            "request": "POST /v1/chat/completions, 1 short user message, 8-token answer",
            "duration_s": duration,
            "warmup_s": 1.0,
            "upstream": "bench/upstream.py (asyncio+uvloop, keep-alive)",
            "keel": "one process; admission 256/1024; rate_limit raised; no local worker",
            "litellm": litellm_version(),
        },
        "targets": {},
        "not_run": {},
    }
    with common.processes("gateway") as group:
        upstream = common.start_upstream(group)
        config = common.keel_config_for(upstream.url)
        targets: dict[str, Process] = {"direct": upstream}
        targets["keel"] = common.start_keel(group, config)
        if what_if:
            try:
                launcher = [str(common.BENCH / "what_if.py")]
                targets["keel+fixes"] = common.start_keel(
                    group, config, name="keel+fixes", launcher=launcher
                )
            except (RuntimeError, TimeoutError) as exc:
                result["not_run"]["keel+fixes"] = str(exc)[:300]
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
        for name, process in targets.items():
            result.setdefault("rss_kib", {})[name] = common.rss_kib(process.popen.pid)
        result["upstream_stats"] = common.upstream_counts(upstream)
    result["summary"] = summarize(result)
    return result


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Added latency and throughput ratio of each gateway against direct, per scenario."""
    direct = result["targets"].get("direct", {})
    summary: dict[str, Any] = {}
    for name, scenarios in result["targets"].items():
        for scenario, figures in scenarios.items():
            base = direct.get(scenario)
            row = {
                "rps": figures["rps"],
                "p50_ms": figures["latency_ms"]["p50"],
                "p99_ms": figures["latency_ms"]["p99"],
                "errors": sum(figures["errors"].values())
                + sum(v for k, v in figures["statuses"].items() if k != "200"),
            }
            if base and base["latency_ms"]["p50"] is not None and row["p50_ms"] is not None:
                row["added_p50_ms"] = row["p50_ms"] - base["latency_ms"]["p50"]
                row["rps_vs_direct"] = figures["rps"] / base["rps"] if base["rps"] else None
            summary.setdefault(name, {})[scenario] = row
    return summary


def plot(result: dict[str, Any], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for axis, (concurrency, stream) in zip(axes.flat, SCENARIOS, strict=True):
        scenario = scenario_name(concurrency, stream)
        for name, scenarios in result["targets"].items():
            samples = sorted(scenarios.get(scenario, {}).get("samples_ms", []))
            if not samples:
                continue
            ys = [(i + 1) / len(samples) for i in range(len(samples))]
            axis.plot(samples, ys, label=f"{name} ({scenarios[scenario]['rps']:.0f} req/s)")
        axis.set_xscale("log")
        axis.set_title(scenario)
        axis.set_xlabel("latency, ms (log)")
        axis.set_ylabel("fraction of requests")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("Gateway latency CDF: direct vs keel vs LiteLLM (same fake upstream)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--no-what-if", action="store_true")
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    result = run(args.duration, what_if=not args.no_what_if, peers=not args.no_peers)
    common.write_json("gateway", result)
    plot(result, common.RESULTS / "gateway.png")
    for name, scenarios in result["summary"].items():
        for scenario, row in scenarios.items():
            print(name, scenario, {k: round(v, 2) if v else v for k, v in row.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
