"""The job store several pods share: PostgreSQL, chosen by a database URL (the API replicas and the trainers).

Same tables and the same contract as the SQLite store. What differs is how concurrency is made safe:
- a claim takes the oldest queued row with FOR UPDATE SKIP LOCKED, so trainers claiming at once
  never wait on each other and never get the same job;
- lease times come from the database's clock, the one clock every pod shares;
- every write that appends an event first locks its job's row, so one job's events get their
  sequence numbers in commit order and a reader paging with `after` never skips one.

Each process keeps a small pool of connections (at most POOL_MAX_SIZE), checked before use, so a
restarted database costs a failed request, not a restarted pod.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import Connection, OperationalError
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from finetune_core.errors import ConfigError

from .job_record import (CANCELLED, CANCELLED_WHILE_DOWN, COLUMNS, EVENTS_PAGE, FAILED, LEASE_SECONDS, MAX_ATTEMPTS,
                         PROGRESS_FIELDS, QUEUED, RECOVERED_REASON, RUNNING, STATES, SUCCEEDED, TERMINAL, Job,
                         JobStoreUnavailable, encode, event_text, interrupted_error, job_from_row, terminal_event)

# Connections one process holds at most: replicas x workers x this (plus the trainers') must stay
# under the server's max_connections (100 by default).
POOL_MAX_SIZE = 4
CONNECT_TIMEOUT_SECONDS = 30.0
# Every process creates the tables if missing; this lock makes concurrent first starts take turns.
_SCHEMA_LOCK = 0x66696E65  # "fine"
_NOW = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"
# Running jobs whose lease ran out, or held by the worker given (it restarted): what recover() acts on.
_LAPSED = f"status = %s AND (lease_expires_at IS NULL OR lease_expires_at <= {_NOW} OR worker = %s)"
_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        status TEXT NOT NULL,
        progress DOUBLE PRECISION NOT NULL DEFAULT 0,
        epoch INTEGER,
        step INTEGER,
        eta_seconds DOUBLE PRECISION,
        metrics TEXT,
        model TEXT,
        error TEXT,
        attempt INTEGER NOT NULL DEFAULT 0,
        cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
        created_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        worker TEXT,
        lease_expires_at DOUBLE PRECISION,
        position BIGINT GENERATED ALWAYS AS IDENTITY
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, position)",
    """CREATE TABLE IF NOT EXISTS events (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id TEXT NOT NULL,
        event TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq)",
]
_RETURNING = "RETURNING " + ", ".join(COLUMNS)
_SELECT = "SELECT " + ", ".join(COLUMNS) + " FROM jobs"


