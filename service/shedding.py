"""Load shedding: a bounded number of /predict and V2 infer requests per API worker, the rest answered 429 at once.

Each worker serves at most `max_inflight` prediction requests at a time (FINETUNE_SERVE_MAX_INFLIGHT).
One more waits, first come first served, at most `max_queue_ms` (FINETUNE_SERVE_MAX_QUEUE_MS) for a
slot; if none frees by then it is answered 429 with `Retry-After` and the `{"error", "field"}` body,
and counted in `finetune_requests_shed_total`. So under overload a request either runs with bounded
company or is refused within the wait bound: it never sits in an unbounded queue until a client or
proxy times it out, and the moment load drops every request is admitted again (no state to recover).

The waiting happens before the body is read, so a shed request costs the worker little. Other routes
(jobs, datasets, health, metrics) are never limited: probes keep answering under overload.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from .guard import _send_error
from .settings import env_name, settings

# Seconds a shed client is told to wait. A whole second: the queue a shed request met drains in far
# less (128 in flight at ~490 req/s on 2 cores is ~0.26 s), so a client that honours it finds room.
RETRY_AFTER_SECONDS = 1


def route_of(scope) -> str | None:
    """The limited route a request is for ("predict" or "v2_infer"), else None."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path = scope["path"]
    if path == "/predict":
        return "predict"
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "v2_infer"
    return None


def count_in_metrics(route: str) -> None:
    """Count a shed request in this worker's metrics (service.metrics: requests_shed), once the worker has them."""
    from .app import app

    ctx = getattr(app.state, "context", None)
    if ctx is not None:
        ctx.metrics.requests_shed.labels(route=route).inc()


class Shedding:
    """ASGI middleware: at most `limit` prediction requests in flight; a request over it waits `wait` s, then 429."""

    def __init__(self, app, limit: int | None = None, wait: float | None = None,
                 on_shed: Callable[[str], None] = count_in_metrics):
        self.app = app
        self.limit = settings().max_inflight if limit is None else limit
        self.wait = settings().max_queue_ms / 1000 if wait is None else wait
        self.on_shed = on_shed
        self.in_flight = 0
        self._waiters: deque[asyncio.Future] = deque()  # each is handed a slot by a finishing request

    async def __call__(self, scope, receive, send):
        route = route_of(scope)
        if route is None:
            return await self.app(scope, receive, send)
        if not await self._acquire():
            self.on_shed(route)
            return await _send_error(send, 429, self._overloaded(), None,
                                     extra=[(b"retry-after", str(RETRY_AFTER_SECONDS).encode())])
        try:
            await self.app(scope, receive, send)
        finally:
            self._release()

    async def _acquire(self) -> bool:
        """True with a slot held; False when none freed within the wait."""
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return True
        if self.wait <= 0:
            return False
        slot = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            await asyncio.wait_for(asyncio.shield(slot), self.wait)
            return True
        except (asyncio.TimeoutError, asyncio.CancelledError) as err:
            if slot.done() and not slot.cancelled():  # handed a slot just as the wait ended: it is ours
                if isinstance(err, asyncio.CancelledError):  # the client went away: pass the slot on
                    self._release()
                    raise
                return True
            slot.cancel()
            self._waiters.remove(slot)
            if isinstance(err, asyncio.CancelledError):
                raise
            return False

    def _release(self) -> None:
        """Hand the slot to the oldest waiter, else free it."""
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.in_flight -= 1

    def _overloaded(self) -> str:
        return (f"overloaded: this worker is already serving {self.limit} prediction requests "
                f"({env_name('max_inflight')}) and none finished within {self.wait * 1000:g} ms "
                f"({env_name('max_queue_ms')}); retry after {RETRY_AFTER_SECONDS} s")
