"""Retention on real files: old finished jobs lose their checkpoints, old unused uploads go, the rest stays."""

from __future__ import annotations

import json
import os
import sqlite3
import time

import pg_helpers
import pytest
from conftest import toy_rows
from service_helpers import wait_until

from service import datasets
from service.jobs import PostgresJobStore, SqliteJobStore
from service.retention import DAY_SECONDS, sweep
from service.runner import Runner
from service.train_job import run_dir_of, runs_dir


@pytest.fixture
def store(tmp_path):
    return SqliteJobStore(tmp_path / "home" / "jobs.sqlite3")


def _upload(name: str = "rows.jsonl", days_old: float = 0) -> str:
    body = "".join(json.dumps(r) + "\n" for r in toy_rows(20)).encode()
    dataset_id = datasets.save_upload(name, [body]).id
    if days_old:
        then = time.time() - days_old * DAY_SECONDS
        os.utime(datasets.datasets_dir() / f"{dataset_id}.json", (then, then))
    return dataset_id


def _spec(dataset_id: str) -> dict:
    return {"config": {"data": {"train": str(datasets.lookup(dataset_id, "train").path)}}, "model_name": "toy"}


def _run_folder(job_id: str) -> None:
    """A run folder as training leaves it: checkpoints (also a distilled student's) beside what is kept."""
    run = run_dir_of(job_id)
    for path in ("checkpoints/last.pt", "checkpoints/best.pt", "distill/checkpoints/last.pt", "model/model.safetensors",
                 "plots/curves.png", "splits/train.jsonl"):
        (run / path).parent.mkdir(parents=True, exist_ok=True)
        (run / path).write_bytes(b"x" * 1000)
    (run / "metrics.json").write_text("{}")


def _job(store, status: str, dataset_id: str, finished_days_ago: float = 0, worker: str = "trainer-b"):
    job = store.create(_spec(dataset_id))
    if status != "queued":
        claimed = store.claim_next(worker, lease_seconds=600)
        assert claimed.id == job.id
        for step in (1, 2):
            store.update(job.id, 1, event={"type": "step", "step": step, "loss": 0.5})
        store.update(job.id, 1, event={"type": "eval", "step": 2, "metrics": {"accuracy": 0.9}})
        if status != "running":
            assert store.finish(job.id, 1, status)
            _finished_ago(store, job.id, finished_days_ago)
    _run_folder(job.id)
    return job


def _finished_ago(store, job_id: str, days: float) -> None:
    """As if the job had finished `days` ago."""
    when = time.time() - days * DAY_SECONDS
    if isinstance(store, SqliteJobStore):
        with sqlite3.connect(store.path) as db:
            db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (when, job_id))
    else:
        with store._transaction() as db:
            db.execute("UPDATE jobs SET finished_at = %s WHERE id = %s", (when, job_id))


def _types(store, job_id: str) -> list[str]:
    return [event["type"] for _, event in store.events(job_id)]


