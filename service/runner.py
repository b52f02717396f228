"""The trainer's loop: one job at a time, each in a child process it supervises.

Several trainers (pods) may share one job store; each has a name (`worker`). At start a trainer
re-queues the jobs it held itself before a restart; on every poll it re-queues jobs whose lease ran
out (their trainer died), so they resume from their last checkpoint wherever they are claimed next.
It claims queued jobs one by one and runs `python -m service.train_job` for each, renewing the
job's lease every third of it. When the child exits without recording an outcome (a crash, an
out-of-memory kill) the job fails with the reason, unless the child had registered its version
already: then it succeeded (service.train_job says why), and so does a lapsed one found registered before
it is re-queued, cancelled or failed; a job whose cancel was asked for (through any
API replica) but does not stop within the grace period is killed; a job whose lease this trainer
lost (it could not reach the database for a whole lease) is stopped here, since another trainer
has it now. Between jobs, at start and then hourly, it deletes what FINETUNE_SERVE_RETENTION_DAYS
lets go (service.retention).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from finetune_core.isolated import exit_reason
from service import retention
from service.job_record import CANCELLED, FAILED, LEASE_SECONDS, MAX_ATTEMPTS, RUNNING, TERMINAL, Job, JobStore
from service.settings import settings
from service.train_job import finish_registered, registered_version

log = logging.getLogger("service.runner")

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# How long a running job may ignore a cancel request (it is polled once per optimizer step).
CANCEL_GRACE_SECONDS = 30.0
# How long a child gets to exit after SIGTERM before SIGKILL.
TERMINATE_GRACE_SECONDS = 5.0


class Runner:
    def __init__(self, store: JobStore, *, worker: str, lease_seconds: float = LEASE_SECONDS, poll_seconds: float = 1.0,
                 cancel_grace_seconds: float = CANCEL_GRACE_SECONDS, max_attempts: int = MAX_ATTEMPTS,
                 on_tick: Callable[[], None] = lambda: None, on_finished: Callable[[Job], None] = lambda job: None,
                 retention_days: float | None = None, retention_every_seconds: float = retention.SWEEP_EVERY_SECONDS):
        self.store = store
        self.worker = worker
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.cancel_grace_seconds = cancel_grace_seconds
        self.max_attempts = max_attempts
        self.on_tick = on_tick
        self.on_finished = on_finished
        # None: the service's setting (its Trainer passes none); a test gives its own.
        self.retention_days = settings().retention_days if retention_days is None else retention_days
        self.retention_every_seconds = retention_every_seconds
        self._next_sweep = 0.0  # the first poll sweeps: at start
        self.current: Job | None = None
        self._child: subprocess.Popen | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> list[str]:
        """Re-queue the jobs this trainer held before a restart (and lapsed ones), then run queued jobs in a
        background thread; returns the re-queued ids."""
        recovered = self._recover(worker=self.worker)
        if recovered:
            log.warning("re-queued %d job(s) left running by a previous trainer: %s", len(recovered), ", ".join(recovered))
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._thread.start()
        return recovered

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self._wake.set()

    def child_pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs and end the running child; its lease ends, so the next trainer to poll resumes it."""
        self._stopping.set()
        self._wake.set()
        child = self._child
        if child is not None and child.poll() is None:
            _end(child, TERMINATE_GRACE_SECONDS)
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.on_tick()
                self._sweep_when_due()
                lapsed = self._recover()
                if lapsed:
                    log.warning("re-queued %d job(s) whose trainer's lease ran out: %s", len(lapsed), ", ".join(lapsed))
                job = self.store.claim_next(self.worker, self.lease_seconds)
                if job is not None:
                    self._run(job)
                    continue
            except Exception:  # the loop must outlive any one failure (e.g. a locked or full disk); it retries
                log.exception("job runner: unexpected error; retrying in %.0fs", self.poll_seconds)
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def _recover(self, worker: str | None = None) -> list[str]:
        """Settle, then re-queue, the lapsed jobs (and `worker`'s, at its start); the store is asked for them once
        per poll, and recover() runs only when there are some. A job lapsing in between waits for the next poll."""
        lapsed = self.store.lapsed(worker)
        if not lapsed:
            return []
        self._settle_registered(lapsed)
        return self.store.recover(self.max_attempts, worker=worker)

    def _settle_registered(self, lapsed: list[Job]) -> None:
        """Record success for lapsed jobs whose process registered the version and died before recording it,
        before recover() would cancel them (a cancel was asked for), fail them (their last attempt) or train
        them again."""
        for job in lapsed:
            try:
                registered = registered_version(job)
            except Exception:  # a registry it cannot read must not keep recover() from running
                log.exception("%s: could not look for its registered version", job.id)
                continue
            if registered is not None:
                finish_registered(self.store, job, registered, f"its trainer stopped after it registered {registered.ref}")

    def _run(self, job: Job) -> None:
        log.info("starting %s (attempt %d)", job.id, job.attempt)
        self.current = job
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])),
                   TOKENIZERS_PARALLELISM="false")
        self._child = child = subprocess.Popen(
            [sys.executable, "-m", "service.train_job", job.id, str(job.attempt), str(os.getpid())],
            cwd=PACKAGE_ROOT, env=env,
        )
        try:
            cancel_seen = None
            heartbeat_due: float | None = time.monotonic() + self.lease_seconds / 3
            while child.poll() is None:
                if self._stopping.wait(self.poll_seconds):
                    _end(child, TERMINATE_GRACE_SECONDS)
                    self._release(job)
                    return
                try:
                    self.on_tick()
                    if heartbeat_due is not None and time.monotonic() >= heartbeat_due:
                        heartbeat_due = time.monotonic() + self.lease_seconds / 3
                        if not self.store.heartbeat(job.id, job.attempt, self.lease_seconds):
                            if self._recorded_outcome(job):
                                heartbeat_due = None  # the child wrote its outcome and is exiting: nothing to hold
                            else:
                                log.warning("%s (attempt %d) is no longer this trainer's (re-queued after its lease "
                                            "ran out); stopping its training here", job.id, job.attempt)
                                _end(child, TERMINATE_GRACE_SECONDS)
                                return
                    if cancel_seen is None and self.store.cancel_requested(job.id):
                        cancel_seen = time.monotonic()
                except Exception:  # the database away for a moment: training goes on; the lease bounds how long
                    log.exception("%s: could not reach the job store; training goes on, retrying", job.id)
                if cancel_seen is not None and time.monotonic() - cancel_seen > self.cancel_grace_seconds:
                    log.warning("%s did not stop within %.0fs of its cancel; killing it", job.id, self.cancel_grace_seconds)
                    _end(child, TERMINATE_GRACE_SECONDS)
            if self._stopping.is_set():  # stop() ended the child: an interruption, not an outcome
                self._release(job)
                return
            self._settle(job, child.returncode)
            final = self.store.get(job.id)
            if final is not None and final.status in TERMINAL:
                self.on_finished(final)
        finally:
            self._child = None
            self.current = None

    def _sweep_when_due(self) -> None:
        if self.retention_days and time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.retention_every_seconds
            retention.sweep(self.store, self.retention_days)

    def _recorded_outcome(self, job: Job) -> bool:
        now = self.store.get(job.id)
        return now is not None and now.attempt == job.attempt and now.status in TERMINAL

    def _release(self, job: Job) -> None:
        """Stopping with a job unfinished: end its lease now, so any trainer resumes it at its next poll."""
        try:
            self.store.heartbeat(job.id, job.attempt, 0)
        except Exception:  # the lease then runs out by itself
            log.exception("%s: could not release its lease; another trainer takes it when the lease runs out", job.id)

    def _settle(self, job: Job, returncode: int) -> None:
        """A child that exited with the job still running did not record its outcome: find it, or record why."""
        now = self.store.get(job.id)
        if now is None or now.status != RUNNING or now.attempt != job.attempt:
            return
        registered = registered_version(now)
        if registered is not None:  # its version is served: whatever stopped the process, the job succeeded
            ended = "was stopped for the cancel" if now.cancel_requested else f"ended ({exit_reason(returncode)})"
            finish_registered(self.store, now, registered, f"the training process {ended} after registering {registered.ref}")
            return
        if now.cancel_requested:
            self.store.finish(job.id, job.attempt, CANCELLED, error=None)
            return
        self.store.finish(job.id, job.attempt, FAILED, error=exit_reason(returncode))


def _end(child: subprocess.Popen, grace: float) -> None:
    child.terminate()
    try:
        child.wait(grace)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(grace)
