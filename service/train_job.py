"""One training job, run in its own process: `python -m service.train_job JOB_ID ATTEMPT PARENT_PID`.

A crash or an out-of-memory kill here ends this job, not the server; device memory is freed when
the process exits. The process trains with `run_training` (resuming from the run folder's last
checkpoint on a later attempt), distils a student after it when a distilled variant is asked for,
exports, proves and registers the model, and writes progress, events and the outcome to the job
store. A job with "distill_from" distils an existing version into a new one instead. Events and
metrics say the phase ("teacher", "distill") when there is more than one. It dies with the trainer
that started it.

Registering the version is the point of no return. A cancel seen before the export starts is
honoured and nothing is registered; one that comes during the export either kills the process
before the version is registered (the job ends cancelled) or comes too late: a registered version
always ends its job succeeded, with a `cancel_too_late` event. A process that died after
registering (killed for its cancel, or its trainer gone) leaves the version in the registry
(its manifest names this job's run folder): the runner, or the job's next attempt, finds it there
and records the success instead of a cancel, a failure or a second training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from finetune_core.config import DISTILL_GATE_POINTS, STUDENT_FOLDER
from finetune_core.isolated import die_with_parent
from service.jobs import CANCELLED, FAILED, RUNNING, SUCCEEDED, Job, JobStore, open_store
from service.settings import settings

log = logging.getLogger("service.train_job")

# Share of the progress bar given to training; the rest is export and registration.
TRAIN_SHARE = 0.95
# With a distilled variant the teacher's training fills this share, the student's the rest of TRAIN_SHARE.
TEACHER_SHARE = 0.6
# How often (seconds) should_stop() reads the cancel flag from the store.
CANCEL_POLL_SECONDS = 1.0


def runs_dir() -> Path:
    from finetune_core.registry import root

    return root() / "runs"


def run_dir_of(job_id: str) -> Path:
    return runs_dir() / job_id


def distill_dir(run_dir: Path) -> Path:
    """Where a job distils its student (in STUDENT_FOLDER under it): after the teacher, or from a registered version."""
    return run_dir / "distill"


class Progress:
    """Turns the training loop's events into job progress, ETA, metrics and stored events.

    In a search job each trial's training fills its share of the bar, and the metrics keep
    {"search": {"trials_done", "trials", "best"}} beside the running trial's figures.
    """

    def __init__(self, store: JobStore, job_id: str, attempt: int):
        self.store, self.job_id, self.attempt = store, job_id, attempt
        self.total_steps = 0
        self.first_step = 0
        self.started = time.monotonic()
        self.checked = 0.0
        self.stop = False
        self.live: dict = {}
        self.search: dict | None = None
        self.span = (0.0, TRAIN_SHARE)  # the share of the bar the current training run fills
        self.bounds = self.span  # the current phase's share: a search's trials divide it
        self.phase: str | None = None  # teacher | distill, in a job with more than one training run

    def start_phase(self, phase: str, span: tuple[float, float]) -> None:
        self.phase, self.span, self.bounds, self.live = phase, span, span, {}
        self({"type": "phase", "phase": phase})

    def __call__(self, event: dict) -> None:
        if self.phase is not None:
            event = {**event, "phase": event.get("phase", self.phase)}
        kind = event["type"]
        fields: dict = {}
        if kind == "start":
            self.total_steps = max(1, event["total_steps"])
            self.first_step = event["step"]
            self.started = time.monotonic()
            fields = {"step": event["step"], "progress": self._progress(event["step"])}
        elif kind == "step":
            step = event["step"]
            done = step - self.first_step
            rate = done / max(time.monotonic() - self.started, 1e-9)
            self.live = {"loss": event["loss"], "samples_per_second": event["samples_per_second"], "step": step}
            # A search's ETA would need the trials to come; a trial's alone would mislead.
            eta = round((self.total_steps - step) / rate, 1) if done > 0 and self.search is None else None
            fields = {"step": step, "epoch": event["epoch"], "progress": self._progress(step), "eta_seconds": eta,
                      "metrics": self._metrics()}
        elif kind == "eval":
            scalars = {k: v for k, v in event["metrics"].items() if isinstance(v, (int, float))}
            fields = {"epoch": event["epoch"], "step": event["step"], "metrics": self._metrics(validation=scalars)}
            event = {**event, "metrics": scalars}  # the stored event keeps the headline figures only
        elif kind == "checkpoint":
            fields = {"epoch": event["epoch"]}
        elif kind == "trial_start":
            done, trials = event["trials_done"], max(1, event["trials"])
            low, high = self.bounds
            self.span = (low + (high - low) * done / trials, low + (high - low) * (done + 1) / trials)
            self.search = {"trials_done": done, "trials": event["trials"], "best": (self.search or {}).get("best")}
            self.live = {}
            fields = {"progress": self.span[0], "metrics": self._metrics()}
        elif kind == "trial_end":
            self.search = search_view(event["trials_done"], event["trials"], event["best"], event["metric"])
            fields = {"metrics": self._metrics()}
        elif kind == "phase":
            fields = {"progress": self.span[0], "metrics": self._metrics()}
        elif kind == "exporting":
            fields = {"progress": TRAIN_SHARE, "eta_seconds": None}
        if not self.store.update(self.job_id, self.attempt, event=event, **fields):
            self.stop = True  # no longer ours: cancelled while queued, or a newer attempt took over

    def _progress(self, step: int) -> float:
        low, high = self.span
        return low + (high - low) * step / self.total_steps

    def _metrics(self, **extra) -> dict:
        phase = {"phase": self.phase} if self.phase else {}
        return {"train": self.live, **extra, **({"search": self.search} if self.search else {}), **phase}

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self.stop and now - self.checked >= CANCEL_POLL_SECONDS:
            self.checked = now
            self.stop = self.store.cancel_requested(self.job_id)
        return self.stop


def run(store: JobStore, job_id: str, attempt: int) -> str:
    """Train (or search), export and register one job; returns the terminal status it recorded."""
    from finetune_core.artifacts import export_version
    from finetune_core.errors import FinetuneError

    job = store.get(job_id)
    if job is None or job.status != RUNNING or job.attempt != attempt:
        return job.status if job else "missing"
    run_dir = run_dir_of(job_id)
    progress = Progress(store, job_id, attempt)
    try:
        earlier = registered_version(job) if attempt > 1 else None
        if earlier is not None:
            return finish_registered(store, job, earlier, f"attempt {attempt - 1} registered {earlier.ref} and stopped "
                                                          "before recording it; nothing is trained again")
        if "distill_from" in job.spec:
            return _distil_version(store, job, run_dir, progress)
        if "generation" in job.spec:
            return _generation(store, job, run_dir, progress)
        distil = "distill" in job.spec
        if distil:
            progress.start_phase("teacher", (0.0, TEACHER_SHARE))
        produce = _search if "search" in job.spec else _train
        metrics, model_dir = produce(store, job, run_dir, progress)
        if metrics["train"]["status"] == "cancelled":
            store.finish(job_id, attempt, CANCELLED, metrics={k: v for k, v in metrics.items() if k in ("train", "search")})
            return CANCELLED
        student, distilled = None, None
        if distil:
            progress.start_phase("distill", (TEACHER_SHARE, TRAIN_SHARE))
            distilled = _distil(job, model_dir.parent, distill_dir(run_dir), progress)
            if distilled["train"]["status"] == "cancelled":
                store.finish(job_id, attempt, CANCELLED, metrics={"train": metrics["train"], "distillation": distilled["train"]})
                return CANCELLED
            student = distill_dir(run_dir) / STUDENT_FOLDER
        if store.cancel_requested(job_id):  # the last moment a cancel stops the job with nothing registered
            store.finish(job_id, attempt, CANCELLED, metrics={"train": _scalars(metrics["train"])})
            return CANCELLED
        progress({"type": "exporting", "variants": job.spec["variants"]})
        info = export_version(model_dir, job.spec["model_name"], job.spec["variants"], student=student,
                              distill_gate=job.spec["distill"]["distill_gate"] if distil else DISTILL_GATE_POINTS)
        summary = {role: m if role == "search" else _scalars(m) for role, m in metrics.items() if m}
        return _succeed(store, job, summary, distilled, info)
    except FinetuneError as err:
        store.finish(job_id, attempt, FAILED, error=str(err))
        return FAILED
    except Exception as err:  # a bug or the machine: the job fails with what happened, the trace goes to the log
        (run_dir / "error.log").parent.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.log").write_text(traceback.format_exc())
        store.finish(job_id, attempt, FAILED,
                     error=f"internal error while training: {type(err).__name__}: {err} (trace in {run_dir / 'error.log'})")
        return FAILED


def _succeed(store: JobStore, job: Job, summary: dict, distilled: dict | None, info) -> str:
    """Finish with the figures: the teacher's (if trained here), the student's, every variant's verdict."""
    if distilled is not None:
        summary["distillation"] = {"validation": _scalars(distilled["validation"]),
                                   "teacher_validation": _scalars(distilled["teacher"]["validation"]),
                                   "train": _scalars(distilled["train"])}
    summary["variants"] = _verdicts(info)
    if store.cancel_requested(job.id):
        store.update(job.id, job.attempt, event=_too_late(info))
    store.finish(job.id, job.attempt, SUCCEEDED, metrics=summary, model={"name": info.name, "version": info.version})
    return SUCCEEDED


