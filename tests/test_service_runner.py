"""The trainer's runner without BentoML: real child processes, a crash, bad data, thread and priority limits, leases."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from conftest import toy_rows, write_jsonl
from service_helpers import alive, wait_until

from service.jobs import SqliteJobStore
from service.runner import Runner, exit_reason
from service.schemas import FinetuneRequest, job_spec
from service.settings import Settings
from service.train_job import run_dir_of, training_threads


# Short, so a heartbeat (every third of it) comes within a second.
LEASE = 3.0


def _spec(tiny_base, train_path, **hyper) -> dict:
    request = FinetuneRequest(base_model=str(tiny_base), train="ds-unused", model_name="toy", variants=["onnx"],
                              hyperparameters={"epochs": 1, "batch_size": 8, "max_length": 32, "precision": "fp32", **hyper})
    return job_spec(request, {"train": str(train_path)})


@pytest.fixture
def runner(tmp_path):
    running = Runner(SqliteJobStore(tmp_path / "home" / "jobs.sqlite3"), worker="trainer-a", lease_seconds=LEASE,
                     poll_seconds=0.2)
    running.start()
    yield running
    running.stop()


@pytest.mark.process
def test_a_killed_child_fails_its_job_with_the_reason_and_ran_niced_with_capped_threads(runner, tiny_base, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(240))
    job = runner.store.create(_spec(tiny_base, train, epochs=300))  # num_threads left to the service
    wait_until("training steps", 90, lambda: (runner.store.get(job.id).step or 0) > 0, poll=0.2)
    pid = runner.child_pid()
    assert pid is not None and pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + Settings().train_nice)
    saved = json.loads((run_dir_of(job.id) / "config.json").read_text())
    assert saved["train"]["num_threads"] == training_threads()
    os.kill(pid, signal.SIGKILL)
    failed = wait_until("the job to fail", 30, lambda: (j := runner.store.get(job.id)).status == "failed" and j, poll=0.2)
    assert "killed by SIGKILL" in failed.error and "out-of-memory" in failed.error
    assert runner.alive()  # the runner outlives its child


@pytest.mark.process
def test_bad_data_fails_with_the_core_message_and_the_next_job_still_runs(runner, tiny_base, tmp_path):
    missing = runner.store.create(_spec(tiny_base, tmp_path / "nowhere.jsonl"))
    one_class = write_jsonl(tmp_path / "one.jsonl", [{"text": f"row {i}", "label": "a"} for i in range(20)])
    single = runner.store.create(_spec(tiny_base, one_class))
    runner.wake()
    first = wait_until("the first job", 90, lambda: (j := runner.store.get(missing.id)).status == "failed" and j, poll=0.2)
    assert "does not exist" in first.error
    second = wait_until("the second job", 90, lambda: (j := runner.store.get(single.id)).status == "failed" and j, poll=0.2)
    assert "one class only" in second.error


@pytest.mark.process
def test_a_job_whose_lease_went_to_another_trainer_is_stopped_here_and_left_to_it(runner, tiny_base, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(240))
    job = runner.store.create(_spec(tiny_base, train, epochs=300))
    wait_until("training steps", 90, lambda: (runner.store.get(job.id).step or 0) > 0, poll=0.2)
    pid = runner.child_pid()
    # What a long partition from the database looks like from outside: the lease lapses, another trainer
    # re-queues the job and claims it. This trainer's next heartbeat fails, and it must stop its copy.
    assert runner.store.heartbeat(job.id, 1, 0) and runner.store.recover() == [job.id]
    taken = runner.store.claim_next("trainer-b", 600)
    assert (taken.id, taken.attempt) == (job.id, 2)
    # The runner clears `current` just after its child exits: wait for both, not the child alone.
    wait_until("the stale training process to end", 30,
               lambda: runner.child_pid() is None and runner.current is None and not alive(pid), poll=0.2)
    now = runner.store.get(job.id)
    assert (now.status, now.attempt, now.worker, now.error) == ("running", 2, "trainer-b", None)  # not failed by us
    assert runner.alive() and runner.current is None


@pytest.mark.process
def test_stopping_the_runner_hands_its_job_back_at_once(tiny_base, tmp_path):
    store = SqliteJobStore(tmp_path / "home" / "jobs.sqlite3")
    running = Runner(store, worker="trainer-a", lease_seconds=600, poll_seconds=0.2)
    running.start()
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(240))
    job = store.create(_spec(tiny_base, train, epochs=300))
    wait_until("the training process", 60, lambda: running.child_pid() is not None, poll=0.2)
    pid = running.child_pid()
    running.stop()  # a pod's SIGTERM: a rolling update, a scale-down
    assert not alive(pid)
    held = store.get(job.id)
    assert (held.status, held.attempt, held.error) == ("running", 1, None) and held.lease_expires_at <= time.time()
    assert store.recover() == [job.id]  # any trainer's next poll takes it over, without waiting out 600 s


def test_exit_reasons_are_for_people():
    assert "SIGKILL" in exit_reason(-9) and "batch_size" in exit_reason(-9)
    assert exit_reason(-15) == "the training process was killed by SIGTERM"
    assert "exited with code 3" in exit_reason(3)


def _registered_for(job, spec: dict) -> str:
    """Register a version as the job's process would have (its run folder in the manifest), and return it."""
    from finetune_core import registry
    from finetune_core.metadata import Manifest, ModelMeta, VariantRecord

    run_dir = run_dir_of(job.id)
    staging = run_dir / "staging"
    (staging / "model").mkdir(parents=True)
    (staging / "model" / "weights.bin").write_bytes(b"weights")
    if "distill_from" in spec:  # a distilled version names its teacher's run and the student it proved
        manifest = Manifest(ModelMeta("text-classification", ["a", "b"]),
                            {"pytorch": VariantRecord(True, "", file="model")}, source_run="/elsewhere/teacher-run",
                            proof={"student": str((run_dir / "distill" / "model").resolve())})
    else:
        manifest = Manifest(ModelMeta("text-classification", ["a", "b"]),
                            {"pytorch": VariantRecord(True, "", file="model")}, source_run=str(run_dir.resolve()))
    return registry.register("toy", staging, manifest).version


