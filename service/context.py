"""What every route of one API worker shares, made once when the BentoML service starts (service.bento)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request

from .batching import Batcher
from .jobs import JobStore
from .metrics import Metrics
from .predictors import Predictors


@dataclass
class Context:
    store: JobStore
    predictors: Predictors
    metrics: Metrics
    batcher: Batcher  # one per worker: /predict and V2 infer fill the same forward passes
    wake_trainer: Callable[[], Awaitable[None]]


def context(request: Request) -> Context:
    return request.app.state.context
