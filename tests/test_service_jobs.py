"""The durable job store: states, fencing by attempt, leases, events paging, cancel and recovery.

Every test of the contract runs on both stores: SQLite (one machine) and a real PostgreSQL server
(tests/pg_helpers.py; the PostgreSQL half starts a server, so it carries the `process` marker).
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import time

import psycopg
import pytest
import pg_helpers

from finetune_core.errors import ConfigError
from service import settings as service_settings
from service.jobs import (CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, PostgresJobStore, SqliteJobStore,
                          open_store)

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.process)]
LONG_LEASE = 600.0


@pytest.fixture(params=BACKENDS)
def location(request, tmp_path) -> str:
    """Where one test's store lives: an SQLite file, or a new PostgreSQL database."""
    return str(tmp_path / "jobs.sqlite3") if request.param == "sqlite" else pg_helpers.server().create_database()


def open_at(location: str):
    return PostgresJobStore(location) if location.startswith("postgresql://") else SqliteJobStore(location)


@pytest.fixture
def stores(location):
    """open_at(location), as often as a test asks (one per pod, say); closed after the test."""
    opened = []

    def another():
        opened.append(open_at(location))
        return opened[-1]

    yield another
    for store in opened:
        if isinstance(store, PostgresJobStore):
            store.close()


@pytest.fixture
def store(stores):
    return stores()


def test_lifecycle_queued_running_succeeded(store):
    job = store.create({"model_name": "m"})
    assert (job.status, job.attempt, job.progress, job.started_at, job.worker) == (QUEUED, 0, 0.0, None, None)
    claimed = store.claim_next("trainer-a", LONG_LEASE)
    assert (claimed.id, claimed.status, claimed.attempt, claimed.worker) == (job.id, RUNNING, 1, "trainer-a")
    assert claimed.started_at is not None and claimed.lease_expires_at > claimed.started_at + LONG_LEASE / 2
    assert store.claim_next("trainer-b") is None  # one running, none queued
    assert store.update(job.id, 1, event={"type": "step"}, progress=0.5, step=10, epoch=0, eta_seconds=3.0,
                        metrics={"train": {"loss": 0.7}})
    mid = store.get(job.id)
    assert (mid.progress, mid.step, mid.eta_seconds, mid.metrics) == (0.5, 10, 3.0, {"train": {"loss": 0.7}})
    assert store.finish(job.id, 1, SUCCEEDED, model={"name": "m", "version": "v1"}, metrics={"validation": {"accuracy": 1.0}})
    done = store.get(job.id)
    assert (done.status, done.progress, done.eta_seconds, done.model) == (SUCCEEDED, 1.0, None, {"name": "m", "version": "v1"})
    assert done.finished_at >= done.started_at >= done.created_at and done.lease_expires_at is None
    public = done.public()
    assert public["created_at"].endswith("+00:00") and public["model"] == {"name": "m", "version": "v1"}
    assert public["worker"] == "trainer-a"
    types = [e["type"] for _, e in store.events(job.id)]
    assert types == [QUEUED, RUNNING, "step", SUCCEEDED]


def test_jobs_are_claimed_oldest_first_and_listed_newest_first(store):
    first, second, third = store.create({"n": 1}), store.create({"n": 2}), store.create({"n": 3})
    assert store.claim_next().id == first.id
    assert store.claim_next().id == second.id
    assert [j.id for j in store.list()] == [third.id, second.id, first.id]
    assert [j.id for j in store.list(RUNNING)] == [second.id, first.id]
    assert [j.id for j in store.list(QUEUED, limit=5)] == [third.id]
    assert [j.id for j in store.list(limit=1)] == [third.id]


def test_a_stale_attempt_cannot_write(store):
    job = store.create({})
    store.claim_next("trainer-a", LONG_LEASE)
    assert store.recover(worker="trainer-a") == [job.id]  # trainer-a restarted: attempt 1 is stale
    again = store.claim_next("trainer-b", LONG_LEASE)
    assert (again.attempt, again.worker) == (2, "trainer-b")
    assert not store.update(job.id, 1, event={"type": "step"}, progress=0.9)
    assert not store.update(job.id, 1, event={"type": "note"})
    assert not store.heartbeat(job.id, 1, LONG_LEASE)
    assert not store.finish(job.id, 1, FAILED, error="late")
    assert store.get(job.id).status == RUNNING and store.get(job.id).progress == 0.0
    assert not {"step", "note"} & {e["type"] for _, e in store.events(job.id)}
    assert store.finish(job.id, 2, SUCCEEDED)
    assert not store.heartbeat(job.id, 2, LONG_LEASE)  # finished: nothing left to hold


