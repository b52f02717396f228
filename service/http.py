"""The REST endpoints: thin functions that decode a request, make one core call and encode the answer.

Errors are JSON `{"error": MESSAGE, "field": FIELD | null}`: 401 without a valid key (when one is
configured), 404 for an unknown job, dataset or model, 409 for a job already finished, 413 for a
body, upload, image or input list over its limit, 422 for a value the service cannot use (an image
that does not decode names its position: `images[3]`, `files[1]`).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from finetune_core import registry
from finetune_core.errors import ConfigError, DataError, FinetuneError

from . import datasets, v2
from .batching import Batcher, batcher_from_env
from .evaluation import evaluate_file, evaluate_images
from .image_inputs import BadImage, decode, is_image_model, too_large
from .jobs import TERMINAL, JobStore
from .metrics import Metrics
from .predictors import Predictors, only_model
from .schemas import (MAX_IMAGE_BYTES, MAX_PREDICT_BODY, MAX_PREDICT_INPUTS, MAX_TEXT_BYTES, EvaluateRequest, FieldError,
                      FinetuneRequest, PredictRequest, PromoteRequest, job_spec)
from .train_job import run_dir_of

log = logging.getLogger("service.http")

API_KEY_ENV = "FINETUNE_SERVE_API_KEY"
# What stays open with an API key set: health checks and metrics. The guard wraps the whole BentoML
# server (service.bento), so BentoML's own routes (/schema.json, /docs) need the key too.
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics", "/v2/health/live", "/v2/health/ready")
# JSON bodies larger than this are refused with 413 (uploads have their own, larger limit).
MAX_JSON_BODY = 1 << 20
ARTIFACTS = {"curves.png": "plots/curves.png", "confusion.png": "plots/confusion.png", "data_report.json": "data_report.json"}


@dataclass
class Context:
    store: JobStore
    predictors: Predictors
    metrics: Metrics
    wake_trainer: Callable[[], Awaitable[None]]


class HTTPError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


app = FastAPI(title="finetune-serve", version="0.1.0",
              description="Fine-tune, export, verify, version and serve text and image classifiers and regressors.")


def context(request: Request) -> Context:
    return request.app.state.context


# ---------------------------------------------------------------- datasets


@app.post("/datasets")
async def upload_dataset(request: Request,
                         file: UploadFile = File(description="JSONL, CSV, TSV or Parquet; or a zip of images"),
                         image_column: str = Form("image", description="a zip holding an image list: its path column"),
                         label_column: str = Form("label", description="a zip holding an image list: its label column"),
                         ) -> dict:
    ctx = context(request)

    async def chunks():
        while chunk := await file.read(1 << 20):
            yield chunk

    try:
        info = await datasets.save_upload(file.filename, chunks(), datasets.max_upload_bytes(), image_column, label_column)
    except datasets.TooLarge:
        ctx.metrics.dataset_uploads.labels(outcome="rejected", reason="too_large").inc()
        raise
    except datasets.UnsafeArchive:
        ctx.metrics.dataset_uploads.labels(outcome="rejected", reason="unsafe").inc()
        raise
    except DataError:
        ctx.metrics.dataset_uploads.labels(outcome="rejected", reason="invalid").inc()
        raise
    ctx.metrics.dataset_uploads.labels(outcome="accepted", reason="").inc()
    return info.public()


# ---------------------------------------------------------------- jobs


@app.post("/finetune", status_code=202)
async def finetune(body: FinetuneRequest, request: Request) -> dict:
    ctx = context(request)
    found = {role: datasets.lookup(getattr(body, role), role)
             for role in ("train", "validation", "test") if getattr(body, role) is not None}
    for role, stored in found.items():
        _check_kind(role, stored, body.task)
    # A dataset root's own val/ and test/ folders come with train; a separate upload gives its matching split.
    paths = {role: str(stored.path if role == "train" else stored.held_out(role)) for role, stored in found.items()}
    job = ctx.store.create(job_spec(body, paths, _image_list_defaults(list(found.values()))))
    ctx.metrics.set_jobs(ctx.store.counts())
    await ctx.wake_trainer()
    return {"id": job.id, "status": job.status}


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


@app.get("/jobs")
def list_jobs(request: Request, status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
              limit: int = Query(100, ge=1, le=1000)) -> dict:
    return {"jobs": [job.public() for job in context(request).store.list(status, limit)]}


@app.get("/jobs/{job_id}")
def get_job(job_id: str, request: Request) -> dict:
    return _job(context(request).store, job_id).public()


@app.get("/jobs/{job_id}/events")
def job_events(job_id: str, request: Request, after: int = Query(0, ge=0), limit: int = Query(500, ge=1, le=500)) -> dict:
    store = context(request).store
    _job(store, job_id)
    events = [{"seq": seq, **event} for seq, event in store.events(job_id, after, limit)]
    return {"events": events, "next": events[-1]["seq"] if events else after}


@app.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, request: Request) -> dict:
    store = context(request).store
    before = _job(store, job_id)
    if before.status in TERMINAL:
        raise HTTPError(409, f"job {job_id} already {before.status}; only queued or running jobs can be cancelled")
    return store.request_cancel(job_id).public()


@app.get("/jobs/{job_id}/artifacts/{name}")
def job_artifact(job_id: str, name: Literal["curves.png", "confusion.png", "data_report.json"], request: Request):
    _job(context(request).store, job_id)
    path = run_dir_of(job_id) / ARTIFACTS[name]
    if not path.is_file():
        raise HTTPError(404, f"job {job_id} has no {name} yet; it is written when training ends (data_report.json: "
                             "once the data is loaded)", "name")
    return FileResponse(path)


def _job(store: JobStore, job_id: str):
    job = store.get(job_id)
    if job is None:
        raise HTTPError(404, f"no job '{job_id[:80]}'; see GET /jobs", "job_id")
    return job


# ---------------------------------------------------------------- predict and evaluate


_MULTIPART_PREDICT = {
    "type": "object",
    "required": ["files"],
    "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "image files"},
        "model": {"type": "string"}, "version": {"type": "string"}, "variant": {"type": "string"},
        "top_k": {"type": "integer", "minimum": 1},
    },
}


@app.post("/predict", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": PredictRequest.model_json_schema()},
    "multipart/form-data": {"schema": _MULTIPART_PREDICT}}}})
async def predict(request: Request) -> dict:
    """Texts (`inputs`) or base64 images (`images`) as JSON, or image `files` as multipart/form-data.

    Concurrent requests for one model version and variant share forward passes (service.batching).
    """
    ctx = context(request)
    started = time.perf_counter()
    variant = "default"
    model_label = "none"
    try:
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            body, encoded, field = await _multipart_predict(request)
        else:
            body = _parse(PredictRequest, await request.body())
            encoded, field = _json_inputs(body)
        name = body.model or only_model()
        # A predictor in memory is used at once; loading one takes seconds, so it happens off the event loop.
        info, predictor = (_predictor(ctx, name, body.version, body.variant, load=False)
                           or await run_in_threadpool(_predictor, ctx, name, body.version, body.variant))
        model_label = ctx.metrics.model_label(info.name)
        variant = predictor.variant
        _check_inputs(info, predictor.meta, field)
        inputs = body.inputs if encoded is None else await _pixels(ctx, predictor, encoded, field)
        predictions = await _batcher(request, ctx).predict((info.name, info.version, body.variant), predictor,
                                                           inputs, body.top_k)
    except BadImage as err:
        ctx.metrics.image_decode_failures.labels(reason=err.reason).inc()
        ctx.metrics.predictions.labels(model=model_label, variant=variant, outcome="error").inc()
        status = 413 if err.reason == "too_large" else 422
        raise HTTPError(status, f"{field}[{err.index}]: {err.message}", f"{field}[{err.index}]") from None
    except Exception:
        ctx.metrics.predictions.labels(model=model_label, variant=variant, outcome="error").inc()
        raise
    ctx.metrics.predictions.labels(model=model_label, variant=variant, outcome="ok").inc()
    ctx.metrics.prediction_latency.labels(variant=variant).observe(time.perf_counter() - started)
    ctx.metrics.prediction_batch.observe(len(predictions))
    if encoded is not None:
        ctx.metrics.images_predicted.labels(input="multipart" if field == "files" else "base64").inc(len(encoded))
    return {"model": {"name": info.name, "version": info.version}, "variant": predictor.variant, "predictions": predictions}


def _parse(model: type[BaseModel], raw: bytes | dict):
    """A request model from JSON bytes or form fields; errors go to the 422 handler like FastAPI's own."""
    try:
        return model.model_validate_json(raw) if isinstance(raw, bytes) else model.model_validate(raw)
    except ValidationError as err:
        raise RequestValidationError(err.errors()) from None


