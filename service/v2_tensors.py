"""The Open Inference Protocol's (KServe V2) wire format: an infer request in, an infer response out.

A text model takes one input, `text`: BYTES, shape [-1], UTF-8 texts. An image model takes one of
`image` as BYTES [-1] (encoded JPEG, PNG...; base64 strings in JSON `data`), `image` as UINT8
[N, H, W, 3] (RGB pixels, resized, cropped and normalised like a decoded image) or `pixel_values`
as FP32 [N, 3, S, S] (already preprocessed: the metadata's parameters give S, mean and std). A
classifier answers `label` (BYTES [-1], the top label per input) and `probabilities` (FP32
[-1, num_labels], softmax in the order of the metadata's `parameters.labels`); a regression model
answers `value` (FP32 [-1]).

Tensors travel as JSON `data` or, with the binary tensor data extension (tritonclient's default),
after the JSON: the request's `Inference-Header-Content-Length` header gives the JSON's length and
each input's `parameters.binary_data_size` its bytes (BYTES elements: 4-byte little-endian length,
then the bytes). Outputs are binary when `parameters.binary_data_output` (request) or
`parameters.binary_data` (output) is true. Compressed bodies and the classification extension
are refused with a message. The body is parsed here rather than by pydantic because a binary
request is not JSON.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
from fastapi.responses import Response

from pydantic import ValidationError

from finetune_core import registry
from finetune_core.gen_config import GENERATION_TASK
from finetune_core.metadata import ModelMeta

from .errors import HTTPError
from .inference import GenerationAsk, Images, Inputs, Pixels, Texts
from .metrics import Metrics
from .schemas import GENERATION_FIELDS, MAX_PREDICT_INPUTS, PredictRequest

TEXT_INPUT, IMAGE_INPUT, PIXELS_INPUT = "text", "image", "pixel_values"
FIELD = "inputs[0]"
HEADER_LENGTH = "Inference-Header-Content-Length"
# Nesting allowed in an input's JSON `data` (a [-1] or [-1, 1] tensor needs at most 2).
MAX_DATA_DEPTH = 8


def split_body(raw: bytes, headers) -> tuple[dict, bytes]:
    """The JSON header as a dict, and the binary tensor data after it (b"" for a JSON-only body)."""
    encoding = headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise HTTPError(415, f"Content-Encoding {encoding!r} is not supported; send the request uncompressed")
    length = headers.get(HEADER_LENGTH)
    if length is None:
        length_n = len(raw)
    elif not length.isdigit() or int(length) > len(raw):
        raise HTTPError(400, f"{HEADER_LENGTH}: {length!r} is not a length within the {len(raw)}-byte body")
    else:
        length_n = int(length)
    try:
        body = json.loads(raw[:length_n])
    except (ValueError, RecursionError) as err:  # RecursionError: arrays nested past Python's limit
        raise HTTPError(400, f"body: not valid JSON ({err}); send an inference request object "
                           '{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [N], "data": [...]}]}') from None
    if not isinstance(body, dict):
        raise HTTPError(400, "body: must be a JSON object with an 'inputs' list")
    return body, raw[length_n:]


def _input(body: dict, binary: bytes) -> dict:
    """The request's one input tensor, its shape checked and its binary data (if any) accounted for."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise HTTPError(400, f"inputs: give exactly one input: {TEXT_INPUT!r} (BYTES, shape [N]) for a text model; "
                           f"{IMAGE_INPUT!r} (BYTES or UINT8) or {PIXELS_INPUT!r} (FP32) for an image model "
                           "(GET /v2/models/NAME says which)")
    tensor = inputs[0]
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise HTTPError(400, "inputs[0].shape: give a list of non-negative integers, e.g. [3] for three texts")
    size = _parameters(tensor, "inputs[0].parameters").get("binary_data_size")
    if size is not None and (type(size) is not int or size != len(binary)):
        raise HTTPError(400, f"inputs[0].parameters.binary_data_size: {size!r}, but {len(binary)} bytes follow the "
                           f"JSON ({HEADER_LENGTH} tells where the JSON ends)")
    if size is None and "data" not in tensor:
        raise HTTPError(400, "inputs[0]: give the tensor as 'data' (a list) or as binary tensor data")
    return tensor


def inputs(body: dict, binary: bytes, metrics: Metrics) -> Inputs:
    """The request's one input tensor as the shared path's Inputs: texts, encoded or raw images, or pixel_values.

    A malformed image tensor counts as a decode failure (reason `tensor`).
    """
    tensor = _input(body, binary)
    kind = (tensor.get("name"), tensor.get("datatype"))
    if kind == (TEXT_INPUT, "BYTES"):
        return Texts(_texts(tensor, binary), FIELD)
    if kind not in ((IMAGE_INPUT, "BYTES"), (IMAGE_INPUT, "UINT8"), (PIXELS_INPUT, "FP32")):
        raise HTTPError(400, f"{FIELD}: a text model takes {TEXT_INPUT!r} as BYTES (texts, shape [N]); an image model "
                             f"takes {IMAGE_INPUT!r} as BYTES (encoded images, shape [N]) or UINT8 (RGB, shape "
                             f"[N, H, W, 3]), or {PIXELS_INPUT!r} as FP32 (shape [N, 3, S, S]); got "
                             f"{str(kind[0])[:40]!r} as {str(kind[1])[:20]!r} (GET /v2/models/NAME says which)")
    try:
        return _images(tensor, binary)
    except HTTPError:
        metrics.image_decode_failures.labels(reason="tensor").inc()
        raise


