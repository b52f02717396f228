"""A search job through a real `bentoml serve`: a bad search block is a 422 naming the field; a grid search
over two learning rates, whose server is SIGKILLed during the second trial and started again, resumes
the same study (the first trial kept, the interrupted one failed and run again), finds the better rate,
shows trials_done and best, serves its plots and registers the best trial's model."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
from conftest import toy_rows
from service_helpers import Server, descendants, finetune_body, sigkill_server_alone, upload, wait_for_job

GOOD_LR, BAD_LR = 3e-3, 1e-6


pytestmark = pytest.mark.process  # starts (and kills) a real server


def test_search_job_over_rest_survives_a_server_sigkill(tmp_path, tiny_base):
    allowed = {"FINETUNE_SERVE_BASE_MODELS": str(tiny_base)}  # POST /finetune takes listed base models alone
    first = Server(tmp_path / "home", tmp_path / "first.log", env=allowed).start()
    try:
        with httpx.Client(base_url=first.url, timeout=60) as client:
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

            # Grid order is the sampler's, so which rate trial 0 gets is not fixed. The kill comes as trial 1
            # starts: its process takes seconds to import torch, where its training (a tiny model) may not.
            search = {"sampler": "grid", "space": {"learning_rate": [BAD_LR, GOOD_LR]}}
            job_id = client.post("/finetune", json={**body, "search": search}).json()["id"]
            deadline = time.monotonic() + 240
            while not _trial_started(client, job_id, 1) and time.monotonic() < deadline:
                time.sleep(0.3)
            assert _trial_started(client, job_id, 1), first.tail()
        assert len(descendants(first.process.pid)) >= 3  # API and trainer workers, the job (and its trial)
        assert sigkill_server_alone(first) == [], "processes outlived the killed server"
    finally:
        first.kill(signal.SIGKILL)

    server = Server(tmp_path / "home", tmp_path / "second.log", env=allowed).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            job = wait_for_job(client, job_id, timeout=300)
            assert job["status"] == "succeeded", (job, server.tail())
            assert job["attempt"] == 2 and job["trials_done"] == 2
            assert job["best"]["params"] == {"learning_rate": GOOD_LR}
            assert job["best"]["metric"] == "validation.accuracy" and job["best"]["value"] >= 0.9
            assert job["metrics"]["validation"]["accuracy"] == job["best"]["value"]
            assert job["metrics"]["test"]["accuracy"] >= 0.9  # the best trial's model, on the test split
            assert job["model"] == {"name": "searched", "version": "v1"}

            events = client.get(f"/jobs/{job_id}/events").json()["events"]
            ends = [e for e in events if e["type"] == "trial_end"]
            # Trial 1 died with the server; the resumed study failed it and ran its rate again as trial 2.
            assert [(e["number"], e["state"]) for e in ends] == [(0, "complete"), (1, "failed"), (2, "complete")], \
                [(e["type"], e.get("trial"), e.get("step"), e.get("time")) for e in events]
            assert "interrupted" in ends[1]["error"] and ends[2]["params"] == ends[1]["params"] != ends[0]["params"]
            assert [e["type"] for e in events].count("trial_start") == 3
            assert {0, 2} <= {e["trial"] for e in events if e["type"] == "eval"}

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


def _trial_started(client: httpx.Client, job_id: str, number: int) -> bool:
    """Trial `number` has started."""
    events = client.get(f"/jobs/{job_id}/events", params={"limit": 500}).json()["events"]
    return any(e["type"] == "trial_start" and e.get("number") == number for e in events)
