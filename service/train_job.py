"""One training job, run in its own process: `python -m service.train_job JOB_ID ATTEMPT PARENT_PID`.

A crash or an out-of-memory kill here ends this job, not the server; device memory is freed when
the process exits. The process trains with `run_training` (resuming from the run folder's last
checkpoint on a later attempt), exports, proves and registers the model, and writes progress,
events and the outcome to the job store. It dies with the trainer that started it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from service.jobs import CANCELLED, FAILED, RUNNING, SUCCEEDED, JobStore, open_store

log = logging.getLogger("service.train_job")

# Share of the progress bar given to training; the rest is export and registration.
TRAIN_SHARE = 0.95
# How often (seconds) should_stop() reads the cancel flag from the store.
CANCEL_POLL_SECONDS = 1.0
NICE_ENV = "FINETUNE_SERVE_TRAIN_NICE"
DEFAULT_NICE = 10


def runs_dir() -> Path:
    from finetune_core.registry import root

    return root() / "runs"


def run_dir_of(job_id: str) -> Path:
    return runs_dir() / job_id


class Progress:
    """Turns the training loop's events into job progress, ETA, metrics and stored events."""

    def __init__(self, store: JobStore, job_id: str, attempt: int):
        self.store, self.job_id, self.attempt = store, job_id, attempt
        self.total_steps = 0
        self.first_step = 0
        self.started = time.monotonic()
        self.checked = 0.0
        self.stop = False
        self.live: dict = {}

    def __call__(self, event: dict) -> None:
        kind = event["type"]
        fields: dict = {}
        if kind == "start":
            self.total_steps = max(1, event["total_steps"])
            self.first_step = event["step"]
            self.started = time.monotonic()
            fields = {"step": event["step"], "progress": TRAIN_SHARE * event["step"] / self.total_steps}
        elif kind == "step":
            step = event["step"]
            done = step - self.first_step
            rate = done / max(time.monotonic() - self.started, 1e-9)
            self.live = {"loss": event["loss"], "samples_per_second": event["samples_per_second"], "step": step}
            fields = {"step": step, "epoch": event["epoch"], "progress": TRAIN_SHARE * step / self.total_steps,
                      "eta_seconds": round((self.total_steps - step) / rate, 1) if done > 0 else None,
                      "metrics": {"train": self.live}}
        elif kind == "eval":
            scalars = {k: v for k, v in event["metrics"].items() if isinstance(v, (int, float))}
            fields = {"epoch": event["epoch"], "step": event["step"], "metrics": {"train": self.live, "validation": scalars}}
            event = {**event, "metrics": scalars}  # the stored event keeps the headline figures only
        elif kind == "checkpoint":
            fields = {"epoch": event["epoch"]}
        if not self.store.update(self.job_id, self.attempt, event=event, **fields):
            self.stop = True  # no longer ours: cancelled while queued, or a newer attempt took over

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self.stop and now - self.checked >= CANCEL_POLL_SECONDS:
            self.checked = now
            self.stop = self.store.cancel_requested(self.job_id)
        return self.stop


def run(store: JobStore, job_id: str, attempt: int) -> str:
    """Train, export and register one job; returns the terminal status it recorded."""
    from finetune_core.artifacts import export_version
    from finetune_core.config import config_from_dict
    from finetune_core.errors import FinetuneError
    from finetune_core.pipeline import run_training

    job = store.get(job_id)
    if job is None or job.status != RUNNING or job.attempt != attempt:
        return job.status if job else "missing"
    run_dir = run_dir_of(job_id)
    resume = attempt > 1 and (run_dir / "config.json").is_file()
    progress = Progress(store, job_id, attempt)
    try:
        cfg = None if resume else _with_threads(config_from_dict(job.spec["config"]))
        if resume:
            store.update(job_id, attempt, event={"type": "resuming", "run_dir": str(run_dir)})
        metrics = run_training(cfg, run_dir, resume=resume, on_event=progress, should_stop=progress.should_stop)
        if metrics["train"]["status"] == "cancelled":
            store.finish(job_id, attempt, CANCELLED, metrics={"train": metrics["train"]})
            return CANCELLED
        store.update(job_id, attempt, event={"type": "exporting", "variants": job.spec["variants"]}, progress=TRAIN_SHARE,
                     eta_seconds=None)
        info = export_version(run_dir / "model", job.spec["model_name"], job.spec["variants"])
        summary = {role: _scalars(m) for role, m in metrics.items() if m}
        summary["variants"] = {v: {"accepted": e["accepted"], "reason": e["reason"]}
                               for v, e in info.manifest["variants"].items()}
        store.finish(job_id, attempt, SUCCEEDED, metrics=summary, model={"name": info.name, "version": info.version})
        return SUCCEEDED
    except FinetuneError as err:
        store.finish(job_id, attempt, FAILED, error=str(err))
        return FAILED
    except Exception as err:  # a bug or the machine: the job fails with what happened, the trace goes to the log
        (run_dir / "error.log").parent.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.log").write_text(traceback.format_exc())
        store.finish(job_id, attempt, FAILED,
                     error=f"internal error while training: {type(err).__name__}: {err} (trace in {run_dir / 'error.log'})")
        return FAILED


def training_threads(cpu_count: int | None = None) -> int:
    """CPU threads for a training child: half the cores, so /predict keeps the other half."""
    return max(1, (cpu_count or os.cpu_count() or 2) // 2)


def _with_threads(cfg):
    """Cap torch's CPU threads when the job did not choose a number (on GPU it matters little)."""
    if cfg.train.num_threads:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_threads=training_threads()))


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL us when the trainer dies, so no orphan keeps training a re-queued job."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(f"train_job: the trainer (pid {parent_pid}) is gone; exiting")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m service.train_job JOB_ID ATTEMPT PARENT_PID", file=sys.stderr)
        return 2
    job_id, attempt, parent = argv[0], int(argv[1]), int(argv[2])
    _die_with_parent(parent)
    os.nice(int(os.environ.get(NICE_ENV, DEFAULT_NICE)))  # below the API workers: /predict is not starved
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s train_job {job_id} %(levelname)s %(message)s")
    status = run(open_store(), job_id, attempt)
    log.info("finished with status %s", status)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
