"""The REST endpoints: thin functions that decode a request, make one core call and encode the answer.

Errors are JSON `{"error": MESSAGE, "field": FIELD | null}`: 401 without a valid key (when one is
configured), 404 for an unknown job, dataset or model, 409 for a job already finished, 413 for a
body, upload or input list over its limit, 422 for a value the service cannot use.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse

from finetune_core import registry
from finetune_core.errors import ConfigError, DataError, FinetuneError

from . import datasets, v2
from .batching import Batcher, batcher_from_env
from .evaluation import evaluate_file
from .jobs import TERMINAL, JobStore
from .metrics import Metrics
from .predictors import Predictors, only_model
from .schemas import (MAX_PREDICT_INPUTS, EvaluateRequest, FieldError, FinetuneRequest, PredictRequest, PromoteRequest,
                      job_spec)
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
              description="Fine-tune, export, verify, version and serve text classifiers.")


def context(request: Request) -> Context:
    return request.app.state.context


# ---------------------------------------------------------------- datasets


@app.post("/datasets")
async def upload_dataset(request: Request, file: UploadFile = File(description="JSONL, CSV, TSV or Parquet")) -> dict:
    ctx = context(request)

    async def chunks():
        while chunk := await file.read(1 << 20):
            yield chunk

    try:
        info = await datasets.save_upload(file.filename, chunks(), datasets.max_upload_bytes())
    except datasets.TooLarge:
        ctx.metrics.dataset_uploads.labels(outcome="rejected", reason="too_large").inc()
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
    paths = {role: str(datasets.path_of(getattr(body, role), role))
             for role in ("train", "validation", "test") if getattr(body, role) is not None}
    job = ctx.store.create(job_spec(body, paths))
    ctx.metrics.set_jobs(ctx.store.counts())
    await ctx.wake_trainer()
    return {"id": job.id, "status": job.status}


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


@app.post("/predict")
async def predict(body: PredictRequest, request: Request) -> dict:
    """Concurrent requests for one model version and variant share forward passes (service.batching)."""
    ctx = context(request)
    started = time.perf_counter()
    variant = body.variant or "default"
    model_label = "none"
    try:
        if not body.inputs:
            raise HTTPError(422, "inputs: give at least one text", "inputs")
        if len(body.inputs) > MAX_PREDICT_INPUTS:
            raise HTTPError(413, f"inputs: {len(body.inputs)} texts; at most {MAX_PREDICT_INPUTS} per request", "inputs")
        name = body.model or only_model()
        # A predictor in memory is used at once; loading one takes seconds, so it happens off the event loop.
        info, predictor = (_predictor(ctx, name, body.version, body.variant, load=False)
                           or await run_in_threadpool(_predictor, ctx, name, body.version, body.variant))
        model_label = ctx.metrics.model_label(info.name)
        variant = predictor.variant
        predictions = await _batcher(request, ctx).predict((info.name, info.version, body.variant), predictor,
                                                           body.inputs, body.top_k)
    except Exception:
        ctx.metrics.predictions.labels(model=model_label, variant=variant, outcome="error").inc()
        raise
    ctx.metrics.predictions.labels(model=model_label, variant=variant, outcome="ok").inc()
    ctx.metrics.prediction_latency.labels(variant=variant).observe(time.perf_counter() - started)
    ctx.metrics.prediction_batch.observe(len(body.inputs))
    return {"model": {"name": info.name, "version": info.version}, "variant": predictor.variant, "predictions": predictions}


def _batcher(request: Request, ctx: Context) -> Batcher:
    """The worker's one Batcher, made on first use inside its event loop; sized by FINETUNE_SERVE_MAX_BATCH/_WAIT_MS."""
    state = request.app.state
    if getattr(state, "batcher", None) is None:
        state.batcher = batcher_from_env(on_batch=ctx.metrics.inference_batch.observe)
    return state.batcher


@app.post("/evaluate")
def evaluate(body: EvaluateRequest, request: Request) -> dict:
    ctx = context(request)
    path = datasets.path_of(body.data, "data")
    info, predictor = _predictor(ctx, body.model, body.version, body.variant)
    figures = evaluate_file(predictor, path, body.text_column, body.label_column, body.data)
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
        limit = datasets.max_upload_bytes() + (1 << 20) if scope["path"] == "/datasets" else MAX_JSON_BODY
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

