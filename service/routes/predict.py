"""POST /predict and POST /evaluate: a registered model on texts or images.

/predict decodes its request (service.predict_inputs) and makes the one call every front end makes,
service.inference.predict; concurrent requests for one version and variant share forward passes.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from finetune_core.gen_predict import GenerationPredictor

from .. import datasets, inference, predict_inputs
from ..context import context
from ..errors import FieldError
from ..evaluation import evaluate_dataset
from ..generation import evaluate_generation, stream
from ..schemas import EvaluateRequest, PredictRequest

router = APIRouter(tags=["predict"])

REST = inference.FrontEnd(variant_field="variant", send_texts="send them as inputs",
                          send_images="send them base64-encoded as images, or as multipart files")


@router.post("/predict", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": PredictRequest.model_json_schema()},
    "multipart/form-data": {"schema": predict_inputs.MULTIPART_SCHEMA}}}})
async def predict(request: Request) -> dict:
    """Texts (`inputs`) or base64 images (`images`) as JSON, or image `files` as multipart/form-data; prompts
    (`inputs`) and the generation fields for a text-generation model."""
    ctx = context(request)
    body, inputs = await predict_inputs.read(request, ctx.metrics)
    if body.stream:
        served = await inference.load(ctx, REST, inference.Target(body.model, body.version, body.variant))
        model = ctx.metrics.model_label(served.info.name)
        events = await stream(served, inputs, body.sampling(), body.top_k, ctx.metrics, model)
        ctx.metrics.predictions.labels(model=model, variant=served.predictor.variant, outcome="ok").inc()
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
    served, predictions = await inference.predict(ctx, REST, inference.Target(body.model, body.version, body.variant),
                                                  inputs, body.top_k,
                                                  generation=inference.GenerationAsk(body.sampling(), body.generation_fields()))
    return {"model": {"name": served.info.name, "version": served.info.version}, "variant": served.predictor.variant,
            "predictions": predictions}


@router.post("/evaluate")
async def evaluate(body: EvaluateRequest, request: Request) -> dict:
    stored = await run_in_threadpool(datasets.lookup, body.data, "data")
    served = await inference.load(context(request), REST, inference.Target(body.model, body.version, body.variant))
    info, predictor = served.info, served.predictor
    if isinstance(predictor, GenerationPredictor):
        if stored.kind != datasets.TABLE:
            raise FieldError("data", f"data: '{body.data}' is an image dataset; {info.ref} is a text-generation model "
                                     "and is evaluated on a table of prompts and completions")
        meta = predictor.meta
        prompt = body.text_column if "text_column" in body.model_fields_set else meta.text_column
        figures = await run_in_threadpool(evaluate_generation, info, predictor, stored, prompt,
                                          body.label_column or meta.label_column)
        return {"model": {"name": info.name, "version": info.version}, "variant": predictor.variant, **figures}
    if predictor.meta.is_image != (stored.kind in datasets.IMAGE_KINDS):
        model = "an image model" if predictor.meta.is_image else "a text model"
        wants = "a zip of images" if predictor.meta.is_image else "a table (JSONL, CSV, TSV, Parquet)"
        raise FieldError("data", f"data: '{body.data}' is {'a table' if stored.kind == datasets.TABLE else 'an image dataset'}; "
                                 f"{info.ref} is {model} ({predictor.meta.task}) and is evaluated on {wants}")
    figures = await run_in_threadpool(evaluate_dataset, info, predictor, stored, body.text_column, body.image_column,
                                      body.label_column)
    return {"model": {"name": info.name, "version": info.version}, "variant": predictor.variant, **figures}
