"""Deleting what an operator no longer wants now, without waiting for retention (service.retention).

DELETE /datasets/{id} removes an upload no queued or running job uses (409 while one does);
DELETE /jobs/{id}/files removes a finished job's run folder (409 while it is queued or running),
keeping its record, events and figures in the job store and its registered version. An id is
looked up before anything is touched: a name that is not an upload's or a job's is a 404.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from .. import datasets, retention
from ..context import context
from ..errors import HTTPError
from ..jobs import TERMINAL

router = APIRouter(tags=["admin"])


@router.delete("/datasets/{dataset_id}")
async def delete_dataset(dataset_id: str, request: Request) -> dict:
    store = context(request).store
    await run_in_threadpool(datasets.lookup, dataset_id, "dataset_id")  # 404 for an unknown id, or a path
    users = await run_in_threadpool(lambda: retention.datasets_in_use(store).get(dataset_id))
    if users:
        raise HTTPError(409, f"dataset {dataset_id} is used by the queued or running job(s) {', '.join(sorted(users))}; "
                             "cancel them, or delete it when they end", "dataset_id")
    freed = await run_in_threadpool(retention.dataset_bytes, dataset_id)
    await run_in_threadpool(datasets.delete, dataset_id)
    return {"id": dataset_id, "deleted": True, "bytes": freed}


@router.delete("/jobs/{job_id}/files")
async def delete_job_files(job_id: str, request: Request) -> dict:
    job = await run_in_threadpool(context(request).store.get, job_id) if retention.JOB_ID.fullmatch(job_id) else None
    if job is None:
        raise HTTPError(404, f"no job '{job_id[:80]}'; see GET /jobs", "job_id")
    if job.status not in TERMINAL:
        raise HTTPError(409, f"job {job_id} is {job.status}; its files are deleted once it has ended (cancel it first)",
                        "job_id")
    freed = await run_in_threadpool(retention.delete_run, job_id)
    return {"id": job_id, "deleted": freed > 0, "bytes": freed}