def test_finish_only_from_running(store):
    job = store.create({})
    assert not store.finish(job.id, 0, SUCCEEDED)  # never claimed
    with pytest.raises(ValueError, match="status must be one of"):
        store.finish(job.id, 0, RUNNING)
    with pytest.raises(ValueError, match="unknown field"):
        store.update(job.id, 0, status=SUCCEEDED)


def test_a_lapsed_lease_is_requeued_by_any_trainer_and_a_live_one_is_left_alone(store):
    lapsed, held = store.create({"n": 1}), store.create({"n": 2})
    store.claim_next("dead-pod", 0)  # no heartbeat will come: its lease is over at once
    store.claim_next("live-pod", LONG_LEASE)
    # what recover() is about to act on, by the same rule (the runner settles registered ones first)
    assert [job.id for job in store.lapsed()] == [lapsed.id]
    assert [job.id for job in store.lapsed(worker="live-pod")] == [lapsed.id, held.id]  # live-pod restarted
    assert store.lapsed()[0].worker == "dead-pod"
    assert store.recover() == [lapsed.id]
    assert store.lapsed() == []
    assert store.recover(worker="another-pod") == []
    requeued = store.get(lapsed.id)
    assert (requeued.status, requeued.attempt, requeued.lease_expires_at) == (QUEUED, 1, None)
    assert store.get(held.id).status == RUNNING
    events = [e for _, e in store.events(lapsed.id)]
    assert events[-1]["type"] == "recovered" and "resumes from its last checkpoint" in events[-1]["reason"]
    resumed = store.claim_next("other-pod", LONG_LEASE)
    assert (resumed.id, resumed.attempt, resumed.worker) == (lapsed.id, 2, "other-pod")


def test_a_heartbeat_renews_the_lease_and_a_zero_lease_releases_it(store):
    job = store.create({})
    claimed = store.claim_next("pod", 5)
    assert store.heartbeat(job.id, 1, LONG_LEASE)
    renewed = store.get(job.id).lease_expires_at
    assert renewed > claimed.lease_expires_at + LONG_LEASE / 2
    assert store.recover() == []  # renewed: still the pod's
    assert store.heartbeat(job.id, 1, 0)  # a trainer stopping with the job unfinished hands it back
    assert store.recover() == [job.id]


def test_cancel_queued_is_immediate_and_running_is_flagged_across_stores(stores):
    api, trainer = stores(), stores()  # say, an API replica and a trainer pod
    queued = api.create({})
    cancelled = api.request_cancel(queued.id)
    assert cancelled.status == CANCELLED and cancelled.finished_at is not None
    assert trainer.claim_next("pod") is None  # a cancelled job never runs

    running = api.create({})
    trainer.claim_next("pod", LONG_LEASE)
    flagged = api.request_cancel(running.id)
    assert flagged.status == RUNNING and flagged.cancel_requested
    assert trainer.cancel_requested(running.id)
    assert api.request_cancel(running.id).cancel_requested  # asking twice changes nothing
    assert [e["type"] for _, e in api.events(running.id)].count("cancel_requested") == 1
    assert api.request_cancel("job-nope") is None


def test_recover_requeues_fails_after_max_attempts_and_honours_cancel(store):
    exhausted = store.create({})
    store.claim_next("pod", 0)
    for _ in range(2):  # interrupted twice already: now on its third attempt
        store.recover(max_attempts=99)
        store.claim_next("pod", 0)
    resumable, cancelled = store.create({}), store.create({})
    store.claim_next("pod", 0), store.claim_next("pod", 0)
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


def _claim_all(location: str, worker: str, out) -> None:
    store = open_at(location)
    claimed = []
    while (job := store.claim_next(worker, LONG_LEASE)) is not None:
        claimed.append(job.id)
    out.put(claimed)


