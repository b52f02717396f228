"""One path from a decoded prediction request to its answers, shared by REST /predict and V2 infer.

A front end decodes its request into a Target (which model) and Inputs (texts, images or pixel
values), calls `predict` once and encodes what comes back. Here, once for both: the name, version
and variant are validated and resolved (404 for an unknown model or version, 422 naming the field
for a bad name or a variant the version cannot serve) off the event loop, as is the predictor's load,
the inputs are checked against the model's kind, images are decoded in a thread-pool thread,
concurrent requests share forward passes through the worker's Batcher, and the prediction metrics
are recorded. Errors are HTTPError or core errors (status from service.errors.status_of).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from fastapi.concurrency import run_in_threadpool

from finetune_core import registry
from finetune_core.errors import ConfigError
from finetune_core.gen_predict import GenerationPredictor, Sampling
from finetune_core.predict import Predictor

from .context import Context
from .errors import FieldError, HTTPError
from .generation import generate, refuse_generation_fields
from .image_inputs import BadImage, decode
from .metrics import Metrics


@dataclass(frozen=True)
class FrontEnd:
    """What differs between the front ends' errors: where the variant is asked for, how inputs are sent."""

    variant_field: str
    send_texts: str
    send_images: str


@dataclass(frozen=True)
class Target:
    name: str | None  # None: the only registered model
    version: str | None  # vN, latest, production; None: production, else latest
    variant: str | None  # None: the fastest accepted one


@dataclass(frozen=True)
class Texts:
    texts: list[str]
    field: str  # the request field that holds them, for errors


@dataclass(frozen=True)
class Images:
    """Encoded images (bytes, or base64 text) or HxWx3 uint8 RGB arrays, to decode for the model."""

    images: list
    base64_text: bool
    source: str  # metrics label: base64, multipart, v2_bytes, v2_uint8
    field: str


@dataclass(frozen=True)
class Pixels:
    """pixel_values already preprocessed by the client: (rows, 3, S, S) float32."""

    values: np.ndarray
    field: str
    source: str = "v2_fp32"


Inputs = Texts | Images | Pixels


@dataclass(frozen=True)
class GenerationAsk:
    """The generation settings a request sent (None: none were) and the fields that carried them, as the
    front end names them (`temperature`, `parameters.temperature`), to name one a classifier refuses."""

    sampling: Sampling | None
    fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class Served:
    info: registry.VersionInfo
    predictor: Predictor


async def predict(ctx: Context, front: FrontEnd, target: Target, inputs: Inputs, top_k: int | None = None,
                  check: Callable[[registry.VersionInfo], None] = lambda info: None,
                  generation: GenerationAsk | None = None) -> tuple[Served, list[dict]]:
    """(what served the request, one result per input); `check` vets the request against the version first.
    A text-generation model generates (service.generation) with `generation`'s settings."""
    started = time.perf_counter()
    model, variant = "none", "default"  # metrics labels until the predictor is known
    try:
        served = await load(ctx, front, target)
        model, variant = ctx.metrics.model_label(served.info.name), served.predictor.variant
        check(served.info)
        if isinstance(served.predictor, GenerationPredictor):
            results = await generate(served, inputs, generation.sampling if generation else None, top_k, ctx.metrics,
                                     model)
        else:
            if generation is not None and generation.fields:
                refuse_generation_fields(generation.fields[0], served.info.ref)
            ready = await _model_inputs(ctx, front, served, inputs)
            key = (served.info.name, served.info.version, target.variant)
            results = await ctx.batcher.predict(key, served.predictor, ready, top_k)
    except Exception:
        ctx.metrics.predictions.labels(model=model, variant=variant, outcome="error").inc()
        raise
    ctx.metrics.predictions.labels(model=model, variant=variant, outcome="ok").inc()
    ctx.metrics.prediction_latency.labels(variant=variant).observe(time.perf_counter() - started)
    ctx.metrics.prediction_batch.observe(len(results))
    if not isinstance(inputs, Texts):
        ctx.metrics.images_predicted.labels(input=inputs.source).inc(len(results))
    return served, results


async def load(ctx: Context, front: FrontEnd, target: Target) -> Served:
    """The loaded predictor for the target, from memory when a recent request resolved it; otherwise the
    registry reads (the default model, the version) and the load (seconds) happen in a thread-pool thread.

    An alias (no version, latest, production) goes to Predictors as such, so after a promotion the
    old version keeps answering until the new one is loaded.
    """
    found = (ctx.predictors.get_cached(target.name, target.version, target.variant)
             or await run_in_threadpool(_get, ctx, front, target))
    ctx.metrics.models_loaded.set(len(ctx.predictors.loaded()))
    return Served(*found)


def _get(ctx: Context, front: FrontEnd, target: Target) -> tuple[registry.VersionInfo, Predictor]:
    """Blocking: reads the registry and may wait for a load."""
    name = target.name or ctx.predictors.default_name()
    resolve(ctx, name, target.version)  # an unknown model or version: 404, before any variant error
    try:
        return ctx.predictors.get(name, target.version, target.variant)
    except (registry.NotFoundError, registry.RegistryError) as err:
        raise FieldError(front.variant_field, f"{front.variant_field}: {err}") from None


def resolve(ctx: Context, name: str, version: str | None) -> registry.VersionInfo:
    """The version a name and version resolve to: a malformed one names its field, an unknown one is a 404."""
    try:
        registry.validate_name(name)
    except ConfigError as err:
        raise FieldError("model", f"model: {err}") from None
    if version:
        try:
            registry.parse_ref(f"{name}:{version}")
        except ConfigError as err:
            raise FieldError("version", f"version: {err}") from None
    return ctx.predictors.resolve(name, version)


def bad_image(metrics: Metrics, err: BadImage, field: str) -> HTTPError:
    """A request image the service cannot use, counted and named by its position (`images[3]`)."""
    metrics.image_decode_failures.labels(reason=err.reason).inc()
    where = f"{field}[{err.index}]"
    return HTTPError(413 if err.reason == "too_large" else 422, f"{where}: {err.message}", where)


async def _model_inputs(ctx: Context, front: FrontEnd, served: Served, inputs: Inputs) -> list[str] | np.ndarray:
    """Texts for a text model, pixel_values for an image model: otherwise the field that was sent is at fault."""
    meta, ref = served.predictor.meta, served.info.ref
    if isinstance(inputs, Texts):
        if meta.is_image:
            raise HTTPError(422, f"{inputs.field}: {ref} is an image model ({meta.task}) and takes images, not texts: "
                                 f"{front.send_images}", inputs.field)
        return inputs.texts
    if not meta.is_image:
        raise HTTPError(422, f"{inputs.field}: {ref} is a text model ({meta.task}) and takes texts, not images: "
                             f"{front.send_texts}", inputs.field)
    if isinstance(inputs, Pixels):
        size = meta.image_size
        if inputs.values.shape[1:] != (3, size, size):
            ctx.metrics.image_decode_failures.labels(reason="tensor").inc()
            raise HTTPError(422, f"{inputs.field}.shape: pixel_values for {ref} are [N, 3, {size}, {size}] (normalised "
                                 f"as its metadata says), got {list(inputs.values.shape)}", inputs.field)
        return inputs.values
    try:  # in a thread-pool thread: the batcher's worker then only runs the model
        pixels, seconds = await run_in_threadpool(decode, served.predictor, inputs.images, inputs.base64_text,
                                                  ctx.metrics.image_bytes.observe)
    except BadImage as err:
        raise bad_image(ctx.metrics, err, inputs.field) from None
    ctx.metrics.image_decode_seconds.observe(seconds)
    return pixels
