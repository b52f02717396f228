"""The deployment Kubernetes runs, on one machine: two API processes and two trainer processes, separate
servers from the same code, sharing only a real PostgreSQL job store and one folder (the RWX volume).

One scenario, in the order a cluster lives it: the APIs serve /predict and take jobs while no trainer is
up; trainers come up and drain the queue by polling (one API wakes a trainer, the other never does); the
trainer running the long job is SIGKILLed (its pod dies) and the job resumes from its checkpoint on the
other trainer once the lease runs out, while a replacement pod joins under a new name; 50 tiny jobs
queued through both APIs all succeed, each exactly once; a promotion through one API is served by the other.
"""

from __future__ import annotations


import httpx
import pg_helpers
import pytest
from artifact_helpers import make_run
from conftest import toy_rows
from service_helpers import Server, finetune_body, upload, wait_until

from finetune_core import registry
from finetune_core.artifacts import export_version
from service.jobs import PostgresJobStore

pytestmark = [pytest.mark.process, pytest.mark.cluster]  # starts PostgreSQL and five BentoML servers

TINY_JOBS = 50
LEASE_SECONDS = 3
CHECKPOINT_EVERY = 5
DRAIN_DEADLINE_SECONDS = 720
PROMOTION_DEADLINE_SECONDS = 30


def tiny_body(tiny_base, train_id: str, name: str) -> dict:
    """The smallest job the service runs: the tiny BERT, one epoch over 80 rows, the PyTorch variant alone."""
    return {**finetune_body(tiny_base, train_id, model_name=name, epochs=1), "variants": []}


def as_pod(target: str, name: str, logs, env: dict) -> Server:
    """A server process as a pod runs it; its SIGKILLed process group is the pod's death."""
    return Server(None, logs / f"{name}.log", env, target=target, name=name)


