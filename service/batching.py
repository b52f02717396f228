"""Adaptive batching: concurrent /predict requests for one predictor share its forward passes.

A request goes to the model at once when the worker is idle; requests that arrive while it is busy
queue up and run together as the next batch (up to max_batch inputs), so a lone request is not held
back and a busy server merges what piled up. `max_wait` (default 0) makes an idle worker wait that
long for company first. The model runs in one worker thread, never on the event loop.

Inputs are texts, or an image model's pixel_values (rows, 3, S, S): the caller decodes its images
in its own thread first, so the worker only runs the model. Within a batch, texts are sorted by
length and run in groups of GROUP_SIZE, so a short text is not padded to the longest of 32; images
run in groups of IMAGE_PIXELS_PER_PASS pixels. Each caller gets its own results, in its order,
with its top_k.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np

from finetune_core.errors import ConfigError
from finetune_core.predict import Predictor, results

# Rows per forward pass inside a batch. MiniLM int8 on 2 cores, 32 random SST-2 dev texts, one
# ORT thread: one padded pass 5.1 ms/text; sorted by length in groups of 8, 3.2; one by one, 3.8.
GROUP_SIZE = 8
# Pixels per forward pass of an image batch. EfficientNet-Lite0 ONNX fp32, 2 ORT threads on 2 shared
# cores, 32 images, ms per image at 1 / 4 / 8 / 32 rows per pass: 224 px 20 / 25 / 27 / 26; 128 px
# 8.8 / 7.3 / 8.1 / 9.5; 64 px 4.8 / 2.6 / 2.3 / 2.5. So one 224 px image per pass, 4 of 128, 16 of 64.
IMAGE_PIXELS_PER_PASS = 65_536


@dataclass
class _Request:
    predictor: Predictor
    inputs: list[str] | np.ndarray  # texts, or pixel_values (rows, 3, S, S)
    top_k: int | None
    future: asyncio.Future


class Batcher:
    """`await batcher.predict(key, predictor, inputs, top_k)`; requests with the same key may share a batch.

    Requests under one key are all texts or all pixel_values: a key names one model version.
    """

    def __init__(self, max_batch: int = 32, max_wait: float = 0.0, on_batch: Callable[[int], None] = lambda size: None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        if max_batch < 1 or max_wait < 0:
            raise ConfigError(f"batching: max_batch must be >= 1 and max_wait >= 0, got {max_batch} and {max_wait}")
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.on_batch = on_batch  # sees each batch's input count before it runs
        self.sleep = sleep  # the idle worker's wait for company: a test passes one it controls
        self._queues: dict[Hashable, deque[_Request]] = {}
        self._drains: set[asyncio.Task] = set()  # held so the loop does not collect a running drain
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")

    async def predict(self, key: Hashable, predictor: Predictor, inputs: Sequence[str] | np.ndarray,
                      top_k: int | None) -> list[dict]:
        loop = asyncio.get_running_loop()
        request = _Request(predictor, inputs if isinstance(inputs, np.ndarray) else list(inputs), top_k,
                           loop.create_future())
        queue = self._queues.get(key)
        if queue is None:  # the worker is idle for this key: this request starts a drain
            queue = self._queues[key] = deque()
            task = loop.create_task(self._drain(key, queue))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        queue.append(request)
        return await request.future

    async def _drain(self, key: Hashable, queue: deque[_Request]) -> None:
        """Run batches until the queue is empty; then the next request for this key starts a new drain."""
        batch: list[_Request] = []
        try:
            if self.max_wait:  # the worker was idle: give concurrent requests a moment to join
                await self.sleep(self.max_wait)
            while queue:
                batch = [queue.popleft()]
                size = len(batch[0].inputs)
                while queue and size + len(queue[0].inputs) <= self.max_batch:
                    size += len(queue[0].inputs)
                    batch.append(queue.popleft())
                self.on_batch(size)
                await self._run(batch)
                batch = []
        finally:
            del self._queues[key]  # no await since the last `while queue` check: nothing was added meanwhile
            for request in batch + list(queue):  # left only when the drain itself was cancelled (shutdown)
                request.future.cancel()

    async def _run(self, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(batch[0].inputs, np.ndarray):
            work, inputs = run_pixels, np.concatenate([request.inputs for request in batch])
        else:
            work, inputs = run_grouped, [text for request in batch for text in request.inputs]
        try:
            answers = await loop.run_in_executor(self._worker, work, batch[0].predictor, inputs)
        except Exception as err:
            if len(batch) > 1:  # find whose inputs failed: the others still get their answers
                for request in batch:
                    await self._run([request])
                return
            _settle(batch[0], exception=err)
            return
        start = 0
        for request in batch:
            mine = answers[start : start + len(request.inputs)]
            start += len(request.inputs)
            _settle(request, result=[_top(answer, request.top_k) for answer in mine])


def run_grouped(predictor: Predictor, texts: list[str]) -> list[dict]:
    """predictor.predict over texts sorted by length in groups of GROUP_SIZE; results in the input order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[dict] = [{}] * len(texts)
    for start in range(0, len(order), GROUP_SIZE):
        group = order[start : start + GROUP_SIZE]
        for i, result in zip(group, predictor.predict([texts[i] for i in group]), strict=True):
            out[i] = result
    return out


def run_pixels(predictor, pixel_values: np.ndarray) -> list[dict]:
    """An image predictor's results for preprocessed rows, IMAGE_PIXELS_PER_PASS pixels per forward pass."""
    rows = max(1, IMAGE_PIXELS_PER_PASS // (pixel_values.shape[-1] * pixel_values.shape[-2]))
    logits = np.concatenate([predictor.logits_from_pixels(pixel_values[i : i + rows])
                             for i in range(0, len(pixel_values), rows)])
    return results(logits, predictor.meta, None)


def _settle(request: _Request, result: list[dict] | None = None, exception: Exception | None = None) -> None:
    if request.future.done():  # the caller went away and its future was cancelled
        return
    if exception is not None:
        request.future.set_exception(exception)
    else:
        request.future.set_result(result)


def _top(result: dict, top_k: int | None) -> dict:
    """The result with its top_k highest scores: predict() gives every label's, highest first."""
    if top_k is None or "scores" not in result:
        return result
    return dict(result, scores=dict(islice(result["scores"].items(), top_k)))
