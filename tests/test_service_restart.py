"""SIGKILL the whole server (workers and training child) mid-job, restart it, and lose nothing."""

from __future__ import annotations

import pytest
import signal
import time

import httpx
from conftest import toy_rows
from service_helpers import Server, descendants, finetune_body, sigkill_server_alone, upload, wait_for_job

from service.jobs import SqliteJobStore

pytestmark = pytest.mark.process  # starts and kills a real server

CHECKPOINT_EVERY = 5


def test_sigkill_during_a_job_then_restart_resumes_it_and_runs_the_queue(tmp_path, tiny_base):
    home = tmp_path / "home"
    allowed = {"FINETUNE_SERVE_BASE_MODELS": str(tiny_base)}  # POST /finetune takes listed base models alone
    first = Server(home, tmp_path / "first.log", env=allowed).start()
    try:
        with httpx.Client(base_url=first.url, timeout=60) as client:
            train = upload(client, toy_rows(240))
            long_body = finetune_body(tiny_base, train["id"], model_name="resumed", epochs=30, batch_size=8,
                                      checkpoint_every_steps=CHECKPOINT_EVERY, log_every_steps=CHECKPOINT_EVERY)
            long_id = client.post("/finetune", json=long_body).json()["id"]
            queued_id = client.post("/finetune", json=finetune_body(tiny_base, train["id"], model_name="queued",
                                                                     epochs=1)).json()["id"]
            step_before = 0
            deadline = time.monotonic() + 120
            while step_before < 4 * CHECKPOINT_EVERY and time.monotonic() < deadline:
                step_before = client.get(f"/jobs/{long_id}").json()["step"] or 0
                time.sleep(0.3)
            assert step_before >= 4 * CHECKPOINT_EVERY, "the job never got going"
        assert len(descendants(first.process.pid)) >= 3  # API worker, trainer worker, training child
        assert sigkill_server_alone(first) == [], "processes outlived the killed server"
    finally:
        first.kill(signal.SIGKILL)

    store = SqliteJobStore(home / "jobs.sqlite3")  # what a crash leaves: one job running, one queued
    assert store.get(long_id).status == "running" and store.get(queued_id).status == "queued"

    second = Server(home, tmp_path / "second.log", env=allowed).start()
    try:
        with httpx.Client(base_url=second.url, timeout=60) as client:
            resumed = wait_for_job(client, long_id, timeout=240)
            assert resumed["status"] == "succeeded", resumed
            assert resumed["attempt"] == 2 and resumed["model"] == {"name": "resumed", "version": "v1"}
            events = client.get(f"/jobs/{long_id}/events", params={"limit": 500}).json()["events"]
            types = [e["type"] for e in events]
            assert "recovered" in types and "resuming" in types
            starts = [e for e in events if e["type"] == "start"]
            assert len(starts) == 2 and not starts[0]["resumed"] and starts[1]["resumed"]
            # It went on from its last checkpoint, not from scratch.
            assert starts[1]["step"] >= (step_before // CHECKPOINT_EVERY) * CHECKPOINT_EVERY > 0
            assert resumed["metrics"]["validation"]["accuracy"] >= 0.9

            queued = wait_for_job(client, queued_id, timeout=120)
            assert queued["status"] == "succeeded" and queued["attempt"] == 1
            answer = client.post("/predict", json={"model": "resumed", "inputs": ["great film", "awful plot"]}).json()
            assert [p["label"] for p in answer["predictions"]] == ["positive", "negative"]
    finally:
        second.kill(signal.SIGKILL)


def _events(client: httpx.Client, job_id: str) -> list[dict]:
    return client.get(f"/jobs/{job_id}/events", params={"limit": 500}).json()["events"]


def test_sigkill_during_export_registers_one_whole_version_with_the_uninterrupted_runs_figures(tmp_path, tiny_base):
    """Kill the server and everything under it as the export starts: the restarted job exports again from its finished training, one
    complete version is registered, and its figures are those of the same job run without a kill."""
    home = tmp_path / "home"
    allowed = {"FINETUNE_SERVE_BASE_MODELS": str(tiny_base)}
    variants = ["onnx", "int8", "torchscript"]  # an export of several seconds: time to kill it halfway
    first = Server(home, tmp_path / "first.log", env=allowed).start()
    try:
        with httpx.Client(base_url=first.url, timeout=60) as client:
            train = upload(client, toy_rows(240))
            body = {**finetune_body(tiny_base, train["id"], model_name="killed"), "variants": variants}
            job_id = client.post("/finetune", json=body).json()["id"]
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and not any(e["type"] == "exporting" for e in _events(client, job_id)):
                time.sleep(0.1)
            assert any(e["type"] == "exporting" for e in _events(client, job_id)), "the export never started"
        # The whole tree at once, the machine's crash: killed alone, the server leaves its workers up to
        # ORPHAN_CHECK_SECONDS to notice, and on a quiet machine the tiny export finished in that time.
        first.kill(signal.SIGKILL)
    finally:
        first.kill(signal.SIGKILL)
    store = SqliteJobStore(home / "jobs.sqlite3")
    assert store.get(job_id).status == "running", "the export finished before the kill: nothing was tested"
    assert not list((home / "models" / "killed").glob("v*")), "a version was registered before the kill"

    second = Server(home, tmp_path / "second.log", env=allowed).start()
    try:
        with httpx.Client(base_url=second.url, timeout=60) as client:
            resumed = wait_for_job(client, job_id, timeout=240)
            assert resumed["status"] == "succeeded" and resumed["attempt"] == 2, resumed
            assert resumed["model"] == {"name": "killed", "version": "v1"}
            versions = client.get("/models/killed").json()["versions"]
            assert [v["version"] for v in versions] == ["v1"]  # one version, whole: every file checks out
            assert all(v["integrity"] == "ok" for v in versions)
            straight_body = {**body, "model_name": "straight"}
            straight = wait_for_job(client, client.post("/finetune", json=straight_body).json()["id"], timeout=240)
            assert straight["status"] == "succeeded" and straight["attempt"] == 1
            for role in ("validation", "test"):
                for name, value in straight["metrics"].get(role, {}).items():
                    assert resumed["metrics"][role][name] == pytest.approx(value, abs=1e-4), (role, name)
            assert resumed["metrics"]["validation"]["accuracy"] >= 0.9
    finally:
        second.kill(signal.SIGKILL)