@pytest.mark.parametrize("spec", [{"model_name": "toy"}, {"distill_from": {"name": "toy", "version": "v1"}}],
                         ids=["finetune", "distill-version"])
@pytest.mark.parametrize("state", ["cancel-asked", "last-attempt"])
def test_a_job_whose_trainer_died_after_registering_ends_succeeded_not_cancelled_failed_or_retrained(
        tmp_path, spec, state):
    """The trainer died (its lease ran out) after the job's process registered the version: the next trainer
    records the success, whatever recover() would have done (cancel it, fail it on its last attempt, retrain it)."""
    store = SqliteJobStore(tmp_path / "home" / "jobs.sqlite3")
    job = store.create(spec)
    for _ in range(1 if state == "cancel-asked" else 3):  # each claim is one attempt; 3 is the last
        if store.claim_next("trainer-gone", lease_seconds=0.01) is None:
            store.recover(max_attempts=99)
            assert store.claim_next("trainer-gone", lease_seconds=0.01) is not None
        time.sleep(0.02)  # the lease runs out: the trainer is gone
    if state == "cancel-asked":
        store.request_cancel(job.id)
    version = _registered_for(job, spec)
    running = Runner(store, worker="trainer-b", poll_seconds=0.05)
    running.start()
    try:
        ended = wait_until("the job to end", 30, lambda: (j := store.get(job.id)).status != "running" and j, poll=0.05)
    finally:
        running.stop()
    assert ended.status == "succeeded", [event for _, event in store.events(job.id)]
    assert ended.model == {"name": "toy", "version": version}
    kinds = [event["type"] for _, event in store.events(job.id)]
    assert ("cancel_too_late" if state == "cancel-asked" else "registered_earlier") in kinds
