"""Overload: ten times the sustainable load for a minute, then normal load again.

    python bench/overload.py            # sustainable 20 s, overload 60 s, normal 20 s
    python bench/overload.py --quick    # 8 s, 15 s, 8 s

The demo profile (serve_app/profiles.py, with its finite max_ongoing_requests / max_queued_requests) runs in a
subprocess; the load comes from this process (httpx, asyncio), half chat streams and half embedding requests.
  1. sustainable: closed loop, a few clients per kind that send again as soon as an answer is in: the request
     rates every request of which is served (200).
  2. overload: open loop at 10x those rates for --overload-s: requests are sent on a clock, whatever the answers,
     from --overload-processes client processes (one asyncio client cannot send that much on 2 cores, and its
     backlog of answers to read must not delay the normal load's client).
     Counted: 200, 503 (back-pressure), any other status, client-side errors; latency of the 503s (they must be
     quick) and of the 200s; the RSS of the server's process tree (Ray's workers, raylet, GCS), sampled.
  3. normal: the sustainable closed loop again, started the moment the overload stops: how many succeed, and the
     time to the first 200.
Closed-loop clients send a 503 again after its Retry-After, as the openai SDK does; the open loop does not wait.
Figures go to stdout and to bench/results/overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from _machine import machine_busy, run_record
from _server import interrupt_on_sigterm
from embeddings import (  # the sibling benchmark's helpers (the script's folder is on sys.path)
    RESULTS,
    make_sentences,
    pct,
    start_glm_serve,
    stop_process,
    wait_http_ok,
)

# Requests heavy for the server and light for the client (few events, one answer), so that on a small machine
# the server, not this load generator, is what saturates. Greedy: every stream runs to max_tokens.
CHAT_BODY = {
    "model": "tiny-glm",
    "messages": [{"role": "user", "content": "Tell me about back-pressure."}],
    "max_tokens": 256,
    "temperature": 0,
    "stream": True,
}
EMBED_BODY = {"model": "all-MiniLM-L6-v2", "input": make_sentences(32)}


class Tally:
    """Answers of one phase: counts by status and latencies by outcome."""

    def __init__(self) -> None:
        self.statuses: dict[str, int] = {}
        self.latency: dict[str, list[float]] = {"200": [], "503": []}
        self.retry_after_missing = 0
        self.first_ok_at: float | None = None

    def add(self, status: str, seconds: float, response: httpx.Response | None = None) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status in self.latency:
            self.latency[status].append(seconds)
        if status == "503" and response is not None and "retry-after" not in response.headers:
            self.retry_after_missing += 1
        if status == "200" and self.first_ok_at is None:
            self.first_ok_at = time.monotonic()

    @classmethod
    def merged(cls, states: list[dict[str, Any]]) -> Tally:
        """One tally from the `vars()` of tallies kept in other processes (sent as plain data: the class itself
        does not unpickle across a spawned process's `__mp_main__`)."""
        tally = cls()
        for state in states:
            for status, count in state["statuses"].items():
                tally.statuses[status] = tally.statuses.get(status, 0) + count
            for status, values in state["latency"].items():
                tally.latency[status].extend(values)
            tally.retry_after_missing += state["retry_after_missing"]
        return tally

    def summary(self, seconds: float) -> dict[str, Any]:
        total = sum(count for status, count in self.statuses.items() if status != "not-sent")
        out: dict[str, Any] = {
            "requests": total,
            "per_s": total / seconds,
            "statuses": dict(sorted(self.statuses.items())),
            "ok_per_s": self.statuses.get("200", 0) / seconds,
            "retry_after_missing": self.retry_after_missing,
        }
        for status, values in self.latency.items():
            if values:
                out[f"latency_{status}_ms"] = {
                    "p50": pct(values, 50) * 1000,
                    "p99": pct(values, 99) * 1000,
                    "max": max(values) * 1000,
                }
        return out


async def chat_once(client: httpx.AsyncClient, tally: Tally) -> float | None:
    """One streamed chat request; returns the Retry-After of a 503 (None otherwise)."""
    start = time.monotonic()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=CHAT_BODY) as response:
            if response.status_code != 200:
                await response.aread()
                tally.add(str(response.status_code), time.monotonic() - start, response)
                return retry_after(response)
            lines = [line async for line in response.aiter_lines() if line]
        # A 200 stream counts as served only if it ran to [DONE] without an error event.
        clean = lines[-1:] == ["data: [DONE]"] and not any('"error"' in line for line in lines)
        tally.add("200" if clean else "200-broken", time.monotonic() - start)
    except httpx.HTTPError as exc:
        tally.add(f"client-{type(exc).__name__}", time.monotonic() - start)
    return None


