"""Errors as HTTP answers: `{"error": MESSAGE, "field": FIELD | null}` with a status that says what kind.

401 without a valid key (service.guard), 404 for an unknown job, dataset, model or version, 409 for a
job already finished, 413 for a body, upload, image or input list over its limit, 422 for a value
the service cannot use, 503 for a stored file that failed its checksum; a 500 is a bug. The V2
front end reuses `status_of` and answers in its own format.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from finetune_core import registry
from finetune_core.errors import ConfigError, FinetuneError

from . import datasets

log = logging.getLogger("service.errors")


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
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        return answer(422, f"{field}: {first.get('msg', 'invalid value')}", field)

    @app.exception_handler(FinetuneError)
    async def finetune_error(_: Request, err: FinetuneError) -> Response:
        return answer(status_of(err), str(err), field_of(err))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> Response:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return answer(500, f"internal error: {type(err).__name__}; the server log has the details")
