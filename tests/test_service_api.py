"""The service over real HTTP: one `bentoml serve` for the module, with an API key and a small upload limit.

The lifecycle test trains the tiny BERT through POST /finetune; the other tests reuse its model.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import toy_rows
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import Server, finetune_body, upload, wait_for_job

pytestmark = pytest.mark.process  # starts a real server

KEY = "test-key-0123"
UPLOAD_LIMIT_MB = 0.1


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base):
    folder = tmp_path_factory.mktemp("service")
    running = Server(folder / "home", folder / "server.log",
                     env={"FINETUNE_SERVE_API_KEY": KEY, "FINETUNE_SERVE_MAX_UPLOAD_MB": str(UPLOAD_LIMIT_MB),
                          "FINETUNE_SERVE_BASE_MODELS": str(tiny_base)}).start()
    yield running
    running.kill()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def trained(client, tiny_base) -> dict:
    """Upload toy data, fine-tune through the API, wait for success: {"job", "train", "eval"}."""
    train = upload(client, toy_rows(240, seed=0))
    held_out = upload(client, toy_rows(80, seed=7), name="held_out.jsonl")
    response = client.post("/finetune", json=finetune_body(tiny_base, train["id"]))
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    job = wait_for_job(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    return {"job": job, "train": train, "eval": held_out}


def test_upload_reports_rows_columns_format(client):
    info = upload(client, toy_rows(30))
    assert (info["rows"], info["columns"], info["format"]) == (30, ["label", "text"], "jsonl")
    assert info["id"].startswith("ds-")
    csv = b"text,label\nhello there,positive\nawful thing,negative\n"
    response = client.post("/datasets", files={"file": ("small.csv", csv)})
    assert response.status_code == 200
    assert response.json()["rows"] == 2 and response.json()["format"] == "csv"


def test_finetune_job_succeeds_and_registers_a_model(client, trained):
    job = trained["job"]
    assert job["progress"] == 1.0 and job["model"] == {"name": "toy", "version": "v1"}
    assert job["error"] is None and job["epoch"] == 6 and job["step"] > 0
    assert job["metrics"]["validation"]["accuracy"] >= 0.9  # the cue-word task is learnt
    assert job["metrics"]["variants"]["onnx"]["accepted"] is True
    assert job["started_at"] <= job["finished_at"]
    listed = client.get("/jobs").json()["jobs"]
    assert job["id"] in [j["id"] for j in listed]
    assert [j["id"] for j in client.get("/jobs", params={"status": "succeeded"}).json()["jobs"]] == [job["id"]]


def test_job_events_page_in_order(client, trained):
    job_id = trained["job"]["id"]
    first = client.get(f"/jobs/{job_id}/events", params={"limit": 3}).json()
    assert [e["type"] for e in first["events"]] == ["queued", "running", "data"]
    rest = client.get(f"/jobs/{job_id}/events", params={"after": first["next"]}).json()["events"]
    types = [e["type"] for e in rest]
    assert types[0] == "start" and types[-2:] == ["exporting", "succeeded"]
    assert types.count("eval") == 6 and "step" in types
    seqs = [e["seq"] for e in first["events"] + rest]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_job_artifacts(client, trained):
    job_id = trained["job"]["id"]
    curves = client.get(f"/jobs/{job_id}/artifacts/curves.png")
    assert curves.status_code == 200 and curves.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get(f"/jobs/{job_id}/artifacts/confusion.png").content[:4] == b"\x89PNG"
    report = client.get(f"/jobs/{job_id}/artifacts/data_report.json").json()
    assert report["rows"]["train"] + report["rows"]["validation"] + report["rows"]["test"] <= 240
    bad = client.get(f"/jobs/{job_id}/artifacts/model.bin")
    assert bad.status_code == 422 and bad.json()["field"] == "name"


def test_predict_evaluate_promote(client, trained):
    texts = ["the movie was great", "a terrible plot", "superb acting", "dull film"]
    response = client.post("/predict", json={"model": "toy", "inputs": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "toy", "version": "v1"} and body["variant"] == "onnx"
    assert [p["label"] for p in body["predictions"]] == ["positive", "negative", "positive", "negative"]
    for p in body["predictions"]:
        assert abs(sum(p["scores"].values()) - 1.0) < 1e-5 and p["score"] == max(p["scores"].values())
    # One model registered: `model` may be left out; the pytorch variant gives the same labels.
    same = client.post("/predict", json={"inputs": texts, "variant": "pytorch", "version": "v1"}).json()
    assert [p["label"] for p in same["predictions"]] == [p["label"] for p in body["predictions"]]

    evaluated = client.post("/evaluate", json={"model": "toy", "data": trained["eval"]["id"]})
    assert evaluated.status_code == 200, evaluated.text
    figures = evaluated.json()
    assert figures["n"] == 80 and figures["labels"] == ["negative", "positive"]
    assert figures["accuracy"] >= 0.9 and sum(map(sum, figures["confusion_matrix"])) == 80

    assert client.get("/models").json()["models"][0]["production"] is None
    promoted = client.post("/models/toy/promote", json={"version": "v1"})
    assert promoted.json() == {"name": "toy", "production": "v1"}
    shown = client.get("/models/toy").json()
    assert shown["production"] == "v1" and shown["versions"][0]["variants"]["onnx"] is True
    production = client.post("/predict", json={"model": "toy", "version": "production", "inputs": ["great"]})
    assert production.json()["model"]["version"] == "v1"


@pytest.mark.parametrize(
    "path, body, status, field",
    [
        ("/predict", {"model": "nope", "inputs": ["x"]}, 404, None),
        ("/predict", {"model": "toy", "version": "v9", "inputs": ["x"]}, 404, None),
        ("/predict", {"model": "toy", "version": "9", "inputs": ["x"]}, 422, "version"),
        ("/predict", {"model": "../etc", "inputs": ["x"]}, 422, "model"),
        ("/predict", {"model": "toy", "variant": "fp64", "inputs": ["x"]}, 422, "variant"),
        ("/predict", {"model": "toy", "variant": "int8", "inputs": ["x"]}, 422, "variant"),  # not exported
        ("/predict", {"model": "toy", "inputs": []}, 422, "inputs"),
        ("/predict", {"model": "toy", "inputs": ["x"] * 257}, 413, "inputs"),
        ("/predict", {"model": "toy", "inputs": "just one string"}, 422, "inputs"),
        ("/predict", {"model": "toy", "inputs": ["x"], "extra": 1}, 422, "extra"),
        ("/evaluate", {"model": "toy", "data": "ds-0000000000000000"}, 404, "data"),
        ("/evaluate", {"model": "toy", "data": "../../etc/passwd"}, 404, "data"),
        ("/finetune", {"train": "ds-0000000000000000", "model_name": "m"}, 404, "train"),
        ("/finetune", {"train": "DATASET", "model_name": "m", "hyperparameters": {"epochs": 0}}, 422, "hyperparameters.epochs"),
        ("/finetune", {"train": "DATASET", "model_name": "m", "hyperparameters": {"optimizer": "lion"}}, 422, "hyperparameters.optimizer"),
        ("/finetune", {"train": "DATASET", "model_name": "m", "hyperparameters": {"freeze": "most"}}, 422, "hyperparameters.freeze"),
        ("/finetune", {"train": "DATASET", "model_name": "m", "hyperparameters": {"epoch": 3}}, 422, "hyperparameters.epoch"),
        ("/finetune", {"train": "DATASET", "model_name": "m", "variants": ["tflite"]}, 422, "variants.0"),
        ("/finetune", {"train": "DATASET", "model_name": "a/b"}, 422, "model_name"),
        ("/finetune", {"train": "DATASET", "model_name": "m", "task": "translation"}, 422, "task"),
        ("/finetune", {"train": "DATASET"}, 422, "model_name"),
        ("/models/toy/promote", {"version": "v7"}, 404, None),
        ("/models/ghost/promote", {"version": "v1"}, 404, None),
    ],
)
def test_bad_requests_get_4xx_naming_the_field(client, trained, path, body, status, field):
    body = json.loads(json.dumps(body).replace("DATASET", trained["train"]["id"]))
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["error"] and (field is None or error["field"] == field), error


def test_unknown_job_and_finished_job_cancel(client, trained):
    assert client.get("/jobs/job-missing").status_code == 404
    assert client.get("/jobs/job-missing/events").status_code == 404
    assert client.post("/jobs/job-missing/cancel").status_code == 404
    finished = client.post(f"/jobs/{trained['job']['id']}/cancel")
    assert finished.status_code == 409 and "already succeeded" in finished.json()["error"]
    assert client.get("/models/ghost").status_code == 404


def test_bad_uploads(client):
    broken = client.post("/datasets", files={"file": ("data.jsonl", b'{"text": "a", "label": "x"}\nnot json\n')})
    assert broken.status_code == 422 and "line 2" in broken.json()["error"] and "data.jsonl" in broken.json()["error"]
    unknown = client.post("/datasets", files={"file": ("data.xlsx", b"PK")})
    assert unknown.status_code == 422 and unknown.json()["field"] == "file"
    empty = client.post("/datasets", files={"file": ("data.jsonl", b"")})
    assert empty.status_code == 422
    missing = client.post("/datasets", data={"other": "x"})
    assert missing.status_code == 422 and missing.json()["field"] == "file"
    huge = b'{"text": "' + b"x" * int(UPLOAD_LIMIT_MB * 2**20) + b'", "label": "a"}\n'
    too_large = client.post("/datasets", files={"file": ("big.jsonl", huge)})
    assert too_large.status_code == 413 and "upload limit" in too_large.json()["error"]


def test_large_json_body_is_413_and_bad_json_is_422(client):
    big = client.post("/evaluate", content=b'{"data": "' + b"x" * (2 << 20) + b'"}',
                      headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["field"] == "body"
    # /predict takes bodies up to 32 MiB (base64 images), but at most 1 MiB of text.
    huge = client.post("/predict", content=b'{"images": ["' + b"x" * (33 << 20) + b'"]}',
                       headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["field"] == "body"
    long_texts = client.post("/predict", json={"model": "toy", "inputs": ["x" * (2 << 20)]})
    assert long_texts.status_code == 413 and long_texts.json()["field"] == "inputs"
    bad = client.post("/predict", content=b'{"inputs": [', headers={"content-type": "application/json"})
    assert bad.status_code == 422


def test_cancel_a_running_job(client, tiny_base, trained):
    body = finetune_body(tiny_base, trained["train"]["id"], model_name="long", epochs=500, batch_size=4)
    job_id = client.post("/finetune", json=body).json()["id"]
    wait_for_job(client, job_id, states=("running",), timeout=60)
    for _ in range(120):  # until the loop reports steps, so the cancel lands mid-training
        if client.get(f"/jobs/{job_id}").json()["step"]:
            break
        time.sleep(0.5)
    cancelled = client.post(f"/jobs/{job_id}/cancel").json()
    assert cancelled["cancel_requested"] is True
    final = wait_for_job(client, job_id, timeout=60)
    assert final["status"] == "cancelled" and final["model"] is None
    assert "long" not in [m["name"] for m in client.get("/models").json()["models"]]


def test_api_key_guards_everything_but_health_and_metrics(server, client):
    anonymous = httpx.get(server.url + "/jobs", timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["field"] == "authorization"
    wrong = httpx.get(server.url + "/models", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    assert httpx.post(server.url + "/predict", json={"inputs": ["x"]}, timeout=10).status_code == 401
    for open_path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(server.url + open_path, timeout=10).status_code == 200
    for bentoml_own in ("/schema.json", "/docs.json"):
        assert httpx.get(server.url + bentoml_own, timeout=10).status_code == 401
    assert client.get("/jobs").status_code == 200


def test_metrics_are_ours_and_parse(server, client, trained):
    client.post("/predict", json={"model": "toy", "inputs": ["great", "awful"]})
    client.post("/predict", json={"model": "nope", "inputs": ["x"]})
    text = httpx.get(server.url + "/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    ok = samples[("finetune_predictions_total", (("model", "toy"), ("outcome", "ok"), ("variant", "onnx")))]
    assert ok >= 1
    assert samples[("finetune_predictions_total", (("model", "none"), ("outcome", "error"), ("variant", "default")))] >= 1
    assert samples[("finetune_jobs", (("state", "succeeded"),))] >= 1
    assert samples[("finetune_dataset_uploads_total", (("outcome", "accepted"), ("reason", "")))] >= 2
    assert samples[("finetune_dataset_uploads_total", (("outcome", "rejected"), ("reason", "invalid")))] >= 1
    assert samples[("finetune_prediction_latency_seconds_count", (("variant", "onnx"),))] >= 1
    assert samples[("finetune_job_duration_seconds_count", (("outcome", "succeeded"),))] >= 1


def test_trainer_asks_for_a_gpu_is_composed_with_depends_and_runs_without_one(trained):
    import torch

    from service.bento import FinetuneServe, Trainer

    assert Trainer.config["resources"]["gpu"] == 1 and Trainer.config["workers"] == 1
    assert FinetuneServe.dependencies["trainer"].on is Trainer
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert trained["job"]["metrics"]["train"]["device"] == expected
