"""The Open Inference Protocol (KServe V2) over HTTP, so Triton and KServe clients work unchanged.

    GET  /v2                                   server metadata
    GET  /v2/health/live, /v2/health/ready     200 when the worker is up / has its predictors
    GET  /v2/models/{name}[/versions/{v}]      model metadata (below)
    GET  /v2/models/{name}[/versions/{v}]/ready  200 once the model is loaded (this call loads it)
    POST /v2/models/{name}[/versions/{v}]/infer

A text model takes one input, `text`: BYTES, shape [-1], UTF-8 texts. An image model takes one of
`image` as BYTES [-1] (encoded JPEG, PNG...; base64 strings in JSON `data`), `image` as UINT8
[N, H, W, 3] (RGB pixels, resized, cropped and normalised like a decoded image) or `pixel_values`
as FP32 [N, 3, S, S] (already preprocessed: the metadata's parameters give S, mean and std). A
classifier answers `label` (BYTES [-1], the top label per input) and `probabilities` (FP32
[-1, num_labels], softmax in the order of the metadata's `parameters.labels`); a regression model
answers `value` (FP32 [-1]).
Versions are the registry's (`v3`); a bare number (`3`, as Triton clients send) means the same,
and `latest` / `production` work too. Without a version: production when set, else latest. An
infer request may choose a variant with `parameters.variant`.

Tensors travel as JSON `data` or, with the binary tensor data extension (tritonclient's default),
after the JSON: the request's `Inference-Header-Content-Length` header gives the JSON's length and
each input's `parameters.binary_data_size` its bytes (BYTES elements: 4-byte little-endian length,
then the bytes). Outputs are binary when `parameters.binary_data_output` (request) or
`parameters.binary_data` (output) is true. Compressed bodies and the classification extension
are refused with a message.

Errors are `{"error": MESSAGE}`: 400 for a malformed request or an undecodable image, 404 for an
unknown model or version, 413 for too many inputs or an image over 10 MiB, 415 for a compressed body. The body is parsed here rather than by pydantic
because a binary request is not JSON.
"""

from __future__ import annotations

import json
import math
import struct
import time

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from finetune_core import registry
from finetune_core.errors import FinetuneError
from finetune_core.model import META_FILE
from finetune_core.predict import DEFAULT_ORDER

from .batching import batcher_from_env
from .image_inputs import BadImage, decode, is_image_model
from .schemas import MAX_PREDICT_INPUTS

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])

