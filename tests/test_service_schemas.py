"""The HTTP schema's enumerations are the core's own tuples: a value added to the core is accepted over HTTP."""

from __future__ import annotations

import pytest

from finetune_core import artifacts, config, gen_config, predict, search_space
from service import jobs, schemas
from service.app import app


def enum(prop: dict) -> tuple:
    """The allowed values of a JSON-schema property (Optional and list wrappers looked through)."""
    if "enum" in prop:
        return tuple(prop["enum"])
    for inner in prop.get("anyOf", []) + [prop.get("items", {})]:
        if found := enum(inner):
            return found
    return ()


@pytest.mark.parametrize("model, field, core", [
    (schemas.FinetuneRequest, "task", config.TASKS + (gen_config.GENERATION_TASK,)),
    (schemas.AdapterRequest, "method", gen_config.METHODS),
    (schemas.FinetuneRequest, "variants", artifacts.EXPORT_VARIANTS),
    (schemas.Hyperparameters, "optimizer", config.OPTIMIZERS),
    (schemas.Hyperparameters, "schedule", config.SCHEDULES),
    (schemas.Hyperparameters, "precision", config.PRECISIONS),
    (schemas.Hyperparameters, "early_stopping_metric", config.METRICS),
    (schemas.Hyperparameters, "regression_loss", config.REGRESSION_LOSSES),
    (schemas.PredictRequest, "variant", predict.VARIANTS + ("onnx-genai",)),
    (schemas.EvaluateRequest, "variant", predict.VARIANTS + ("onnx-genai",)),
    (schemas.SearchRequest, "sampler", search_space.SAMPLERS),
    (schemas.SearchRequest, "pruner", search_space.PRUNERS),
])
def test_request_enums_are_the_cores_tuples(model, field, core):
    assert enum(model.model_json_schema()["properties"][field]) == core


def test_freeze_policies_and_job_states_come_from_their_owners():
    freeze = schemas.Hyperparameters.model_json_schema()["properties"]["freeze"]["description"]
    assert freeze.startswith(" | ".join(config.FREEZE_POLICIES) + " | auto")
    status = next(p for p in app.openapi()["paths"]["/jobs"]["get"]["parameters"] if p["name"] == "status")
    assert enum(status["schema"]) == jobs.STATES
