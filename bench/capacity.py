"""Capacity, scaled down to this machine: /predict from 1 to 2 API processes, jobs from 1 to 2 trainers.

    python bench/capacity.py --run RUN_DIR                    # both parts (RUN_DIR: a fine-tuned run, e.g. `make demo`'s)
    python bench/capacity.py --run RUN_DIR --only predict     # /predict only
    python bench/capacity.py --only jobs --jobs 12            # jobs only
    python bench/capacity.py ... --database-url postgresql://...   # the jobs part on PostgreSQL (default: SQLite)

predict: RUN_DIR/model is exported (onnx, int8) into a new HOME. For each variant, 1 and then 2
`bentoml serve service.bento:Api` processes (one worker each, one HOME, as API replicas share the
volume) take CLIENTS closed-loop aiohttp clients split evenly over them, as a Kubernetes Service
spreads connections; one text per request, after a warm-up. Reported: req/s, p50/p99 and the cores
the API processes kept busy, so req/s per busy core, the figure the README's capacity model scales.
The load generator runs on the same cores, as in bench/serve_bench.py.

jobs: JOBS tiny fine-tunes (a 2-layer BERT with MiniLM's tokenizer, one epoch over 80 SST-2 rows,
the PyTorch variant alone) are queued in the store once 1, then 2 `service.bento:Trainer` processes
are up and idle; reported: jobs per minute from queueing to the last one done. A tiny job is mostly
its fixed cost (a training process starting, loading, exporting, registering), so this measures what
a second trainer adds when jobs do not fight over one GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from serve_bench import BIN, REPO, REQUEST_TIMEOUT_SECONDS, Result, Server, cpu_seconds

sys.path.insert(0, str(REPO))

SAMPLE = REPO / "examples" / "sst2_sample" / "train.jsonl"
ACCESS_LOG_OFF = {"logging": {"access": {"enabled": False}}}
BENTOML_ENV = {"BENTOML_DO_NOT_TRACK": "true",
               "BENTOML_CONFIG_OVERRIDES": json.dumps({"services": {"finetune-api": ACCESS_LOG_OFF}})}
WARMUP_SECONDS = 3.0
JOBS_DEADLINE_SECONDS = 1800


def api_argv() -> list[str]:
    return [str(BIN / "bentoml"), "serve", "service.bento:Api", "--host", "127.0.0.1", "--port", "{port}"]


def trainer_argv() -> list[str]:
    return [str(BIN / "bentoml"), "serve", "service.bento:Trainer", "--host", "127.0.0.1", "--port", "{port}"]


# ---------------------------------------------------------------- predict


async def spread_load(session, servers: list[Server], texts: list[str], model: str, variant: str, clients: int,
                      seconds: float, max_requests: int, name: str) -> Result:
    """`clients` closed-loop clients split evenly over the servers, one text per request, until `seconds` pass
    or `max_requests` are sent (bench/serve_bench.py's load, with a variant and several servers)."""
    import aiohttp

    result = Result(name, seconds)
    sent = 0
    deadline = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)

    async def client(url: str) -> None:
        nonlocal sent
        while time.perf_counter() < deadline and sent < max_requests:
            body = {"model": model, "variant": variant, "inputs": [texts[sent % len(texts)]]}
            sent += 1
            started = time.perf_counter()
            try:
                async with session.post(url + "/predict", json=body, timeout=timeout) as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            if ok:
                result.latencies.append(time.perf_counter() - started)
            else:
                result.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(servers[i % len(servers)].url) for i in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


async def measure_predict(session, args, home: Path, model: str, texts: list[str], logs: Path) -> list[dict]:
    rows = []
    env = dict(BENTOML_ENV, FINETUNE_SERVE_HOME=str(home), FINETUNE_SERVE_API_WORKERS="1")
    for variant in args.variants:
        for count in (1, 2):
            servers = [Server(f"api-{variant}-{count}-{i}", api_argv(), env, logs) for i in range(count)]
            try:
                for server in servers:
                    await server.ready(session)
                name = f"{variant}, {count} API process{'es' if count > 1 else ''}"
                await spread_load(session, servers, texts, model, variant, args.clients, WARMUP_SECONDS,
                                  args.max_requests, name)
                before = [cpu_seconds(server.process.pid) for server in servers]
                result = await spread_load(session, servers, texts, model, variant, args.clients, args.seconds,
                                           args.max_requests, name)
                after = [cpu_seconds(server.process.pid) for server in servers]
            finally:
                for server in servers:
                    server.stop()
            server_cores = sum(a["server"] - b["server"] for a, b in zip(after, before)) / result.seconds
            row = {"variant": variant, "api_processes": count, "rps": result.rps, "p50_ms": result.percentile(50) * 1000,
                   "p99_ms": result.percentile(99) * 1000, "errors": result.errors, "server_cores": server_cores,
                   "client_cores": (after[0]["client"] - before[0]["client"]) / result.seconds,
                   "machine_cores": (after[0]["machine"] - before[0]["machine"]) / result.seconds,
                   "rps_per_core": result.rps / server_cores if server_cores else float("nan")}
            print(f"  {name}: {row['rps']:.1f} req/s, p99 {row['p99_ms']:.0f} ms, {row['errors']} errors; cores: API "
                  f"{row['server_cores']:.2f}, client {row['client_cores']:.2f}, machine {row['machine_cores']:.2f}; "
                  f"{row['rps_per_core']:.1f} req/s per API core", flush=True)
            rows.append(row)
    return rows


