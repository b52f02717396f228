"""The HTTP schema: pydantic request models, converted at once into the core's own types.

Fields that choose code are Literal enums made from the core's own tuples, so the two cannot drift
(tests/test_service_schemas.py checks it). `job_spec` turns a FinetuneRequest into the stored job
spec (a validated JobConfig as a dict plus the model name and variants); a ConfigError is re-worded
to name the request field (`hyperparameters.epochs`, not the core's `train.epochs`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune_core.artifacts import EXPORT_VARIANTS
from finetune_core.config import (FREEZE_POLICIES, METRICS, OPTIMIZERS, PRECISIONS, REGRESSION_LOSSES, SCHEDULES, TASKS,
                                  config_from_dict)
from finetune_core.errors import ConfigError
from finetune_core.predict import VARIANTS
from finetune_core.registry import validate_name
from finetune_core.search_space import PRUNERS, SAMPLERS, search_spec_from_dict

from .errors import FieldError

# Inputs (texts or images) one /predict call may carry; more is a 413.
MAX_PREDICT_INPUTS = 256
# Bytes of one encoded image in /predict or V2 infer (before base64); more is a 413.
MAX_IMAGE_BYTES = 10 << 20
# Bytes of all texts of one /predict call together; more is a 413 (the body may be larger for images).
MAX_TEXT_BYTES = 1 << 20
# Bytes of one /predict or V2 infer body: a few large photos in base64, or a batch of small ones.
MAX_PREDICT_BODY = 32 << 20
DEFAULT_VARIANTS = ["onnx", "int8"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(Strict):
    epochs: int | Literal["auto"] | None = Field(None, description="default auto: from the training rows (data report)")
    batch_size: int | None = None
    learning_rate: float | Literal["auto"] | None = Field(None, description="default: the task's (images: auto)")
    max_length: int | Literal["auto"] | None = Field(None, description="text: default auto, from the token lengths")
    freeze: str | None = Field(None, description=" | ".join(FREEZE_POLICIES) + " | auto (images: from their size)")
    early_stopping_patience: int | None = None
    early_stopping_metric: Literal[METRICS] | None = None
    weight_decay: float | None = None
    optimizer: Literal[OPTIMIZERS] | None = None
    schedule: Literal[SCHEDULES] | None = None
    warmup_ratio: float | None = None
    max_grad_norm: float | None = None
    gradient_accumulation: int | None = None
    precision: Literal[PRECISIONS] | None = None
    class_weights: bool | None = None
    label_smoothing: float | None = None
    eval_every_steps: int | None = None
    checkpoint_every_steps: int | None = None
    log_every_steps: int | None = None
    seed: int | None = None
    num_threads: int | None = Field(None, description="CPU threads for training; default: half the cores")
    split_seed: int | None = None
    min_rows_per_class: int | None = None
    image_size: int | Literal["auto"] | None = Field(
        None, description="image tasks: square input in pixels; 0: the model's own (224); default auto: from the images")
    augment: bool | Literal["auto"] | None = Field(
        None, description="image tasks: random crop, flip, rotation, colour jitter in training; default auto (photos only)")
    horizontal_flip: bool | None = Field(None, description="image tasks: part of augment; off where mirroring changes the label")
    regression_loss: Literal[REGRESSION_LOSSES] | None = None


class SearchRequest(Strict):
    """A hyperparameter search; what is left out gets the core's defaults (finetune_core/search_space.py)."""

    trials: int | None = Field(None, description="trials to complete or prune; default 10")
    timeout_s: float | None = Field(None, description="start no trial after this many seconds")
    sampler: Literal[SAMPLERS] | None = Field(None, description="default tpe")
    pruner: Literal[PRUNERS] | None = Field(None, description="default median")
    space: dict[str, Any] | None = Field(None, description='hyperparameters to vary: {"learning_rate": {"low": 1e-5, '
                                                           '"high": 3e-4, "log": true}, "freeze": ["none", "bottom:2"]}; '
                                                           "default: a space for the task")
    metric: str | None = Field(None, description="validation.<metric> to optimise; default the early-stopping metric")


