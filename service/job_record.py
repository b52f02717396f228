"""What a job is: its states, the Job record, the JobStore Protocol both stores satisfy, and their shared row.

States: queued -> running -> succeeded | failed | cancelled. Every write a training process makes
names the attempt it belongs to (`attempt` is a fencing token): after a job is re-queued, a stale
process of an earlier attempt can no longer change it.

A running job is leased to the trainer that claimed it (`worker`) until `lease_expires_at`; the
trainer renews the lease with heartbeats while the job trains. A job whose lease runs out (its
trainer's pod died, or lost the database) is re-queued by any trainer's `recover` and resumes from
its last checkpoint on whichever trainer claims it next.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass
from typing import Protocol

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
# A job interrupted this many times (server restarts, trainer crashes, lost leases) fails rather than loops.
MAX_ATTEMPTS = 3
# Rows one events() call returns at most; clients page with `after`.
EVENTS_PAGE = 500
PROGRESS_FIELDS = ("progress", "epoch", "step", "eta_seconds", "metrics")
# A claim's lease when the caller names none; the service takes its own from the settings.
LEASE_SECONDS = 30.0
# The columns of a job row, in the order Job takes them: both stores select exactly these.
COLUMNS = ("id", "spec", "status", "progress", "epoch", "step", "eta_seconds", "metrics", "model", "error", "attempt",
           "cancel_requested", "created_at", "started_at", "finished_at", "worker", "lease_expires_at")
JSON_COLUMNS = ("spec", "metrics", "model")


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
    worker: str | None = None  # the trainer that holds (or last held) it
    lease_expires_at: float | None = None  # while running: when it stops being that trainer's without a heartbeat

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
            "worker": self.worker,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
        }
        if "search" in self.spec:
            search = (self.metrics or {}).get("search") or {}
            view |= {"trials_done": search.get("trials_done", 0), "best": search.get("best")}
        return view


class JobStoreUnavailable(RuntimeError):
    """The job store did not answer (PostgreSQL down, SQLite locked past its busy timeout): a 503 over HTTP,
    this request or poll fails with the reason in the log, and the process stays up."""


class JobStore(Protocol):
    url: str  # the database's SQLAlchemy URL: a search job keeps its Optuna study there

    def create(self, spec: dict) -> Job: ...

    def get(self, job_id: str) -> Job | None: ...

    def list(self, status: str | None = None, limit: int = 100) -> list[Job]: ...

    def claim_next(self, worker: str = "", lease_seconds: float = LEASE_SECONDS) -> Job | None:
        """Atomically move the oldest queued job to running (attempt + 1), leased to `worker`, and return it.

        Claims from several trainers at once never return the same job.
        """
        ...

    def heartbeat(self, job_id: str, attempt: int, lease_seconds: float = LEASE_SECONDS) -> bool:
        """Renew the lease of a job running this attempt; False when it is no longer (the trainer must stop it)."""
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
        """Cancel a queued job at once; flag a running one for its trainer to stop, wherever it runs. None: no such job."""
        ...

    def cancel_requested(self, job_id: str) -> bool: ...

    def prune_events(self, finished_before: float, types: tuple[str, ...]) -> int:
        """Delete the events of these types of jobs that ended before `finished_before` (epoch seconds); how many."""
        ...

    def lapsed(self, worker: str | None = None) -> list[Job]:
        """The running jobs recover() would act on now: their lease ran out, or `worker` held them (it restarted)."""
        ...

    def recover(self, max_attempts: int = MAX_ATTEMPTS, worker: str | None = None) -> list[str]:
        """Re-queue running jobs whose lease ran out, and those `worker` held (it restarted): they resume.

        One interrupted max_attempts times fails instead; one whose cancel was asked for is cancelled.
        Returns the re-queued ids.
        """
        ...

    def counts(self) -> dict[str, int]: ...


def job_from_row(row: tuple) -> Job:
    """A Job from a row of COLUMNS, JSON columns still encoded."""
    values = dict(zip(COLUMNS, row, strict=True))
    for name in JSON_COLUMNS:
        values[name] = json.loads(values[name]) if values[name] else None
    values["spec"] = values["spec"] or {}
    values["cancel_requested"] = bool(values["cancel_requested"])
    return Job(**values)


def encode(name: str, value):
    """A field's value as its column stores it."""
    return json.dumps(value) if name in JSON_COLUMNS and value is not None else value


def event_text(event: dict) -> str:
    """An event as stored: stamped with the time it was written."""
    return json.dumps({"time": round(time.time(), 3), **event})


def terminal_event(status: str, error: str | None, model: dict | None) -> dict:
    return {"type": status, **({"error": error} if error else {}), **({"model": model} if model else {})}


def interrupted_error(attempt: int) -> str:
    return (f"interrupted {attempt} times (server restarts, trainer crashes or lost leases); giving up. "
            "Check the trainers' logs and resubmit the job")


RECOVERED_REASON = "its trainer stopped (or lost its lease) while the job ran; it resumes from its last checkpoint"
CANCELLED_WHILE_DOWN = "cancelled; its trainer stopped before it could stop the job"


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="seconds")
