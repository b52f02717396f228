"""The durable job store: jobs, their progress and their events, behind a small Protocol.

States: queued -> running -> succeeded | failed | cancelled. Every write a training process makes
names the attempt it belongs to (`attempt` is a fencing token): after a restart re-queues a job, a
stale process of an earlier attempt can no longer change it.

`SqliteJobStore` keeps everything in one SQLite file in WAL mode, so the API workers, the trainer
and its training child can read and write it at once. A PostgreSQL store can satisfy the same
Protocol (same tables; RETURNING and row-level UPDATEs only).
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
# A job interrupted this many times (server restarts, trainer crashes) fails rather than loops.
MAX_ATTEMPTS = 3
# Rows one events() call returns at most; clients page with `after`.
EVENTS_PAGE = 500
PROGRESS_FIELDS = ("progress", "epoch", "step", "eta_seconds", "metrics")


@dataclass(frozen=True)
class Job:
    id: str
    spec: dict
    status: str
    progress: float
    epoch: int | None
    step: int | None
    eta_seconds: float | None
    metrics: dict | None
    model: dict | None  # {"name", "version"} once registered
    error: str | None
    attempt: int  # 0 while never started; +1 each time a trainer claims it
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None

    def public(self) -> dict:
        """The REST contract's view of a job (times as ISO 8601 UTC); a search job's adds trials_done and best."""
        view = {
            "id": self.id,
            "status": self.status,
            "progress": self.progress,
            "epoch": self.epoch,
            "step": self.step,
            "eta_seconds": self.eta_seconds,
            "metrics": self.metrics,
            "model": self.model,
            "error": self.error,
            "model_name": self.spec.get("model_name"),
            "attempt": self.attempt,
            "cancel_requested": self.cancel_requested,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
        }
        if "search" in self.spec:
            search = (self.metrics or {}).get("search") or {}
            view |= {"trials_done": search.get("trials_done", 0), "best": search.get("best")}
        return view


class JobStore(Protocol):
    url: str  # the database's SQLAlchemy URL: a search job keeps its Optuna study there

    def create(self, spec: dict) -> Job: ...

    def get(self, job_id: str) -> Job | None: ...

    def list(self, status: str | None = None, limit: int = 100) -> list[Job]: ...

    def claim_next(self) -> Job | None:
        """Atomically move the oldest queued job to running (attempt + 1) and return it."""
        ...

    def update(self, job_id: str, attempt: int, event: dict | None = None, **fields) -> bool:
        """Set progress fields (and append an event) if the job is still running this attempt."""
        ...

    def finish(self, job_id: str, attempt: int, status: str, *, error: str | None = None,
               metrics: dict | None = None, model: dict | None = None) -> bool:
        """Move a running job of this attempt to a terminal state; False when it was not."""
        ...

    def add_event(self, job_id: str, event: dict) -> int: ...

    def events(self, job_id: str, after: int = 0, limit: int = EVENTS_PAGE) -> list[tuple[int, dict]]: ...

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once; flag a running one for its process to stop. None: no such job."""
        ...

    def cancel_requested(self, job_id: str) -> bool: ...

    def recover(self, max_attempts: int = MAX_ATTEMPTS) -> list[str]:
        """At start-up: re-queue jobs left running (to resume), or fail those interrupted too often."""
        ...

    def counts(self) -> dict[str, int]: ...


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
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    event TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
"""
_JSON_COLUMNS = ("spec", "metrics", "model")


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

    def create(self, spec: dict) -> Job:
        job_id = "job-" + uuid.uuid4().hex[:16]
        with self._connect() as db:
            db.execute("INSERT INTO jobs (id, spec, status, created_at) VALUES (?, ?, ?, ?)",
                       (job_id, json.dumps(spec), QUEUED, time.time()))
            _insert_event(db, job_id, {"type": QUEUED})
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, status: str | None = None, limit: int = 100) -> list[Job]:
        with self._connect() as db:
            if status is None:
                rows = db.execute("SELECT * FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,))
            else:
                rows = db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
                                  (status, limit))
            return [_job(r) for r in rows.fetchall()]

    def claim_next(self) -> Job | None:
        with self._connect() as db:
            row = db.execute(
                "UPDATE jobs SET status = ?, attempt = attempt + 1, started_at = COALESCE(started_at, ?) "
                "WHERE id = (SELECT id FROM jobs WHERE status = ? ORDER BY created_at, rowid LIMIT 1) RETURNING *",
                (RUNNING, time.time(), QUEUED),
            ).fetchone()
            if row is None:
                return None
            job = _job(row)
            _insert_event(db, job.id, {"type": RUNNING, "attempt": job.attempt})
            return job

    def update(self, job_id: str, attempt: int, event: dict | None = None, **fields) -> bool:
        unknown = set(fields) - set(PROGRESS_FIELDS)
        if unknown:
            raise ValueError(f"update: unknown field(s) {sorted(unknown)}; allowed: {', '.join(PROGRESS_FIELDS)}")
        with self._connect() as db:
            changed = True
            if fields:
                sets = ", ".join(f"{name} = ?" for name in fields)
                values = [json.dumps(v) if name in _JSON_COLUMNS else v for name, v in fields.items()]
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
                f"eta_seconds = NULL, progress = {progress} WHERE id = ? AND attempt = ? AND status = ?",
                (status, error, json.dumps(metrics) if metrics is not None else None,
                 json.dumps(model) if model is not None else None, time.time(), job_id, attempt, RUNNING),
            ).rowcount == 1
            if changed:
                _insert_event(db, job_id, {"type": status, **({"error": error} if error else {}),
                                           **({"model": model} if model else {})})
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

    def recover(self, max_attempts: int = MAX_ATTEMPTS) -> list[str]:
        recovered = []
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute("SELECT id, attempt, cancel_requested FROM jobs WHERE status = ?", (RUNNING,)).fetchall()
            now = time.time()
            for job_id, attempt, cancel in rows:
                if cancel:
                    db.execute("UPDATE jobs SET status = ?, finished_at = ?, eta_seconds = NULL WHERE id = ?",
                               (CANCELLED, now, job_id))
                    _insert_event(db, job_id, {"type": CANCELLED, "reason": "cancelled; the server restarted before it stopped"})
                elif attempt >= max_attempts:
                    error = (f"interrupted {attempt} times (server restarts or trainer crashes); giving up. "
                             "Check the server logs and resubmit the job")
                    db.execute("UPDATE jobs SET status = ?, error = ?, finished_at = ?, eta_seconds = NULL WHERE id = ?",
                               (FAILED, error, now, job_id))
                    _insert_event(db, job_id, {"type": FAILED, "error": error})
                else:
                    db.execute("UPDATE jobs SET status = ?, eta_seconds = NULL WHERE id = ?", (QUEUED, job_id))
                    _insert_event(db, job_id, {"type": "recovered", "attempt": attempt,
                                               "reason": "the server stopped while the job ran; it resumes from its last checkpoint"})
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
        except BaseException:
            if tx.open:
                db.execute("ROLLBACK")
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


def default_store_path() -> Path:
    from finetune_core.registry import root

    return root() / "jobs.sqlite3"


def open_store(path: str | Path | None = None) -> SqliteJobStore:
    """The job store of this FINETUNE_SERVE_HOME (or `path`)."""
    return SqliteJobStore(path or default_store_path())


def _insert_event(db, job_id: str, event: dict) -> int:
    event = {"time": round(time.time(), 3), **event}
    return db.execute("INSERT INTO events (job_id, event) VALUES (?, ?)", (job_id, json.dumps(event))).lastrowid


def _is_current(db, job_id: str, attempt: int) -> bool:
    row = db.execute("SELECT attempt, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row is not None and row[0] == attempt and row[1] == RUNNING


def _job(row: sqlite3.Row | tuple) -> Job:
    (job_id, spec, status, progress, epoch, step, eta, metrics, model, error, attempt, cancel,
     created, started, finished) = row
    return Job(job_id, json.loads(spec), status, progress, epoch, step, eta,
               json.loads(metrics) if metrics else None, json.loads(model) if model else None, error,
               attempt, bool(cancel), created, started, finished)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="seconds")