def prepare_model(run: Path, home: Path) -> str:
    from finetune_core.artifacts import export_version

    os.environ["FINETUNE_SERVE_HOME"] = str(home)
    print(f"exporting {run}/model (onnx, int8) into {home}", flush=True)
    info = export_version(run / "model", "capacity", variants=["onnx", "int8"])
    refused = [v for v, record in info.manifest.variants.items() if not record.accepted]
    if refused:
        print(f"  refused by the accuracy gate, so not measured: {', '.join(refused)}", flush=True)
    return info.name


def read_texts(run: Path) -> list[str]:
    path = run / "splits" / "validation.jsonl"
    if not path.is_file():
        path = REPO / "examples" / "sst2_sample" / "validation.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- jobs


def tiny_base(folder: Path) -> Path:
    """The tests' tiny model: a 2-layer, 32-wide random BERT with the real MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from finetune_core.model import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("default"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_spec(base: Path, train: Path, name: str) -> dict:
    from service.schemas import FinetuneRequest, job_spec

    request = FinetuneRequest(base_model=str(base), train="unused", model_name=name, variants=[],
                              hyperparameters={"epochs": 1, "batch_size": 16, "max_length": 32, "precision": "fp32",
                                               "learning_rate": 2e-3, "early_stopping_patience": 0, "seed": 1})
    return job_spec(request, {"train": str(train)})


def measure_jobs(args, work: Path, logs: Path) -> list[dict]:
    from service.jobs import PostgresJobStore, SqliteJobStore

    base = tiny_base(work / "tiny-bert")
    train = work / "train.jsonl"
    train.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:80]))
    rows = []
    for count in (1, 2):
        home = work / f"home-{count}"
        env = dict(BENTOML_ENV, FINETUNE_SERVE_HOME=str(home))
        if args.database_url:
            env["FINETUNE_SERVE_DATABASE_URL"] = args.database_url
            store = PostgresJobStore(args.database_url)
        else:
            store = SqliteJobStore(home / "jobs.sqlite3")
        trainers = [Server(f"trainer-{count}-{i}", trainer_argv(), dict(env, FINETUNE_SERVE_TRAINER_NAME=f"bench-{count}-{i}"),
                           logs) for i in range(count)]
        try:
            asyncio.run(_all_ready(trainers))
            started = time.monotonic()
            before = cpu_seconds(os.getpid())["machine"]
            ids = [store.create(tiny_spec(base, train, f"bench-{count}-{n}")).id for n in range(args.jobs)]
            while time.monotonic() - started < JOBS_DEADLINE_SECONDS:
                states = [store.get(job_id).status for job_id in ids]
                if all(state in ("succeeded", "failed", "cancelled") for state in states):
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError(f"the jobs did not end within {JOBS_DEADLINE_SECONDS}s; logs in {logs}")
            seconds = time.monotonic() - started
            machine = (cpu_seconds(os.getpid())["machine"] - before) / seconds
        finally:
            for trainer in trainers:
                trainer.stop()
        failed = [s for s in states if s != "succeeded"]
        row = {"trainers": count, "jobs": args.jobs, "seconds": seconds, "jobs_per_minute": 60 * args.jobs / seconds,
               "failed": len(failed), "machine_cores": machine}
        print(f"  {count} trainer(s): {args.jobs} jobs in {seconds:.1f} s = {row['jobs_per_minute']:.1f} jobs/min, "
              f"{len(failed)} not succeeded; machine cores busy {machine:.2f}", flush=True)
        rows.append(row)
        if args.database_url:
            store.close()
    return rows


async def _all_ready(servers: list[Server]) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for server in servers:
            await server.ready(session)


# ---------------------------------------------------------------- report


def print_tables(predict: list[dict], jobs: list[dict]) -> None:
    if predict:
        print("\n| variant | API processes | req/s | p50 ms | p99 ms | errors | API cores busy | req/s per API core | "
              "machine cores busy |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in predict:
            print(f"| {r['variant']} | {r['api_processes']} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                  f"{r['errors']} | {r['server_cores']:.2f} | {r['rps_per_core']:.1f} | {r['machine_cores']:.2f} |")
    if jobs:
        print("\n| trainers | jobs | seconds | jobs/min | not succeeded | machine cores busy |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in jobs:
            print(f"| {r['trainers']} | {r['jobs']} | {r['seconds']:.1f} | {r['jobs_per_minute']:.1f} | {r['failed']} | "
                  f"{r['machine_cores']:.2f} |")


async def predict_part(args, work: Path, logs: Path) -> list[dict]:
    import aiohttp

    home = work / "home-predict"
    model = prepare_model(Path(args.run), home)
    texts = read_texts(Path(args.run))
    connector = aiohttp.TCPConnector(limit=args.clients + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        return await measure_predict(session, args, home, model, texts, logs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a fine-tuned run folder (RUN_DIR/model), for the predict part")
    parser.add_argument("--only", choices=["predict", "jobs"])
    parser.add_argument("--variants", nargs="+", default=["int8", "onnx", "pytorch"])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per configuration")
    parser.add_argument("--max-requests", type=int, default=50_000, help="at most this many requests per configuration")
    parser.add_argument("--jobs", type=int, default=12, help="tiny jobs per trainer configuration")
    parser.add_argument("--database-url", help="the jobs part on this PostgreSQL database (default: SQLite)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and the servers' logs")
    args = parser.parse_args(argv)
    if args.only != "jobs" and not args.run:
        parser.error("the predict part needs --run RUN_DIR (e.g. `make demo RUN_DIR=runs/demo`), or give --only jobs")
    work = Path(tempfile.mkdtemp(prefix="capacity-"))
    logs = work / "logs"
    logs.mkdir()
    print(f"work folder {work}; {os.cpu_count()} cores", flush=True)
    try:
        predict = asyncio.run(predict_part(args, work, logs)) if args.only != "jobs" else []
        jobs = measure_jobs(args, work, logs) if args.only != "predict" else []
        print_tables(predict, jobs)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