def _json_inputs(body: PredictRequest) -> tuple[list[str] | None, str]:
    """(base64 images or None for texts, the field that holds the inputs), after the count and size limits."""
    if body.inputs is not None and body.images is not None:
        raise HTTPError(422, "images: give either texts as inputs or base64 images as images, not both", "images")
    if body.images is None:
        if body.inputs is None:
            raise HTTPError(422, "inputs: give texts as inputs, or base64-encoded images as images", "inputs")
        _check_count("inputs", len(body.inputs), "text")
        size = sum(len(text.encode()) for text in body.inputs)
        if size > MAX_TEXT_BYTES:
            raise HTTPError(413, f"inputs: {size // 1024} KiB of text; at most {MAX_TEXT_BYTES // 1024} KiB per request",
                            "inputs")
        return None, "inputs"
    _check_count("images", len(body.images), "image")
    return body.images, "images"


async def _multipart_predict(request: Request) -> tuple[PredictRequest, list[bytes], str]:
    """The form's `files` (read within MAX_IMAGE_BYTES each) and its other fields as a PredictRequest."""
    try:
        form = await request.form(max_files=MAX_PREDICT_INPUTS + 1, max_fields=20)
    except StarletteHTTPException as err:
        status = 413 if "too many files" in str(err.detail).lower() else 422
        raise HTTPError(status, f"files: {err.detail} (at most {MAX_PREDICT_INPUTS} files per request)", "files") from None
    try:
        fields = {}
        for key, value in form.multi_items():
            if key == "files":
                continue
            if key in ("inputs", "images"):
                raise HTTPError(422, f"{key}: a multipart request carries images as files; send texts or base64 images "
                                     "as JSON", key)
            if not isinstance(value, str):
                raise HTTPError(422, f"{key}: expected a form field, got a file; send images as files", key)
            fields[key] = value
        body = _parse(PredictRequest, fields)
        files = form.getlist("files")
        _check_count("files", len(files), "image file")
        encoded = []
        for index, upload in enumerate(files):
            if not isinstance(upload, StarletteUploadFile):
                raise HTTPError(422, f"files[{index}]: expected a file, got a text field", f"files[{index}]")
            data = await upload.read(MAX_IMAGE_BYTES + 1)
            if len(data) > MAX_IMAGE_BYTES:
                raise too_large(index, upload.size or len(data))
            encoded.append(data)
    except BadImage as err:
        context(request).metrics.image_decode_failures.labels(reason=err.reason).inc()
        raise HTTPError(413, f"files[{err.index}]: {err.message}", f"files[{err.index}]") from None
    finally:
        await form.close()
    return body, encoded, "files"