SERVER = {"name": "finetune-serve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
TEXT_INPUT, IMAGE_INPUT, PIXELS_INPUT = "text", "image", "pixel_values"
HEADER_LENGTH = "Inference-Header-Content-Length"
# Triton's platform names, by the variant a version serves when none is asked for.
PLATFORMS = {"int8": "onnxruntime_onnx", "onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch",
             "pytorch": "pytorch", "bf16": "pytorch"}
# Nesting allowed in an input's JSON `data` (a [-1] or [-1, 1] tensor needs at most 2).
MAX_DATA_DEPTH = 8


class V2Error(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------- server


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


# ---------------------------------------------------------------- models


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
def model_metadata(name: str, version: str | None = None) -> JSONResponse:
    try:
        info = _resolve(name, version)
        return JSONResponse(_metadata(info))
    except (V2Error, FinetuneError) as err:
        return _error(err)


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(name: str, request: Request, version: str | None = None) -> JSONResponse:
    try:
        info, _ = await _predictor(request, name, version, None)
        return JSONResponse({"name": info.name, "version": info.version, "ready": True})
    except (V2Error, FinetuneError) as err:
        return _error(err)


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request, version: str | None = None) -> Response:
    ctx = request.app.state.context
    started = time.perf_counter()
    try:
        body, binary = _split_body(await request.body(), request.headers)
        tensor = _input(body, binary)
        outputs = _requested_outputs(body)
        variant = _parameter(body, "variant", str)
        info, predictor = await _predictor(request, name, version, variant)
        names = [output["name"] for output in _outputs(info.manifest)]
        wanted = outputs if outputs is not None else dict.fromkeys(names, _parameter(body, "binary_data_output", bool))
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise V2Error(400, f"outputs: {info.ref} has no output {unknown[0]!r}; it has {', '.join(names)}")
        if is_image_model(predictor.meta):
            inputs, source = await _images(ctx, predictor, tensor, binary)
        else:
            inputs, source = _texts(info, tensor, binary), None
    except (V2Error, FinetuneError) as err:
        return _error(err)
    model_label = ctx.metrics.model_label(info.name)
    try:
        results = await _batcher(request).predict((info.name, info.version, variant), predictor, inputs, None)
    except FinetuneError as err:
        ctx.metrics.predictions.labels(model=model_label, variant=predictor.variant, outcome="error").inc()
        return _error(err)
    ctx.metrics.predictions.labels(model=model_label, variant=predictor.variant, outcome="ok").inc()
    ctx.metrics.prediction_latency.labels(variant=predictor.variant).observe(time.perf_counter() - started)
    ctx.metrics.prediction_batch.observe(len(inputs))
    if source is not None:
        ctx.metrics.images_predicted.labels(input=source).inc(len(inputs))
    return _response(info, _output_tensors(info, results), wanted, body.get("id"))


# ---------------------------------------------------------------- models: helpers


def _ref(name: str, version: str | None) -> str | None:
    """The registry ref for a V2 version: a bare number N is vN. ConfigError (400) for a malformed one."""
    ref = f"v{version}" if version is not None and version.isdigit() else version
    registry.parse_ref(f"{name}:{ref}" if ref else name)
    return ref


def _resolve(name: str, version: str | None) -> registry.VersionInfo:
    """Unknown model or version: NotFoundError (404)."""
    return registry.resolve(name, _ref(name, version))


def _metadata(info: registry.VersionInfo) -> dict:
    manifest = info.manifest
    accepted = [v for v in DEFAULT_ORDER if manifest["variants"].get(v, {}).get("accepted")]
    parameters = {"version": info.version, "task": manifest["task"], "labels": manifest["labels"],
                  "default_variant": accepted[0] if accepted else "pytorch"}
    if is_image_model(manifest):
        # One input is declared (clients send every declared input); the other two forms are listed here.
        meta = json.loads((registry.model_dir(info) / META_FILE).read_text())
        size = meta["image_size"]
        inputs = [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]}]
        parameters.update(image_size=size, resize_size=meta["resize_size"], mean=meta["mean"], std=meta["std"],
                          also_accepted_inputs=[{"name": IMAGE_INPUT, "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
                                                {"name": PIXELS_INPUT, "datatype": "FP32", "shape": [-1, 3, size, size]}])
    else:
        inputs = [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}]
        parameters["max_length"] = manifest["max_length"]
    return {
        "name": info.name,
        "versions": next((m["versions"] for m in registry.list_models() if m["name"] == info.name), []),
        "platform": PLATFORMS[accepted[0]] if accepted else "pytorch",
        "inputs": inputs,
        "outputs": _outputs(manifest),
        "parameters": parameters,
    }


