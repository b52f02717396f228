"""Serving throughput and latency on loopback: the service's /predict against a naive baseline and the framework's ceiling.

    python bench/serve_bench.py --run RUN_DIR                 # 1, 8, 32, 64 clients: table and plot (about 7 minutes)
    python bench/serve_bench.py --run RUN_DIR --overload 256  # the same, then the service at 256 clients (429s)
    python bench/serve_bench.py --run RUN_DIR --concurrency 32 --only empty service naive   # one level, with the ceiling
    python bench/serve_bench.py --run RUN_DIR --sweep         # ORT threads/spinning and batching settings (about 4 minutes)
    python bench/serve_bench.py --home HOME --model NAME      # a model already registered in HOME

Contenders, one after another, each a fresh server on 127.0.0.1, one text per request from N
concurrent closed-loop aiohttp clients (an httpx client saturated a core here and hid the differences)
for each N of --concurrency, a few seconds of warm-up at N, then --seconds of measurement (and at most
--max-requests requests). For each: requests/s, p50/p95/p99 of the 200s, errors (anything but 200 and
429, timeouts included), 429s (the service's load shedding, service/shedding.py; a client that gets one
waits its Retry-After before its next request, as a well-behaved client does), and the server's
process tree (bench/load/procstats.py): cores busy and peak summed RSS. `--plot PNG` (default
serve_bench.png in the logs folder's parent, printed) draws throughput and p99 against N:

  empty     an async BentoML endpoint returning a constant: the framework's ceiling on this machine
  service   `bentoml serve service.bento:FinetuneServe`, the registered model's default variant
  training  the same server while a training job runs in its trainer (niced child, capped threads), at
            32 clients (or the largest N below it)
  naive     FastAPI, a sync endpoint around transformers' pipeline("text-classification") on the
            same model folder, one uvicorn worker

The load generator shares the machine's cores with the server, as a client on the same host would.
BentoML's access log is off for both BentoML servers (it costs about as much as the endpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import bentoml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "load"))
import procstats  # noqa: E402  (bench/load is not a package: bench/load/procstats.py)

BIN = Path(sys.executable).parent
SAMPLE_TRAIN = REPO / "examples" / "sst2_sample" / "train.jsonl"
ACCESS_LOG_OFF = {"logging": {"access": {"enabled": False}}}
BENTOML_ENV = {
    "BENTOML_DO_NOT_TRACK": "true",
    "BENTOML_CONFIG_OVERRIDES": json.dumps({"services": {"finetune-serve": ACCESS_LOG_OFF, "bench-empty": ACCESS_LOG_OFF}}),
}
START_SECONDS = 120
WARMUP_SECONDS = 3.0
REQUEST_TIMEOUT_SECONDS = 30.0
CONCURRENCY = [1, 8, 32, 64]
TRAINING_CLIENTS = 32  # the goal's level: /predict p99 with a job running, against idle at the same level
STATS_EVERY_SECONDS = 0.5
# (label, environment) for --sweep: the service under its defaults, then one setting changed at a time.
SWEEP = [
    ("defaults (ORT 2 threads, no spinning, max batch 32, no wait)", {}),
    ("max batch 8", {"FINETUNE_SERVE_MAX_BATCH": "8"}),
    ("no merging (max batch 1)", {"FINETUNE_SERVE_MAX_BATCH": "1"}),
    ("max wait 10 ms", {"FINETUNE_SERVE_MAX_WAIT_MS": "10"}),
    ("ORT 1 thread, no spinning", {"FINETUNE_SERVE_ORT_THREADS": "1", "FINETUNE_SERVE_ORT_SPINNING": "0"}),
    ("ORT 1 thread, spinning", {"FINETUNE_SERVE_ORT_THREADS": "1", "FINETUNE_SERVE_ORT_SPINNING": "1"}),
    ("ORT 2 threads, spinning", {"FINETUNE_SERVE_ORT_THREADS": "2", "FINETUNE_SERVE_ORT_SPINNING": "1"}),
]


# ---------------------------------------------------------------- the two contender apps


@bentoml.service(name="bench-empty", workers=1)
class EmptyService:
    """`bentoml serve serve_bench:EmptyService`: the same request shape, a constant answer."""

    @bentoml.api
    async def predict(self, inputs: list[str]) -> dict:
        return {"predictions": [{"label": "positive", "score": 1.0}]}


def naive_app():
    """`uvicorn --factory serve_bench:naive_app`: what a first attempt looks like (NAIVE_MODEL_DIR)."""
    from fastapi import FastAPI
    from transformers import pipeline

    classifier = pipeline("text-classification", model=os.environ["NAIVE_MODEL_DIR"], device="cpu")
    app = FastAPI()

    @app.post("/predict")
    def predict(body: dict) -> dict:
        return {"predictions": classifier(body["inputs"])}

    @app.get("/readyz")
    def ready() -> dict:
        return {}

    return app


# ---------------------------------------------------------------- servers


class Server:
    def __init__(self, name: str, argv: list[str], env: dict, logs: Path):
        self.name = name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logs / f"{name}.log"
        argv = [a.replace("{port}", str(self.port)) for a in argv]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, cwd=REPO, env=dict(os.environ, **env), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    async def ready(self, session) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                async with session.get(self.url + "/readyz") as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.name} was not ready within {START_SECONDS}s; see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM to the whole process group (BentoML workers and the training child too), SIGKILL if slow."""
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bentoml_argv(target: str, working_dir: Path) -> list[str]:
    return [str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", "{port}", "--working-dir", str(working_dir)]


# ---------------------------------------------------------------- load


@dataclass
class Result:
    name: str
    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # of the 200s
    shed_latencies: list[float] = field(default_factory=list)  # of the 429s
    errors: int = 0  # anything else: other statuses, connection errors, timeouts
    note: str = ""
    cpu: dict[str, float] = field(default_factory=dict)  # cores busy: server, client, whole machine
    peak_rss_mb: float = float("nan")  # the server's process tree, summed

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, p: float, shed: bool = False) -> float:
        return percentile(self.shed_latencies if shed else self.latencies, p)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


