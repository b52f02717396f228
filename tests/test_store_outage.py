"""A job store that does not answer is a 503 with Retry-After, not a 500: PostgreSQL stopped under a real
API server, and SQLite locked past its busy timeout. The server itself stays up and live."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import httpx
import pytest
from pg_helpers import PostgresServer
from service_helpers import Server

from service.job_record import JobStoreUnavailable
from service.jobs_sqlite import SqliteJobStore


def test_sqlite_locked_past_its_busy_timeout_is_unavailable_not_a_crash(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", busy_timeout_seconds=0.2)
    holder = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing, for longer than the store waits
    try:
        with pytest.raises(JobStoreUnavailable, match="stayed locked by another process for 0.2 s"):
            store.create({"task": "text-classification"})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.create({"task": "text-classification"}).status == "queued"  # and it recovers at once


@pytest.mark.process
def test_postgres_down_answers_503_with_retry_after_and_the_server_stays_live(tmp_path):
    # Its own server, in a folder the postgres user can reach (pytest's tmp folders are root's alone).
    postgres = PostgresServer(Path(tempfile.mkdtemp(prefix="finetune-pg-outage-"))).start()
    api = None
    try:
        url = postgres.create_database()
        api = Server(tmp_path / "home", tmp_path / "api.log", target="service.bento:Api",
                     env={"FINETUNE_SERVE_DATABASE_URL": url}).start()
        with httpx.Client(base_url=api.url, timeout=60) as client:
            assert client.get("/jobs").status_code == 200
            postgres.stop()
            for path in ("/jobs", "/jobs/0123456789abcdef"):
                response = client.get(path)
                assert response.status_code == 503, (path, response.text)
                assert response.headers["retry-after"] == "5"
                body = response.json()
                assert body["field"] is None and "the job store's database" in body["error"]
                assert "PostgreSQL" in body["error"] and postgres.password not in body["error"]
            assert client.get("/livez").status_code == 200
            assert client.get("/models").status_code == 200  # the registry is files: still served
    finally:
        if api is not None:
            api.kill()
        postgres.stop()
