"""Adaptive batching: concurrent /predict requests for one predictor share its forward passes.

A request goes to the model at once when the worker is idle; requests that arrive while it is busy
queue up and run together as the next batch (up to max_batch texts), so a lone request is not held
back and a busy server merges what piled up. `max_wait` (default 0) makes an idle worker wait that
long for company first. The model runs in one worker thread, never on the event loop.

Within a batch, texts are sorted by length and run in groups of GROUP_SIZE, so a short text is not
padded to the longest of 32. Each caller gets its own texts' results, in its order, with its top_k.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

from finetune_core.errors import ConfigError
from finetune_core.predict import Predictor

MAX_BATCH_ENV = "FINETUNE_SERVE_MAX_BATCH"
MAX_WAIT_ENV = "FINETUNE_SERVE_MAX_WAIT_MS"
DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_WAIT_MS = 0.0
# Rows per forward pass inside a batch. MiniLM int8 on 2 cores, 32 random SST-2 dev texts, one
# ORT thread: one padded pass 5.1 ms/text; sorted by length in groups of 8, 3.2; one by one, 3.8.
GROUP_SIZE = 8


@dataclass
class _Request:
    predictor: Predictor
    texts: list[str]
    top_k: int | None
    future: asyncio.Future


class Batcher:
    """`await batcher.predict(key, predictor, texts, top_k)`; requests with the same key may share a batch."""

    def __init__(self, max_batch: int = DEFAULT_MAX_BATCH, max_wait: float = DEFAULT_MAX_WAIT_MS / 1000,
                 on_batch: Callable[[int], None] = lambda size: None):
        if max_batch < 1 or max_wait < 0:
            raise ConfigError(f"batching: max_batch must be >= 1 and max_wait >= 0, got {max_batch} and {max_wait}")
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.on_batch = on_batch
        self._queues: dict[Hashable, deque[_Request]] = {}
        self._drains: set[asyncio.Task] = set()  # held so the loop does not collect a running drain
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")

    async def predict(self, key: Hashable, predictor: Predictor, texts: Sequence[str], top_k: int | None) -> list[dict]:
        loop = asyncio.get_running_loop()
        request = _Request(predictor, list(texts), top_k, loop.create_future())
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
                await asyncio.sleep(self.max_wait)
            while queue:
                batch = [queue.popleft()]
                size = len(batch[0].texts)
                while queue and size + len(queue[0].texts) <= self.max_batch:
                    size += len(queue[0].texts)
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
        texts = [text for request in batch for text in request.texts]
        try:
            results = await loop.run_in_executor(self._worker, run_grouped, batch[0].predictor, texts)
        except Exception as err:
            if len(batch) > 1:  # find whose texts failed: the others still get their answers
                for request in batch:
                    await self._run([request])
                return
            _settle(batch[0], exception=err)
            return
        start = 0
        for request in batch:
            mine = results[start : start + len(request.texts)]
            start += len(request.texts)
            _settle(request, result=[_top(result, request.top_k) for result in mine])


def run_grouped(predictor: Predictor, texts: list[str]) -> list[dict]:
    """predictor.predict over texts sorted by length in groups of GROUP_SIZE; results in the input order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    results: list[dict] = [{}] * len(texts)
    for start in range(0, len(order), GROUP_SIZE):
        group = order[start : start + GROUP_SIZE]
        for i, result in zip(group, predictor.predict([texts[i] for i in group]), strict=True):
            results[i] = result
    return results


def batcher_from_env(on_batch: Callable[[int], None] = lambda size: None) -> Batcher:
    """A Batcher sized by FINETUNE_SERVE_MAX_BATCH (texts) and FINETUNE_SERVE_MAX_WAIT_MS."""
    try:
        max_batch = int(os.environ.get(MAX_BATCH_ENV) or DEFAULT_MAX_BATCH)
        max_wait_ms = float(os.environ.get(MAX_WAIT_ENV) or DEFAULT_MAX_WAIT_MS)
    except ValueError as err:
        raise ConfigError(f"{MAX_BATCH_ENV} must be an integer and {MAX_WAIT_ENV} a number of milliseconds: {err}") from None
    return Batcher(max_batch, max_wait_ms / 1000, on_batch)


def _settle(request: _Request, result: list[dict] | None = None, exception: Exception | None = None) -> None:
    if request.future.done():  # the caller went away and its future was cancelled
        return
    if exception is not None:
        request.future.set_exception(exception)
    else:
        request.future.set_result(result)


def _top(result: dict, top_k: int | None) -> dict:
    """The result with its top_k highest scores: predict(texts) gives every label's, highest first."""
    if top_k is None or "scores" not in result:
        return result
    return dict(result, scores=dict(islice(result["scores"].items(), top_k)))