async def embed_once(client: httpx.AsyncClient, tally: Tally) -> float | None:
    start = time.monotonic()
    try:
        response = await client.post("/v1/embeddings", json=EMBED_BODY)
        tally.add(str(response.status_code), time.monotonic() - start, response)
        return retry_after(response)
    except httpx.HTTPError as exc:
        tally.add(f"client-{type(exc).__name__}", time.monotonic() - start)
    return None


def retry_after(response: httpx.Response) -> float | None:
    if response.status_code != 503:
        return None
    return float(response.headers.get("retry-after", "1"))


Send = Callable[[httpx.AsyncClient, Tally], Coroutine[Any, Any, float | None]]
KINDS: dict[str, Send] = {"chat": chat_once, "embeddings": embed_once}


async def closed_loop(
    client: httpx.AsyncClient, clients: dict[str, int], seconds: float
) -> tuple[dict[str, Tally], float]:
    tallies = {kind: Tally() for kind in KINDS}
    deadline = time.monotonic() + seconds

    async def user(kind: str) -> None:
        # As the openai SDK does: a 503 is sent again after its Retry-After.
        while time.monotonic() < deadline:
            wait = await KINDS[kind](client, tallies[kind])
            if wait is not None:
                await asyncio.sleep(min(wait, max(deadline - time.monotonic(), 0)))

    start = time.monotonic()
    await asyncio.gather(*(user(kind) for kind, n in clients.items() for _ in range(n)))
    return tallies, time.monotonic() - start


async def open_loop(
    client: httpx.AsyncClient, rates: dict[str, float], seconds: float, max_in_flight: int
) -> tuple[dict[str, Tally], float, list[asyncio.Task[float | None]]]:
    """Send each kind at its rate on a clock for `seconds`; returns the requests still in flight, unawaited.

    A request due while `max_in_flight` are outstanding is not sent (counted as `not-sent`): on a small machine
    this client is slower than the server's refusals, and an unbounded backlog here would measure the client."""
    tallies = {kind: Tally() for kind in KINDS}
    in_flight: set[asyncio.Task[float | None]] = set()
    start = time.monotonic()

    async def clock(kind: str, rate: float) -> None:
        sent = 0
        while (now := time.monotonic() - start) < seconds:
            due = int(now * rate) + 1 - sent  # the client catches up when the machine made it late
            for _ in range(due):
                if len(in_flight) >= max_in_flight:
                    tallies[kind].statuses["not-sent"] = tallies[kind].statuses.get("not-sent", 0) + 1
                    continue
                task = asyncio.create_task(KINDS[kind](client, tallies[kind]))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            sent += due
            await asyncio.sleep(min(0.01, 1 / rate))

    await asyncio.gather(*(clock(kind, rate) for kind, rate in rates.items()))
    return tallies, time.monotonic() - start, list(in_flight)


class TreeRss:
    """Samples the summed VmRSS of a process and its descendants on a thread; `mark(name)` starts a window."""

    def __init__(self, root: int, interval_s: float = 0.5) -> None:
        self._root, self._interval_s = root, interval_s
        self.windows: dict[str, list[int]] = {}
        self._current = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def mark(self, name: str) -> None:
        self._current = name

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join()
        return {
            name: {"peak_mib": max(kib) / 1024, "mean_mib": sum(kib) / len(kib) / 1024}
            for name, kib in self.windows.items()
            if kib
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            self.windows.setdefault(self._current, []).append(tree_rss_kib(self._root))
            self._stop.wait(self._interval_s)


def tree_rss_kib(root: int) -> int:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def phase_summary(tallies: dict[str, Tally], seconds: float) -> dict[str, Any]:
    return {kind: tally.summary(seconds) for kind, tally in tallies.items()}


CLIENT_LIMITS = httpx.Limits(max_connections=4096, max_keepalive_connections=512)


def overload_process(
    base: str, rates: dict[str, float], seconds: float, max_in_flight: int, stopped: Any, out: Any
) -> None:
    """The overload's open loop, in a process of its own: its backlog of answers to read must not delay the
    normal load's client, which starts when `stopped` is set. Puts its figures on `out`."""

    async def main() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=CLIENT_LIMITS) as client:
            tallies, sent_s, in_flight = await open_loop(client, rates, seconds, max_in_flight)
            stopped.set()
            drain_start = time.monotonic()
            await asyncio.gather(*in_flight)
            return {
                "tallies": {kind: vars(tally) for kind, tally in tallies.items()},
                "seconds": sent_s,
                "in_flight_at_stop": len(in_flight),
                "drained_s": time.monotonic() - drain_start,
            }

    out.put(asyncio.run(main()))


