"""What the published schema (GET /openapi.json, the page at /docs) says beyond each route's signature.

FastAPI writes a route's parameters, request model and success answer from its signature. It cannot
see what the guard (401, 413), the load shedding (429), the error handlers (404, 409, 422, 503) and
the V2 front end (400, 415, bodies read by hand) answer, so without this module the schema lists none
of the 4xx a client meets and a generated client is misled. `document(*routers)` runs on the routers
before the app includes them and adds to every route the errors it answers (ERRORS), with their body
(`Error`, `{"error", "field"}`; V2's `V2Error`, `{"error"}`), and what else its signature cannot say
(EXTRA): the answers of routes that return a dict, the V2 bodies, request examples. BentoML's own
/docs.json is built from the same routes, so it says the same (tests/test_openapi_fuzz.py).
"""

from __future__ import annotations

import copy

from fastapi import APIRouter
from fastapi.routing import APIRoute
from fastapi.utils import deep_dict_update
from pydantic import BaseModel, Field

from .datasets import IMAGE_KINDS, TABLE
from .guard import OPEN_PATHS
from .job_record import QUEUED, STATES
from .schemas import MAX_PREDICT_INPUTS
from .settings import env_name
from .v2_tensors import HEADER_LENGTH, IMAGE_INPUT, PIXELS_INPUT, TEXT_INPUT


class Error(BaseModel):
    """Every error answer of the REST routes, and the guard's and the load shedding's on any route."""

    error: str = Field(description="what was wrong, where, and what to do")
    field: str | None = Field(description="the request field at fault (`inputs`, `hyperparameters.epochs`, `files[1]`, "
                                          "`body`, `authorization`); null when no one field is")


class V2Error(BaseModel):
    """The V2 routes' error answer; the guard's 401 and 413 and the shedding's 429 add `field`."""

    error: str = Field(description="what was wrong and what to do")


WHY = {
    400: "a malformed V2 request or an undecodable image (V2 says 400 where REST says 422)",
    401: f"no valid API key ({env_name('api_key')} is set): send `Authorization: Bearer <key>`",
    404: "an unknown job, dataset, model or version",
    409: "cancel: the job has already ended; delete: a queued or running job uses it, or is it",
    413: "a body, upload, image or input list over its limit",
    415: "a compressed body (Content-Encoding); send it uncompressed",
    422: "a value the service cannot use; `field` names it",
    429: "too many prediction requests in flight on this worker; retry after `Retry-After` seconds",
    503: "a stored model file failed its checksum, or the job store did not answer (then with `Retry-After`)",
    507: "the server's disk is full: nothing was stored",
}

# Headers that come with an error answer (service.guard, service.shedding).
_HEADERS = {401: ("WWW-Authenticate", "Bearer"), 429: ("Retry-After", "seconds to wait before retrying")}

# The errors each route answers besides the guard's 401 (every path but OPEN_PATHS), by path. 422 stands on
# every route with parameters or a body, where FastAPI validates them (V2's string path parameters never fail;
# V2 answers its own errors with 400): left out, FastAPI would document its own `{"detail"}` body there.
ERRORS = {
    "/datasets": (413, 422, 507),
    "/datasets/{dataset_id}": (404, 409, 422, 503),
    "/finetune": (404, 413, 422, 503),
    "/jobs": (422, 503),
    "/jobs/{job_id}": (404, 422, 503),
    "/jobs/{job_id}/events": (404, 422, 503),
    "/jobs/{job_id}/cancel": (404, 409, 422, 503),
    "/jobs/{job_id}/artifacts/{name}": (404, 422, 503),
    "/jobs/{job_id}/files": (404, 409, 422, 503),
    "/models": (),
    "/models/{name}": (404, 422),
    "/models/{name}/promote": (404, 413, 422),
    "/models/{name}/versions/{version}/distill": (404, 413, 422, 503),
    "/predict": (404, 413, 422, 429, 503),
    "/evaluate": (404, 413, 422, 503),
    "/v2": (),
    "/v2/health/live": (),
    "/v2/health/ready": (),
    "/v2/models/{name}": (400, 404, 422, 503),
    "/v2/models/{name}/versions/{version}": (400, 404, 422, 503),
    "/v2/models/{name}/ready": (400, 404, 422, 503),
    "/v2/models/{name}/versions/{version}/ready": (400, 404, 422, 503),
    "/v2/models/{name}/infer": (400, 404, 413, 415, 422, 429, 503),
    "/v2/models/{name}/versions/{version}/infer": (400, 404, 413, 415, 422, 429, 503),
}

