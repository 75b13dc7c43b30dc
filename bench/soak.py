"""Load and soak: many concurrent clients against keel for a while, with its
default admission settings, watching errors, latency and keel's memory.

Setup: keel with the completion role on ``bench/upstream.py``, default
admission (a role served by a model server takes 1024 requests at once, so all
500 clients are in flight; beyond that 64 would queue for 10 s, the rest get a
designed 429 with ``Retry-After``), no per-backend rate limit (keel's default).
Two load generator processes of ``--clients``/2 clients each, one sending
plain and one streaming ``POST /v1/completions`` (OpenAI body). A client that
gets a 429 waits ``min(Retry-After, 1 s)`` (jittered) and tries again. Keel's
resident memory (``/proc/PID/status`` VmRSS) is sampled every second;
"start" is a third into the run, "end" at its end: a leak grows on, where
filling the 500 clients' connections and buffers stops (under 5 s at 2,400
req/s; 28 s at 1,200 req/s in a slow hour on 2026-12-06, for this code and
751252a's alike: +16% from 5 s, then nothing over the last 30 s). The figure
at ``--warmup`` seconds is kept beside it.
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import common
import httpx
from common import COMPLETION_BODY, log


def config(upstream: str) -> str:
    return (
        "[model.completion]\nembedded_last_resort = false\n\n"
        "[model.completion.http]\n"
        + common.http_provider("openai/completion", upstream)
        + "\n[model.chat.http]\n"
        + common.http_provider("openai/chat", upstream)
        + "\n[model.embedding.http]\n"
        + common.http_provider("openai/embedding", upstream)
    )


def run(clients: int = 500, duration: float = 60.0, warmup: float = 5.0) -> dict[str, Any]:
    with common.processes("soak") as group:
        upstream = common.start_upstream(group)
        keel = common.start_keel(group, config(upstream.url))
        pid = keel.popen.pid
        rss_idle = common.rss_kib(pid)
        samples: list[tuple[float, int | None]] = []
        stop = threading.Event()
        started = time.monotonic()

        def sample() -> None:
            while not stop.wait(1.0):
                samples.append((time.monotonic() - started, common.rss_kib(pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        half = clients // 2
        with ThreadPoolExecutor(2) as pool:
            runs = [
                pool.submit(
                    common.loadgen,
                    keel.url,
                    path="/v1/completions",
                    body={**COMPLETION_BODY, "stream": stream},
                    concurrency=count,
                    duration=duration,
                    warmup=warmup,
                    timeout=60.0,
                    max_requests=2_000_000,
                )
                for stream, count in ((False, half), (True, clients - half))
            ]
            results = [r.result() for r in runs]
        stop.set()
        sampler.join()
        rss_end = common.rss_kib(pid)
        alive = keel.alive()
        providers = httpx.get(f"{keel.url}/v1/providers", timeout=10).json()
    settled = duration / 3

    def rss_from(when: float) -> int | None:
        return next((rss for t, rss in samples if t >= when and rss is not None), rss_idle)

    rss_warm, rss_start = rss_from(warmup), rss_from(settled)
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    latencies: list[float] = []
    for figures in results:
        for key, value in figures["statuses"].items():
            statuses[key] = statuses.get(key, 0) + value
        for key, value in figures["errors"].items():
            errors[key] = errors.get(key, 0) + value
        latencies += figures["samples_ms"]
    latencies.sort()
    from loadgen import percentile

    unexpected = sum(v for k, v in statuses.items() if k not in ("200", "429")) + sum(
        errors.values()
    )
    unexpected += sum(f["stream_errors"] for f in results)
    return {
        "setup": {
            "clients": clients,
            "duration_s": duration,
            "warmup_s": warmup,
            "settled_s": settled,
            "admission": "defaults: max_concurrent 1024 (a model server's role), queue_size 64, "
            "queue_timeout 10 s",
            "client_on_429": "wait min(Retry-After, 1 s) x U(0.5, 1)",
        },
        "ok": statuses.get("200", 0),
        "rejected_429": statuses.get("429", 0),
        "statuses": statuses,
        "errors": errors,
        "unexpected_errors": unexpected,
        "ok_rps": sum(f["rps"] for f in results),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "per_mode": {
            ("plain", "stream")[i]: {
                k: results[i][k]
                for k in ("rps", "statuses", "errors", "stream_errors", "latency_ms", "ttfb_ms")
            }
            for i in range(2)
        },
        "rss_kib": {"idle": rss_idle, "warm": rss_warm, "start": rss_start, "end": rss_end},
        "rss_growth": (rss_end / rss_start - 1) if rss_start and rss_end else None,
        "rss_timeline": samples,
        "timeline": [f["timeline"] for f in results],
        "samples_ms": latencies,
        "keel_alive_at_end": alive,
        "admission_at_end": providers["roles"]["completion"]["admission"],
    }


def plot(result: dict[str, Any], out: Any) -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    times = [t for t, rss in result["rss_timeline"] if rss]
    left.plot(times, [rss / 1024 for t, rss in result["rss_timeline"] if rss])
    left.set_xlabel("seconds")
    left.set_ylabel("keel RSS, MiB")
    left.set_title("keel resident memory")
    left.grid(True, alpha=0.3)
    for mode, timeline in zip(("plain", "stream"), result["timeline"], strict=True):
        for outcome, counts in timeline.items():
            middle.plot(range(len(counts)), counts, label=f"{mode} {outcome}")
    middle.set_xlabel("seconds after warm-up")
    middle.set_ylabel("answers per second")
    middle.set_title("answers by status")
    middle.legend(fontsize=7)
    middle.grid(True, alpha=0.3)
    samples = result["samples_ms"]
    if samples:
        right.plot(samples, [(i + 1) / len(samples) for i in range(len(samples))])
    right.set_xscale("log")
    right.set_xlabel("latency of 200s, ms (log)")
    right.set_ylabel("fraction")
    right.set_title("latency CDF")
    right.grid(True, which="both", alpha=0.3)
    fig.suptitle(
        f"Soak: {result['setup']['clients']} clients, {result['setup']['duration_s']:.0f} s"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    args = parser.parse_args()
    log(f"soak: {args.clients} clients for {args.duration:.0f} s")
    result = run(args.clients, args.duration, args.warmup)
    common.write_json("soak", result)
    plot(result, common.RESULTS / "soak.png")
    shown = ("samples_ms", "rss_timeline", "timeline")
    print({k: v for k, v in result.items() if k not in shown})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