def test_sweep_deletes_old_checkpoints_and_old_unused_uploads_only(store):
    data = _upload()
    old_done = _job(store, "succeeded", data, finished_days_ago=10)
    old_failed = _job(store, "failed", data, finished_days_ago=8)
    recent = _job(store, "cancelled", data, finished_days_ago=1)
    running = _job(store, "running", data)
    old_unused, old_used_queued = _upload(days_old=10), _upload(days_old=10)
    old_used_running, new_unused = _upload(days_old=30), _upload()
    store.create(_spec(old_used_running))
    assert store.claim_next("trainer-b", 600).spec == _spec(old_used_running)
    queued = _job(store, "queued", data)
    store.create(_spec(old_used_queued))
    stray = runs_dir() / "not-a-job"
    (stray / "checkpoints").mkdir(parents=True)
    os.utime(datasets.datasets_dir() / f"{data}.json", (1, 1))  # ancient, but running and queued jobs use it

    assert sweep(store, 0) == sweep(store, 0.0)  # 0 days: keep everything
    assert all((run_dir_of(j.id) / "checkpoints").is_dir() for j in (old_done, old_failed))
    swept = sweep(store, 7)

    assert sorted(swept.checkpoints) == sorted([old_done.id, old_failed.id])
    assert swept.events == 4  # two steps each
    assert _types(store, old_done.id) == ["queued", "running", "eval", "succeeded"]
    assert _types(store, recent.id).count("step") == 2 and _types(store, running.id).count("step") == 2
    assert swept.datasets == [old_unused]
    assert swept.bytes >= 2 * 3000 + len(toy_rows(20))
    for job in (old_done, old_failed):
        run = run_dir_of(job.id)
        assert not (run / "checkpoints").exists() and not (run / "distill" / "checkpoints").exists()
        for kept in ("model/model.safetensors", "plots/curves.png", "splits/train.jsonl", "metrics.json"):
            assert (run / kept).is_file()
        assert store.get(job.id).status in ("succeeded", "failed")
    for job in (recent, queued, running):
        assert (run_dir_of(job.id) / "checkpoints" / "last.pt").is_file()
    assert (stray / "checkpoints").is_dir()  # not a job's: left alone
    with pytest.raises(datasets.UnknownDataset):
        datasets.lookup(old_unused, "data")
    assert not list(datasets.datasets_dir().glob(f"{old_unused}*"))
    for kept in (data, old_used_queued, old_used_running, new_unused):
        assert datasets.lookup(kept, "data").path.is_file()
    assert sweep(store, 7).checkpoints == []  # nothing left to do: a second sweep (another trainer's) is a no-op


def test_the_trainer_sweeps_at_start_and_then_periodically(store):
    data = _upload()
    old = _job(store, "succeeded", data, finished_days_ago=10)
    runner = Runner(store, worker="trainer-a", poll_seconds=0.1, retention_days=7, retention_every_seconds=0.5)
    runner.start()
    try:
        wait_until("the start-up sweep", 10, lambda: not (run_dir_of(old.id) / "checkpoints").exists(), poll=0.1)
        later = _upload(days_old=8)
        wait_until("the next sweep", 10, lambda: not (datasets.datasets_dir() / f"{later}.json").exists(), poll=0.1)
        assert datasets.lookup(data, "data").path.is_file()  # a day old: kept
    finally:
        runner.stop()


def test_a_runner_without_retention_deletes_nothing(store):
    old = _job(store, "succeeded", _upload(days_old=100), finished_days_ago=100)
    runner = Runner(store, worker="trainer-a", poll_seconds=0.05, retention_days=0, retention_every_seconds=0.05)
    runner.start()
    try:
        time.sleep(0.5)  # ten polls
    finally:
        runner.stop()
    assert (run_dir_of(old.id) / "checkpoints" / "last.pt").is_file()
    assert len(list(datasets.datasets_dir().glob("ds-*.json"))) == 1


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.process)])
def test_both_stores_prune_the_step_events_of_old_finished_jobs_alone(backend, tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3") if backend == "sqlite" else \
        PostgresJobStore(pg_helpers.server().create_database())
    data = _upload()
    old, recent = _job(store, "failed", data, finished_days_ago=3), _job(store, "succeeded", data, finished_days_ago=1)
    running = _job(store, "running", data)
    assert store.prune_events(time.time() - 2 * DAY_SECONDS, ("step",)) == 2
    assert _types(store, old.id) == ["queued", "running", "eval", "failed"]
    assert _types(store, recent.id) == ["queued", "running", "step", "step", "eval", "succeeded"]
    assert _types(store, running.id) == ["queued", "running", "step", "step", "eval"]
    assert store.prune_events(time.time(), ("step", "eval")) == 4  # the running job's stay
    assert _types(store, running.id).count("step") == 2
    if backend == "postgres":
        store.close()
