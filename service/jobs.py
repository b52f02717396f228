"""The job store of this deployment: `open_store()` picks the backend from the settings.

FINETUNE_SERVE_DATABASE_URL unset (`make run`): SQLite in FINETUNE_SERVE_HOME (service.jobs_sqlite),
for one machine. Set to a `postgresql://` URL: the PostgreSQL store (service.jobs_postgres) that
API replicas and trainer pods share. What a job is and the JobStore Protocol live in
service.job_record; the names the rest of the service uses are imported from here.
"""

from __future__ import annotations

from pathlib import Path

from finetune_core.registry import root

from .job_record import (CANCELLED, EVENTS_PAGE, FAILED, LEASE_SECONDS, MAX_ATTEMPTS, PROGRESS_FIELDS, QUEUED,
                         RUNNING, STATES, SUCCEEDED, TERMINAL, Job, JobStore)
from .jobs_postgres import PostgresJobStore
from .jobs_sqlite import SqliteJobStore
from .settings import env_name, settings

__all__ = ["CANCELLED", "EVENTS_PAGE", "FAILED", "LEASE_SECONDS", "MAX_ATTEMPTS", "PROGRESS_FIELDS", "QUEUED", "RUNNING",
           "STATES", "SUCCEEDED", "TERMINAL", "Job", "JobStore", "PostgresJobStore", "SqliteJobStore",
           "default_store_path", "open_store"]


def default_store_path() -> Path:
    return root() / "jobs.sqlite3"


def open_store(path: str | Path | None = None) -> JobStore:
    """The PostgreSQL store when the settings name a database URL; else SQLite at `path` (default: in HOME)."""
    url = settings().database_url
    if url is not None and path is None:
        return PostgresJobStore(url.get_secret_value(), setting=env_name("database_url"))
    return SqliteJobStore(path or default_store_path())
