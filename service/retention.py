"""What the service deletes, and when: old jobs' checkpoints and old unused uploads (FINETUNE_SERVE_RETENTION_DAYS).

A job that finished RETENTION_DAYS ago loses the `checkpoints/` folders of its run (best.pt and
last.pt: weights with the optimizer's state, about three times the model, kept only to resume a
job, and a finished job never resumes), and the job store drops its `step` events (one per logged
step, most of a job's events; the run's events.jsonl and curves.png keep the same figures). Its
record and its other events, and its metrics, plots, data report, splits and model folder stay; so
does every registered version (the registry holds its own copy). An upload goes once it is RETENTION_DAYS old and no queued or running job names
it; a finished job that used it keeps its figures. 0 days: nothing is deleted.

Trainers sweep (service.runner), at start and then hourly between jobs: a trainer knows when it is
idle, there are far fewer of them than API workers, and each sweep is idempotent, so two trainers
sweeping at once only repeat each other. `DELETE /datasets/{id}` and `DELETE /jobs/{id}/files`
(service.routes.admin) delete one thing at once.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import datasets
from .job_record import QUEUED, RUNNING, TERMINAL, JobStore
from .train_job import run_dir_of, runs_dir

log = logging.getLogger("service.retention")

SWEEP_EVERY_SECONDS = 3600.0
DAY_SECONDS = 86_400
JOB_ID = re.compile(r"job-[0-9a-f]{16}")
_DATASET_ID = re.compile(r"ds-[0-9a-f]{16}")
# More queued or running jobs than any deployment holds: the in-use check must see them all.
_ACTIVE_JOBS = 1_000_000
# The events an old job's record loses: the training loop's per-step figures.
PRUNED_EVENTS = ("step",)


@dataclass(frozen=True)
class Swept:
    checkpoints: list[str]  # the jobs whose checkpoints were deleted
    events: int  # job events deleted
    datasets: list[str]  # the uploads deleted
    bytes: int  # freed


def sweep(store: JobStore, days: float, now: float | None = None) -> Swept:
    """Delete the checkpoints and step events of jobs finished `days` ago, and the uploads that old which no
    queued or running job uses."""
    if days <= 0:
        return Swept([], 0, [], 0)
    cutoff = (time.time() if now is None else now) - days * DAY_SECONDS
    jobs, freed = [], 0
    for run in sorted(runs_dir().iterdir()) if runs_dir().is_dir() else []:
        job = store.get(run.name) if JOB_ID.fullmatch(run.name) else None
        if job is None or job.status not in TERMINAL or job.finished_at is None or job.finished_at > cutoff:
            continue
        folders = [p for p in run.rglob("checkpoints") if p.is_dir()]
        if folders:
            freed += sum(_size(p) for p in folders)
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
            jobs.append(job.id)
    events = store.prune_events(cutoff, PRUNED_EVENTS)
    in_use = datasets_in_use(store)
    uploads = []
    for record in sorted(datasets.datasets_dir().glob("ds-*.json")) if datasets.datasets_dir().is_dir() else []:
        dataset_id = record.stem
        if dataset_id in in_use or record.stat().st_mtime > cutoff:
            continue
        freed += dataset_bytes(dataset_id)
        try:
            datasets.delete(dataset_id)
        except datasets.UnknownDataset as err:  # another trainer's sweep got there first, or a damaged record
            log.warning("retention: %s", err)
            continue
        uploads.append(dataset_id)
    if jobs or events or uploads:
        log.info("retention (%g days): deleted the checkpoints of %d job(s), %d job event(s) and %d upload(s), %.1f MiB",
                 days, len(jobs), events, len(uploads), freed / 2**20)
    return Swept(jobs, events, uploads, freed)


def datasets_in_use(store: JobStore) -> dict[str, list[str]]:
    """Upload id -> the queued or running jobs whose spec names it (a path under the datasets folder)."""
    users: dict[str, list[str]] = {}
    for status in (QUEUED, RUNNING):
        for job in store.list(status, _ACTIVE_JOBS):
            for dataset_id in set(_DATASET_ID.findall(repr(job.spec))):
                users.setdefault(dataset_id, []).append(job.id)
    return users


def delete_run(job_id: str) -> int:
    """Delete a job's whole run folder; the bytes freed (0: it had none). `job_id` must be a job's id."""
    if not JOB_ID.fullmatch(job_id):
        raise ValueError(f"not a job id: {job_id[:80]!r}")
    folder = run_dir_of(job_id)
    if not folder.is_dir():
        return 0
    freed = _size(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return freed


def dataset_bytes(dataset_id: str) -> int:
    """The bytes an upload holds on disk, its record included."""
    return sum(_size(p) for p in datasets.datasets_dir().glob(f"{dataset_id}*"))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