async def load(session, url: str, texts: list[str], model: str | None, clients: int, seconds: float,
               max_requests: int, name: str = "") -> Result:
    """`clients` closed-loop clients, one text per request, until `seconds` pass or `max_requests` are sent."""
    import aiohttp

    result = Result(name, clients, seconds)
    sent = 0
    deadline = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)

    async def client() -> None:
        nonlocal sent
        while time.perf_counter() < deadline and sent < max_requests:
            body = {"inputs": [texts[sent % len(texts)]]}
            if model:
                body["model"] = model
            sent += 1
            started = time.perf_counter()
            try:
                async with session.post(url + "/predict", json=body, timeout=timeout) as response:
                    await response.read()
                    status = response.status
                    retry_after = float(response.headers.get("Retry-After", "1"))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = None
            if status == 200:
                result.latencies.append(time.perf_counter() - started)
            elif status == 429:
                result.shed_latencies.append(time.perf_counter() - started)
                await asyncio.sleep(retry_after)  # as a client honouring Retry-After; retrying at once is a flood
            else:
                result.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


async def peak_rss(pid: int, stop: asyncio.Event) -> float:
    """The server tree's largest summed RSS in MB, sampled every STATS_EVERY_SECONDS until `stop`."""
    peak = 0
    while not stop.is_set():
        peak = max(peak, (await asyncio.to_thread(procstats.snapshot, pid)).rss_bytes)
        try:
            await asyncio.wait_for(stop.wait(), STATS_EVERY_SECONDS)
        except asyncio.TimeoutError:
            pass
    return peak / 2**20


async def measure(session, server: Server, args, texts: list[str], model: str | None, name: str,
                  clients: int) -> Result:
    await load(session, server.url, texts, model, clients, WARMUP_SECONDS, args.max_requests)
    before = cpu_seconds(server.process.pid)
    stop = asyncio.Event()
    sampler = asyncio.create_task(peak_rss(server.process.pid, stop))
    result = await load(session, server.url, texts, model, clients, args.seconds, args.max_requests, name)
    stop.set()
    result.peak_rss_mb = await sampler
    after = cpu_seconds(server.process.pid)
    result.cpu = {part: (after[part] - before[part]) / result.seconds for part in after}
    print(f"  {name}, {clients} clients: {result.rps:.1f} req/s, p99 {result.percentile(99) * 1000:.0f} ms, "
          f"{result.errors} errors, {len(result.shed_latencies)} shed; cores busy: server {result.cpu['server']:.2f}, "
          f"client {result.cpu['client']:.2f}, machine {result.cpu['machine']:.2f}; "
          f"server RSS {result.peak_rss_mb:.0f} MB", flush=True)
    return result


def cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds so far of the server's process tree, of this process (the client) and of the whole machine.

    The machine figure includes anything else running: compare it with the other two to see interference.
    """
    machine = procstats.psutil.cpu_times()
    return {"server": procstats.snapshot(server_pid).cpu_seconds, "client": sum(os.times()[:2]),
            "machine": machine.user + machine.nice + machine.system + machine.irq + machine.softirq + machine.steal}


# ---------------------------------------------------------------- contenders


def service_server(home: Path, logs: Path, extra_env: dict, name: str = "service") -> Server:
    env = dict(BENTOML_ENV, FINETUNE_SERVE_HOME=str(home), **extra_env)
    return Server(name, bentoml_argv("service.bento:FinetuneServe", REPO), env, logs)


async def start_training(session, url: str) -> str:
    """Queue a real MiniLM fine-tune on the shipped SST-2 sample and wait for its first optimizer steps."""
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("file", SAMPLE_TRAIN.read_bytes(), filename="train.jsonl")
    async with session.post(url + "/datasets", data=form) as response:
        dataset = await response.json()
    body = {"base_model": "default", "train": dataset["id"], "model_name": "bench-training", "variants": ["onnx"],
            "hyperparameters": {"epochs": 3, "batch_size": 16, "max_length": 64}}
    async with session.post(url + "/finetune", json=body) as response:
        job_id = (await response.json())["id"]
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        async with session.get(f"{url}/jobs/{job_id}") as response:
            job = await response.json()
        if job["status"] != "queued" and job["status"] != "running":
            raise RuntimeError(f"the training job ended before the measurement: {job}")
        if job["status"] == "running" and (job["step"] or 0) >= 2:
            return job_id
        await asyncio.sleep(1)
    raise RuntimeError(f"the training job made no steps within {START_SECONDS}s")


async def job_steps(session, url: str, job_id: str) -> int:
    async with session.get(f"{url}/jobs/{job_id}") as response:
        return (await response.json())["step"] or 0


def training_clients(levels: list[int]) -> int:
    below = [n for n in levels if n <= TRAINING_CLIENTS]
    return max(below) if below else min(levels)


async def run_table(session, args, home: Path, model: str, texts: list[str], logs: Path) -> list[Result]:
    results = []
    contenders = args.only or ["service", "naive"]
    levels = args.concurrency
    if "empty" in contenders:
        print("empty BentoML endpoint", flush=True)
        server = Server("empty", bentoml_argv("serve_bench:EmptyService", REPO / "bench"), BENTOML_ENV, logs)
        try:
            await server.ready(session)
            for clients in levels:
                results.append(await measure(session, server, args, texts, None, "empty BentoML endpoint (ceiling)",
                                             clients))
        finally:
            server.stop()
    if "service" in contenders:
        print("service", flush=True)
        server = service_server(home, logs, {})
        try:
            await server.ready(session)
            for clients in levels + ([args.overload] if args.overload else []):
                results.append(await measure(session, server, args, texts, model, "service /predict", clients))
            if not args.no_training:
                clients = training_clients(levels)
                job_id = await start_training(session, server.url)
                steps = await job_steps(session, server.url, job_id)
                during = await measure(session, server, args, texts, model, "service /predict, training job running",
                                       clients)
                steps = await job_steps(session, server.url, job_id) - steps
                during.note = f"trainer made {steps} steps of 16 meanwhile"
                results.append(during)
                async with session.post(f"{server.url}/jobs/{job_id}/cancel") as response:
                    await response.read()
        finally:
            server.stop()
    if "naive" in contenders:
        print("naive baseline", flush=True)
        env = {"NAIVE_MODEL_DIR": str(args.model_dir)}
        argv = [str(BIN / "uvicorn"), "--factory", "serve_bench:naive_app", "--app-dir", str(REPO / "bench"),
                "--host", "127.0.0.1", "--port", "{port}", "--workers", "1", "--no-access-log"]
        server = Server("naive", argv, env, logs)
        try:
            await server.ready(session)
            for clients in levels:
                results.append(await measure(session, server, args, texts, None, "naive FastAPI + transformers pipeline",
                                             clients))
        finally:
            server.stop()
    return results


async def run_sweep(session, args, home: Path, model: str, texts: list[str], logs: Path) -> list[Result]:
    results = []
    clients = args.concurrency[-1]
    for i, (label, env) in enumerate(SWEEP):
        print(label, flush=True)
        server = service_server(home, logs, env, name=f"sweep-{i}")
        try:
            await server.ready(session)
            results.append(await measure(session, server, args, texts, model, label, clients))
        finally:
            server.stop()
    return results


def print_table(results: list[Result]) -> None:
    """One row per contender and level; `vs naive` against the naive baseline at the same level."""
    naive = {r.clients: r for r in results if r.name.startswith("naive")}
    print()
    print("| contender | clients | req/s | p50 ms | p95 ms | p99 ms | errors | 429s (p99 ms) | vs naive | "
          "server cores | server RSS MB | cores: client/machine |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        vs_naive = f"{r.rps / naive[r.clients].rps:.1f}x" if r.clients in naive and naive[r.clients].rps else "-"
        shed = f"{len(r.shed_latencies)} ({r.percentile(99, shed=True) * 1000:.0f})" if r.shed_latencies else "0"
        print(f"| {r.name} | {r.clients} | {r.rps:.1f} | {r.percentile(50) * 1000:.0f} | {r.percentile(95) * 1000:.0f} | "
              f"{r.percentile(99) * 1000:.0f} | {r.errors} | {shed} | {vs_naive} | {r.cpu['server']:.2f} | "
              f"{r.peak_rss_mb:.0f} | {r.cpu['client']:.2f}/{r.cpu['machine']:.2f} |")
    for r in results:
        if r.note:
            print(f"{r.name}, {r.clients} clients: {r.note}")


def plot(results: list[Result], path: Path) -> None:
    """Throughput and p99 against clients, one line per contender (points alone for single-level ones)."""
    sys.path.insert(0, str(REPO))
    from finetune_core.plots import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(dict.fromkeys(r.name for r in results))
    for name in names:
        rows = sorted((r for r in results if r.name == name), key=lambda r: r.clients)
        clients = [r.clients for r in rows]
        style = "o-" if len(rows) > 1 else "s"
        left.plot(clients, [r.rps for r in rows], style, label=name)
        right.plot(clients, [r.percentile(99) * 1000 for r in rows], style, label=name)
    levels = sorted({r.clients for r in results})
    for ax, ylabel, title in ((left, "requests/s (200s)", "Throughput"), (right, "p99 ms (200s)", "p99 latency")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.set(xlabel="concurrent clients", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prepare(args) -> tuple[Path, str]:
    """The registry home and model name: --home/--model as given, or a fresh home with --run exported into it."""
    sys.path.insert(0, str(REPO))
    from finetune_core import registry

    if args.home and args.model:
        home = Path(args.home)
        os.environ[registry.ROOT_ENV] = str(home)
        info = registry.resolve(args.model)
        args.model_dir = args.model_dir or registry.model_dir(info)
        return home, args.model
    if not args.run:
        raise SystemExit("give --run RUN_DIR (a fine-tuned run) or --home HOME with --model NAME")
    from finetune_core.artifacts import export_version

    home = Path(args.home or tempfile.mkdtemp(prefix="serve-bench-home-"))
    os.environ[registry.ROOT_ENV] = str(home)
    print(f"exporting {args.run}/model (onnx, int8) into {home}", flush=True)
    info = export_version(Path(args.run) / "model", "bench", variants=["onnx", "int8"])
    args.model_dir = args.model_dir or Path(args.run) / "model"
    return home, info.name


def read_texts(args) -> list[str]:
    path = Path(args.texts) if args.texts else Path(args.model_dir).parent / "splits" / "validation.jsonl"
    if not path.is_file():
        path = REPO / "examples" / "sst2_sample" / "validation.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


async def main_async(args) -> None:
    import aiohttp

    home, model = prepare(args)
    texts = read_texts(args)
    logs = Path(tempfile.mkdtemp(prefix="serve-bench-logs-"))
    print(f"model {model} in {home}; {len(texts)} texts; clients {args.concurrency}, {args.seconds:g} s each; "
          f"logs in {logs}", flush=True)
    connector = aiohttp.TCPConnector(limit=max(args.concurrency + [args.overload or 0]) + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        if args.sweep:
            results = await run_sweep(session, args, home, model, texts, logs)
        else:
            results = await run_table(session, args, home, model, texts, logs)
    print_table(results)
    if not args.sweep:
        path = Path(args.plot) if args.plot else logs.parent / "serve_bench.png"
        plot(results, path)
        print(f"\nplot: {path}")
    if not args.keep_logs:
        shutil.rmtree(logs, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a fine-tuned run folder (RUN_DIR/model); exported to onnx and int8 for the service")
    parser.add_argument("--home", help="FINETUNE_SERVE_HOME to use (default: a new temporary one)")
    parser.add_argument("--model", help="a model already registered in --home")
    parser.add_argument("--model-dir", type=Path, help="the folder the naive baseline loads (default: RUN_DIR/model)")
    parser.add_argument("--texts", help="JSONL with a text field (default: the run's validation split)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=CONCURRENCY,
                        help="closed-loop client counts, each measured in turn (--sweep: the last)")
    parser.add_argument("--overload", type=int, help="then the service alone at this many clients (e.g. 256): its 429s")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per contender and level")
    parser.add_argument("--max-requests", type=int, default=50_000, help="at most this many requests per measurement")
    parser.add_argument("--only", nargs="+", choices=["empty", "service", "naive"],
                        help="contenders (default: service naive)")
    parser.add_argument("--no-training", action="store_true", help="skip /predict under a running training job")
    parser.add_argument("--sweep", action="store_true", help="the service under each of SWEEP's settings instead")
    parser.add_argument("--plot", help="the PNG to write (default: serve_bench.png beside the logs folder)")
    parser.add_argument("--keep-logs", action="store_true")
    asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
