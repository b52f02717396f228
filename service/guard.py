"""The ASGI guard around the whole BentoML server: the optional API key and the body-size limits.

It wraps BentoML's own routes too (/schema.json, /docs), so they need the key as well. The key is
compared in constant time; a body over its limit is a 413 whether or not it declared its length.
"""

from __future__ import annotations

import hmac

from . import datasets, errors
from .schemas import MAX_PREDICT_BODY
from .settings import env_name, settings

# What stays open with an API key set: health checks and metrics.
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics", "/v2/health/live", "/v2/health/ready")
# JSON bodies larger than this are refused with 413 (uploads have their own, larger limit).
MAX_JSON_BODY = 1 << 20


class Guard:
    """ASGI middleware: 401 without the key (when one is set), 413 for a body over its path's limit.

    trust_unix_socket: a request over a Unix socket needs no key. BentoML reaches a service's dependency
    (FinetuneServe's own trainer) through a socket in a folder only its user can open, and sends no headers.
    """

    def __init__(self, app, trust_unix_socket: bool = False):
        self.app = app
        self.trust_unix_socket = trust_unix_socket

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        key = settings().api_key
        local = self.trust_unix_socket and _over_unix_socket(scope)
        if key and scope["path"] not in OPEN_PATHS and not local and not _authorized(scope, key.get_secret_value()):
            return await _send_error(send, 401, "authorization: send the header 'Authorization: Bearer <key>' with "
                                                f"the key in {env_name('api_key')}", "authorization",
                                     extra=[(b"www-authenticate", b"Bearer")])
        if "\n" in scope["path"]:  # BentoML's mount of the app cannot match it, and would answer a plain-text 404
            return await _send_error(send, 404, "path: no route or name here holds a line break", "path")
        limit = _body_limit(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(send, 413, _too_large(scope["path"], limit), "body")
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(413, _too_large(scope["path"], limit), "body")
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, 413, _too_large(scope["path"], limit), "body")


class _BodyTooLarge(errors.HTTPError):
    """Raised while the app reads a body past its limit: the app's HTTPError handler answers 413 (FastAPI's
    body parsing wraps it, see service.errors), and the guard itself where nothing inside did."""


def _over_unix_socket(scope) -> bool:
    """uvicorn gives a Unix socket's connection the server address (path, None) and no client address."""
    server = scope.get("server")
    return server is not None and server[1] is None and scope.get("client") is None


def _body_limit(path: str) -> int:
    if path == "/datasets":
        return settings().max_upload_bytes + (1 << 20)  # the multipart framing around the file
    if path == "/predict" or (path.startswith("/v2/") and path.endswith("/infer")):
        return MAX_PREDICT_BODY  # images
    return MAX_JSON_BODY


def _too_large(path: str, limit: int) -> str:
    if path == "/datasets":
        return str(datasets.too_large())
    return f"body: larger than {limit // 1024} KiB; send fewer or shorter inputs per request"


def _authorized(scope, key: str) -> bool:
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


async def _send_error(send, status: int, message: str, field: str | None, extra: list | None = None) -> None:
    content = errors.body(message, field)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())] + (extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