class PostgresJobStore:
    """JobStore on a PostgreSQL database named by a `postgresql://` URL; safe across threads, processes and pods."""

    def __init__(self, url: str, *, setting: str = "the database URL"):
        parts = conninfo_to_dict(libpq_url(url))
        self.where = describe(parts)  # for messages: never the password
        self.url = sqlalchemy_url(url)
        self.setting = setting
        connection = {"connect_timeout": int(CONNECT_TIMEOUT_SECONDS), "application_name": "finetune-serve"}
        try:  # once by hand, so a wrong URL or password stops the start with libpq's own words
            psycopg.connect(libpq_url(url), **connection).close()
        except OperationalError as err:
            reason = " ".join(str(err).split())
            raise ConfigError(f"{setting}: cannot connect to the job store's database {self.where} ({reason}); check "
                              "the URL, the password and that PostgreSQL is up and reachable from here") from None
        self._pool = ConnectionPool(libpq_url(url), min_size=1, max_size=POOL_MAX_SIZE, open=True,
                                    check=ConnectionPool.check_connection, name="finetune-jobs", kwargs=connection)
        with self._transaction() as db:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in _SCHEMA:
                db.execute(statement)

    def close(self) -> None:
        self._pool.close()

    def create(self, spec: dict) -> Job:
        job_id = "job-" + uuid.uuid4().hex[:16]
        with self._transaction() as db:
            row = db.execute(f"INSERT INTO jobs (id, spec, status, created_at) VALUES (%s, %s, %s, {_NOW}) {_RETURNING}",
                             (job_id, json.dumps(spec), QUEUED)).fetchone()
            _insert_event(db, job_id, {"type": QUEUED})
        return job_from_row(row)

    def get(self, job_id: str) -> Job | None:
        with self._transaction() as db:
            row = db.execute(f"{_SELECT} WHERE id = %s", (job_id,)).fetchone()
        return job_from_row(row) if row else None

    def list(self, status: str | None = None, limit: int = 100) -> list[Job]:
        with self._transaction() as db:
            if status is None:
                rows = db.execute(f"{_SELECT} ORDER BY position DESC LIMIT %s", (limit,))
            else:
                rows = db.execute(f"{_SELECT} WHERE status = %s ORDER BY position DESC LIMIT %s", (status, limit))
            return [job_from_row(r) for r in rows.fetchall()]

    def claim_next(self, worker: str = "", lease_seconds: float = LEASE_SECONDS) -> Job | None:
        with self._transaction() as db:
            row = db.execute(
                f"UPDATE jobs SET status = %s, attempt = attempt + 1, started_at = COALESCE(started_at, {_NOW}), "
                f"worker = %s, lease_expires_at = {_NOW} + %s "
                f"WHERE id = (SELECT id FROM jobs WHERE status = %s ORDER BY position LIMIT 1 FOR UPDATE SKIP LOCKED) "
                f"{_RETURNING}",
                (RUNNING, worker, lease_seconds, QUEUED),
            ).fetchone()
            if row is None:
                return None
            job = job_from_row(row)
            _insert_event(db, job.id, {"type": RUNNING, "attempt": job.attempt, "worker": worker})
            return job

    def heartbeat(self, job_id: str, attempt: int, lease_seconds: float = LEASE_SECONDS) -> bool:
        with self._transaction() as db:
            return db.execute(f"UPDATE jobs SET lease_expires_at = {_NOW} + %s WHERE id = %s AND attempt = %s "
                              "AND status = %s", (lease_seconds, job_id, attempt, RUNNING)).rowcount == 1

    def update(self, job_id: str, attempt: int, event: dict | None = None, **fields) -> bool:
        unknown = set(fields) - set(PROGRESS_FIELDS)
        if unknown:
            raise ValueError(f"update: unknown field(s) {sorted(unknown)}; allowed: {', '.join(PROGRESS_FIELDS)}")
        with self._transaction() as db:
            if fields:
                sets = ", ".join(f"{name} = %s" for name in fields)
                values = [encode(name, v) for name, v in fields.items()]
                changed = db.execute(f"UPDATE jobs SET {sets} WHERE id = %s AND attempt = %s AND status = %s",
                                     (*values, job_id, attempt, RUNNING)).rowcount == 1
            else:
                row = db.execute("SELECT attempt, status FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
                changed = row is not None and tuple(row) == (attempt, RUNNING)
            if changed and event is not None:
                _insert_event(db, job_id, event)
            return changed

    def finish(self, job_id: str, attempt: int, status: str, *, error: str | None = None,
               metrics: dict | None = None, model: dict | None = None) -> bool:
        if status not in TERMINAL:
            raise ValueError(f"finish: status must be one of {', '.join(TERMINAL)}, got {status!r}")
        progress = "1.0" if status == SUCCEEDED else "progress"
        with self._transaction() as db:
            changed = db.execute(
                f"UPDATE jobs SET status = %s, error = %s, metrics = COALESCE(%s, metrics), model = %s, "
                f"finished_at = {_NOW}, eta_seconds = NULL, lease_expires_at = NULL, progress = {progress} "
                f"WHERE id = %s AND attempt = %s AND status = %s",
                (status, error, encode("metrics", metrics), encode("model", model), job_id, attempt, RUNNING),
            ).rowcount == 1
            if changed:
                _insert_event(db, job_id, terminal_event(status, error, model))
            return changed

    def add_event(self, job_id: str, event: dict) -> int:
        with self._transaction() as db:
            db.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
            return _insert_event(db, job_id, event)

    def events(self, job_id: str, after: int = 0, limit: int = EVENTS_PAGE) -> list[tuple[int, dict]]:
        with self._transaction() as db:
            rows = db.execute("SELECT seq, event FROM events WHERE job_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                              (job_id, after, min(limit, EVENTS_PAGE))).fetchall()
        return [(seq, json.loads(event)) for seq, event in rows]

    def request_cancel(self, job_id: str) -> Job | None:
        with self._transaction() as db:
            row = db.execute("SELECT status, cancel_requested FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
            if row is None:
                return None
            status, requested = row
            if status == QUEUED:
                db.execute(f"UPDATE jobs SET status = %s, cancel_requested = TRUE, finished_at = {_NOW} WHERE id = %s",
                           (CANCELLED, job_id))
                _insert_event(db, job_id, {"type": CANCELLED, "reason": "cancelled before it started"})
            elif status == RUNNING and not requested:
                db.execute("UPDATE jobs SET cancel_requested = TRUE WHERE id = %s", (job_id,))
                _insert_event(db, job_id, {"type": "cancel_requested"})
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self._transaction() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = %s", (job_id,)).fetchone()
        return bool(row and row[0])

    def prune_events(self, finished_before: float, types: tuple[str, ...]) -> int:
        with self._transaction() as db:
            return db.execute(
                "DELETE FROM events WHERE (event::jsonb ->> 'type') = ANY(%s) AND job_id IN "
                "(SELECT id FROM jobs WHERE status = ANY(%s) AND finished_at < %s)",
                (list(types), list(TERMINAL), finished_before)).rowcount

    def lapsed(self, worker: str | None = None) -> list[Job]:
        with self._transaction() as db:
            rows = db.execute(f"{_SELECT} WHERE {_LAPSED} ORDER BY position", (RUNNING, worker)).fetchall()
        return [job_from_row(r) for r in rows]

    def recover(self, max_attempts: int = MAX_ATTEMPTS, worker: str | None = None) -> list[str]:
        recovered = []
        with self._transaction() as db:
            # SKIP LOCKED: a row another trainer is recovering (or heartbeating) right now is left to it.
            rows = db.execute(f"SELECT id, attempt, cancel_requested FROM jobs WHERE {_LAPSED} "
                              "ORDER BY position FOR UPDATE SKIP LOCKED", (RUNNING, worker)).fetchall()
            for job_id, attempt, cancel in rows:
                if cancel:
                    db.execute(f"UPDATE jobs SET status = %s, finished_at = {_NOW}, eta_seconds = NULL, "
                               "lease_expires_at = NULL WHERE id = %s", (CANCELLED, job_id))
                    _insert_event(db, job_id, {"type": CANCELLED, "reason": CANCELLED_WHILE_DOWN})
                elif attempt >= max_attempts:
                    error = interrupted_error(attempt)
                    db.execute(f"UPDATE jobs SET status = %s, error = %s, finished_at = {_NOW}, eta_seconds = NULL, "
                               "lease_expires_at = NULL WHERE id = %s", (FAILED, error, job_id))
                    _insert_event(db, job_id, {"type": FAILED, "error": error})
                else:
                    db.execute("UPDATE jobs SET status = %s, eta_seconds = NULL, lease_expires_at = NULL WHERE id = %s",
                               (QUEUED, job_id))
                    _insert_event(db, job_id, {"type": "recovered", "attempt": attempt, "reason": RECOVERED_REASON})
                    recovered.append(job_id)
        return recovered

    def counts(self) -> dict[str, int]:
        with self._transaction() as db:
            found = dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
        return {state: found.get(state, 0) for state in STATES}

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One transaction on a pooled connection: committed when the block ends, rolled back if it raises."""
        try:
            with self._pool.connection(timeout=CONNECT_TIMEOUT_SECONDS) as db:
                yield db
        except (OperationalError, PoolTimeout) as err:
            raise JobStoreUnavailable(f"the job store's database {self.where} is unavailable ({err}); "
                                      f"check that PostgreSQL is up and {self.setting} points at it") from err


def _insert_event(db: Connection, job_id: str, event: dict) -> int:
    return db.execute("INSERT INTO events (job_id, event) VALUES (%s, %s) RETURNING seq",
                      (job_id, event_text(event))).fetchone()[0]


def libpq_url(url: str) -> str:
    """The URL as psycopg (libpq) takes it: without SQLAlchemy's driver suffix."""
    return "postgresql://" + url.split("://", 1)[1]


def sqlalchemy_url(url: str) -> str:
    """The URL as SQLAlchemy (Optuna's storage) takes it, through the psycopg (3) driver."""
    return "postgresql+psycopg://" + url.split("://", 1)[1]


def describe(parts: dict) -> str:
    """user@host:port/database, for messages (the password left out)."""
    user = f"{parts['user']}@" if parts.get("user") else ""
    return f"{user}{parts.get('host') or 'localhost'}:{parts.get('port') or 5432}/{parts.get('dbname') or '?'}"