_STRING, _INTEGER, _NUMBER, _OBJECT = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "object"}
_BINARY = {"schema": {"type": "string", "format": "binary"}}


def _object(required: dict, optional: dict | None = None) -> dict:
    return {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}}


def _array(items: dict, **bounds) -> dict:
    return {"type": "array", "items": items, **bounds}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _example(example: dict) -> dict:
    return {"content": {"application/json": {"example": example}}}


_TENSOR = _object({"name": {**_STRING, "description": f"{TEXT_INPUT!r} for a text model; {IMAGE_INPUT!r} or "
                                                      f"{PIXELS_INPUT!r} for an image model (GET /v2/models/NAME)"},
                   "datatype": {**_STRING, "description": "BYTES (texts, encoded images), UINT8 (RGB [N, H, W, 3]) or "
                                                          "FP32 (pixel_values [N, 3, S, S])"},
                   "shape": _array({**_INTEGER, "minimum": 0}, minItems=1)},
                  {"data": {"type": "array", "description": "the elements, flat or nested; base64 for encoded images"},
                   "parameters": {**_OBJECT, "description": "binary_data_size: the tensor's bytes after the JSON"}})
_INFER_REQUEST = _object(
    {"inputs": _array(_TENSOR, minItems=1, maxItems=1, description=f"one tensor of at most {MAX_PREDICT_INPUTS} rows")},
    {"id": _STRING, "outputs": _array(_object({"name": _STRING}, {"parameters": _OBJECT})),
     "parameters": {**_OBJECT, "description": "variant: the variant to serve; binary_data_output: binary tensors"}})
_INFER_ANSWER = _object({"model_name": _STRING, "model_version": _STRING,
                         "outputs": _array(_object({"name": _STRING, "datatype": _STRING, "shape": _array(_INTEGER)},
                                                   {"data": {"type": "array"}, "parameters": _OBJECT}))},
                        {"id": _STRING})
_QUEUED = _object({"id": _STRING, "status": {"enum": [QUEUED]}})
_JOB = _object({"id": _STRING, "status": {"enum": list(STATES)}, "progress": {}, "epoch": {}, "step": {},
                "eta_seconds": {}, "metrics": {}, "model": {}, "error": _nullable(_STRING), "model_name": {},
                "attempt": {}, "cancel_requested": {"type": "boolean"}, "worker": {}, "created_at": _STRING,
                "started_at": _nullable(_STRING), "finished_at": _nullable(_STRING)})
