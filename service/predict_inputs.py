"""A REST /predict request read into its PredictRequest and its Inputs: JSON, or multipart/form-data with files.

The count and size limits (MAX_PREDICT_INPUTS, MAX_TEXT_BYTES, MAX_IMAGE_BYTES) are checked here,
before any model is touched; an over-limit list is a 413 naming its field.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import HTTPError
from .image_inputs import BadImage, too_large
from .inference import Images, Inputs, Texts, bad_image
from .metrics import Metrics
from .schemas import MAX_IMAGE_BYTES, MAX_PREDICT_INPUTS, MAX_TEXT_BYTES, PredictRequest

# The OpenAPI schema of the multipart form (FastAPI cannot declare one route with two body types).
MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["files"],
    "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "image files"},
        "model": {"type": "string"}, "version": {"type": "string"}, "variant": {"type": "string"},
        "top_k": {"type": "integer", "minimum": 1},
    },
}


async def read(request: Request, metrics: Metrics) -> tuple[PredictRequest, Inputs]:
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return await _multipart(request, metrics)
    body = parse(PredictRequest, await request.body())
    return body, _json_inputs(body)


def parse(model: type[BaseModel], raw: bytes | dict):
    """A request model from JSON bytes or form fields; errors go to the 422 handler like FastAPI's own."""
    try:
        if isinstance(raw, bytes):
            return model.model_validate_json(raw)
        return model.model_validate(raw, strict=False)  # form fields are text: top_k "3" is 3
    except ValidationError as err:
        raise RequestValidationError(err.errors()) from None


def _json_inputs(body: PredictRequest) -> Inputs:
    if body.inputs is not None and body.images is not None:
        raise HTTPError(422, "images: give either texts as inputs or base64 images as images, not both", "images")
    if body.images is None:
        if body.inputs is None:
            raise HTTPError(422, "inputs: give texts as inputs, or base64-encoded images as images", "inputs")
        _check_count("inputs", len(body.inputs), "text")
        size = sum(len(text.encode()) for text in body.inputs)
        if size > MAX_TEXT_BYTES:
            raise HTTPError(413, f"inputs: {size // 1024} KiB of text; at most {MAX_TEXT_BYTES // 1024} KiB per request",
                            "inputs")
        return Texts(body.inputs, "inputs")
    _check_count("images", len(body.images), "image")
    return Images(body.images, base64_text=True, source="base64", field="images")


async def _multipart(request: Request, metrics: Metrics) -> tuple[PredictRequest, Images]:
    """The form's `files` (read within MAX_IMAGE_BYTES each) and its other fields as a PredictRequest."""
    try:
        form = await request.form(max_files=MAX_PREDICT_INPUTS + 1, max_fields=20)
    except StarletteHTTPException as err:
        status = 413 if "too many files" in str(err.detail).lower() else 422
        raise HTTPError(status, f"files: {err.detail} (at most {MAX_PREDICT_INPUTS} files per request)", "files") from None
    try:
        fields = {}
        for key, value in form.multi_items():
            if key == "files":
                continue
            if key in ("inputs", "images"):
                raise HTTPError(422, f"{key}: a multipart request carries images as files; send texts or base64 images "
                                     "as JSON", key)
            if not isinstance(value, str):
                raise HTTPError(422, f"{key}: expected a form field, got a file; send images as files", key)
            fields[key] = value
        body = parse(PredictRequest, fields)
        files = form.getlist("files")
        _check_count("files", len(files), "image file")
        encoded = []
        for index, upload in enumerate(files):
            if not isinstance(upload, UploadFile):
                raise HTTPError(422, f"files[{index}]: expected a file, got a text field", f"files[{index}]")
            data = await upload.read(MAX_IMAGE_BYTES + 1)
            if len(data) > MAX_IMAGE_BYTES:
                raise too_large(index, upload.size or len(data))
            encoded.append(data)
    except BadImage as err:
        raise bad_image(metrics, err, "files") from None
    finally:
        await form.close()
    return body, Images(encoded, base64_text=False, source="multipart", field="files")


def _check_count(field: str, count: int, what: str) -> None:
    if not count:
        raise HTTPError(422, f"{field}: give at least one {what}", field)
    if count > MAX_PREDICT_INPUTS:
        raise HTTPError(413, f"{field}: {count} {what}s; at most {MAX_PREDICT_INPUTS} per request", field)