def test_two_apis_and_two_trainers_share_postgres_and_one_folder(tmp_path, tiny_base, monkeypatch):
    url = pg_helpers.server().create_database()
    home = tmp_path / "volume"
    monkeypatch.setenv("FINETUNE_SERVE_HOME", str(home))
    export_version(make_run(tiny_base, tmp_path / "toy-run"), "toy", variants=["onnx"])  # served before any training
    pod_env = {"FINETUNE_SERVE_HOME": str(home), "FINETUNE_SERVE_DATABASE_URL": url,
              "FINETUNE_SERVE_JOB_LEASE_SECONDS": str(LEASE_SECONDS), "FINETUNE_SERVE_BASE_MODELS": str(tiny_base)}
    trainer_a = as_pod("service.bento:Trainer", "trainer-a", tmp_path, {**pod_env, "FINETUNE_SERVE_TRAINER_NAME": "trainer-a"})
    trainer_b = as_pod("service.bento:Trainer", "trainer-b", tmp_path, {**pod_env, "FINETUNE_SERVE_TRAINER_NAME": "trainer-b"})
    trainer_c = as_pod("service.bento:Trainer", "trainer-c", tmp_path, {**pod_env, "FINETUNE_SERVE_TRAINER_NAME": "trainer-c"})
    # api-1 wakes trainer-a (a Service URL in Kubernetes), api-2 wakes nobody: its jobs are found by polling.
    apis = [as_pod("service.bento:Api", "api-1", tmp_path, {**pod_env, "FINETUNE_SERVE_TRAINER_URL": trainer_a.url}),
            as_pod("service.bento:Api", "api-2", tmp_path, pod_env)]
    pods = apis + [trainer_a, trainer_b, trainer_c]
    store = PostgresJobStore(url)
    clients = [httpx.Client(base_url=api.url, timeout=60) for api in apis]
    try:
        for api in apis:
            api.launch()
        for api in apis:
            api.ready()

        # No trainer is up: both APIs serve the registered model and accept jobs, which wait in the queue.
        for client in clients:
            answer = client.post("/predict", json={"model": "toy", "inputs": ["great film", "awful plot"]})
            assert answer.status_code == 200, answer.text
            assert [p["label"] for p in answer.json()["predictions"]] == ["positive", "negative"]
        tiny_data = upload(clients[0], toy_rows(80))  # uploaded through api-1, used through both
        long_data = upload(clients[1], toy_rows(240))
        long_body = finetune_body(tiny_base, long_data["id"], model_name="long", epochs=30, batch_size=8,
                                  checkpoint_every_steps=CHECKPOINT_EVERY, log_every_steps=CHECKPOINT_EVERY)
        long_id = clients[0].post("/finetune", json=long_body).json()["id"]
        names = ["promoted", "promoted"] + [f"tiny-{i}" for i in range(2, TINY_JOBS)]
        tiny_ids = []
        for i, name in enumerate(names[:TINY_JOBS // 2]):
            response = clients[i % 2].post("/finetune", json=tiny_body(tiny_base, tiny_data["id"], name))
            assert response.status_code == 202, response.text
            tiny_ids.append(response.json()["id"])
        assert store.counts()["queued"] == 1 + TINY_JOBS // 2

        trainer_a.launch(), trainer_b.launch()
        trainer_a.ready(), trainer_b.ready()

        # The long job trains past two checkpoints; then its trainer's pod dies at once.
        running = wait_until("the long job to pass two checkpoints", 300,
                             lambda: (job := store.get(long_id)).status == "running" and (job.step or 0) >= 2 * CHECKPOINT_EVERY
                             and job)
        victim = {"trainer-a": trainer_a, "trainer-b": trainer_b}[running.worker]
        survivor = "trainer-b" if victim is trainer_a else "trainer-a"
        step_before = running.step
        victim.kill()
        for i, name in enumerate(names[TINY_JOBS // 2:]):  # api-1 may be waking a dead trainer: it still answers 202
            response = clients[i % 2].post("/finetune", json=tiny_body(tiny_base, tiny_data["id"], name))
            assert response.status_code == 202, response.text
            tiny_ids.append(response.json()["id"])

        resumed = wait_until("the long job to be claimed again", 240,
                             lambda: (job := store.get(long_id)).attempt == 2 and job)
        assert resumed.worker == survivor, resumed
        trainer_c.launch().ready()  # the Deployment's replacement pod, under a new name

        everything = [long_id] + tiny_ids
        wait_until(f"{len(everything)} jobs to end", DRAIN_DEADLINE_SECONDS,
                   lambda: all(store.get(job_id).status in ("succeeded", "failed", "cancelled") for job_id in everything))
        jobs = {job_id: store.get(job_id) for job_id in everything}
        assert {job_id: (job.status, job.error) for job_id, job in jobs.items() if job.status != "succeeded"} == {}

        # The long job: one interruption, resumed on the survivor from its last checkpoint, not from scratch.
        long_job = jobs[long_id]
        assert (long_job.attempt, long_job.worker, long_job.model) == (2, survivor, {"name": "long", "version": "v1"})
        events = [event for _, event in store.events(long_id)]
        types = [event["type"] for event in events]
        assert "recovered" in types and "resuming" in types and types.count("succeeded") == 1
        starts = [event for event in events if event["type"] == "start"]
        assert len(starts) == 2 and starts[1]["resumed"]
        # A step's progress is reported before that step's checkpoint is written, so the pod can die in
        # between: at most one checkpoint interval is lost, never the run.
        last_written = (step_before // CHECKPOINT_EVERY) * CHECKPOINT_EVERY - CHECKPOINT_EVERY
        assert starts[1]["step"] >= last_written > 0

        # None ran twice to completion: one claim, one start, one success each, and one registered version each.
        for job_id in tiny_ids:
            types = [event["type"] for _, event in store.events(job_id)]
            assert (jobs[job_id].attempt, types.count("start"), types.count("succeeded")) == (1, 1, 1), (job_id, types)
        versions = {model["name"]: model["versions"] for model in registry.list_models()}
        assert versions == {"toy": ["v1"], "long": ["v1"], "promoted": ["v1", "v2"],
                            **{f"tiny-{i}": ["v1"] for i in range(2, TINY_JOBS)}}
        assert {job.worker for job in jobs.values()} <= {"trainer-a", "trainer-b", "trainer-c"}
        for pod in (trainer_a, trainer_b, trainer_c):  # no trainer stopped a job it still held
            assert "is no longer this trainer's" not in pod.tail(10**8), pod.name
        # Both APIs see every job, whichever took it.
        for client in clients:
            listed = {job["id"] for job in client.get("/jobs", params={"limit": 1000}).json()["jobs"]}
            assert set(everything) <= listed

        # A promotion through one API is served by the other, and back, without a restart.
        def served_by(client: httpx.Client) -> str:
            answer = client.post("/predict", json={"model": "promoted", "inputs": ["great film"]})
            assert answer.status_code == 200, answer.text
            return answer.json()["model"]["version"]

        assert served_by(clients[1]) == "v2"  # no production yet: latest
        for via, seen_by, version in ((clients[0], clients[1], "v1"), (clients[1], clients[0], "v2")):
            assert via.post("/models/promoted/promote", json={"version": version}).status_code == 200
            wait_until(f"the other API to serve {version}", PROMOTION_DEADLINE_SECONDS,
                       lambda: served_by(seen_by) == version)
    finally:
        for client in clients:
            client.close()
        store.close()
        for pod in pods:
            pod.kill()
