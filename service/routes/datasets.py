"""POST /datasets: an upload, validated and stored (service.datasets), counted by outcome."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, File, Form, Request, UploadFile

from finetune_core.errors import DataError

from .. import datasets
from ..context import context

router = APIRouter(tags=["datasets"])


@router.post("/datasets")
def upload_dataset(request: Request,
                   file: UploadFile = File(description="JSONL, CSV, TSV or Parquet; or a zip of images"),
                   image_column: str = Form("image", description="a zip holding an image list: its path column"),
                   label_column: str = Form("label", description="a zip holding an image list: its label column"),
                   ) -> dict:
    # A plain def: FastAPI runs it in a thread-pool thread, so writing and parsing the upload (seconds for
    # 100 MB) leave the event loop free for /livez and /predict. The file streams in 1 MiB chunks.
    uploads = context(request).metrics.dataset_uploads
    chunks = iter(partial(file.file.read, 1 << 20), b"")
    try:
        info = datasets.save_upload(file.filename, chunks, image_column, label_column)
    except datasets.TooLarge:
        uploads.labels(outcome="rejected", reason="too_large").inc()
        raise
    except datasets.UnsafeArchive:
        uploads.labels(outcome="rejected", reason="unsafe").inc()
        raise
    except datasets.OutOfSpace:
        uploads.labels(outcome="rejected", reason="no_space").inc()
        raise
    except DataError:
        uploads.labels(outcome="rejected", reason="invalid").inc()
        raise
    uploads.labels(outcome="accepted", reason="").inc()
    return info.public()