_DELETED = _object({"id": _STRING, "deleted": {"type": "boolean"}, "bytes": _INTEGER})
_VERSION_REF = _object({"name": _STRING, "version": _STRING})
# What a route's signature cannot tell FastAPI, by path and status: the answers of routes that return a dict
# or a JSONResponse (which FastAPI documents as any object), the artifacts' file types, request examples,
# and the V2 routes' bodies, read by hand.
EXTRA = {
    "/datasets": {"responses": {"200": _json(_object(
        {"id": {**_STRING, "pattern": "^ds-[0-9a-f]{16}$"}, "kind": {"enum": [TABLE, *IMAGE_KINDS]}, "rows": _INTEGER,
         "columns": _array(_STRING), "format": _STRING, "bytes": _INTEGER}))}},
    "/finetune": {"requestBody": _example({"train": "ds-0123456789abcdef", "model_name": "sst2-minilm",
                                            "hyperparameters": {"epochs": 1}, "variants": ["onnx", "int8"]}),
                  "responses": {"202": _json(_QUEUED)}},
    "/models/{name}/versions/{version}/distill": {"responses": {"202": _json(_QUEUED)}},
    "/datasets/{dataset_id}": {"responses": {"200": _json(_DELETED)}},
    "/jobs/{job_id}/files": {"responses": {"200": _json(_DELETED)}},
    "/jobs": {"responses": {"200": _json(_object({"jobs": _array(_JOB)}))}},
    "/jobs/{job_id}": {"responses": {"200": _json(_JOB)}},
    "/jobs/{job_id}/cancel": {"responses": {"200": _json(_JOB)}},
    "/jobs/{job_id}/events": {"responses": {"200": _json(_object(
        {"events": _array(_object({"seq": _INTEGER, "type": _STRING})), "next": _INTEGER}))}},
    "/jobs/{job_id}/artifacts/{name}": {"responses": {"200": {
        "description": "the file: a PNG plot, data_report.json, or label_issues.jsonl or samples.jsonl (JSON lines)",
        "content": {"image/png": _BINARY, "application/json": {"schema": _OBJECT},
                    "text/plain": {"schema": _STRING}}}}},
    "/models": {"responses": {"200": _json(_object({"models": _array(_object(
        {"name": _STRING, "versions": _array(_STRING), "latest": _STRING, "production": _nullable(_STRING)}))}))}},
    "/models/{name}/promote": {"requestBody": _example({"version": "v3"}),
                               "responses": {"200": _json(_object({"name": _STRING, "production": _STRING}))}},
    "/predict": {"requestBody": _example({"model": "sst2-minilm", "inputs": ["a moving, funny film", "a dull mess"]}),
                 "responses": {"200": {"content": {
                     **_json(_object({"model": _VERSION_REF, "variant": _STRING, "predictions": _array(
                         _OBJECT, description="per input: label, score, scores (classifiers); value (regression); "
                                              "text, tokens, finish_reason (text generation)")}))["content"],
                     "text/event-stream": {"schema": {**_STRING, "description": (
                         '"stream": true (text generation): data: [{"index", "text"}, ...] per decoding step '
                         '(a prompt\'s last piece adds finish_reason and tokens), then data: [DONE]')}}}}}},
    "/evaluate": {"requestBody": _example({"model": "sst2-minilm", "data": "ds-0123456789abcdef"}),
                  "responses": {"200": _json(_object({"model": _VERSION_REF, "variant": _STRING}))}},
    "/v2/health/ready": {"responses": {
        "200": _json(_object({"ready": {"type": "boolean"}})),
        "503": {"description": "this worker has not started its predictors yet",
                **_json(_object({"ready": {"type": "boolean"}}))}}},
    "/v2/models/{name}": {"responses": {"200": _json(_object(
        {"name": _STRING, "versions": _array(_STRING), "platform": _STRING, "inputs": _array(_OBJECT),
         "outputs": _array(_OBJECT), "parameters": _OBJECT}))}},
    "/v2/models/{name}/ready": {"responses": {"200": _json(_object(
        {"name": _STRING, "version": _STRING, "ready": {"type": "boolean"}}))}},
    "/v2/models/{name}/infer": {
        "parameters": [{"name": HEADER_LENGTH, "in": "header", "required": False,
                        "description": "binary tensor data: the length of the JSON header before the tensors",
                        "schema": {**_INTEGER, "minimum": 0}}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _INFER_REQUEST, "example": {
                "inputs": [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [1], "data": ["a moving, funny film"]}]}},
            "application/octet-stream": _BINARY}},
        "responses": {"200": {"description": "JSON; or, when an output is binary, the JSON (its length in "
                                             f"{HEADER_LENGTH}) then the tensors",
                              "content": {"application/json": {"schema": _INFER_ANSWER},
                                          "application/octet-stream": _BINARY}}},
    },
}
EXTRA.update({path.replace("{name}", "{name}/versions/{version}"): EXTRA[path]  # the same with a version
              for path in ("/v2/models/{name}", "/v2/models/{name}/ready", "/v2/models/{name}/infer")})


def document(*routers: APIRouter) -> None:
    """Add the error answers and EXTRA to every route of `routers`; call it before including them."""
    for router in routers:
        for route in router.routes:
            if isinstance(route, APIRoute):
                _document(route)


def _document(route: APIRoute) -> None:
    if route.path not in ERRORS:
        raise KeyError(f"{route.path}: list the errors it answers in service.openapi.ERRORS")
    body = V2Error if route.path.startswith("/v2") else Error
    codes = ERRORS[route.path] + (() if route.path in OPEN_PATHS else (401,))
    route.responses = {**{code: _answer(code, body) for code in sorted(codes)}, **route.responses}
    if route.path in EXTRA:  # merged under what the route's own decorator says
        extra = copy.deepcopy(EXTRA[route.path])
        deep_dict_update(extra, route.openapi_extra or {})
        route.openapi_extra = extra


def _answer(code: int, body: type[BaseModel]) -> dict:
    answer = {"model": body, "description": WHY[code]}
    if code in _HEADERS:
        answer["headers"] = {_HEADERS[code][0]: {"description": _HEADERS[code][1], "schema": {"type": "string"}}}
    return answer
