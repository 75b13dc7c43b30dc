"""Failover: how long a request takes when its primary fails and the fallback
serves it, and whether a provider whose breaker is open still gets requests.

Setup: completion role, primary and one ``[[model.completion.fallback]]``,
each a ``bench/upstream.py`` process; default routing settings (2 attempts per
provider with 0-100 ms jittered backoff, breaker after 5 consecutive failures)
except the primary's ``first_token_timeout = 2`` s so a hang costs 2 s rather
than the default 15 s, and the background prober slowed to 300 s so that it
does not find the failure before the measured request does.

1. Latency: per cycle a fresh keel (startup well under a second), a few
   warm requests, then the primary fails (``refuse``: its process is killed,
   connections are refused; ``error500``: every answer is a 500; ``hang``:
   it reads the request and never answers), then ``--requests`` sequential
   requests. Request #1 pays the whole failover; later ones show the primary
   routed around (health marks it after 2 failures, then the breaker).
2. Breaker: the primary answers 500 to everything (breaker after 2 consecutive
   failures here, so that it opens at all), load is sent sequentially
   then by 16 clients; the fake counts what reaches the primary and
   ``/v1/providers`` is read after every sequential request, so requests sent
   to the primary while its breaker was open are counted (target: 0).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import common
import httpx
from common import COMPLETION_BODY, Process, log
from loadgen import percentile

COMPLETION_PATH = "/v1/completions"


def config(primary: str, fallback: str, routing: str = "") -> str:
    return (
        f"[routing]\nprobe_interval_seconds = 300\n{routing}\n"
        "[model.completion]\nembedded_last_resort = false\n\n"
        "[model.completion.http]\n"
        + common.http_provider("openai/completion", primary, "first_token_timeout = 2.0\n")
        + "\n[[model.completion.fallback]]\n"
        + common.http_provider("openai/completion", fallback)
        + "\n[model.chat.http]\n"
        + common.http_provider("openai/chat", fallback)
        + "\n[model.embedding.http]\n"
        + common.http_provider("openai/embedding", fallback)
    )


def posts(upstream: Process) -> int:
    counts = common.upstream_counts(upstream)
    return sum(v for k, v in counts.items() if " POST " in k)


def timed_request(client: httpx.Client) -> tuple[float, int]:
    started = time.perf_counter()
    response = client.post(COMPLETION_PATH, json=COMPLETION_BODY)
    return (time.perf_counter() - started) * 1000, response.status_code


def latency_cycle(mode: str, requests: int) -> list[dict[str, Any]]:
    """One fresh keel; the primary fails in ``mode``; ``requests`` timed requests."""
    with common.processes(f"failover-{mode}") as group:
        primary = common.start_upstream(group, name="primary")
        fallback = common.start_upstream(group, name="fallback")
        keel = common.start_keel(group, config(primary.url, fallback.url))
        rows = []
        with httpx.Client(base_url=keel.url, timeout=30) as client:
            for _ in range(3):
                client.post(COMPLETION_PATH, json=COMPLETION_BODY).raise_for_status()
            if mode == "refuse":
                group.stop(primary)
            else:
                common.set_upstream_mode(primary, mode)
            for index in range(requests):
                before = posts(fallback)
                latency, status = timed_request(client)
                served_by_fallback = posts(fallback) > before
                rows.append(
                    {
                        "index": index + 1,
                        "ms": latency,
                        "status": status,
                        "fallback_served": served_by_fallback,
                    }
                )
        return rows


def breaker_run(sequential: int, concurrent_s: float) -> dict[str, Any]:
    with common.processes("failover-breaker") as group:
        primary = common.start_upstream(group, name="primary")
        fallback = common.start_upstream(group, name="fallback")
        # Two consecutive failures open the breaker (default 5): health routing alone
        # takes a failing primary out after one request, so the open state is
        # otherwise never reached by sequential traffic.
        routing = "breaker_consecutive_failures = 2\n"
        keel = common.start_keel(group, config(primary.url, fallback.url, routing))
        common.set_upstream_mode(primary, "error500")
        timeline = []
        sent_while_open = 0
        statuses: dict[int, int] = {}
        with httpx.Client(base_url=keel.url, timeout=30) as client:

            def primary_state() -> dict[str, Any]:
                chain = client.get("/v1/providers").json()["roles"]["completion"]["providers"]
                state: dict[str, Any] = chain[0]
                return state

            for index in range(sequential):
                before_state = primary_state()
                before = posts(primary)
                _latency, status = timed_request(client)
                statuses[status] = statuses.get(status, 0) + 1
                after_state = primary_state()
                hits = posts(primary) - before
                if before_state["breaker"] == "open" and after_state["breaker"] == "open":
                    sent_while_open += hits
                timeline.append(
                    {
                        "index": index + 1,
                        "primary_hits": hits,
                        "breaker": after_state["breaker"],
                        "healthy": after_state["healthy"],
                    }
                )
            state_before_load = primary_state()
            before = posts(primary)
            load = common.loadgen(
                keel.url,
                path=COMPLETION_PATH,
                body=COMPLETION_BODY,
                concurrency=16,
                duration=concurrent_s,
                warmup=0,
            )
            state_after_load = primary_state()
            concurrent_hits = posts(primary) - before
        if state_before_load["breaker"] == "open" and state_after_load["breaker"] == "open":
            sent_while_open += concurrent_hits
        opened_at = next((t["index"] for t in timeline if t["breaker"] == "open"), None)
        unhealthy_at = next((t["index"] for t in timeline if not t["healthy"]), None)
        return {
            "sequential_requests": sequential,
            "statuses": statuses,
            "primary_hits_total": sum(t["primary_hits"] for t in timeline) + concurrent_hits,
            "primary_hits_sequential": [t["primary_hits"] for t in timeline],
            "breaker_opened_at_request": opened_at,
            "marked_unhealthy_at_request": unhealthy_at,
            "sent_while_open": sent_while_open,
            "concurrent": {
                "clients": 16,
                "seconds": concurrent_s,
                "ok": load["ok"],
                "statuses": load["statuses"],
                "primary_hits": concurrent_hits,
                "breaker_before": state_before_load["breaker"],
                "breaker_after": state_after_load["breaker"],
            },
        }


def run(cycles: int = 6, requests: int = 5) -> dict[str, Any]:
    result: dict[str, Any] = {
        "setup": {
            "cycles": cycles,
            "requests_per_cycle": requests,
            "primary_first_token_timeout_s": 2.0,
            "retry": "defaults: 2 attempts per provider, full-jitter backoff 0-100 ms",
            "request": "POST /v1/completions (OpenAI body), sequential",
        },
        "modes": {},
    }
    for mode, count in (("refuse", cycles), ("error500", cycles), ("hang", max(2, cycles // 2))):
        rows: list[dict[str, Any]] = []
        for cycle in range(count):
            log(f"failover {mode} cycle {cycle + 1}/{count}")
            rows += [{"cycle": cycle + 1, **row} for row in latency_cycle(mode, requests)]
        first = sorted(r["ms"] for r in rows if r["index"] == 1)
        later = sorted(r["ms"] for r in rows if r["index"] >= 3)
        result["modes"][mode] = {
            "first_p50_ms": percentile(first, 50),
            "first_max_ms": first[-1] if first else None,
            "routed_around_p50_ms": percentile(later, 50),
            "served": sum(1 for r in rows if r["status"] == 200),
            "failed": sum(1 for r in rows if r["status"] != 200),
            "served_by_fallback": sum(1 for r in rows if r["fallback_served"]),
            "rows": rows,
        }
    log("failover breaker")
    result["breaker"] = breaker_run(sequential=40, concurrent_s=3.0)
    return result


def plot(result: dict[str, Any], out: Any) -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    modes = list(result["modes"])
    fig, axes = plt.subplots(1, len(modes), figsize=(4 * len(modes), 4))
    for axis, mode in zip(axes, modes, strict=True):
        rows = result["modes"][mode]["rows"]
        for index in sorted({r["index"] for r in rows}):
            ys = [r["ms"] for r in rows if r["index"] == index]
            axis.scatter([index] * len(ys), ys, s=14, alpha=0.7)
        axis.set_yscale("log")
        axis.set_xlabel("request # after the primary failed")
        axis.set_ylabel("latency, ms (log)")
        axis.set_title(f"primary {mode}")
        axis.grid(True, which="both", alpha=0.3)
    fig.suptitle(
        "Failover: latency of each request after the primary failed (fresh keel per cycle)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=6)
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()
    result = run(args.cycles, args.requests)
    common.write_json("failover", result)
    plot(result, common.RESULTS / "failover.png")
    for mode, figures in result["modes"].items():
        print(mode, {k: v for k, v in figures.items() if k != "rows"})
    print("breaker", result["breaker"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