def registered_version(job: Job):
    """The version this job's run registered, if a process of it got that far: the one whose manifest names the
    run folder (a search's: its best trial's; a distillation of a registered version's: its student's folder)."""
    from finetune_core.registry import registered_from

    run_dir = run_dir_of(job.id)
    if "distill_from" in job.spec:
        return registered_from(job.spec["distill_from"]["name"], distill_dir(run_dir) / STUDENT_FOLDER)
    if "model_name" not in job.spec:
        return None
    return registered_from(job.spec["model_name"], run_dir / "best" if "search" in job.spec else run_dir)


def finish_registered(store: JobStore, job: Job, info, what_happened: str) -> str:
    """Record success for a version registered by a process that stopped before recording it (`job`: as stored now)."""
    path = run_dir_of(job.id) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    summary = {role: _scalars(m) for role, m in metrics.items() if isinstance(m, dict) and role != "search"}
    summary["variants"] = _verdicts(info)
    if job.cancel_requested:
        event = {**_too_late(info), "reason": f"the cancel came too late: {what_happened}"}
    else:
        event = {"type": "registered_earlier", "version": info.version, "reason": what_happened}
    store.update(job.id, job.attempt, event=event)
    store.finish(job.id, job.attempt, SUCCEEDED, metrics=summary, model={"name": info.name, "version": info.version})
    return SUCCEEDED


