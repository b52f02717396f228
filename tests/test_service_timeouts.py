"""The per-request timeout: a 504 naming the limit when nothing answers in time, a streaming answer never
cut short, and no timer left behind by a request that answered (BentoML's own leaves one for `timeout`
seconds, which made every full garbage collection of a busy server slower; service.timeouts)."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
from types import SimpleNamespace

from service.timeouts import CancellingTimeout


async def quick(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def request(middleware, app) -> tuple[int, bytes]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    async def go():
        await middleware(app, 0.2)({"type": "http", "path": "/predict", "headers": []}, receive, send)

    asyncio.run(go())
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def live_timers_after(middleware, requests: int) -> int:
    async def go():
        timed = middleware(quick, 300)

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            pass

        for _ in range(requests):
            await timed({"type": "http", "path": "/predict", "headers": []}, receive, send)
        loop = asyncio.get_running_loop()
        return sum(1 for handle in loop._scheduled if not handle.cancelled())

    return asyncio.run(go())


def bentoml_own_timeout():
    """BentoML's class from a fresh load of its module, whether or not service.bento replaced it already."""
    spec = importlib.util.find_spec("bentoml._internal.server.http.traffic")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TimeoutMiddleware


def test_an_answered_request_leaves_no_timer_behind():
    assert live_timers_after(CancellingTimeout, 500) == 0
    # what this replaces: one live timer per request, for the whole timeout (so the count can tell)
    assert live_timers_after(bentoml_own_timeout(), 500) == 500


def test_a_request_that_does_not_answer_in_time_gets_a_504_naming_the_limit():
    stopped = []

    async def stuck(scope, receive, send):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            stopped.append(True)
            raise

    status, body = request(CancellingTimeout, stuck)
    assert status == 504
    assert json.loads(body) == {"error": "Not able to process the request in 0.2 seconds"}
    assert stopped == [True]  # the handler was cancelled, not left running


def test_an_answer_that_started_in_time_is_never_cut_short():
    async def streaming(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"a", b"b", b"c"):
            await asyncio.sleep(0.15)  # 0.45 s in all, past the 0.2 s limit
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    assert request(CancellingTimeout, streaming) == (200, b"abc")


def test_a_handler_that_ends_without_answering_is_not_held_for_the_timeout():
    async def silent(scope, receive, send):
        return None

    async def go():
        await asyncio.wait_for(CancellingTimeout(silent, 300)({"type": "http", "path": "/", "headers": []},
                                                              None, None), 1.0)

    asyncio.run(go())  # BentoML's would wait the whole 300 s


def test_bentoml_builds_the_cancelling_timeout_once_the_service_is_imported():
    importlib.import_module("service.bento")  # installs it, as `bentoml serve` does when it loads the service
    from bentoml._internal.server.base_app import BaseAppFactory

    built = BaseAppFactory.middlewares.fget(SimpleNamespace(timeout=300, max_concurrency=None))
    assert [(m.cls, m.kwargs) for m in built] == [(CancellingTimeout, {"timeout": 300})]
