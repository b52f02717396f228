"""Run bench/load/locustfile.py headless, bounded, against a server this script starts or one already running.

    python bench/load/run_locust.py --run RUN_DIR [--image-run RUN_DIR] -u 32 -t 60s --max-requests 20000
    python bench/load/run_locust.py --url http://127.0.0.1:3000 --text-model NAME [--image-model NAME] -u 32 -t 60s

With --run, RUN_DIR/model is exported (onnx, int8) into a new registry as "bench" and (with
--image-run, an image run folder) the image model as "bench-image", and `bentoml serve
service.bento:FinetuneServe` is started on a free 127.0.0.1 port, then stopped at the end. Locust runs
with -u users spawned at once (-r = -u), stops at --run-time or after --max-requests requests, prints
its table and writes PREFIX_stats.csv (--csv PREFIX, default in a temporary folder, printed). The exit
code is Locust's: 1 when any request failed (a 429 included).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = Path(sys.executable).parent


def locust(args, url: str, text_model: str, image_model: str | None) -> int:
    csv = args.csv or str(Path(tempfile.mkdtemp(prefix="locust-")) / "load")
    argv = [str(BIN / "locust"), "-f", str(HERE / "locustfile.py"), "--headless", "--host", url,
            "-u", str(args.users), "-r", str(args.users), "--run-time", args.run_time,
            "--max-requests", str(args.max_requests), "--text-model", text_model, "--csv", csv, "--only-summary",
            "--stop-timeout", "10"]
    argv += ["--image-model", image_model, "TextUser", "ImageUser"] if image_model else ["TextUser"]
    print(" ".join(argv), flush=True)
    code = subprocess.run(argv, cwd=REPO).returncode
    print(f"stats: {csv}_stats.csv", flush=True)
    return code


def serve_and_run(args) -> int:
    sys.path.insert(0, str(HERE.parent))
    import serve_bench  # the registry export and the server of bench/serve_bench.py

    args.home, args.model, args.model_dir = None, None, None
    home, text_model = serve_bench.prepare(args)
    image_model = None
    if args.image_run:
        from finetune_core.artifacts import export_version

        print(f"exporting {args.image_run}/model (onnx, int8) into {home}", flush=True)
        image_model = export_version(Path(args.image_run) / "model", "bench-image", variants=["onnx", "int8"]).name
    logs = Path(tempfile.mkdtemp(prefix="locust-logs-"))
    server = serve_bench.service_server(home, logs, {})
    print(f"server log: {server.log_path}", flush=True)
    try:
        asyncio.run(_ready(server))
        return locust(args, server.url, text_model, image_model)
    finally:
        server.stop()


async def _ready(server) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        await server.ready(session)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (127.0.0.1); else one is started from --run")
    parser.add_argument("--run", help="a fine-tuned text run folder, exported and served as 'bench'")
    parser.add_argument("--image-run", help="with --run: an image run folder, exported and served as 'bench-image'")
    parser.add_argument("--text-model", default="bench", help="with --url: the text model")
    parser.add_argument("--image-model", help="with --url: an image model (else text requests only)")
    parser.add_argument("-u", "--users", type=int, default=32, help="concurrent users (closed loop)")
    parser.add_argument("-t", "--run-time", default="60s", help="Locust's --run-time: 30s, 5m, ...")
    parser.add_argument("--max-requests", type=int, default=50_000, help="stop after this many requests")
    parser.add_argument("--csv", help="Locust's --csv PREFIX (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.url:
        return locust(args, args.url.rstrip("/"), args.text_model, args.image_model)
    if not args.run:
        parser.error("give --run RUN_DIR (a server is started) or --url URL")
    return serve_and_run(args)


if __name__ == "__main__":
    sys.exit(main())