def _verdicts(info) -> dict:
    return {v: {"accepted": record.accepted, "reason": record.reason} for v, record in info.manifest.variants.items()}


def _too_late(info) -> dict:
    return {"type": "cancel_too_late", "version": info.version,
            "reason": f"the cancel came after {info.ref} was registered; the job keeps it and ends succeeded"}


def _distil(job: Job, teacher_run: Path, output: Path, progress: Progress) -> dict:
    """The student of the teacher trained in this job; a later attempt resumes it from its last checkpoint."""
    from finetune_core.config import distill_config_from_dict
    from finetune_core.distill import distill_run

    return distill_run(teacher_run, output, distill_config_from_dict(job.spec["distill"]), resume=job.attempt > 1,
                       on_event=progress, should_stop=progress.should_stop)


def _distil_version(store: JobStore, job: Job, run_dir: Path, progress: Progress) -> str:
    """Distil a registered version (job.spec["distill_from"]) into a new version of the same model."""
    from finetune_core.config import distill_config_from_dict
    from finetune_core.distill import distill_version

    source, data = job.spec["distill_from"], job.spec.get("data") or {}
    progress.start_phase("distill", (0.0, TRAIN_SHARE))
    info = distill_version(source["name"], source["version"], distill_config_from_dict(job.spec["distill"]),
                           distill_dir(run_dir), train=data.get("train"), validation=data.get("validation"),
                           resume=job.attempt > 1, on_event=progress, should_stop=progress.should_stop)
    if info is None:
        store.finish(job.id, job.attempt, CANCELLED, metrics={"train": {"status": "cancelled"}})
        return CANCELLED
    distilled = json.loads((distill_dir(run_dir) / "metrics.json").read_text())
    return _succeed(store, job, {"teacher": {"name": source["name"], "version": source["version"]}}, distilled, info)


