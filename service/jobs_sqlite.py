"""The embedded job store: one SQLite file in WAL mode under FINETUNE_SERVE_HOME (`make run`'s default).

The API workers, the trainer and its training child read and write it at once, on one machine:
every write takes SQLite's one write lock (BEGIN IMMEDIATE), so a claim, a cancel or a recovery is
atomic. Lease times come from this machine's clock, which every process here shares.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .job_record import (CANCELLED, CANCELLED_WHILE_DOWN, COLUMNS, EVENTS_PAGE, FAILED, LEASE_SECONDS, MAX_ATTEMPTS,
                         PROGRESS_FIELDS, QUEUED, RECOVERED_REASON, RUNNING, STATES, SUCCEEDED, TERMINAL, Job,
                         JobStoreUnavailable, encode, event_text, interrupted_error, job_from_row, terminal_event)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    epoch INTEGER,
    step INTEGER,
    eta_seconds REAL,
    metrics TEXT,
    model TEXT,
    error TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    worker TEXT,
    lease_expires_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    event TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
"""
# Columns later versions added, for a store file an earlier version wrote.
_ADDED_COLUMNS = (("worker", "TEXT"), ("lease_expires_at", "REAL"))
_SELECT = "SELECT " + ", ".join(COLUMNS) + " FROM jobs"
# Running jobs whose lease ran out, or held by the worker given (it restarted): what recover() acts on.
_LAPSED = "status = ? AND (lease_expires_at IS NULL OR lease_expires_at <= ? OR worker = ?)"