class FinetuneRequest(Strict):
    task: Literal[TASKS] = "text-classification"
    base_model: str = Field("default", description='"default" (bundled MiniLM for text, EfficientNet-Lite0 for images), '
                                                   "a local folder, a hub id or a timm model name")
    train: str = Field(description="a dataset id from POST /datasets (a table for text tasks, a zip of images for image tasks)")
    validation: str | None = None
    test: str | None = None
    text_column: str | None = None
    image_column: str | None = Field(None, description="image lists: default the one the upload was checked with")
    label_column: str | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    variants: list[Literal[EXPORT_VARIANTS]] = Field(default_factory=lambda: list(DEFAULT_VARIANTS))
    model_name: str
    search: SearchRequest | None = Field(None, description="tune the hyperparameters first; the best trial's model is "
                                                           "evaluated, exported and registered")


class PredictRequest(Strict):
    model: str | None = Field(None, description="a registered model name; optional when only one model exists")
    version: str | None = Field(None, description="vN, 'production' or 'latest' (default: production, else latest)")
    variant: Literal[VARIANTS] | None = None
    inputs: list[str] | None = Field(None, description="texts, for a text model")
    images: list[str] | None = Field(None, description="base64-encoded images (JPEG, PNG, ...), for an image model")
    top_k: int | None = Field(None, ge=1)


class EvaluateRequest(Strict):
    model: str
    version: str | None = None
    variant: Literal[VARIANTS] | None = None
    data: str = Field(description="a dataset id from POST /datasets; image folders: its test split, else validation, "
                                  "else train")
    text_column: str = "text"
    image_column: str | None = Field(None, description="image lists: default the one the upload was checked with")
    label_column: str | None = Field(None, description='default "label" (image lists: the upload\'s)')


class PromoteRequest(Strict):
    version: str = Field(description="the version to make the production one, e.g. v3")


# Where each core config field comes from in the request.
_DATA_FIELDS = {"train": "train", "validation": "validation", "test": "test", "text_column": "text_column",
                "label_column": "label_column", "image_column": "image_column", "task": "task"}
_MODEL_FIELDS = {"base_model": "base_model"}
_CORE_FIELD = re.compile(r"^(data|model|train)\.([a-z_]+):\s*|^(freeze):\s*")


def request_field(core_field: str) -> str:
    """The request field a core config field (`train.epochs`, `data.train`) comes from."""
    section, _, name = core_field.partition(".")
    if section == "data" and name in _DATA_FIELDS:
        return _DATA_FIELDS[name]
    if section == "model" and name in _MODEL_FIELDS:
        return _MODEL_FIELDS[name]
    return f"hyperparameters.{name}"


def job_spec(request: FinetuneRequest, dataset_paths: dict[str, str], data_defaults: dict | None = None) -> dict:
    """Validate a fine-tune request through the core's config and return the job spec to store.

    data_defaults: data fields the datasets supply (an image list's columns, image_root) unless the request sets them.
    """
    try:
        validate_name(request.model_name)
    except ConfigError as err:
        raise FieldError("model_name", f"model_name: {err}") from None
    hp = request.hyperparameters.model_dump(exclude_none=True)
    data = {"task": request.task, **(data_defaults or {}), **dataset_paths}
    for name in ("text_column", "image_column", "label_column"):
        if getattr(request, name) is not None:
            data[name] = getattr(request, name)
    for name in ("max_length", "split_seed", "min_rows_per_class", "image_size", "augment", "horizontal_flip"):
        if name in hp:
            data[name] = hp.pop(name)
    model = {"base_model": request.base_model}
    if "freeze" in hp:
        model["freeze"] = hp.pop("freeze")
    try:
        cfg = config_from_dict({"data": data, "model": model, "train": hp})
    except ConfigError as err:
        message = str(err)
        match = _CORE_FIELD.match(message)
        if match is None:
            raise FieldError(None, message) from None
        core = f"{match.group(1)}.{match.group(2)}" if match.group(1) else f"model.{match.group(3)}"
        field = request_field(core)
        raise FieldError(field, f"{field}: {message[match.end():]}") from None
    spec = {"config": cfg.to_dict(), "model_name": request.model_name, "variants": list(dict.fromkeys(request.variants))}
    if request.search is not None:  # its errors already name the request field (search.space.learning_rate.low: ...)
        spec["search"] = search_spec_from_dict(request.search.model_dump(exclude_none=True), cfg).to_dict()
    return spec