def _generation(store: JobStore, job: Job, run_dir: Path, progress: Progress) -> str:
    """Fine-tune a causal language model (a later attempt resumes it), then export and register it."""
    from finetune_core.gen_artifacts import export_generation
    from finetune_core.gen_config import generation_job_from_dict
    from finetune_core.gen_pipeline import run_generation

    resume = job.attempt > 1 and (run_dir / "config.json").is_file()
    gen = None if resume else _with_threads(generation_job_from_dict(job.spec["generation"]))
    if resume:
        store.update(job.id, job.attempt, event={"type": "resuming", "run_dir": str(run_dir)})
    metrics = run_generation(gen, run_dir, resume=resume, on_event=progress, should_stop=progress.should_stop)
    if metrics["train"]["status"] == "cancelled" or store.cancel_requested(job.id):
        store.finish(job.id, job.attempt, CANCELLED, metrics={"train": _scalars(metrics["train"])})
        return CANCELLED
    progress({"type": "exporting", "variants": job.spec["variants"]})
    info = export_generation(run_dir / "model", job.spec["model_name"], run_dir)
    summary = {role: _scalars(metrics[role]) for role in ("base", "validation", "test", "train") if metrics.get(role)}
    return _succeed(store, job, summary, None, info)


def _train(store: JobStore, job: Job, run_dir: Path, progress: Progress) -> tuple[dict, Path]:
    """One training run; a later attempt resumes it from the run folder's last checkpoint."""
    from finetune_core.config import config_from_dict
    from finetune_core.pipeline import run_training

    resume = job.attempt > 1 and (run_dir / "config.json").is_file()
    cfg = None if resume else _with_threads(config_from_dict(job.spec["config"]))
    if resume:
        store.update(job.id, job.attempt, event={"type": "resuming", "run_dir": str(run_dir)})
    metrics = run_training(cfg, run_dir, resume=resume, on_event=progress, should_stop=progress.should_stop)
    return metrics, run_dir / "model"


def _search(store: JobStore, job: Job, run_dir: Path, progress: Progress) -> tuple[dict, Path]:
    """A hyperparameter search; a later attempt resumes the same study (kept in the job store's database
    under the job's id). Its metrics are the best trial's, with the search's summary."""
    from finetune_core.config import config_from_dict
    from finetune_core.search import run_search
    from finetune_core.search_space import search_spec_from_dict

    cfg = _with_threads(config_from_dict(job.spec["config"]))
    spec = search_spec_from_dict(job.spec["search"], cfg)
    if job.attempt > 1:
        store.update(job.id, job.attempt, event={"type": "resuming", "run_dir": str(run_dir)})
    summary = run_search(cfg, spec, run_dir, storage=store.url, study_name=job.id, on_event=progress,
                         should_stop=progress.should_stop)
    search = search_view(summary.trials_done, summary.trials_target, summary.best and summary.best.brief(), summary.metric)
    if summary.status == "cancelled":
        return {"train": {"status": "cancelled"}, "search": search}, run_dir / "best" / "model"
    metrics = json.loads((run_dir / "best" / "metrics.json").read_text())
    return {**metrics, "search": search}, run_dir / "best" / "model"


def search_view(trials_done: int, trials: int, best: dict | None, metric: str) -> dict:
    """A search job's metrics["search"], which GET /jobs/{id} shows as trials_done and best."""
    return {"trials_done": trials_done, "trials": trials, "best": best and {**best, "metric": metric}}


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


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m service.train_job JOB_ID ATTEMPT PARENT_PID", file=sys.stderr)
        return 2
    job_id, attempt, parent = argv[0], int(argv[1]), int(argv[2])
    die_with_parent(parent)  # no orphan keeps training a re-queued job
    os.nice(settings().train_nice)  # below the API workers: /predict is not starved
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s train_job {job_id} %(levelname)s %(message)s")
    status = run(open_store(), job_id, attempt)
    log.info("finished with status %s", status)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
