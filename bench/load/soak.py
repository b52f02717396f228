"""Soak: /predict at a steady ~70% of the server's maximum rate for minutes; fails on errors or on growth.

    python bench/load/soak.py --run RUN_DIR                       # starts a server; 10 minutes (make soak)
    python bench/load/soak.py --url http://127.0.0.1:3000 --model NAME --seconds 60   # a running server
    python bench/load/soak.py --url URL --rate 150                # a known rate, no probe

Phases: a probe (closed loop, --clients clients, --probe-seconds) measures the maximum rate unless
--rate is given; then requests are sent open-loop at --load (0.7) of it, one text each, first for
--warmup seconds, then for --seconds of soak proper. Every --every seconds the window's rate,
latencies and errors and the server's process tree (bench/load/procstats.py: summed RSS, open file
descriptors, threads) are recorded and printed as a table, with the share of the machine's CPU time
its hypervisor gave to other guests in the window (steal: a virtual machine's noisy neighbours). The bounds, checked on the soak proper:

  errors     none: any status but 200, a connection error or a timeout (a 429 is an error here: at
             70% of the maximum the service must not shed)
  RSS        the median of the last quarter of samples at most 5% above the median of the first quarter
  fds        the fewest open in the last quarter no more than the most in the warm-up and the first half
             (pools grow and shrink with the load; a leak stays above what they reached); sockets are
             left out (they follow the client's connections) and shown in the table
  threads    the same

A broken bound prints why and exits 1. The load is bounded by time and by --max-requests; requests
in flight are capped at --max-outstanding (a request the cap holds back is counted as late, not sent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import procstats  # noqa: E402

DEFAULT_TEXTS = REPO / "examples" / "sst2_sample" / "validation.jsonl"
REQUEST_TIMEOUT_SECONDS = 30.0
RSS_GROWTH_BOUND = 0.05


@dataclass
class Window:
    """One --every seconds of the soak: what was answered in it and the server tree at its end."""

    at: float  # seconds since the soak proper started (negative: warm-up)
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    late: int = 0
    failures: Counter = field(default_factory=Counter)  # status (or "no answer") of each error
    stats: procstats.Snapshot | None = None
    steal: float = 0.0  # share of the machine's CPU time the hypervisor gave to other guests in the window


@dataclass(frozen=True)
class Verdict:
    bound: str
    measured: str
    limit: str
    ok: bool


def check(windows: list[Window]) -> list[Verdict]:
    """The soak's bounds on the windows after warm-up (at >= 0)."""
    soak = [w for w in windows if w.at >= 0 and w.stats is not None]
    if len(soak) < 4:
        return [Verdict("samples", f"{len(soak)} windows", ">= 4 (a longer --seconds or a shorter --every)", False)]
    quarter = max(1, len(soak) // 4)
    first, last = soak[:quarter], soak[-quarter:]
    errors = sum(w.errors for w in soak)
    failures = sum((w.failures for w in soak), Counter())
    rss_before = statistics.median(w.stats.rss_bytes for w in first)
    rss_after = statistics.median(w.stats.rss_bytes for w in last)
    growth = rss_after / rss_before - 1
    why = f" ({', '.join(f'{n} x {what}' for what, n in failures.most_common())})" if failures else ""
    if errors:  # where they fell: a host that took the CPU away, or the server itself
        shed, clean = [w.steal for w in soak if w.errors], [w.steal for w in soak if not w.errors]
        why += (f"; host steal in the windows with errors {statistics.median(shed):.0%} (median), "
                f"in the others {statistics.median(clean) if clean else float('nan'):.0%}")
    verdicts = [Verdict("errors", f"{errors}{why}", "0", errors == 0),
                Verdict("RSS growth (median, last vs first quarter)",
                        f"{growth:+.1%} ({rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MB)",
                        f"< {RSS_GROWTH_BOUND:.0%}", growth < RSS_GROWTH_BOUND)]
    # Pools (anyio's threads, idle ones stopped after 10 s) grow and shrink with the load: what they reached in
    # the warm-up or the first half is no leak; the last quarter staying above all of it is.
    earlier = [w for w in windows if w.stats is not None and w.at < soak[len(soak) // 2].at]
    for name, value in (("open fds but sockets", lambda w: w.stats.files), ("threads", lambda w: w.stats.threads)):
        most_before, fewest_last = max(map(value, earlier)), min(map(value, last))
        verdicts.append(Verdict(f"{name} (fewest in last quarter vs most in warm-up and first half)",
                                f"{fewest_last} vs {most_before}", "no more", fewest_last <= most_before))
    return verdicts


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


def print_tables(windows: list[Window], verdicts: list[Verdict], rate: float, max_rate: float | None) -> None:
    print()
    print("| t s | req/s | p50 ms | p99 ms | errors | late | server RSS MB | fds: other (sockets) | threads | processes "
          "| host steal |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in windows:
        s = w.stats
        print(f"| {w.at:.0f} | {len(w.latencies) / w.seconds:.1f} | {percentile(w.latencies, 50) * 1000:.0f} | "
              f"{percentile(w.latencies, 99) * 1000:.0f} | {w.errors} | {w.late} | {s.rss_bytes / 2**20:.0f} | "
              f"{s.files} ({s.sockets}) | {s.threads} | {s.processes} | {w.steal:.0%} |")
    soak = [w for w in windows if w.at >= 0]
    answered = [x for w in soak for x in w.latencies]
    seconds = sum(w.seconds for w in soak)
    probe = f"; the probe's maximum {max_rate:.1f} req/s" if max_rate else ""
    print(f"\nsoak proper: {len(answered)} answered in {seconds:.0f} s ({len(answered) / max(seconds, 1e-9):.1f} req/s "
          f"against a target of {rate:.1f}{probe}), p50 {percentile(answered, 50) * 1000:.0f} ms, "
          f"p99 {percentile(answered, 99) * 1000:.0f} ms, late {sum(w.late for w in soak)}")
    print()
    print("| bound | measured | limit | ok |")
    print("|---|---|---|---|")
    for v in verdicts:
        print(f"| {v.bound} | {v.measured} | {v.limit} | {'yes' if v.ok else 'NO'} |")


async def post(session, url: str, body: dict) -> int | None:
    import aiohttp

    try:
        async with session.post(url + "/predict", json=body,
                                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


def body_for(texts: list[str], model: str | None, i: int) -> dict:
    body = {"inputs": [texts[i % len(texts)]]}
    if model:
        body["model"] = model
    return body


async def probe(session, url: str, texts: list[str], model: str | None, clients: int, seconds: float) -> float:
    """The maximum rate: `clients` closed-loop clients for `seconds` (after a 2 s warm-up); 200s per second."""
    for phase_seconds in (2.0, seconds):
        statuses: Counter = Counter()
        deadline = time.perf_counter() + phase_seconds

        async def client():
            while time.perf_counter() < deadline:
                statuses[await post(session, url, body_for(texts, model, sum(statuses.values())))] += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
    others = {status or "no answer": n for status, n in statuses.items() if status != 200}
    if others:
        print(f"probe: answers other than 200: {others}", flush=True)
    return statuses[200] / (time.perf_counter() - started)


async def paced(session, url: str, texts: list[str], model: str | None, rate: float, warmup: float, seconds: float,
                every: float, server_pid: int, max_requests: int, max_outstanding: int) -> list[Window]:
    """Open loop at `rate` requests/s for warmup + seconds, in windows of `every` s, each ending with a snapshot."""
    windows: list[Window] = []
    tasks: set[asyncio.Task] = set()
    start = time.perf_counter()
    soak_start = start + warmup
    end = soak_start + seconds
    window = Window(-warmup, every)
    window_end = start + every
    sent = 0

    async def one(i: int, into: Window) -> None:
        began = time.perf_counter()
        status = await post(session, url, body_for(texts, model, i))
        if status == 200:
            into.latencies.append(time.perf_counter() - began)
        else:
            into.errors += 1
            into.failures[status or "no answer"] += 1

    next_at = start
    stolen = procstats.host_steal()
    while next_at < end and sent < max_requests:
        now = time.perf_counter()
        if now >= window_end:
            window.seconds = now - (window_end - every)
            window.stats = await asyncio.to_thread(procstats.snapshot, server_pid)
            window.steal, stolen = procstats.host_steal(since=stolen)
            windows.append(window)
            window = Window(window_end - soak_start, every)
            window_end += every
        if next_at > now:
            await asyncio.sleep(next_at - now)
        if len(tasks) >= max_outstanding:
            window.late += 1
        else:
            task = asyncio.create_task(one(sent, window))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        next_at += 1 / rate
    if tasks:
        await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_SECONDS + 5)
    window.seconds = time.perf_counter() - (window_end - every)
    window.stats = procstats.snapshot(server_pid)
    window.steal, _ = procstats.host_steal(since=stolen)
    if window.seconds >= every / 2:  # a last sliver would skew the rate
        windows.append(window)
    return windows


def listener_pid(url: str) -> int:
    """The BentoML server above the processes listening on the URL's port: --server-pid's default."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    pids = {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port
            and c.pid}
    if not pids:
        raise SystemExit(f"no process on this machine listens on port {port}: give --server-pid")
    top = psutil.Process(min(pids))
    while top.parent() is not None and "bentoml" in " ".join(top.parent().cmdline()):
        top = top.parent()  # a worker holds the socket too: its server is the bentoml process above it
    return top.pid


async def soak(args, url: str, server_pid: int, model: str | None, texts: list[str]) -> int:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=max(args.clients, args.max_outstanding) + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        max_rate = None
        rate = args.rate
        if rate is None:
            max_rate = await probe(session, url, texts, model, args.clients, args.probe_seconds)
            rate = args.load * max_rate
            print(f"probe: {max_rate:.1f} req/s with {args.clients} clients; soaking at {rate:.1f} req/s", flush=True)
        if rate <= 0:
            raise SystemExit("the probe got no answer: is the server serving the model?")
        print(f"warm-up {args.warmup:g} s, then {args.seconds:g} s, windows of {args.every:g} s", flush=True)
        windows = await paced(session, url, texts, model, rate, args.warmup, args.seconds, args.every, server_pid,
                              args.max_requests, args.max_outstanding)
    verdicts = check(windows)
    print_tables(windows, verdicts, rate, max_rate)
    broken = [v for v in verdicts if not v.ok]
    for v in broken:
        print(f"soak: bound broken: {v.bound}: {v.measured} (limit {v.limit})", file=sys.stderr)
    return 1 if broken else 0


async def main_async(args) -> int:
    texts = [json.loads(line)["text"] for line in Path(args.texts).read_text().splitlines() if line.strip()]
    if args.url:
        return await soak(args, args.url.rstrip("/"), args.server_pid or listener_pid(args.url), args.model, texts)
    sys.path.insert(0, str(HERE.parent))
    import serve_bench  # the registry export and the server of bench/serve_bench.py

    home, model = serve_bench.prepare(args)
    logs = Path(tempfile.mkdtemp(prefix="soak-logs-"))
    server = serve_bench.service_server(home, logs, {})
    print(f"server log: {server.log_path}", flush=True)
    try:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            await server.ready(session)
        return await soak(args, server.url, server.process.pid, model, texts)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (127.0.0.1); else one is started with --run or --home/--model")
    parser.add_argument("--server-pid", type=int, help="with --url: its process (default: the one listening on its port)")
    parser.add_argument("--run", help="a fine-tuned run folder, exported (onnx, int8) into a new registry")
    parser.add_argument("--home", help="FINETUNE_SERVE_HOME holding --model")
    parser.add_argument("--model", help="the model to ask for (default: the server's only model)")
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)  # serve_bench.prepare's
    parser.add_argument("--texts", default=str(DEFAULT_TEXTS), help="JSONL with a text field")
    parser.add_argument("--seconds", type=float, default=600.0, help="the soak proper, after the warm-up")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds at the soak's rate before it is judged")
    parser.add_argument("--every", type=float, default=10.0, help="seconds per window (one table row each)")
    parser.add_argument("--rate", type=float, help="requests/s to send (default: --load of the probe's maximum)")
    parser.add_argument("--load", type=float, default=0.7, help="share of the probed maximum to send")
    parser.add_argument("--clients", type=int, default=32, help="the probe's closed-loop clients")
    parser.add_argument("--probe-seconds", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=2_000_000, help="send no more than this in all")
    parser.add_argument("--max-outstanding", type=int, default=256, help="requests in flight at most")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