async def run(base: str, args: argparse.Namespace, rss: TreeRss) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=CLIENT_LIMITS) as client:
        await closed_loop(client, {"chat": 1, "embeddings": 1}, 3)  # warm-up
        rss.mark("sustainable")
        clients = {"chat": args.chat_clients, "embeddings": args.embedding_clients}
        tallies, seconds = await closed_loop(client, clients, args.sustain_s)
        sustainable = phase_summary(tallies, seconds)
        print_phase("sustainable (closed loop)", sustainable, seconds)
        rates = {kind: args.factor * sustainable[kind]["ok_per_s"] for kind in KINDS}
        print("  overload: " + ", ".join(f"{kind} {rate:.1f}/s" for kind, rate in rates.items()), flush=True)

        # Several processes share the overload: one asyncio client alone cannot send it on a small machine.
        context = multiprocessing.get_context("spawn")
        share = args.overload_processes
        out = context.Queue()
        stopped = [context.Event() for _ in range(share)]
        overloaders = [
            context.Process(
                target=overload_process,
                args=(
                    base,
                    {kind: rate / share for kind, rate in rates.items()},
                    args.overload_s,
                    args.max_in_flight // share,
                    event,
                    out,
                ),
            )
            for event in stopped
        ]
        rss.mark("overload")
        overload_wall = time.time()
        for overloader in overloaders:
            overloader.start()
        loop = asyncio.get_running_loop()
        for event in stopped:
            await loop.run_in_executor(None, event.wait)
        overload_end = time.monotonic()
        overload_wall_end = time.time()
        rss.mark("normal")
        # Normal load starts at once, beside the overload's last requests still in flight (in the other processes).
        normal_tallies, normal_seconds = await closed_loop(client, clients, args.normal_s)
        shares = [await loop.run_in_executor(None, out.get) for _ in overloaders]
        for overloader in overloaders:
            overloader.join()
        seconds = max(part["seconds"] for part in shares)
        overload = phase_summary(
            {kind: Tally.merged([part["tallies"][kind] for part in shares]) for kind in KINDS}, seconds
        )
        in_flight = sum(part["in_flight_at_stop"] for part in shares)
        drained_s = max(part["drained_s"] for part in shares)
        print_phase(f"overload ({args.factor:g}x, open loop, {share} processes)", overload, seconds)
        normal = phase_summary(normal_tallies, normal_seconds)
        print_phase(
            "normal again (closed loop, from the moment the overload stopped)", normal, normal_seconds
        )
        # Completed, so it includes the request's own time (a 256-token stream, a 32-sentence batch).
        first_ok_s = {
            kind: None if tally.first_ok_at is None else round(tally.first_ok_at - overload_end, 2)
            for kind, tally in normal_tallies.items()
        }
        print(
            f"  in flight when the overload stopped: {in_flight}, drained in {drained_s:.1f} s; first 200 "
            f"of the normal load, completed, after the stop (s): {first_ok_s}"
        )
    return {
        "rates_per_s": rates,
        "sustainable": sustainable,
        "overload": overload,
        "overload_in_flight_at_stop": in_flight,
        "overload_drained_s": drained_s,
        "normal": normal,
        "normal_first_ok_after_stop_s": first_ok_s,
        "overload_window": [overload_wall, overload_wall_end],
    }


# Serve's access log of the ingress, e.g. "2026-11-24 14:34:26,005 glm-serve_Ingress ... -- POST /v1/embeddings 503
# 239.1ms", and the proxy's refusals when the ingress is full.
ACCESS = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*-- POST (/v1/\S+) (\d{3}) ([\d.]+)(ms|s)$")
PROXY_REFUSAL = re.compile(
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) proxy .*Request dropped due to backpressure"
)


