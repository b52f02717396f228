"""Fine-tuning jobs: POST /finetune queues one; /jobs lists, shows, pages events, cancels and serves artifacts."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from .. import datasets
from ..base_models import allowed_base_model, allowed_student
from ..context import Context, context
from ..errors import FieldError, HTTPError
from ..jobs import STATES, TERMINAL, Job, JobStore
from ..schemas import FinetuneRequest, job_spec
from ..train_job import run_dir_of

router = APIRouter(tags=["jobs"])

ARTIFACTS = {"curves.png": "plots/curves.png", "confusion.png": "plots/confusion.png", "data_report.json": "data_report.json",
             "label_issues.jsonl": "label_issues.jsonl",
             "samples.jsonl": "samples.jsonl",  # text generation: held-out prompts, references, base and tuned answers
             "optimization_history.png": "plots/optimization_history.png",
             "param_importances.png": "plots/param_importances.png"}
ARTIFACT_NAMES = tuple(ARTIFACTS)
SEARCH_ARTIFACTS = ("optimization_history.png", "param_importances.png")


@router.post("/finetune", status_code=202)
async def finetune(body: FinetuneRequest, request: Request) -> dict:
    ctx = context(request)
    body.base_model = allowed_base_model(body.base_model, body.task)  # never a folder the caller picks
    if body.distillation:
        body.distillation.student = allowed_student(body.distillation.student)
    # The dataset records and the job store (SQLite waits up to 30 s for a lock) block: in a thread.
    job = await run_in_threadpool(_queue, ctx, body)
    await ctx.wake_trainer()
    return {"id": job.id, "status": job.status}


def _queue(ctx: Context, body: FinetuneRequest) -> Job:
    found = {role: datasets.lookup(getattr(body, role), role)
             for role in ("train", "validation", "test") if getattr(body, role) is not None}
    for role, stored in found.items():
        _check_kind(role, stored, body.task)
    # A dataset root's own val/ and test/ folders come with train; a separate upload gives its matching split.
    paths = {role: str(stored.path if role == "train" else stored.held_out(role)) for role, stored in found.items()}
    extra = body.distillation.distill_data if body.distillation else None
    distill_data = str(datasets.lookup(extra, "distillation.distill_data").path) if extra is not None else None
    job = ctx.store.create(job_spec(body, paths, _image_list_defaults(list(found.values())), distill_data))
    ctx.metrics.set_jobs(ctx.store.counts())
    return job


def _check_kind(field: str, stored: datasets.Stored, task: str) -> None:
    """Text tasks take tables, image tasks zips of images: a mismatch is the request field's fault."""
    images = stored.kind in datasets.IMAGE_KINDS
    if images and not task.startswith("image"):
        raise FieldError(field, f"{field}: '{stored.id}' is an image dataset ({stored.kind}); a {task} job needs a table "
                                "(JSONL, CSV, TSV, Parquet), or set task to image-classification or image-regression")
    if not images and task.startswith("image"):
        raise FieldError(field, f"{field}: '{stored.id}' is a table; an {task} job needs a zip of images uploaded to "
                                "POST /datasets (class folders, or an image list beside its images)")


def _image_list_defaults(found: list[datasets.Stored]) -> dict:
    """An image list's columns (as checked on upload) and the folder its paths must stay in."""
    lists = [stored for stored in found if stored.kind == datasets.IMAGE_LIST]
    if not lists:
        return {}
    folders = {stored.folder for stored in lists}
    # The core takes one image_root for all roles: lists from several uploads are fenced into the datasets folder.
    root = folders.pop() if len(folders) == 1 else datasets.datasets_dir()
    return {"image_root": str(root), **lists[0].columns}


@router.get("/jobs")
def list_jobs(request: Request, status: Literal[STATES] | None = None, limit: int = Query(100, ge=1, le=1000)) -> dict:
    return {"jobs": [job.public() for job in context(request).store.list(status, limit)]}


@router.get("/jobs/{job_id}")
def get_job(job_id: str, request: Request) -> dict:
    return _job(context(request).store, job_id).public()


# The largest event number the stores hold (SQLite INTEGER, PostgreSQL BIGINT): a larger `after` was a 500.
MAX_SEQ = (1 << 63) - 1


@router.get("/jobs/{job_id}/events")
def job_events(job_id: str, request: Request, after: int = Query(0, ge=0, le=MAX_SEQ),
               limit: int = Query(500, ge=1, le=500)) -> dict:
    store = context(request).store
    _job(store, job_id)
    events = [{"seq": seq, **event} for seq, event in store.events(job_id, after, limit)]
    return {"events": events, "next": events[-1]["seq"] if events else after}


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, request: Request) -> dict:
    store = context(request).store
    before = _job(store, job_id)
    if before.status in TERMINAL:
        raise HTTPError(409, f"job {job_id} already {before.status}; only queued or running jobs can be cancelled")
    return store.request_cancel(job_id).public()


@router.get("/jobs/{job_id}/artifacts/{name}")
def job_artifact(job_id: str, name: Literal[ARTIFACT_NAMES], request: Request):
    job = _job(context(request).store, job_id)
    run_dir = run_dir_of(job_id)
    if "search" in job.spec and name not in SEARCH_ARTIFACTS:
        run_dir = run_dir / "best"  # a search job's own run is its best trial's
    path = run_dir / ARTIFACTS[name]
    if not path.is_file():
        raise HTTPError(404, f"job {job_id} has no {name} yet; it is written when training ends (data_report.json: "
                             "once the data is loaded; a search's history plot after each trial, param_importances.png "
                             "when the search ends with 2 complete trials)", "name")
    return FileResponse(path)


def _job(store: JobStore, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise HTTPError(404, f"no job '{job_id[:80]}'; see GET /jobs", "job_id")
    return job
