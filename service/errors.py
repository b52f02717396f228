"""Errors as HTTP answers: `{"error": MESSAGE, "field": FIELD | null}` with a status that says what kind.

401 without a valid key (service.guard), 404 for an unknown job, dataset, model or version, 409 for a
job already finished, 413 for a body, upload, image or input list over its limit, 422 for a value
the service cannot use, 507 for an upload the server's disk has no room for, 503 for a stored file
that failed its checksum or a job store that does not answer (with Retry-After); a 500 is a bug. The V2
front end reuses `status_of` and answers in its own format.
"""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from finetune_core import registry
from finetune_core.errors import ConfigError, FinetuneError

from . import datasets
from .job_record import JobStoreUnavailable

log = logging.getLogger("service.errors")
# The member of a union a value failed against, which pydantic puts in its location (`epochs.int`,
# `epochs.literal['auto']`): not a request field.
# What a 503 for an unavailable job store asks the caller to wait before trying again.
STORE_RETRY_AFTER_SECONDS = 5
_UNION_MEMBER = re.compile(r"int|float|str|bool|[a-z-]+\[.*\]")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


class FieldError(ConfigError):
    """A ConfigError that knows which request field it is about."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


def status_of(err: FinetuneError) -> int:
    """The status for a core (or dataset) error: what the caller asked for is missing, too large or unusable."""
    if isinstance(err, (registry.NotFoundError, datasets.UnknownDataset)):
        return 404
    if isinstance(err, datasets.TooLarge):
        return 413
    if isinstance(err, datasets.OutOfSpace):
        return 507  # Insufficient Storage: the server's disk, not the request, is at fault
    if isinstance(err, registry.IntegrityError):
        return 503  # our stored file is damaged: not the caller's fault, and not a crash either
    return 422


def field_of(err: FinetuneError) -> str | None:
    """The request field an error is about: its own, else the `field:` its message starts with."""
    field = getattr(err, "field", None)
    if field:
        return field
    head, sep, _ = str(err).partition(":")
    return head if sep and head.replace(".", "").replace("_", "").isalnum() else None


def body(message: str, field: str | None = None) -> bytes:
    return json.dumps({"error": message, "field": field}).encode()


def install(app: FastAPI) -> None:
    """Answer every error raised in `app` as the JSON error body."""

    def answer(status: int, message: str, field: str | None = None) -> Response:
        return Response(body(message, field), status_code=status, media_type="application/json")

    @app.exception_handler(HTTPError)
    async def http_error(_: Request, err: HTTPError) -> Response:
        return answer(err.status, err.message, err.field)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> Response:
        first = err.errors()[0]
        loc = [str(part) for part in first.get("loc", ())
               if part not in ("body", "query", "path") and not _UNION_MEMBER.fullmatch(str(part))]
        field = ".".join(loc) or "body"
        return answer(422, f"{field}: {first.get('msg', 'invalid value')}", field)

    @app.exception_handler(StarletteHTTPException)
    async def framework_error(_: Request, err: StarletteHTTPException) -> Response:
        # FastAPI's own: 404 or 405 for an unknown path or method, and 400 for a body it could not parse
        # (bytes that are not UTF-8, a broken multipart form): that is a body we cannot use, a 422 like the rest.
        if isinstance(err.__cause__, HTTPError):  # the guard cut the body off while FastAPI read it: a 413
            return answer(err.__cause__.status, err.__cause__.message, err.__cause__.field)
        if err.status_code == 400:
            return answer(422, f"body: {err.detail}; send UTF-8 JSON, or a well-formed multipart form", "body")
        return Response(body(str(err.detail)), status_code=err.status_code, media_type="application/json",
                        headers=err.headers)

    @app.exception_handler(JobStoreUnavailable)
    async def store_unavailable(_: Request, err: JobStoreUnavailable) -> Response:
        log.error("job store unavailable: %s", err)
        return Response(body(f"service unavailable: {err}"), status_code=503, media_type="application/json",
                        headers={"Retry-After": str(STORE_RETRY_AFTER_SECONDS)})

    @app.exception_handler(FinetuneError)
    async def finetune_error(_: Request, err: FinetuneError) -> Response:
        return answer(status_of(err), str(err), field_of(err))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> Response:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return answer(500, f"internal error: {type(err).__name__}; the server log has the details")