def _texts(tensor: dict, binary: bytes) -> list[str]:
    if "binary_data_size" in _parameters(tensor, "inputs[0].parameters"):
        elements = [_decode_utf8(e) for e in _bytes_elements(binary)]
    else:
        elements = [_encodable(text) for text in _flatten(tensor["data"], MAX_DATA_DEPTH)]
    _check_elements(tensor["shape"], len(elements), "texts")
    return elements


def _images(tensor: dict, binary: bytes) -> Images | Pixels:
    """BYTES: encoded images (base64 strings in JSON `data`); UINT8 [N, H, W, 3]: RGB pixels, resized and
    normalised like a decoded image; FP32 [N, 3, S, S]: pixel_values already preprocessed.
    """
    datatype, shape = tensor["datatype"], tensor["shape"]
    as_binary = "binary_data_size" in _parameters(tensor, "inputs[0].parameters")
    if datatype == "BYTES":  # encoded images: raw in binary data, base64 text in JSON
        images = _bytes_elements(binary) if as_binary else _flatten(tensor["data"], MAX_DATA_DEPTH)
        _check_elements(shape, len(images), "images")
        return Images(images, base64_text=not as_binary, source="v2_bytes", field=FIELD)
    if datatype == "UINT8":
        if len(shape) != 4 or shape[3] != 3 or not shape[1] or not shape[2]:
            raise HTTPError(400, f"inputs[0].shape: UINT8 images are [N, H, W, 3] (RGB), got {shape}")
        _check_rows(shape[0], "images")
        return Images(list(_numbers(tensor, binary, as_binary, np.uint8, shape)), base64_text=False, source="v2_uint8",
                      field=FIELD)
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]:
        raise HTTPError(400, f"inputs[0].shape: {PIXELS_INPUT!r} is [N, 3, S, S] with S the model's image_size "
                             f"(GET /v2/models/NAME's parameters), got {shape}")
    _check_rows(shape[0], "images")
    array = _numbers(tensor, binary, as_binary, np.float32, shape)
    if not np.isfinite(array).all():
        raise HTTPError(400, f"inputs[0]: {PIXELS_INPUT!r} holds NaN or infinite values")
    return Pixels(array, FIELD)


def _numbers(tensor: dict, binary: bytes, as_binary: bool, dtype, shape: list[int]) -> np.ndarray:
    """A UINT8 or FP32 tensor from binary data (little-endian) or JSON `data`, in its declared shape."""
    count = math.prod(shape)
    if as_binary:
        itemsize = np.dtype(dtype).itemsize
        if len(binary) != count * itemsize:
            raise HTTPError(400, f"inputs[0]: shape {shape} needs {count * itemsize} bytes of {np.dtype(dtype).name}; "
                               f"{len(binary)} were sent")
        return np.frombuffer(binary, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)
    try:
        values = np.asarray(_flatten_numbers(tensor["data"], MAX_DATA_DEPTH), dtype=np.float64)
    except (TypeError, ValueError):
        raise HTTPError(400, "inputs[0].data: must be a list of numbers") from None
    if values.size != count:
        raise HTTPError(400, f"inputs[0]: shape {shape} holds {count} values but {values.size} were sent")
    if dtype == np.uint8 and not ((values >= 0) & (values <= 255) & (values == np.floor(values))).all():
        raise HTTPError(400, "inputs[0].data: UINT8 values are whole numbers from 0 to 255")
    return values.astype(dtype).reshape(shape)


def _check_elements(shape: list[int], count: int, what: str) -> None:
    """BYTES elements (texts or encoded images) against the shape, then the row limits."""
    if count != math.prod(shape):
        raise HTTPError(400, f"inputs[0]: shape {shape} holds {math.prod(shape)} {what} but {count} were sent")
    _check_rows(count, what)


def _check_rows(rows: int, what: str) -> None:
    if not rows:
        raise HTTPError(400, f"inputs[0]: give at least one of the {what}")
    if rows > MAX_PREDICT_INPUTS:
        raise HTTPError(413, f"inputs[0]: {rows} {what}; at most {MAX_PREDICT_INPUTS} per request")


def _flatten_numbers(data, depth: int) -> list:
    if not isinstance(data, list):
        return [data]
    if depth == 0:
        raise HTTPError(400, f"inputs[0].data: nested deeper than {MAX_DATA_DEPTH} lists")
    return [value for item in data for value in _flatten_numbers(item, depth - 1)]


