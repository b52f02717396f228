"""The per-request timeout (`traffic.timeout`): BentoML's semantics, without its leaked timers.

BentoML's TimeoutMiddleware (bentoml 1.4.x, bentoml/_internal/server/http/traffic.py) arms
`loop.call_later(timeout, ...)` for every request and never cancels it. With this service's 300 s
timeout every request left a live timer, future and context behind for five minutes: ~75,000 of them
at 250 req/s, all scanned by every full garbage collection, which grew from 15 to ~200 ms and stalled
the event loop in 10 s dips (bench/load/README.md, "the soak's dips"). This one keeps the behaviour (a
504 naming the limit when no response has started in time; once one has, the request runs to its end)
and cancels its timer when the request answers.

`install()` puts it where BentoML builds each worker's middleware stack, which imports the class from
its module when the app is built; tests/test_service_timeouts.py fails if that stops being so.
"""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse


class CancellingTimeout:
    """ASGI middleware: 504 if no response has started within `timeout` seconds."""

    def __init__(self, app, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        answered = loop.create_future()  # set when the response starts or the request ends

        def settle(exc: BaseException | None = None) -> None:
            if answered.done():
                return
            if exc is None:
                answered.set_result(None)
            else:
                answered.set_exception(exc)

        async def send_and_settle(message) -> None:
            settle()
            await send(message)

        request = asyncio.ensure_future(self.app(scope, receive, send_and_settle))
        request.add_done_callback(lambda _: settle())
        timer = loop.call_later(self.timeout, settle, asyncio.TimeoutError())
        try:
            await answered
        except asyncio.TimeoutError:
            if request.cancel():
                await JSONResponse({"error": f"Not able to process the request in {self.timeout:g} seconds"},
                                   status_code=504)(scope, receive, send)
                return
        except asyncio.CancelledError:  # the server is stopping this request: stop the handler with it
            request.cancel()
            raise
        finally:
            timer.cancel()  # the fix: a cancelled handle drops its callback and future at once
        await request


def install() -> None:
    """Make BentoML build CancellingTimeout wherever it would build its own TimeoutMiddleware."""
    from bentoml._internal.server.http import traffic

    traffic.TimeoutMiddleware = CancellingTimeout