def _check_count(field: str, count: int, what: str) -> None:
    if not count:
        raise HTTPError(422, f"{field}: give at least one {what}", field)
    if count > MAX_PREDICT_INPUTS:
        raise HTTPError(413, f"{field}: {count} {what}s; at most {MAX_PREDICT_INPUTS} per request", field)


def _check_inputs(info: registry.VersionInfo, meta: dict, field: str) -> None:
    """Texts for a text model, images for an image model: otherwise the field that was sent is at fault."""
    if is_image_model(meta) and field == "inputs":
        raise HTTPError(422, f"inputs: {info.ref} is an {meta['task']} model and takes images: send them base64-encoded "
                             "as images, or as multipart files", "inputs")
    if not is_image_model(meta) and field != "inputs":
        raise HTTPError(422, f"{field}: {info.ref} is a {meta['task']} model and takes texts: send them as inputs", field)


async def _pixels(ctx: Context, predictor, images: list[str] | list[bytes], field: str):
    """Decode (base64 too) and preprocess in a thread-pool thread: the batcher's worker then only runs the model."""
    pixels, seconds = await run_in_threadpool(decode, predictor, images, field == "images", ctx.metrics.image_bytes.observe)
    ctx.metrics.image_decode_seconds.observe(seconds)
    return pixels


def _batcher(request: Request, ctx: Context) -> Batcher:
    """The worker's one Batcher, made on first use inside its event loop; sized by FINETUNE_SERVE_MAX_BATCH/_WAIT_MS."""
    state = request.app.state
    if getattr(state, "batcher", None) is None:
        state.batcher = batcher_from_env(on_batch=ctx.metrics.inference_batch.observe)
    return state.batcher


@app.post("/evaluate")
def evaluate(body: EvaluateRequest, request: Request) -> dict:
    ctx = context(request)
    stored = datasets.lookup(body.data, "data")
    info, predictor = _predictor(ctx, body.model, body.version, body.variant)
    image_model = is_image_model(predictor.meta)
    if image_model != (stored.kind in datasets.IMAGE_KINDS):
        wants = "a zip of images" if image_model else "a table (JSONL, CSV, TSV, Parquet)"
        raise HTTPError(422, f"data: '{body.data}' is {'a table' if stored.kind == datasets.TABLE else 'an image dataset'}; "
                             f"{info.ref} is an {predictor.meta['task']} model and is evaluated on {wants}", "data")
    if image_model:
        figures = evaluate_images(predictor, stored.held_out("test"), stored.column("image_column", body.image_column),
                                  stored.column("label_column", body.label_column), stored.folder, body.data)
    else:
        figures = evaluate_file(predictor, stored.path, body.text_column, body.label_column or "label", body.data)
    return {"model": {"name": info.name, "version": info.version}, "variant": predictor.variant, **figures}


