"""Adaptive batching: batched answers equal single ones, concurrent requests merge, each caller gets its own."""

from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np
import pytest
from artifact_helpers import make_run
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import Server

from finetune_core import predict, registry
from finetune_core.artifacts import export_version
from finetune_core.metadata import ModelMeta
from service.batching import GROUP_SIZE, Batcher, run_grouped, run_pixels

TEXTS = [
    "the movie was really excellent", "a dull plot", "terrible", "quite a lovely film, the acting was superb",
    "the film was awful and the acting poor, a really horrible movie", "great", "very bad acting", "a superb plot",
    "the plot was quite dull", "wonderful", "poor film", "the acting was lovely and the movie great",
]


@pytest.fixture(scope="module")
def home(tiny_base, tmp_path_factory):
    """A registry holding the tiny trained model 'toy' v1 with its ONNX variant."""
    folder = tmp_path_factory.mktemp("batching-home")
    run = make_run(tiny_base, tmp_path_factory.mktemp("run"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(registry.ROOT_ENV, str(folder))
        export_version(run, "toy", variants=["onnx"])
    return folder


@pytest.fixture(scope="module")
def onnx_predictor(home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(registry.ROOT_ENV, str(home))
        return predict.load_predictor(registry.resolve("toy"), "onnx", intra_op_threads=1, allow_spinning=False)


def assert_same(batched: list[dict], single: list[dict]) -> None:
    """Same labels and label order; scores equal up to float noise from padding in a shared batch."""
    assert [r["label"] for r in batched] == [r["label"] for r in single]
    for b, s in zip(batched, single, strict=True):
        assert list(b["scores"]) == list(s["scores"])
        assert b["scores"] == pytest.approx(s["scores"], abs=1e-5)


def test_concurrent_requests_merge_and_equal_single_requests(onnx_predictor):
    sizes = []
    batcher = Batcher(max_batch=32, on_batch=sizes.append)
    requests = [(TEXTS[i : i + 1 + i % 3], 1 if i % 2 else None) for i in range(len(TEXTS))]  # 1-3 texts, top_k 1 or all

    async def all_at_once():
        return await asyncio.gather(*(batcher.predict("toy", onnx_predictor, texts, top_k) for texts, top_k in requests))

    answers = asyncio.run(all_at_once())
    # Every request queued before the worker took the first batch: one batch holds them all.
    assert sizes == [sum(len(texts) for texts, _ in requests)]
    for (texts, top_k), answer in zip(requests, answers, strict=True):
        assert_same(answer, onnx_predictor.predict(texts, top_k))
        assert all(len(r["scores"]) == (top_k or 2) for r in answer)


def test_max_batch_splits_the_queue_and_a_lone_request_is_not_held(onnx_predictor):
    sizes, waits = [], []

    async def no_sleep(seconds):  # what an idle worker would wait for company; with max_wait 0, never called
        waits.append(seconds)

    batcher = Batcher(max_batch=4, on_batch=sizes.append, sleep=no_sleep)

    async def scenario():
        lone = await batcher.predict("toy", onnx_predictor, ["great"], None)
        crowd = await asyncio.gather(*(batcher.predict("toy", onnx_predictor, [t], None) for t in TEXTS[:10]))
        return lone, crowd

    lone, crowd = asyncio.run(scenario())
    assert waits == [] and sizes[0] == 1  # the lone request went to the model at once, alone
    assert sizes[1:] == [4, 4, 2]
    assert_same(lone, onnx_predictor.predict(["great"]))
    assert_same([answer[0] for answer in crowd], [onnx_predictor.predict([t])[0] for t in TEXTS[:10]])


class EchoPredictor:
    """Answers each text with itself; fails on 'boom'; records the texts of each call.

    With `hold`, each call first runs `hold()` in the worker thread (a test blocks the model there).
    """

    variant = "echo"

    def __init__(self, hold=lambda: None):
        self.calls: list[list[str]] = []
        self.hold = hold

    def predict(self, texts, top_k=None):
        self.calls.append(list(texts))
        self.hold()
        if "boom" in texts:
            raise ValueError("boom is not a text this model takes")
        return [{"label": t, "score": 1.0, "scores": {t: 1.0, "other": 0.0}} for t in texts]


def test_each_caller_gets_its_own_results_and_only_the_failing_caller_fails():
    echo = EchoPredictor()
    batcher = Batcher(max_batch=64)
    requests = [[f"r{i}-{j}" + "x" * ((i * 7 + j * 3) % 11) for j in range(1 + i % 4)] for i in range(20)]
    requests[5] = ["fine", "boom"]

    async def all_at_once():
        return await asyncio.gather(*(batcher.predict("k", echo, texts, None) for texts in requests),
                                    return_exceptions=True)

    answers = asyncio.run(all_at_once())
    for i, (texts, answer) in enumerate(zip(requests, answers, strict=True)):
        if i == 5:
            assert isinstance(answer, ValueError)
        else:
            assert [r["label"] for r in answer] == texts
    # The merged batch failed at the group holding 'boom'; then each request ran alone to find whose it was.
    assert max(len(call) for call in echo.calls) <= GROUP_SIZE
    assert echo.calls[-len(requests):] == [sorted(texts, key=len) for texts in requests]


class Gate:
    """Holds the model (in the worker thread) until the test, on the event loop, opens it; logs what happened."""

    def __init__(self, loop: asyncio.AbstractEventLoop, log: list[str]):
        self.loop, self.log = loop, log
        self.entered = asyncio.Event()
        self.opened = threading.Event()

    def hold(self) -> None:
        self.log.append("model started")
        self.loop.call_soon_threadsafe(self.entered.set)
        # The guard only ends a broken run: if the model ran on the event loop, nothing could open the gate.
        self.log.append("model finished" if self.opened.wait(30) else "model gave up")


def test_the_event_loop_keeps_running_while_the_model_works():
    log: list[str] = []

    async def scenario():
        gate = Gate(asyncio.get_running_loop(), log)
        batcher = Batcher()

        async def ticker():
            await gate.entered.wait()
            for _ in range(10):
                log.append("tick")
                await asyncio.sleep(0)
            gate.opened.set()

        await asyncio.gather(batcher.predict("k", EchoPredictor(gate.hold), ["a"], None), ticker())

    asyncio.run(scenario())
    assert log == ["model started", *["tick"] * 10, "model finished"]


def test_requests_that_arrive_while_the_model_works_form_the_next_batch():
    log: list[str] = []
    sizes = []

    async def scenario():
        gate = Gate(asyncio.get_running_loop(), log)
        echo = EchoPredictor(lambda: gate.hold() if not gate.opened.is_set() else None)
        batcher = Batcher(max_batch=3, on_batch=sizes.append)
        first = asyncio.ensure_future(batcher.predict("k", echo, ["first"], None))
        await gate.entered.wait()  # the worker is busy with the first request
        later = [asyncio.ensure_future(batcher.predict("k", echo, [f"later{i}"], None)) for i in range(5)]
        await asyncio.sleep(0)  # every later request is queued
        gate.opened.set()
        return echo, await first, await asyncio.gather(*later)

    echo, first, later = asyncio.run(scenario())
    assert echo.calls == [["first"], ["later0", "later1", "later2"], ["later3", "later4"]]
    assert sizes == [1, 3, 2]
    assert first[0]["label"] == "first" and [answer[0]["label"] for answer in later] == [f"later{i}" for i in range(5)]


def test_an_idle_worker_waits_max_wait_for_company_then_runs_them_together():
    waits, sizes = [], []

    async def scenario():
        window = asyncio.Event()

        async def sleep(seconds):  # the test's clock: the window closes when the test says so
            waits.append(seconds)
            await window.wait()

        echo = EchoPredictor()
        batcher = Batcher(max_batch=8, max_wait=0.05, on_batch=sizes.append, sleep=sleep)
        first = asyncio.ensure_future(batcher.predict("k", echo, ["a"], None))
        await asyncio.sleep(0)  # the drain started and is waiting
        company = [asyncio.ensure_future(batcher.predict("k", echo, [t], None)) for t in ("b", "c")]
        await asyncio.sleep(0)
        window.set()
        await asyncio.gather(first, *company)
        return echo

    echo = asyncio.run(scenario())
    assert waits == [0.05] and sizes == [3] and echo.calls == [["a", "b", "c"]]


def test_run_grouped_keeps_the_input_order():
    echo = EchoPredictor()
    texts = [f"t{i}" + "x" * (i * 5 % 13) for i in range(19)]
    assert [r["label"] for r in run_grouped(echo, texts)] == texts
    assert all(len(call) <= GROUP_SIZE for call in echo.calls)
    assert [len(t) for call in echo.calls for t in call] == sorted(len(t) for t in texts)


class PixelMeanPredictor:
    """An image predictor stand-in: the logits are each image's mean pixel and its negative; records rows per pass."""

    variant = "fake"
    meta = ModelMeta(task="image-classification", labels=["bright", "dark"])

    def __init__(self):
        self.passes: list[int] = []

    def logits_from_pixels(self, pixels: np.ndarray) -> np.ndarray:
        self.passes.append(len(pixels))
        means = pixels.mean(axis=(1, 2, 3))
        return np.stack([means, -means], axis=1)


def test_image_requests_merge_and_run_in_passes_of_bounded_pixels():
    fake = PixelMeanPredictor()
    sizes = []
    batcher = Batcher(max_batch=64, on_batch=sizes.append)
    rng = np.random.default_rng(0)
    requests = [rng.normal(size=(1 + i % 3, 3, 64, 64)).astype(np.float32) for i in range(12)]

    async def all_at_once():
        return await asyncio.gather(*(batcher.predict("img", fake, pixels, 1 if i % 2 else None)
                                      for i, pixels in enumerate(requests)))

    answers = asyncio.run(all_at_once())
    assert sizes == [24] and fake.passes == [16, 8]  # one batch; 64x64 images: 16 per 65,536-pixel pass
    for i, (pixels, answer) in enumerate(zip(requests, answers, strict=True)):
        expected = predict.results(np.stack([pixels.mean(axis=(1, 2, 3)), -pixels.mean(axis=(1, 2, 3))], axis=1),
                                   fake.meta, 1 if i % 2 else None)
        assert [r["label"] for r in answer] == [r["label"] for r in expected]
        for got, want in zip(answer, expected, strict=True):
            assert got["scores"] == pytest.approx(want["scores"], abs=1e-6)
    fake.passes.clear()
    run_pixels(fake, np.zeros((3, 3, 224, 224), dtype=np.float32))
    assert fake.passes == [1, 1, 1]  # 224 px: one image per pass was fastest


# ---------------------------------------------------------------- over real HTTP


@pytest.fixture(scope="module")
def server(home, tmp_path_factory):
    log = tmp_path_factory.mktemp("batching-server") / "server.log"
    # A short window makes merging certain on a fast tiny model; the default (0) merges under load.
    running = Server(home, log, env={"FINETUNE_SERVE_MAX_WAIT_MS": "30"}).start()
    yield running
    running.kill()


def batch_figures(url: str) -> tuple[float, float]:
    """(number of inference batches, texts in them) from /metrics."""
    found = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in ("finetune_inference_batch_size_count", "finetune_inference_batch_size_sum"):
                found[sample.name] = sample.value
    return found.get("finetune_inference_batch_size_count", 0.0), found.get("finetune_inference_batch_size_sum", 0.0)


@pytest.mark.process
def test_concurrent_http_clients_are_batched_and_get_their_own_answers(server):
    texts = [f"{a} {b}" for a in ("great", "awful", "the plot was lovely", "dull acting") for b in ("film", "movie plot", "x")]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        single = {t: client.post("/predict", json={"model": "toy", "inputs": [t]}).json() for t in texts}
    before = batch_figures(server.url)

    answers: dict[int, dict] = {}

    def call(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            answers[i] = client.post("/predict", json={"model": "toy", "inputs": [texts[i % len(texts)]]}).json()

    clients = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(60)

    assert len(answers) == 32
    for i, answer in answers.items():
        expected = single[texts[i % len(texts)]]
        assert answer["model"] == {"name": "toy", "version": "v1"} and answer["variant"] == "onnx"
        assert_same(answer["predictions"], expected["predictions"])
    batches, batched_texts = (now - then for now, then in zip(batch_figures(server.url), before, strict=True))
    assert batched_texts == 32
    assert batches < 32, f"32 concurrent requests ran in {batches:.0f} batches: none were merged"