def server_side(log_path: Path, window: tuple[float, float]) -> dict[str, Any]:
    """What the server itself saw during the overload: the ingress's answer times by route and status (without
    this client's own delays, which dominate on a small busy machine), and the proxy's refusals."""

    def when(stamp: str, millis: str) -> float:
        return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp() + int(millis) / 1000

    answers: dict[str, list[float]] = {}
    proxy_refusals = 0
    for line in log_path.read_text(errors="replace").splitlines():
        if (match := ACCESS.search(line)) and window[0] <= when(match[1], match[2]) <= window[1]:
            value = float(match[5]) * (1 if match[6] == "ms" else 1000)
            answers.setdefault(f"{match[3]} {match[4]}", []).append(value)
        elif (match := PROXY_REFUSAL.search(line)) and window[0] <= when(match[1], match[2]) <= window[1]:
            proxy_refusals += 1
    out: dict[str, Any] = {"proxy_refusals_ingress_full": proxy_refusals}
    for key, values in sorted(answers.items()):
        out[key] = {
            "n": len(values),
            "p50_ms": pct(values, 50),
            "p99_ms": pct(values, 99),
            "max_ms": max(values),
        }
    return out


def print_phase(title: str, phase: dict[str, Any], seconds: float) -> None:
    print(f"{title}, {seconds:.0f} s:", flush=True)
    for kind, figures in phase.items():
        line = f"  {kind:10s} {figures['per_s']:7.1f} req/s sent, {figures['ok_per_s']:6.1f}/s served; "
        line += " ".join(f"{status}={count}" for status, count in figures["statuses"].items())
        for status in ("503", "200"):
            latency = figures.get(f"latency_{status}_ms")
            if latency:
                line += f"; {status} p50 {latency['p50']:.0f} ms p99 {latency['p99']:.0f} ms"
        if figures["retry_after_missing"]:
            line += f"; 503 WITHOUT Retry-After: {figures['retry_after_missing']}"
        print(line, flush=True)


def main() -> int:
    interrupt_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short phases (8 s, 15 s, 8 s)")
    parser.add_argument("--sustain-s", type=float, default=20)
    parser.add_argument("--overload-s", type=float, default=60)
    parser.add_argument("--normal-s", type=float, default=20)
    parser.add_argument("--factor", type=float, default=10, help="overload = factor x the sustainable rates")
    parser.add_argument("--chat-clients", type=int, default=8, help="closed-loop chat clients (sustainable)")
    parser.add_argument("--embedding-clients", type=int, default=4, help="closed-loop embedding clients")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=600,
        help="client-side cap on outstanding overload requests (above what the demo profile admits)",
    )
    parser.add_argument(
        "--overload-processes", type=int, default=2, help="client processes sharing the overload (default 2)"
    )
    parser.add_argument("--port", type=int, default=28130)
    parser.add_argument("--output", default=str(RESULTS / "overload.json"))
    args = parser.parse_args()
    if args.quick:
        args.sustain_s, args.overload_s, args.normal_s = 8, 15, 8

    RESULTS.mkdir(parents=True, exist_ok=True)
    log_path = Path(f"/tmp/glm-serve-overload-{args.port}.log")
    results: dict[str, Any] = {
        **run_record(),
        "phases_s": {"sustainable": args.sustain_s, "overload": args.overload_s, "normal": args.normal_s},
        "factor": args.factor,
    }
    print(f"machine: {results['machine']}", flush=True)
    server = start_glm_serve(args.port, {}, log_path)
    rss = TreeRss(server.pid)
    try:
        base = f"http://127.0.0.1:{args.port}"
        wait_http_ok(f"{base}/health", 300, server)
        rss.mark("idle")
        time.sleep(2)
        results.update(asyncio.run(run(base, args, rss)))
        window = results["overload_window"]
        results["overload_server_side"] = server_side(log_path, (window[0], window[1] + 30))
        print(
            "overload as the server saw it (ingress access log; +30 s for the requests in flight at the stop):"
        )
        for key, figures in results["overload_server_side"].items():
            print(f"  {key}: {figures}")
    finally:
        results["rss_server_tree"] = rss.stop()
        stop_process(server)
    results["machine"]["busy_at_end"] = machine_busy()
    print("RSS of the server's process tree (Ray's workers, raylet, GCS), MiB:")
    for window, figures in results["rss_server_tree"].items():
        print(f"  {window:12s} peak {figures['peak_mib']:7.0f}  mean {figures['mean_mib']:7.0f}")
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
