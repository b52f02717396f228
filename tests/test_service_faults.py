"""Faults through a real `bentoml serve`: a damaged version, SIGTERM under load, metrics against the client.

Each test starts its own server on the toy model (tests/service_helpers.serve_toy_model).
"""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import serve_toy_model, wait_until

from finetune_core import registry

pytestmark = pytest.mark.process  # starts a real server

TEXTS = {"inputs": ["a wonderful film", "an awful film"]}


def samples(url: str, name: str) -> dict[tuple, float]:
    """The samples of one metric family in /metrics, by their sorted label items."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


def flip_bytes(path, offset: int = 4096, count: int = 16) -> None:
    """Damage a file in place, as a bad disk or a careless copy would (same size, different bytes)."""
    with path.open("r+b") as f:
        f.seek(offset)
        data = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_a_damaged_new_production_keeps_the_old_one_serving_and_says_why(tmp_path, tiny_base):
    server = serve_toy_model(tmp_path, tiny_base)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert client.post("/models/toy/promote", json={"version": "v1"}).status_code == 200
            first = client.post("/predict", json=TEXTS)
            assert first.status_code == 200 and first.json()["model"]["version"] == "v1"

            v1 = registry.resolve("toy", "v1")
            v2 = registry.register("toy", v1.path, v1.manifest)
            assert v2.version == "v2"
            flip_bytes(v2.path / v2.manifest.variants["onnx"].file)
            assert client.post("/models/toy/promote", json={"version": "v2"}).status_code == 200

            def served_by_v1_until_v2_failed():
                answer = client.post("/predict", json=TEXTS)  # a request for production starts v2's load
                assert answer.status_code == 200, answer.text
                assert answer.json()["model"]["version"] == "v1"
                return samples(server.url, "finetune_model_load_failures_total").get(
                    (("model", "toy"), ("reason", "integrity"), ("version", "v2")))

            failures = wait_until("v2's load failure in /metrics", 30, served_by_v1_until_v2_failed, poll=0.2)
            for _ in range(10):  # production still answers from v1, and v2's load is not retried per request
                served_by_v1_until_v2_failed()
            assert samples(server.url, "finetune_model_load_failures_total")[
                (("model", "toy"), ("reason", "integrity"), ("version", "v2"))] == failures

            pinned = client.post("/predict", json={**TEXTS, "version": "v2"})
            assert pinned.status_code == 503
            assert "does not match its manifest" in pinned.json()["error"]

            shown = {v["version"]: v for v in client.get("/models/toy").json()["versions"]}
            assert shown["v1"]["integrity"] == "ok" and "error" not in shown["v1"]
            assert shown["v2"]["integrity"] == "failed"
            assert "model.onnx' does not match its manifest" in shown["v2"]["error"]
            assert shown["v2"]["aliases"] == ["latest", "production"]
    finally:
        server.kill()


def load_until_refused(url: str, clients: int, seconds: float, during) -> list[tuple[float, str]]:
    """CLIENTS threads posting /predict back to back (keep-alive) for at most SECONDS, each stopping once refused a
    connection; `during()` runs meanwhile. Each outcome: (when it came, the status code, 'refused' or the
    exception's name)."""
    import threading

    outcomes: list[tuple[float, str]] = []
    deadline = time.monotonic() + seconds

    def client_loop():
        with httpx.Client(base_url=url, timeout=30) as client:
            while time.monotonic() < deadline:
                try:
                    outcome = str(client.post("/predict", json=TEXTS).status_code)
                except httpx.ConnectError:
                    outcome = "refused"
                except httpx.HTTPError as err:  # a reset or a connection closed under the request
                    outcome = type(err).__name__
                outcomes.append((time.monotonic(), outcome))
                if outcome == "refused":
                    return

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    during()
    for t in threads:
        t.join(seconds + 40)
    return outcomes


def test_sigterm_under_load_finishes_what_is_in_flight_and_refuses_the_rest(tmp_path, tiny_base):
    import collections
    import os
    import signal

    server = serve_toy_model(tmp_path, tiny_base)
    stop = {}
    try:
        def sigterm_midway():
            time.sleep(2.5)
            stop["sent"] = time.monotonic()
            os.kill(server.process.pid, signal.SIGTERM)
            stop["code"] = server.process.wait(60)
            stop["seconds"] = time.monotonic() - stop["sent"]

        outcomes = load_until_refused(server.url, 8, 8, sigterm_midway)
    finally:
        server.kill()
    counts = collections.Counter(outcome for _, outcome in outcomes)
    assert set(counts) == {"200", "refused"}, counts  # no 5xx, no reset or cut-off answer
    assert counts["refused"] == 8  # every client was refused in the end, none left hanging
    assert any(when > stop["sent"] and outcome == "200" for when, outcome in outcomes)  # in flight at SIGTERM: served
    assert stop["code"] == 0 and stop["seconds"] < 30, stop  # within Kubernetes' default grace period


def test_metrics_count_what_the_client_saw(tmp_path, tiny_base):
    """BentoML's bentoml_service_request_total counts every /predict by status, summed over both workers; ours
    counts the requests that reached a model lookup (ok, or error: here the unknown model's 404s)."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    server = serve_toy_model(tmp_path, tiny_base, env={"FINETUNE_SERVE_API_WORKERS": "2"})
    bodies = [TEXTS] * 160 + [{**TEXTS, "model": "ghost"}] * 40 + [{"inputs": "not a list"}] * 30
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
            seen = collections.Counter(pool.map(lambda body: str(client.post("/predict", json=body).status_code),
                                                bodies))
        assert seen == {"200": 160, "404": 40, "422": 30}
        counted = collections.Counter()
        for labels, value in samples(server.url, "bentoml_service_request_total").items():
            if ("endpoint", "/predict") in labels:
                counted[dict(labels)["http_response_code"]] += int(value)
        assert counted == seen
        ours = samples(server.url, "finetune_predictions_total")
        assert ours[(("model", "toy"), ("outcome", "ok"), ("variant", "onnx"))] == seen["200"]
        assert ours[(("model", "none"), ("outcome", "error"), ("variant", "default"))] == seen["404"]
    finally:
        server.kill()
