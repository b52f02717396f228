"""A cancel that meets a job's export: the job's end state matches what the registry holds.

Real jobs (the tiny BERT, one epoch, ONNX) run by the runner in child processes. The cancel is timed
with the job store's own write lock: holding it lets the child export and register its version, then
stops it at the write that would record the success; the child is paused there (SIGSTOP) and the
cancel is sent, so the trainer kills a process that registered its version but never said so.
"""

from __future__ import annotations

import os
import signal
import sqlite3

import pytest
from conftest import toy_rows, write_jsonl
from service_helpers import wait_until
from test_service_runner import _spec

from finetune_core import registry
from service.jobs import SqliteJobStore
from service.runner import Runner

pytestmark = pytest.mark.process  # training child processes


@pytest.fixture
def runner(tmp_path):
    # No grace: a cancelled child is killed at once. A long lease: no heartbeat waits on the held lock.
    running = Runner(SqliteJobStore(tmp_path / "home" / "jobs.sqlite3"), worker="trainer-a", lease_seconds=600,
                     poll_seconds=0.1, cancel_grace_seconds=0)
    running.start()
    yield running
    running.stop()


def _exporting(store, job_id: str) -> bool:
    return any(event["type"] == "exporting" for _, event in store.events(job_id))


def _versions(name: str) -> list[str]:
    folder = registry.root() / "models" / name
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def test_a_job_killed_for_its_cancel_after_registering_ends_succeeded_with_its_version(runner, tiny_base, tmp_path):
    store = runner.store
    job = store.create(_spec(tiny_base, write_jsonl(tmp_path / "train.jsonl", toy_rows(240))))
    wait_until("the export to start", 120, lambda: _exporting(store, job.id), poll=0.05)
    pid = runner.child_pid()
    held = sqlite3.connect(store.path, isolation_level=None)
    held.execute("BEGIN IMMEDIATE")  # the child registers, then waits here to record its success
    try:
        wait_until("the version to be registered", 120, lambda: _versions("toy") == ["v1"], poll=0.05)
        os.kill(pid, signal.SIGSTOP)
    finally:
        held.execute("ROLLBACK")
        held.close()
    store.request_cancel(job.id)
    ended = wait_until("the job to end", 60, lambda: (j := store.get(job.id)).status != "running" and j, poll=0.2)

    assert (ended.status, ended.model) == ("succeeded", {"name": "toy", "version": "v1"})
    assert ended.metrics["variants"]["onnx"]["accepted"] is True
    events = [event for _, event in store.events(job.id)]
    too_late = [e for e in events if e["type"] == "cancel_too_late"]
    assert len(too_late) == 1 and too_late[0]["version"] == "v1" and "was stopped for the cancel" in too_late[0]["reason"]
    assert [e["type"] for e in events][-3:] == ["cancel_requested", "cancel_too_late", "succeeded"]
    assert registry.resolve("toy", "v1").manifest.source_run.endswith(job.id)


def test_a_cancel_during_the_export_before_registration_registers_nothing(runner, tiny_base, tmp_path):
    store = runner.store
    job = store.create(_spec(tiny_base, write_jsonl(tmp_path / "train.jsonl", toy_rows(240))))
    wait_until("the export to start", 120, lambda: _exporting(store, job.id), poll=0.05)
    os.kill(runner.child_pid(), signal.SIGSTOP)  # paused before its version is complete
    store.request_cancel(job.id)
    ended = wait_until("the job to end", 60, lambda: (j := store.get(job.id)).status != "running" and j, poll=0.2)
    assert (ended.status, ended.model) == ("cancelled", None)
    assert _versions("toy") == []