def _predictor(ctx: Context, name: str, version: str | None, variant: str | None, load: bool = True):
    """Resolve (404 for an unknown model or version), then load (422 for a variant it cannot serve).

    With load=False: None instead of loading a predictor that is not in memory yet.
    """
    try:
        registry.validate_name(name)
    except ConfigError as err:
        raise FieldError("model", f"model: {err}") from None
    if version:
        try:
            registry.parse_ref(f"{name}:{version}")
        except ConfigError as err:
            raise FieldError("version", f"version: {err}") from None
    ctx.predictors.resolve(name, version)
    try:
        found = (ctx.predictors.get(name, version, variant) if load
                 else ctx.predictors.get_if_loaded(name, version, variant))
    except (registry.NotFoundError, registry.RegistryError) as err:
        raise FieldError("variant", f"variant: {err}") from None
    ctx.metrics.models_loaded.set(len(ctx.predictors.loaded()))
    return found


# ---------------------------------------------------------------- models


@app.get("/models")
def list_models() -> dict:
    return {"models": registry.list_models()}


@app.get("/models/{name}")
def show_model(name: str) -> dict:
    return registry.show(name)


@app.post("/models/{name}/promote")
def promote_model(name: str, body: PromoteRequest) -> dict:
    info = registry.promote(name, body.version)
    return {"name": info.name, "production": info.version}


app.include_router(v2.router)  # the Open Inference Protocol (KServe V2), /v2/...


# ---------------------------------------------------------------- errors


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


@app.exception_handler(HTTPError)
async def _http_error(_: Request, err: HTTPError) -> JSONResponse:
    return _error(err.status, err.message, err.field)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    field = ".".join(loc) or "body"
    return _error(422, f"{field}: {first.get('msg', 'invalid value')}", field)


@app.exception_handler(FinetuneError)
async def _finetune_error(_: Request, err: FinetuneError) -> JSONResponse:
    if isinstance(err, (registry.NotFoundError, datasets.UnknownDataset)):
        status = 404
    elif isinstance(err, datasets.TooLarge):
        status = 413
    elif isinstance(err, registry.IntegrityError):
        status = 503  # our stored file is damaged: not the caller's fault, and not a crash either
    else:
        status = 422
    field = getattr(err, "field", None) or _leading_field(str(err))
    return _error(status, str(err), field)


@app.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return _error(500, f"internal error: {type(err).__name__}; the server log has the details")


def _leading_field(message: str) -> str | None:
    head, sep, _ = message.partition(":")
    return head if sep and head.replace(".", "").replace("_", "").isalnum() else None


# ---------------------------------------------------------------- auth and body limits


class Guard:
    """ASGI middleware: the optional API key (constant-time compare) and body-size limits (413)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        key = os.environ.get(API_KEY_ENV)
        if key and scope["path"] not in OPEN_PATHS and not _authorized(scope, key):
            return await _send_json(send, 401, "authorization: send the header 'Authorization: Bearer <key>' with "
                                               f"the key in {API_KEY_ENV}", "authorization",
                                    extra=[(b"www-authenticate", b"Bearer")])
        limit = _body_limit(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_json(send, 413, _too_large(scope["path"], limit), "body")
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, _too_large(scope["path"], limit), "body")


class _BodyTooLarge(Exception):
    pass


def _body_limit(path: str) -> int:
    if path == "/datasets":
        return datasets.max_upload_bytes() + (1 << 20)
    if path == "/predict" or (path.startswith("/v2/") and path.endswith("/infer")):
        return MAX_PREDICT_BODY  # images
    return MAX_JSON_BODY


def _too_large(path: str, limit: int) -> str:
    if path == "/datasets":
        return (f"file: larger than the upload limit of {datasets.max_upload_bytes() / 2**20:g} MiB "
                f"(set {datasets.MAX_UPLOAD_ENV} to raise it)")
    return f"body: larger than {limit // 1024} KiB; send fewer or shorter inputs per request"


def _authorized(scope, key: str) -> bool:
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


async def _send_json(send, status: int, message: str, field: str | None, extra: list | None = None) -> None:
    import json

    body = json.dumps({"error": message, "field": field}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + (extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

