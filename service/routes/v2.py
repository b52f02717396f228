"""The Open Inference Protocol (KServe V2) over HTTP, so Triton and KServe clients work unchanged.

    GET  /v2                                   server metadata
    GET  /v2/health/live, /v2/health/ready     200 when the worker is up / has its predictors
    GET  /v2/models/{name}[/versions/{v}]      model metadata (inputs, outputs, labels, image spec)
    GET  /v2/models/{name}[/versions/{v}]/ready  200 once the model is loaded (this call loads it)
    POST /v2/models/{name}[/versions/{v}]/infer

Versions are the registry's (`v3`); a bare number (`3`, as Triton clients send) means the same,
and `latest` / `production` work too. Without a version: production when set, else latest. An
infer request may choose a variant with `parameters.variant`. Tensors are decoded and encoded by
service.v2_tensors; the prediction itself is service.inference's, as for /predict.

Errors are `{"error": MESSAGE}`: 400 for a malformed request or an undecodable image (where REST
says 422), 404 for an unknown model or version, 413 for too many inputs or an image over 10 MiB,
415 for a compressed body, 503 for a stored file that failed its checksum.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from finetune_core import registry
from finetune_core.errors import FinetuneError
from finetune_core.gen_config import GENERATION_TASK
from finetune_core.gen_predict import default_generation_variant
from finetune_core.predict import DISTILLED_VARIANTS, default_variant

from .. import inference, v2_tensors
from ..context import context
from ..errors import HTTPError, status_of
from ..v2_tensors import IMAGE_INPUT, PIXELS_INPUT, TEXT_INPUT

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])

SERVER = {"name": "finetune-serve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
# Triton's platform names, by the variant a version serves when none is asked for.
PLATFORMS = {"int8": "onnxruntime_onnx", "onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch",
             "pytorch": "pytorch", "bf16": "pytorch", "distilled": "onnxruntime_onnx",
             "distilled-int8": "onnxruntime_onnx", "onnx-genai": "onnxruntime_onnx"}
V2 = inference.FrontEnd(variant_field="parameters.variant", send_texts=f"send them as {TEXT_INPUT!r} (BYTES)",
                        send_images=f"send {IMAGE_INPUT!r} (BYTES or UINT8) or {PIXELS_INPUT!r} (FP32)")


@router.get("")
def server_metadata() -> dict:
    return SERVER


@router.get("/health/live")
def live() -> dict:
    return {"live": True}


@router.get("/health/ready")
def ready(request: Request) -> JSONResponse:
    """Ready once this worker has its predictors (set when the BentoML service starts)."""
    up = getattr(request.app.state, "context", None) is not None
    return JSONResponse({"ready": up}, status_code=200 if up else 503)


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
def model_metadata(name: str, request: Request, version: str | None = None) -> JSONResponse:
    try:
        return JSONResponse(_metadata(inference.resolve(context(request), name, _ref(version))))
    except (HTTPError, FinetuneError) as err:
        return _error(err)


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(name: str, request: Request, version: str | None = None) -> JSONResponse:
    try:
        served = await inference.load(context(request), V2, inference.Target(name, _ref(version), None))
    except (HTTPError, FinetuneError) as err:
        return _error(err)
    return JSONResponse({"name": served.info.name, "version": served.info.version, "ready": True})


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request, version: str | None = None) -> Response:
    ctx = context(request)
    try:
        body, binary = v2_tensors.split_body(await request.body(), request.headers)
        inputs = v2_tensors.inputs(body, binary, ctx.metrics)
        target = inference.Target(name, _ref(version), v2_tensors.parameter(body, "variant", str))
        served, results = await inference.predict(ctx, V2, target, inputs,
                                                  check=lambda info: v2_tensors.wanted_outputs(info.manifest.model, body),
                                                  generation=v2_tensors.generation_ask(body))
    except (HTTPError, FinetuneError) as err:
        return _error(err)
    wanted = v2_tensors.wanted_outputs(served.info.manifest.model, body)
    return v2_tensors.response(served.info, results, wanted, body.get("id"))


def _ref(version: str | None) -> str | None:
    """The registry ref for a V2 version: a bare number N is vN."""
    return f"v{version}" if version is not None and version.isdigit() else version


def _metadata(info: registry.VersionInfo) -> dict:
    meta = info.manifest.model
    default = default_generation_variant(info) if meta.task == GENERATION_TASK else default_variant(info)
    parameters = {"version": info.version, "task": meta.task, "labels": meta.labels, "default_variant": default,
                  "variants": info.manifest.accepted()}
    if meta.is_image:
        # One input is declared (clients send every declared input); the other two forms are listed here.
        # A distilled student may take a smaller input than the teacher: the default variant's is declared.
        served = info.manifest.variants["distilled"].proof.get("input") if default in DISTILLED_VARIANTS else None
        size, resize = (served["image_size"], served["resize_size"]) if served else (meta.image_size, meta.resize_size)
        inputs = [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]}]
        parameters.update(image_size=size, resize_size=resize, mean=meta.mean, std=meta.std,
                          also_accepted_inputs=[{"name": IMAGE_INPUT, "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
                                                {"name": PIXELS_INPUT, "datatype": "FP32", "shape": [-1, 3, size, size]}])
    else:
        inputs = [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}]
        parameters["max_length"] = meta.max_length
    return {
        "name": info.name,
        "versions": next((m["versions"] for m in registry.list_models() if m["name"] == info.name), []),
        "platform": PLATFORMS[default],
        "inputs": inputs,
        "outputs": v2_tensors.outputs(meta),
        "parameters": parameters,
    }


def _error(err: HTTPError | FinetuneError) -> Response:
    """V2's error body; a value the service cannot use is V2's 400 where REST says 422. Escaped JSON: the message
    may quote a request's lone surrogate (JSON's `\\udcff`), which JSONResponse cannot encode."""
    status = err.status if isinstance(err, HTTPError) else status_of(err)
    message = err.message if isinstance(err, HTTPError) else str(err)
    return Response(json.dumps({"error": message}), status_code=400 if status == 422 else status,
                    media_type="application/json")