def _outputs(manifest: dict) -> list[dict]:
    if manifest["task"].endswith("regression"):
        return [{"name": "value", "datatype": "FP32", "shape": [-1]}]
    return [{"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(manifest["labels"])]}]


async def _predictor(request: Request, name: str, version: str | None, variant: str | None):
    """(version info, loaded predictor); loading (seconds) happens off the event loop.

    An alias (no version, latest, production) goes to Predictors as such, so after a promotion the
    old version keeps answering until the new one is loaded, as for /predict.
    """
    ref = _ref(name, version)
    predictors = request.app.state.context.predictors
    predictors.resolve(name, ref)  # an unknown model or version: NotFoundError (404), before any variant error
    try:
        return (predictors.get_if_loaded(name, ref, variant)
                or await run_in_threadpool(predictors.get, name, ref, variant))
    except (registry.NotFoundError, registry.RegistryError) as err:
        raise V2Error(400, f"parameters.variant: {err}") from None


def _batcher(request: Request):
    """The worker's one Batcher, shared with /predict so both fill the same forward passes."""
    state = request.app.state
    if getattr(state, "batcher", None) is None:
        state.batcher = batcher_from_env(on_batch=state.context.metrics.inference_batch.observe)
    return state.batcher


# ---------------------------------------------------------------- request decoding


def _split_body(raw: bytes, headers) -> tuple[dict, bytes]:
    """The JSON header as a dict, and the binary tensor data after it (b"" for a JSON-only body)."""
    encoding = headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise V2Error(415, f"Content-Encoding {encoding!r} is not supported; send the request uncompressed")
    length = headers.get(HEADER_LENGTH)
    if length is None:
        length_n = len(raw)
    elif not length.isdigit() or int(length) > len(raw):
        raise V2Error(400, f"{HEADER_LENGTH}: {length!r} is not a length within the {len(raw)}-byte body")
    else:
        length_n = int(length)
    try:
        body = json.loads(raw[:length_n])
    except ValueError as err:
        raise V2Error(400, f"body: not valid JSON ({err}); send an inference request object "
                           '{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [N], "data": [...]}]}') from None
    if not isinstance(body, dict):
        raise V2Error(400, "body: must be a JSON object with an 'inputs' list")
    return body, raw[length_n:]


def _input(body: dict, binary: bytes) -> dict:
    """The request's one input tensor, its shape checked and its binary data (if any) accounted for."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise V2Error(400, f"inputs: give exactly one input: {TEXT_INPUT!r} (BYTES, shape [N]) for a text model; "
                           f"{IMAGE_INPUT!r} (BYTES or UINT8) or {PIXELS_INPUT!r} (FP32) for an image model "
                           "(GET /v2/models/NAME says which)")
    tensor = inputs[0]
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise V2Error(400, "inputs[0].shape: give a list of non-negative integers, e.g. [3] for three texts")
    size = _parameters(tensor, "inputs[0].parameters").get("binary_data_size")
    if size is not None and (type(size) is not int or size != len(binary)):
        raise V2Error(400, f"inputs[0].parameters.binary_data_size: {size!r}, but {len(binary)} bytes follow the "
                           f"JSON ({HEADER_LENGTH} tells where the JSON ends)")
    if size is None and "data" not in tensor:
        raise V2Error(400, "inputs[0]: give the tensor as 'data' (a list) or as binary tensor data")
    return tensor


def _texts(info: registry.VersionInfo, tensor: dict, binary: bytes) -> list[str]:
    if tensor.get("name") != TEXT_INPUT or tensor.get("datatype") != "BYTES":
        raise V2Error(400, f"inputs[0]: {info.ref} is a text model: expected name {TEXT_INPUT!r} and datatype 'BYTES', "
                           f"got {str(tensor.get('name'))[:40]!r} and {str(tensor.get('datatype'))[:20]!r}")
    if "binary_data_size" in _parameters(tensor, "inputs[0].parameters"):
        elements = [_decode_utf8(e) for e in _bytes_elements(binary)]
    else:
        elements = _flatten(tensor["data"], MAX_DATA_DEPTH)
    _check_elements(tensor["shape"], len(elements), "texts")
    return elements


async def _images(ctx, predictor, tensor: dict, binary: bytes) -> tuple[np.ndarray, str]:
    """pixel_values for an image model's input, and the input kind for metrics (v2_bytes, v2_uint8, v2_fp32).

    BYTES: encoded images (base64 strings in JSON `data`); UINT8 [N, H, W, 3]: RGB pixels, resized and
    normalised like a decoded image; FP32 [N, 3, S, S]: pixel_values already preprocessed.
    """
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor["shape"]
    wanted = {"BYTES": IMAGE_INPUT, "UINT8": IMAGE_INPUT, "FP32": PIXELS_INPUT}
    if datatype not in wanted or name != wanted[datatype]:
        raise V2Error(400, f"inputs[0]: an image model takes {IMAGE_INPUT!r} as BYTES (encoded images, shape [N]) or "
                           f"UINT8 (RGB, shape [N, H, W, 3]), or {PIXELS_INPUT!r} as FP32 (shape [N, 3, S, S]); got "
                           f"{str(name)[:40]!r} as {str(datatype)[:20]!r}")
    as_binary = "binary_data_size" in _parameters(tensor, "inputs[0].parameters")
    try:
        if datatype in ("BYTES", "UINT8"):
            if datatype == "BYTES":  # encoded images: raw in binary data, base64 text in JSON
                images = _bytes_elements(binary) if as_binary else _flatten(tensor["data"], MAX_DATA_DEPTH)
                _check_elements(shape, len(images), "images")
            else:
                if len(shape) != 4 or shape[3] != 3 or not shape[1] or not shape[2]:
                    raise V2Error(400, f"inputs[0].shape: UINT8 images are [N, H, W, 3] (RGB), got {shape}")
                _check_rows(shape[0], "images")
                images = list(_numbers(tensor, binary, as_binary, np.uint8, shape))
            pixels, seconds = await run_in_threadpool(decode, predictor, images, datatype == "BYTES" and not as_binary,
                                                      ctx.metrics.image_bytes.observe)
            ctx.metrics.image_decode_seconds.observe(seconds)
            return pixels, f"v2_{datatype.lower()}"
        size = predictor.meta["image_size"]
        if len(shape) != 4 or shape[1:] != [3, size, size]:
            raise V2Error(400, f"inputs[0].shape: {PIXELS_INPUT!r} for this model is [N, 3, {size}, {size}] "
                               f"(normalised like GET /v2/models/NAME's parameters say), got {shape}")
        _check_rows(shape[0], "images")
        array = _numbers(tensor, binary, as_binary, np.float32, shape)
        if not np.isfinite(array).all():
            raise V2Error(400, f"inputs[0]: {PIXELS_INPUT!r} holds NaN or infinite values")
        return array, "v2_fp32"
    except BadImage as err:
        ctx.metrics.image_decode_failures.labels(reason=err.reason).inc()
        raise V2Error(413 if err.reason == "too_large" else 400, f"inputs[0]: image {err.index}: {err.message}") from None
    except V2Error:
        ctx.metrics.image_decode_failures.labels(reason="tensor").inc()
        raise


def _numbers(tensor: dict, binary: bytes, as_binary: bool, dtype, shape: list[int]) -> np.ndarray:
    """A UINT8 or FP32 tensor from binary data (little-endian) or JSON `data`, in its declared shape."""
    count = math.prod(shape)
    if as_binary:
        itemsize = np.dtype(dtype).itemsize
        if len(binary) != count * itemsize:
            raise V2Error(400, f"inputs[0]: shape {shape} needs {count * itemsize} bytes of {np.dtype(dtype).name}; "
                               f"{len(binary)} were sent")
        return np.frombuffer(binary, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)
    try:
        values = np.asarray(_flatten_numbers(tensor["data"], MAX_DATA_DEPTH), dtype=np.float64)
    except (TypeError, ValueError):
        raise V2Error(400, "inputs[0].data: must be a list of numbers") from None
    if values.size != count:
        raise V2Error(400, f"inputs[0]: shape {shape} holds {count} values but {values.size} were sent")
    if dtype == np.uint8 and not ((values >= 0) & (values <= 255) & (values == np.floor(values))).all():
        raise V2Error(400, "inputs[0].data: UINT8 values are whole numbers from 0 to 255")
    return values.astype(dtype).reshape(shape)


def _check_elements(shape: list[int], count: int, what: str) -> None:
    """BYTES elements (texts or encoded images) against the shape, then the row limits."""
    if count != math.prod(shape):
        raise V2Error(400, f"inputs[0]: shape {shape} holds {math.prod(shape)} {what} but {count} were sent")
    _check_rows(count, what)


def _check_rows(rows: int, what: str) -> None:
    if not rows:
        raise V2Error(400, f"inputs[0]: give at least one of the {what}")
    if rows > MAX_PREDICT_INPUTS:
        raise V2Error(413, f"inputs[0]: {rows} {what}; at most {MAX_PREDICT_INPUTS} per request")


def _flatten_numbers(data, depth: int) -> list:
    if not isinstance(data, list):
        return [data]
    if depth == 0:
        raise V2Error(400, f"inputs[0].data: nested deeper than {MAX_DATA_DEPTH} lists")
    return [value for item in data for value in _flatten_numbers(item, depth - 1)]


def _flatten(data, depth: int) -> list[str]:
    if isinstance(data, str):
        return [data]
    if not isinstance(data, list) or depth == 0:
        raise V2Error(400, f"inputs[0].data: must be a list of strings (got {type(data).__name__})")
    return [text for item in data for text in _flatten(item, depth - 1)]


def _bytes_elements(buffer: bytes) -> list[bytes]:
    """Triton's BYTES serialisation: each element a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise V2Error(400, f"inputs[0]: binary data ends inside an element's length prefix at byte {offset}")
        (size,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + size > len(buffer):
            raise V2Error(400, f"inputs[0]: binary element at byte {offset - 4} says {size} bytes; "
                               f"only {len(buffer) - offset} remain")
        elements.append(buffer[offset : offset + size])
        offset += size
    return elements


def _decode_utf8(element: bytes) -> str:
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError as err:
        raise V2Error(400, f"inputs[0]: a text is not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _requested_outputs(body: dict) -> dict[str, bool] | None:
    """{output name: as binary} for the outputs asked for; None when the request names none (all)."""
    outputs = body.get("outputs")
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise V2Error(400, "outputs: must be a list of objects with a 'name'")
    default = _parameter(body, "binary_data_output", bool)
    wanted = {}
    for output in outputs:
        parameters = _parameters(output, f"outputs[{output['name'][:40]!r}].parameters")
        if parameters.get("classification"):
            raise V2Error(400, f"outputs: the classification extension is not supported; ask for "
                               f"'label' and 'probabilities' instead of {output['name']!r} with class_count")
        binary = parameters.get("binary_data", default)
        wanted[output["name"]] = bool(binary)
    return wanted


def _parameters(holder: dict, where: str) -> dict:
    parameters = holder.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise V2Error(400, f"{where}: must be an object of parameters")
    return parameters


def _parameter(body: dict, name: str, kind: type):
    value = _parameters(body, "parameters").get(name)
    if value is not None and not isinstance(value, kind):
        raise V2Error(400, f"parameters.{name}: must be a {kind.__name__}, got {value!r:.40}")
    return value if value is not None else (False if kind is bool else None)


# ---------------------------------------------------------------- response encoding


def _output_tensors(info: registry.VersionInfo, results: list[dict]) -> dict[str, tuple[str, np.ndarray]]:
    if info.manifest["task"].endswith("regression"):
        return {"value": ("FP32", np.array([r["value"] for r in results], dtype=np.float32))}
    labels = info.manifest["labels"]
    probabilities = np.array([[r["scores"][label] for label in labels] for r in results], dtype=np.float32)
    return {"label": ("BYTES", np.array([r["label"] for r in results], dtype=object)),
            "probabilities": ("FP32", probabilities)}


def _response(info: registry.VersionInfo, tensors: dict[str, tuple[str, np.ndarray]], wanted: dict[str, bool],
              request_id) -> Response:
    """V2 JSON, or JSON then binary tensors (with Inference-Header-Content-Length) when any output is binary."""
    header = {"model_name": info.name, "model_version": info.version, "outputs": []}
    if request_id is not None:
        header["id"] = request_id
    chunks = []
    for name, as_binary in wanted.items():
        datatype, array = tensors[name]
        tensor = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if as_binary:
            chunks.append(_encode_binary(datatype, array))
            tensor["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            tensor["data"] = array.reshape(-1).tolist()
        header["outputs"].append(tensor)
    encoded = json.dumps(header).encode()
    if not chunks:
        return Response(encoded, media_type="application/json")
    return Response(encoded + b"".join(chunks), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(encoded))})


def _encode_binary(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        encoded = [str(item).encode() for item in array.reshape(-1)]
        return b"".join(struct.pack("<I", len(item)) + item for item in encoded)
    return array.astype("<f4").tobytes()


def _error(err: Exception) -> JSONResponse:
    if isinstance(err, V2Error):
        status = err.status
    elif isinstance(err, registry.NotFoundError):
        status = 404
    elif isinstance(err, registry.IntegrityError):
        status = 503  # our stored file is damaged: not the caller's fault
    else:
        status = 400
    return JSONResponse({"error": getattr(err, "message", None) or str(err)}, status_code=status)