class SqliteJobStore:
    """JobStore on one SQLite file (WAL). A connection per call: safe across threads and processes."""

    def __init__(self, path: str | Path, busy_timeout_seconds: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.url = f"sqlite:///{self.path.resolve()}"
        self.busy_timeout_seconds = busy_timeout_seconds
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent in the file: readers never block the writer
            db.executescript(_SCHEMA)
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # two processes opening an old file at once add each column once
            present = {row[1] for row in db.execute("PRAGMA table_info(jobs)").fetchall()}
            for column, kind in _ADDED_COLUMNS:
                if column not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def create(self, spec: dict) -> Job:
        job_id = "job-" + uuid.uuid4().hex[:16]
        with self._connect() as db:
            db.execute("INSERT INTO jobs (id, spec, status, created_at) VALUES (?, ?, ?, ?)",
                       (job_id, json.dumps(spec), QUEUED, time.time()))
            _insert_event(db, job_id, {"type": QUEUED})
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
        return job_from_row(row) if row else None

    def list(self, status: str | None = None, limit: int = 100) -> list[Job]:
        with self._connect() as db:
            if status is None:
                rows = db.execute(f"{_SELECT} ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,))
            else:
                rows = db.execute(f"{_SELECT} WHERE status = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
                                  (status, limit))
            return [job_from_row(r) for r in rows.fetchall()]

    def claim_next(self, worker: str = "", lease_seconds: float = LEASE_SECONDS) -> Job | None:
        now = time.time()
        with self._connect() as db:
            row = db.execute(
                "UPDATE jobs SET status = ?, attempt = attempt + 1, started_at = COALESCE(started_at, ?), worker = ?, "
                "lease_expires_at = ? "
                "WHERE id = (SELECT id FROM jobs WHERE status = ? ORDER BY created_at, rowid LIMIT 1) "
                "RETURNING " + ", ".join(COLUMNS),
                (RUNNING, now, worker, now + lease_seconds, QUEUED),
            ).fetchone()
            if row is None:
                return None
            job = job_from_row(row)
            _insert_event(db, job.id, {"type": RUNNING, "attempt": job.attempt, "worker": worker})
            return job

    def heartbeat(self, job_id: str, attempt: int, lease_seconds: float = LEASE_SECONDS) -> bool:
        with self._connect() as db:
            return db.execute("UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND attempt = ? AND status = ?",
                              (time.time() + lease_seconds, job_id, attempt, RUNNING)).rowcount == 1

    def update(self, job_id: str, attempt: int, event: dict | None = None, **fields) -> bool:
        unknown = set(fields) - set(PROGRESS_FIELDS)
        if unknown:
            raise ValueError(f"update: unknown field(s) {sorted(unknown)}; allowed: {', '.join(PROGRESS_FIELDS)}")
        with self._connect() as db:
            changed = True
            if fields:
                sets = ", ".join(f"{name} = ?" for name in fields)
                values = [encode(name, v) for name, v in fields.items()]
                changed = db.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND attempt = ? AND status = ?",
                                     (*values, job_id, attempt, RUNNING)).rowcount == 1
            elif event is not None:
                changed = _is_current(db, job_id, attempt)
            if changed and event is not None:
                _insert_event(db, job_id, event)
            return changed

    def finish(self, job_id: str, attempt: int, status: str, *, error: str | None = None,
               metrics: dict | None = None, model: dict | None = None) -> bool:
        if status not in TERMINAL:
            raise ValueError(f"finish: status must be one of {', '.join(TERMINAL)}, got {status!r}")
        with self._connect() as db:
            progress = "1.0" if status == SUCCEEDED else "progress"
            changed = db.execute(
                f"UPDATE jobs SET status = ?, error = ?, metrics = COALESCE(?, metrics), model = ?, finished_at = ?, "
                f"eta_seconds = NULL, lease_expires_at = NULL, progress = {progress} "
                f"WHERE id = ? AND attempt = ? AND status = ?",
                (status, error, encode("metrics", metrics), encode("model", model), time.time(), job_id, attempt, RUNNING),
            ).rowcount == 1
            if changed:
                _insert_event(db, job_id, terminal_event(status, error, model))
            return changed

    def add_event(self, job_id: str, event: dict) -> int:
        with self._connect() as db:
            return _insert_event(db, job_id, event)

    def events(self, job_id: str, after: int = 0, limit: int = EVENTS_PAGE) -> list[tuple[int, dict]]:
        with self._connect() as db:
            rows = db.execute("SELECT seq, event FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                              (job_id, after, min(limit, EVENTS_PAGE))).fetchall()
        return [(seq, json.loads(event)) for seq, event in rows]

    def request_cancel(self, job_id: str) -> Job | None:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT status, cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            status, requested = row
            if status == QUEUED:
                db.execute("UPDATE jobs SET status = ?, cancel_requested = 1, finished_at = ? WHERE id = ?",
                           (CANCELLED, time.time(), job_id))
                _insert_event(db, job_id, {"type": CANCELLED, "reason": "cancelled before it started"})
            elif status == RUNNING and not requested:
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                _insert_event(db, job_id, {"type": "cancel_requested"})
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self._connect() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def prune_events(self, finished_before: float, types: tuple[str, ...]) -> int:
        kinds, ended = ", ".join("?" * len(types)), ", ".join("?" * len(TERMINAL))
        with self._connect() as db:
            return db.execute(
                f"DELETE FROM events WHERE json_extract(event, '$.type') IN ({kinds}) AND job_id IN "
                f"(SELECT id FROM jobs WHERE status IN ({ended}) AND finished_at < ?)",
                (*types, *TERMINAL, finished_before)).rowcount

    def lapsed(self, worker: str | None = None) -> list[Job]:
        with self._connect() as db:
            rows = db.execute(f"{_SELECT} WHERE {_LAPSED} ORDER BY rowid", (RUNNING, time.time(), worker)).fetchall()
        return [job_from_row(r) for r in rows]

    def recover(self, max_attempts: int = MAX_ATTEMPTS, worker: str | None = None) -> list[str]:
        recovered = []
        with self._connect() as db:
            now = time.time()
            # A cheap read first: a trainer calls this once a poll, and most polls find nothing.
            if db.execute(f"SELECT 1 FROM jobs WHERE {_LAPSED} LIMIT 1", (RUNNING, now, worker)).fetchone() is None:
                return []
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(f"SELECT id, attempt, cancel_requested FROM jobs WHERE {_LAPSED}",
                              (RUNNING, now, worker)).fetchall()
            for job_id, attempt, cancel in rows:
                if cancel:
                    db.execute("UPDATE jobs SET status = ?, finished_at = ?, eta_seconds = NULL, lease_expires_at = NULL "
                               "WHERE id = ?", (CANCELLED, now, job_id))
                    _insert_event(db, job_id, {"type": CANCELLED, "reason": CANCELLED_WHILE_DOWN})
                elif attempt >= max_attempts:
                    error = interrupted_error(attempt)
                    db.execute("UPDATE jobs SET status = ?, error = ?, finished_at = ?, eta_seconds = NULL, "
                               "lease_expires_at = NULL WHERE id = ?", (FAILED, error, now, job_id))
                    _insert_event(db, job_id, {"type": FAILED, "error": error})
                else:
                    db.execute("UPDATE jobs SET status = ?, eta_seconds = NULL, lease_expires_at = NULL WHERE id = ?",
                               (QUEUED, job_id))
                    _insert_event(db, job_id, {"type": "recovered", "attempt": attempt, "reason": RECOVERED_REASON})
                    recovered.append(job_id)
        return recovered

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            found = dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
        return {state: found.get(state, 0) for state in STATES}

    @contextmanager
    def _connect(self) -> Iterator[_Transaction]:
        # isolation_level=None: we open transactions ourselves, so one `with` block is one transaction.
        db = sqlite3.connect(self.path, timeout=self.busy_timeout_seconds, isolation_level=None)
        tx = _Transaction(db)
        try:
            yield tx
            if tx.open:
                db.execute("COMMIT")
        except BaseException as err:
            if tx.open:
                db.execute("ROLLBACK")
            if isinstance(err, sqlite3.OperationalError) and "locked" in str(err):
                raise JobStoreUnavailable(f"the job store '{self.path}' stayed locked by another process for "
                                          f"{self.busy_timeout_seconds:g} s ({err}); try again") from err
            raise
        finally:
            db.close()


class _Transaction:
    """Opens one write transaction (BEGIN IMMEDIATE) at the first statement that writes."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.open = False

    def execute(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        if sql.startswith("BEGIN"):
            self.open = True
        elif not self.open and not sql.startswith(("SELECT", "PRAGMA")):
            self.db.execute("BEGIN IMMEDIATE")
            self.open = True
        return self.db.execute(sql, params)

    def executescript(self, script: str) -> None:
        self.db.executescript(script)


def _insert_event(db, job_id: str, event: dict) -> int:
    return db.execute("INSERT INTO events (job_id, event) VALUES (?, ?)", (job_id, event_text(event))).lastrowid


def _is_current(db, job_id: str, attempt: int) -> bool:
    row = db.execute("SELECT attempt, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row is not None and row[0] == attempt and row[1] == RUNNING
