"""Load shedding (service.shedding): the in-flight limit on its own, then through a real `bentoml serve`.

The unit tests drive the middleware around a real ASGI app whose requests finish when the test opens
a gate, so which request holds a slot, waits or is shed is decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import serve_toy_model

from service.shedding import RETRY_AFTER_SECONDS, Shedding, route_of


class Gated:
    """An ASGI app answering 200 once `gate` is set; `entered` counts the requests that reached it."""

    def __init__(self):
        self.gate = asyncio.Event()
        self.entered = 0

    async def __call__(self, scope, receive, send):
        self.entered += 1
        await self.gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def scope(path: str = "/predict", method: str = "POST") -> dict:
    return {"type": "http", "method": method, "path": path, "headers": []}


async def call(app, request_scope: dict | None = None) -> dict:
    """One request through `app`: {"status", "headers", "body"}."""
    answer = {}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"], answer["headers"] = message["status"], dict(message["headers"])
        else:
            answer["body"] = answer.get("body", b"") + message.get("body", b"")

    await app(request_scope or scope(), receive, send)
    return answer


def test_routes_limited():
    assert route_of(scope("/predict")) == "predict"
    assert route_of(scope("/v2/models/toy/infer")) == "v2_infer"
    assert route_of(scope("/v2/models/toy/versions/2/infer")) == "v2_infer"
    assert route_of(scope("/predict", "GET")) is None
    for path in ("/evaluate", "/datasets", "/metrics", "/readyz", "/v2/models/toy", "/v2/models/toy/ready"):
        assert route_of(scope(path)) is None


def test_over_the_limit_is_shed_at_once_with_retry_after_and_recovers():
    async def scenario():
        inner, shed = Gated(), []
        app = Shedding(inner, limit=2, wait=0, on_shed=shed.append)
        held = [asyncio.create_task(call(app)) for _ in range(2)]
        await asyncio.sleep(0)
        refused = await call(app, scope("/v2/models/toy/infer"))
        assert refused["status"] == 429 and inner.entered == 2
        assert refused["headers"][b"retry-after"] == str(RETRY_AFTER_SECONDS).encode()
        body = json.loads(refused["body"])
        assert set(body) == {"error", "field"} and body["field"] is None
        assert "FINETUNE_SERVE_MAX_INFLIGHT" in body["error"] and "retry after" in body["error"]
        assert shed == ["v2_infer"]
        inner.gate.set()
        assert [a["status"] for a in await asyncio.gather(*held)] == [200, 200]
        assert app.in_flight == 0
        assert (await call(app))["status"] == 200 and shed == ["v2_infer"]

    asyncio.run(scenario())


def test_other_routes_are_never_limited():
    async def scenario():
        inner = Gated()
        app = Shedding(inner, limit=1, wait=0, on_shed=lambda route: None)
        held = asyncio.create_task(call(app))
        await asyncio.sleep(0)
        inner.gate.set()
        for path, method in (("/datasets", "POST"), ("/jobs", "GET"), ("/metrics", "GET")):
            assert (await call(app, scope(path, method)))["status"] == 200
        assert (await held)["status"] == 200

    asyncio.run(scenario())


def test_a_waiting_request_gets_the_next_free_slot_in_order():
    async def scenario():
        inner, shed = Gated(), []
        app = Shedding(inner, limit=1, wait=30, on_shed=shed.append)
        first = asyncio.create_task(call(app))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(call(app)) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert inner.entered == 1 and app.in_flight == 1 and len(app._waiters) == 3
        inner.gate.set()
        answers = await asyncio.gather(first, *waiting)
        assert [a["status"] for a in answers] == [200] * 4 and inner.entered == 4
        assert shed == [] and app.in_flight == 0 and not app._waiters

    asyncio.run(scenario())


def test_a_request_that_waits_past_the_bound_is_shed_and_frees_nothing():
    async def scenario():
        inner, shed = Gated(), []
        app = Shedding(inner, limit=1, wait=0.05, on_shed=shed.append)
        held = asyncio.create_task(call(app))
        await asyncio.sleep(0)
        refused = await asyncio.wait_for(call(app), 5)  # the wait bound answers it, not this timeout
        assert refused["status"] == 429 and shed == ["predict"]
        assert app.in_flight == 1 and not app._waiters and inner.entered == 1
        inner.gate.set()
        assert (await held)["status"] == 200 and app.in_flight == 0

    asyncio.run(scenario())


def test_a_waiter_whose_client_goes_away_leaks_no_slot():
    async def scenario():
        inner = Gated()
        app = Shedding(inner, limit=1, wait=30, on_shed=lambda route: None)
        held = asyncio.create_task(call(app))
        await asyncio.sleep(0)
        gone = asyncio.create_task(call(app))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert not app._waiters
        inner.gate.set()
        await held
        assert app.in_flight == 0
        assert (await call(app))["status"] == 200 and app.in_flight == 0

    asyncio.run(scenario())


# ---------------------------------------------------------------- through a real server

MAX_INFLIGHT = 2
BURST, CONCURRENCY = 200, 64
# A request of the burst must come back within this: a 429 after the 20 ms wait, or an answer.
ANSWER_BOUND_SECONDS = 20.0


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base):
    running = serve_toy_model(tmp_path_factory.mktemp("shedding"), tiny_base,
                              env={"FINETUNE_SERVE_MAX_INFLIGHT": str(MAX_INFLIGHT), "FINETUNE_SERVE_MAX_QUEUE_MS": "20"})
    yield running
    running.kill()


async def burst(url: str) -> list[tuple[str, int, dict, bytes, float]]:
    """BURST requests, half /predict and half V2 infer, CONCURRENCY at a time: (route, status, headers, body, s)."""
    answers = []
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=ANSWER_BOUND_SECONDS) as client:
        todo = list(range(BURST))

        async def one_client():
            while todo:
                i = todo.pop()
                started = time.perf_counter()
                if i % 2:
                    route, response = "predict", await client.post("/predict", json={"inputs": [f"a great film {i}"]})
                else:
                    response = await client.post("/v2/models/toy/infer", json={"inputs": [
                        {"name": "text", "datatype": "BYTES", "shape": [1], "data": [f"a dull film {i}"]}]})
                    route = "v2_infer"
                answers.append((route, response.status_code, response.headers, response.content,
                                time.perf_counter() - started))

        await asyncio.gather(*(one_client() for _ in range(CONCURRENCY)))
    return answers


def shed_counts(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {sample.labels["route"]: sample.value for family in text_string_to_metric_families(text)
            if family.name == "finetune_requests_shed" for sample in family.samples if sample.name.endswith("_total")}


@pytest.mark.process
def test_a_burst_is_shed_with_429_and_the_server_recovers_at_once(server):
    answers = asyncio.run(burst(server.url))  # an httpx timeout would raise here: none may happen
    assert len(answers) == BURST
    statuses = [status for _, status, *_ in answers]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    shed = [(route, headers, body) for route, status, headers, body, _ in answers if status == 429]
    assert 0 < len(shed) < BURST
    for _, headers, body in shed:
        assert headers["retry-after"] == str(RETRY_AFTER_SECONDS)
        error = json.loads(body)
        assert set(error) == {"error", "field"} and "FINETUNE_SERVE_MAX_INFLIGHT" in error["error"]
    assert max(seconds for *_, seconds in answers) < ANSWER_BOUND_SECONDS

    after = httpx.post(server.url + "/predict", json={"inputs": ["a great film"]}, timeout=30)
    assert after.status_code == 200, after.text
    assert after.json()["predictions"][0]["label"] in ("positive", "negative")
    seen = {route: sum(1 for r, *_ in shed if r == route) for route in ("predict", "v2_infer")}
    counted = shed_counts(server.url)
    assert {route: counted.get(route, 0) for route in seen} == seen, (counted, seen)