@pytest.mark.process
def test_concurrent_claims_from_processes_never_share_a_job(location):
    store = open_at(location)
    ids = {store.create({"i": i}).id for i in range(40)}
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_claim_all, args=(location, f"pod-{n}", out)) for n in range(3)]
    for w in workers:
        w.start()
    claimed = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(30)
    together = [job_id for part in claimed for job_id in part]
    assert sorted(together) == sorted(ids)  # each exactly once
    assert {j.worker for j in store.list(RUNNING)} <= {"pod-0", "pod-1", "pod-2"}


def test_sqlite_store_lives_in_home_and_uses_wal(tmp_path):
    store = open_store()
    assert store.path == tmp_path / "home" / "jobs.sqlite3"
    assert sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# The jobs table as the previous version wrote it: no worker, no lease.
OLD_SCHEMA = """CREATE TABLE jobs (id TEXT PRIMARY KEY, spec TEXT NOT NULL, status TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0, epoch INTEGER, step INTEGER, eta_seconds REAL, metrics TEXT, model TEXT,
    error TEXT, attempt INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL);
CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, event TEXT NOT NULL);"""


def test_a_sqlite_store_an_earlier_version_wrote_opens_and_its_running_job_resumes(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO jobs (id, spec, status, attempt, created_at, started_at) VALUES (?, ?, ?, ?, ?, ?)",
                   ("job-old", '{"model_name": "m"}', RUNNING, 1, time.time() - 60, time.time() - 50))
    store = SqliteJobStore(path)
    old = store.get("job-old")
    assert (old.status, old.worker, old.lease_expires_at, old.spec) == (RUNNING, None, None, {"model_name": "m"})
    assert store.recover() == ["job-old"]  # no lease recorded: nobody holds it
    assert store.claim_next("pod").attempt == 2
    SqliteJobStore(path)  # opening it again adds nothing twice


@pytest.fixture
def fresh_settings(monkeypatch):
    service_settings.settings.cache_clear()
    yield monkeypatch
    service_settings.settings.cache_clear()


@pytest.mark.process
def test_open_store_takes_postgres_from_the_database_url_and_gives_optuna_a_url_it_can_use(fresh_settings, tmp_path):
    import optuna

    url = pg_helpers.server().create_database()
    fresh_settings.setenv("FINETUNE_SERVE_DATABASE_URL", url)
    store = open_store()
    try:
        assert isinstance(store, PostgresJobStore) and store.url.startswith("postgresql+psycopg://")
        assert not (tmp_path / "home" / "jobs.sqlite3").exists()
        job = store.create({"model_name": "m"})
        assert PostgresJobStore(url.replace("postgresql://", "postgres://")).get(job.id) == job
        # A search job keeps its study in the job store's database (service.train_job passes store.url).
        study = optuna.create_study(storage=store.url, study_name=job.id, direction="maximize")
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
        again = optuna.load_study(storage=store.url, study_name=job.id)
        assert len(again.trials) == 2 and again.best_value == max(t.value for t in study.trials)
    finally:
        store.close()
    with psycopg.connect(url) as db:  # the study's tables sit beside ours, in the same database
        tables = {row[0] for row in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"jobs", "events", "studies", "trials"} <= tables


@pytest.mark.process
def test_a_wrong_password_stops_the_start_naming_the_setting_and_not_the_password():
    url = pg_helpers.server().url().replace(pg_helpers.server().password, "wrong-secret")
    with pytest.raises(ConfigError) as err:
        PostgresJobStore(url, setting="FINETUNE_SERVE_DATABASE_URL")
    message = str(err.value)
    assert message.startswith("FINETUNE_SERVE_DATABASE_URL: cannot connect to the job store's database postgres@127.0.0.1:")
    assert "password authentication failed" in message and "wrong-secret" not in message


def test_the_database_url_setting_must_be_postgres_and_is_never_echoed(fresh_settings):
    fresh_settings.setenv("FINETUNE_SERVE_DATABASE_URL", "mysql://root:hunter2@db/jobs")
    with pytest.raises(service_settings.SettingsError) as err:
        service_settings.settings()
    assert "FINETUNE_SERVE_DATABASE_URL='***': Value error, not a PostgreSQL URL" in str(err.value)
    assert "starting postgresql://" in str(err.value) and "hunter2" not in str(err.value)
