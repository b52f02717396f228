"""A search job through a real `bentoml serve`: a bad search block is a 422 naming the field; a grid search
over two learning rates finds the better one, shows trials_done and best, serves its plots and
registers the best trial's model."""

from __future__ import annotations

import pytest
import json

import httpx
from conftest import toy_rows
from service_helpers import Server, finetune_body, upload, wait_for_job

GOOD_LR, BAD_LR = 3e-3, 1e-6


pytestmark = pytest.mark.process  # starts a real server

def test_search_job_over_rest(tmp_path, tiny_base):
    server = Server(tmp_path / "home", tmp_path / "server.log").start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            ids = {role: upload(client, rows, name=f"{role}.jsonl")["id"] for role, rows in
                   (("train", toy_rows(120)), ("validation", toy_rows(40, seed=7)), ("test", toy_rows(40, seed=9)))}
            body = {**finetune_body(tiny_base, ids["train"], model_name="searched", batch_size=8),
                    "validation": ids["validation"], "test": ids["test"]}
            for search, field in (({"space": {"learning_rate": {"low": 0, "high": 1e-3, "log": True}}}, "search.space.learning_rate.low"),
                                  ({"space": {"dropout": [0.1, 0.2]}}, "search.space.dropout"),
                                  ({"sampler": "grid"}, "search.space.learning_rate"),
                                  ({"pruner": "asha"}, "search.pruner")):
                refused = client.post("/finetune", json={**body, "search": search})
                assert refused.status_code == 422 and refused.json()["field"] == field, refused.text
                assert refused.json()["error"].startswith(field)

            search = {"sampler": "grid", "space": {"learning_rate": [BAD_LR, GOOD_LR]}}
            job_id = client.post("/finetune", json={**body, "search": search}).json()["id"]
            job = wait_for_job(client, job_id, timeout=300)
            assert job["status"] == "succeeded", (job, server.tail())
            assert job["trials_done"] == 2 and job["best"]["params"] == {"learning_rate": GOOD_LR}
            assert job["best"]["metric"] == "validation.accuracy" and job["best"]["value"] >= 0.9
            assert job["metrics"]["validation"]["accuracy"] == job["best"]["value"]
            assert job["metrics"]["test"]["accuracy"] >= 0.9  # the best trial's model, on the test split
            assert job["model"] == {"name": "searched", "version": "v1"}

            events = client.get(f"/jobs/{job_id}/events").json()["events"]
            ends = [e for e in events if e["type"] == "trial_end"]
            assert [e["state"] for e in ends] == ["complete", "complete"]
            assert [e["type"] for e in events].count("trial_start") == 2
            assert {e["trial"] for e in events if e["type"] == "eval"} == {0, 1}

            report = json.loads((tmp_path / "home" / "runs" / job_id / "search.json").read_text())
            expected = {"optimization_history.png": 200, "param_importances.png": 200 if report["importances"] else 404,
                        "curves.png": 200}
            for name, status in expected.items():
                got = client.get(f"/jobs/{job_id}/artifacts/{name}")
                assert got.status_code == status, (name, got.text)
            answer = client.post("/predict", json={"model": "searched", "inputs": ["great film", "awful plot"]}).json()
            assert [p["label"] for p in answer["predictions"]] == ["positive", "negative"]
    finally:
        server.kill()
