"""The model registry over HTTP: list, show, promote, and distil a version into a new one (a job)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from finetune_core import registry
from finetune_core.errors import ConfigError

from .. import datasets
from ..base_models import allowed_student
from ..context import Context, context
from ..errors import FieldError
from ..jobs import Job
from ..schemas import DistillVersionRequest, PromoteRequest, distill_spec

router = APIRouter(tags=["models"])


@router.get("/models")
def list_models() -> dict:
    return {"models": registry.list_models()}


@router.get("/models/{name}")
def show_model(name: str) -> dict:
    return registry.show(name)


@router.post("/models/{name}/promote")
def promote_model(name: str, body: PromoteRequest) -> dict:
    info = registry.promote(name, body.version)
    return {"name": info.name, "production": info.version}


@router.post("/models/{name}/versions/{version}/distill", status_code=202)
async def distill_version(name: str, version: str, body: DistillVersionRequest, request: Request) -> dict:
    """Queue a job that distils NAME:VERSION into a smaller student, registered as a new version with the
    teacher, its variants and `distilled` / `distilled-int8` (GET /jobs/{id} follows it)."""
    ctx = context(request)
    body.distillation.student = allowed_student(body.distillation.student)  # never a folder the caller picks
    # The registry, the dataset records and the job store (SQLite waits up to 30 s for a lock) block: in a thread.
    job = await run_in_threadpool(_queue_distillation, ctx, name, version, body)
    await ctx.wake_trainer()
    return {"id": job.id, "status": job.status}


def _queue_distillation(ctx: Context, name: str, version: str, body: DistillVersionRequest) -> Job:
    try:
        registry.parse_ref(f"{name}:{version}")
    except ConfigError as err:
        raise FieldError("version", f"version: {err}") from None
    info = registry.resolve(name, version)  # 404 for an unknown model or version, before the job is queued
    paths = {role: str(datasets.lookup(getattr(body, role), role).held_out(role))
             for role in ("train", "validation") if getattr(body, role) is not None}
    extra = body.distillation.distill_data
    distill_data = str(datasets.lookup(extra, "distillation.distill_data").path) if extra is not None else None
    job = ctx.store.create(distill_spec(info.name, info.version, body, paths, distill_data))
    ctx.metrics.set_jobs(ctx.store.counts())
    return job
