"""The durable job store: states, fencing by attempt, events paging, cancel and recovery."""

from __future__ import annotations

import multiprocessing

import pytest

from service.jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, SqliteJobStore, open_store


@pytest.fixture
def store(tmp_path) -> SqliteJobStore:
    return SqliteJobStore(tmp_path / "jobs.sqlite3")


def test_store_lives_in_home_and_uses_wal(tmp_path):
    store = open_store()
    assert store.path == tmp_path / "home" / "jobs.sqlite3"
    import sqlite3

    assert sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_lifecycle_queued_running_succeeded(store):
    job = store.create({"model_name": "m"})
    assert (job.status, job.attempt, job.progress, job.started_at) == (QUEUED, 0, 0.0, None)
    claimed = store.claim_next()
    assert (claimed.id, claimed.status, claimed.attempt) == (job.id, RUNNING, 1)
    assert claimed.started_at is not None
    assert store.claim_next() is None  # one running, none queued
    assert store.update(job.id, 1, event={"type": "step"}, progress=0.5, step=10, epoch=0, eta_seconds=3.0,
                        metrics={"train": {"loss": 0.7}})
    mid = store.get(job.id)
    assert (mid.progress, mid.step, mid.eta_seconds, mid.metrics) == (0.5, 10, 3.0, {"train": {"loss": 0.7}})
    assert store.finish(job.id, 1, SUCCEEDED, model={"name": "m", "version": "v1"}, metrics={"validation": {"accuracy": 1.0}})
    done = store.get(job.id)
    assert (done.status, done.progress, done.eta_seconds, done.model) == (SUCCEEDED, 1.0, None, {"name": "m", "version": "v1"})
    assert done.finished_at >= done.started_at
    public = done.public()
    assert public["created_at"].endswith("+00:00") and public["model"] == {"name": "m", "version": "v1"}
    types = [e["type"] for _, e in store.events(job.id)]
    assert types == [QUEUED, RUNNING, "step", SUCCEEDED]


def test_jobs_are_claimed_oldest_first(store):
    first, second = store.create({"n": 1}), store.create({"n": 2})
    assert store.claim_next().id == first.id
    assert store.claim_next().id == second.id


def test_a_stale_attempt_cannot_write(store):
    job = store.create({})
    store.claim_next()
    assert store.recover() == [job.id]  # the server restarted: attempt 1 is stale
    again = store.claim_next()
    assert again.attempt == 2
    assert not store.update(job.id, 1, event={"type": "step"}, progress=0.9)
    assert not store.finish(job.id, 1, FAILED, error="late")
    assert store.get(job.id).status == RUNNING and store.get(job.id).progress == 0.0
    assert "step" not in [e["type"] for _, e in store.events(job.id)]
    assert store.finish(job.id, 2, SUCCEEDED)


def test_finish_only_from_running(store):
    job = store.create({})
    assert not store.finish(job.id, 0, SUCCEEDED)  # never claimed
    with pytest.raises(ValueError, match="status must be one of"):
        store.finish(job.id, 0, RUNNING)
    with pytest.raises(ValueError, match="unknown field"):
        store.update(job.id, 0, status=SUCCEEDED)


def test_cancel_queued_is_immediate_and_running_is_flagged(store):
    queued = store.create({})
    cancelled = store.request_cancel(queued.id)
    assert cancelled.status == CANCELLED and cancelled.finished_at is not None
    assert store.claim_next() is None  # a cancelled job never runs

    running = store.create({})
    store.claim_next()
    flagged = store.request_cancel(running.id)
    assert flagged.status == RUNNING and flagged.cancel_requested
    assert store.cancel_requested(running.id)
    assert store.request_cancel("job-nope") is None


def test_recover_requeues_running_fails_after_max_attempts_and_honours_cancel(store):
    exhausted = store.create({})
    store.claim_next()
    for _ in range(2):  # interrupted twice already: now on its third attempt
        store.recover(max_attempts=99)
        store.claim_next()
    resumable, cancelled = store.create({}), store.create({})
    store.claim_next(), store.claim_next()
    store.request_cancel(cancelled.id)
    assert store.get(exhausted.id).attempt == 3 and store.get(resumable.id).attempt == 1
    assert store.recover(max_attempts=3) == [resumable.id]
    assert store.get(resumable.id).status == QUEUED
    assert store.get(exhausted.id).status == FAILED
    assert "interrupted 3 times" in store.get(exhausted.id).error
    assert store.get(cancelled.id).status == CANCELLED
    assert store.counts() == {"queued": 1, "running": 0, "succeeded": 0, "failed": 1, "cancelled": 1}


def test_events_page_with_after(store):
    job = store.create({})
    for i in range(7):
        store.add_event(job.id, {"type": "note", "i": i})
    page = store.events(job.id, after=0, limit=3)
    assert [e.get("i") for _, e in page] == [None, 0, 1]
    rest = store.events(job.id, after=page[-1][0])
    assert [e["i"] for _, e in rest] == [2, 3, 4, 5, 6]
    assert store.events(job.id, after=rest[-1][0]) == []
    assert store.events("job-other") == []


def test_list_filters_by_status_newest_first(store):
    a, b = store.create({}), store.create({})
    store.claim_next()
    assert [j.id for j in store.list()] == [b.id, a.id]
    assert [j.id for j in store.list(RUNNING)] == [a.id]
    assert [j.id for j in store.list(QUEUED, limit=5)] == [b.id]


def _claim_all(path: str, out) -> None:
    store = SqliteJobStore(path)
    claimed = []
    while (job := store.claim_next()) is not None:
        claimed.append(job.id)
    out.put(claimed)


@pytest.mark.process
def test_concurrent_claims_from_processes_never_share_a_job(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    ids = {store.create({"i": i}).id for i in range(40)}
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_claim_all, args=(str(path), out)) for _ in range(2)]
    for w in workers:
        w.start()
    claimed = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(30)
    together = claimed[0] + claimed[1]
    assert sorted(together) == sorted(ids)  # each exactly once