def _flatten(data, depth: int) -> list[str]:
    if isinstance(data, str):
        return [data]
    if not isinstance(data, list) or depth == 0:
        raise HTTPError(400, f"inputs[0].data: must be a list of strings (got {type(data).__name__})")
    return [text for item in data for text in _flatten(item, depth - 1)]


def _bytes_elements(buffer: bytes) -> list[bytes]:
    """Triton's BYTES serialisation: each element a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise HTTPError(400, f"inputs[0]: binary data ends inside an element's length prefix at byte {offset}")
        (size,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + size > len(buffer):
            raise HTTPError(400, f"inputs[0]: binary element at byte {offset - 4} says {size} bytes; "
                               f"only {len(buffer) - offset} remain")
        elements.append(buffer[offset : offset + size])
        offset += size
    return elements


def _encodable(text: str) -> str:
    """A JSON text the tokenizer can take: JSON may escape a lone surrogate (\\udcff), which is no character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise HTTPError(400, f"inputs[0].data: a text holds a lone surrogate at character {err.start}; send valid "
                             "Unicode") from None
    return text


def _decode_utf8(element: bytes) -> str:
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HTTPError(400, f"inputs[0]: a text is not valid UTF-8 ({err.reason} at byte {err.start})") from None


def requested_outputs(body: dict) -> dict[str, bool] | None:
    """{output name: as binary} for the outputs asked for; None when the request names none (all)."""
    outputs = body.get("outputs")
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise HTTPError(400, "outputs: must be a list of objects with a 'name'")
    default = parameter(body, "binary_data_output", bool)
    wanted = {}
    for output in outputs:
        parameters = _parameters(output, f"outputs[{output['name'][:40]!r}].parameters")
        if parameters.get("classification"):
            raise HTTPError(400, f"outputs: the classification extension is not supported; ask for "
                               f"'label' and 'probabilities' instead of {output['name']!r} with class_count")
        binary = parameters.get("binary_data", default)
        wanted[output["name"]] = bool(binary)
    return wanted


def _parameters(holder: dict, where: str) -> dict:
    parameters = holder.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise HTTPError(400, f"{where}: must be an object of parameters")
    return parameters


def parameter(body: dict, name: str, kind: type):
    value = _parameters(body, "parameters").get(name)
    if value is not None and not isinstance(value, kind):
        raise HTTPError(400, f"parameters.{name}: must be a {kind.__name__}, got {value!r:.40}")
    return value if value is not None else (False if kind is bool else None)


def generation_ask(body: dict) -> GenerationAsk:
    """A generation model's settings from the request's parameters, checked as REST /predict checks its fields
    (a bad one is named as `parameters.NAME`); None settings when none is given."""
    given = {name: value for name, value in _parameters(body, "parameters").items() if name in GENERATION_FIELDS}
    try:
        request = PredictRequest.model_validate({"inputs": ["-"], **given})
    except ValidationError as err:
        first = err.errors()[0]
        raise HTTPError(422, f"parameters.{first['loc'][0]}: {first['msg']}", f"parameters.{first['loc'][0]}") from None
    return GenerationAsk(request.sampling(), tuple(f"parameters.{name}" for name in given))


def outputs(meta: ModelMeta) -> list[dict]:
    """The output tensors a model answers with: `value`, `label` and `probabilities`, or `text` and
    `finish_reason` (text generation)."""
    if meta.task == GENERATION_TASK:
        return [{"name": "text", "datatype": "BYTES", "shape": [-1]}, {"name": "finish_reason", "datatype": "BYTES", "shape": [-1]}]
    if meta.is_regression:
        return [{"name": "value", "datatype": "FP32", "shape": [-1]}]
    return [{"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(meta.labels)]}]


def wanted_outputs(meta: ModelMeta, body: dict) -> dict[str, bool]:
    """{output name: as binary} for the outputs a request asks for (all when it names none)."""
    names = [output["name"] for output in outputs(meta)]
    requested = requested_outputs(body)
    if requested is None:
        return dict.fromkeys(names, parameter(body, "binary_data_output", bool))
    unknown = sorted(set(requested) - set(names))
    if unknown:
        raise HTTPError(400, f"outputs: the model has no output {unknown[0]!r}; it has {', '.join(names)}")
    return requested


def response(info: registry.VersionInfo, results: list[dict], wanted: dict[str, bool], request_id) -> Response:
    """V2 JSON, or JSON then binary tensors (with Inference-Header-Content-Length) when any output is binary."""
    meta = info.manifest.model
    if meta.task == GENERATION_TASK:
        tensors = {name: ("BYTES", np.array([r[name] for r in results], dtype=object)) for name in ("text", "finish_reason")}
    elif meta.is_regression:
        tensors = {"value": ("FP32", np.array([r["value"] for r in results], dtype=np.float32))}
    else:
        probabilities = np.array([[r["scores"][label] for label in meta.labels] for r in results], dtype=np.float32)
        tensors = {"label": ("BYTES", np.array([r["label"] for r in results], dtype=object)),
                   "probabilities": ("FP32", probabilities)}
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
