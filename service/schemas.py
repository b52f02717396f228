"""The HTTP schema: pydantic request models, converted at once into the core's own types.

Fields that choose code are Literal enums made from the core's own tuples, so the two cannot drift
(tests/test_service_schemas.py checks it). `job_spec` turns a FinetuneRequest into the stored job
spec (a validated JobConfig as a dict plus the model name and variants, and the DistillConfig when a
distilled variant is asked for); a ConfigError is re-worded to name the request field
(`hyperparameters.epochs`, not the core's `train.epochs`; `distillation.alpha`, not `distill.alpha`).
`distill_spec` does the same for POST /models/{name}/versions/{version}/distill.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune_core.artifacts import EXPORT_VARIANTS
from finetune_core.config import (DISTILL_GATE_POINTS, FREEZE_POLICIES, METRICS, OPTIMIZERS, PRECISIONS,
                                  REGRESSION_LOSSES, SCHEDULES, TASKS, TRUNCATIONS, config_from_dict,
                                  distill_config_from_dict)
from finetune_core.errors import ConfigError
from finetune_core.gen_config import GENERATION_TASK, generation_job_from_dict
from finetune_core.gen_config import METHODS as ADAPTER_METHODS
from finetune_core.gen_predict import GENERATION_VARIANTS, Sampling
from finetune_core.predict import DISTILLED_VARIANTS, VARIANTS
from finetune_core.registry import validate_name
from finetune_core.search_space import PRUNERS, SAMPLERS, search_spec_from_dict

from .errors import FieldError
from .settings import env_name

# Inputs (texts or images) one /predict call may carry; more is a 413.
MAX_PREDICT_INPUTS = 256
# Bytes of one encoded image in /predict or V2 infer (before base64); more is a 413.
MAX_IMAGE_BYTES = 10 << 20
# Bytes of all texts of one /predict call together; more is a 413 (the body may be larger for images).
MAX_TEXT_BYTES = 1 << 20
# Bytes of one /predict or V2 infer body: a few large photos in base64, or a batch of small ones.
MAX_PREDICT_BODY = 32 << 20
DEFAULT_VARIANTS = ["onnx", "int8"]
# Text generation: the longest answer one /predict call may ask for, the default, and stop strings per call.
MAX_NEW_TOKENS = 512
DEFAULT_NEW_TOKENS = 64
MAX_STOP_STRINGS = 4
# Prompts in one /predict call to a generation model (each costs up to MAX_NEW_TOKENS decoding steps), and
# tokens in one prompt; more is a 413 / 422 naming the field.
MAX_GENERATION_INPUTS = 16
MAX_PROMPT_TOKENS = 2048
GENERATION_ONLY_VARIANTS = tuple(v for v in GENERATION_VARIANTS if v not in VARIANTS)


class Strict(BaseModel):
    # strict: a value of the schema's type only (no `true` for 1, no "3" for 3), as the published schema says
    model_config = ConfigDict(extra="forbid", strict=True)


class Hyperparameters(Strict):
    epochs: int | Literal["auto"] | None = Field(None, description="default auto: from the training rows (data report)")
    batch_size: int | None = None
    learning_rate: float | Literal["auto"] | None = Field(None, description="default: the task's (images: auto)")
    max_length: int | Literal["auto"] | None = Field(None, description="text: default auto, from the token lengths")
    truncation: Literal[TRUNCATIONS] | Literal["auto"] | None = Field(
        None, description="text longer than max_length: keep its head, or its head and tail; default auto: head+tail when 10% of the training rows are longer")
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


class DistillRequest(Strict):
    """How the student is distilled; what is left out gets the core's defaults (finetune_core/config.py DistillConfig)."""

    alpha: float | None = Field(None, description="weight of the distillation term (KL to the teacher, or MSE for "
                                                  "regression); the labels' loss gets 1 - alpha")
    temperature: float | None = Field(None, description="softens teacher and student distributions in the KL term")
    student_layers: list[int] | None = Field(None, description="text: the teacher's encoder layers the student keeps, "
                                                               "e.g. [1, 3, 5]; default every other one, the last kept")
    hidden_weight: float | None = Field(None, description="text: weight of matching the kept layers' hidden states "
                                                          "to the teacher's (0: off)")
    student: str | None = Field(None, description="text: a local model folder using the teacher's tokenizer, instead "
                                                  "of dropping layers")
    image_size: int | None = Field(None, description="images: the student's input in pixels; 0: the teacher's")
    block_depths: list[int] | None = Field(None, description="images: blocks the student keeps per stage; default all")
    distill_data: str | None = Field(None, description="a dataset id from POST /datasets: extra unlabelled rows "
                                                       "(texts, or images) labelled by the teacher")
    max_rows: int | None = Field(None, description="rows distilled on, a seeded sample; 0: all")
    epochs: int | None = None
    learning_rate: float | None = Field(None, description="default: the teacher's")
    distill_gate: float | None = Field(None, description=f"accuracy points the student may lose against the teacher "
                                                         f"before it is refused; default {DISTILL_GATE_POINTS:g}")
    seed: int | None = None


class DistillVersionRequest(Strict):
    """POST /models/{name}/versions/{version}/distill: a new version with the distilled variants."""

    distillation: DistillRequest = Field(default_factory=DistillRequest)
    train: str | None = Field(None, description="a dataset id: the labelled rows to distil on, when the version's "
                                                "training run (and its splits) is gone; with validation")
    validation: str | None = Field(None, description="a dataset id: the rows for early stopping and the gate")


class AdapterRequest(Strict):
    """Text generation: LoRA adapters (finetune_core/gen_config.py AdapterConfig), or full fine-tuning."""

    method: Literal[ADAPTER_METHODS] | None = None
    rank: int | None = None
    alpha: int | None = None
    dropout: float | None = None
    target_modules: list[str] | None = None
    gradient_checkpointing: bool | None = None


class FinetuneRequest(Strict):
    task: Literal[TASKS + (GENERATION_TASK,)] = "text-classification"
    base_model: str = Field("default", description='"default" (bundled MiniLM for text, EfficientNet-Lite0 for images), '
                                                   "a bundled model's name, or one the operator lists in "
                                                   f"{env_name('base_models')} (service/base_models.py)")
    train: str = Field(description="a dataset id from POST /datasets (a table for text tasks, a zip of images for image tasks)")
    validation: str | None = None
    test: str | None = None
    text_column: str | None = None
    image_column: str | None = Field(None, description="image lists: default the one the upload was checked with")
    label_column: str | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    variants: list[Literal[EXPORT_VARIANTS]] = Field(
        default_factory=lambda: list(DEFAULT_VARIANTS),
        description="variants to build and prove; 'distilled' / 'distilled-int8' train a student after the teacher")
    distillation: DistillRequest | None = Field(None, description="settings of the student, with a distilled variant")
    model_name: str
    search: SearchRequest | None = Field(None, description="tune the hyperparameters first; the best trial's model is "
                                                           "evaluated, exported and registered")
    # Text generation only: the prompt and completion columns are text_column and label_column (default prompt
    # and completion; a "messages" column of chat turns is used when the table has one).
    system_prompt: str | None = Field(None, description="text generation: a system turn before every prompt")
    adapter: AdapterRequest | None = Field(None, description="text generation: LoRA settings, or method 'full'")
    packing: bool | None = Field(None, description="text generation: pack short training conversations into "
                                                   "max_length rows (each attends only to itself); default false")


class PredictRequest(Strict):
    model: str | None = Field(None, description="a registered model name; optional when only one model exists")
    version: str | None = Field(None, description="vN, 'production' or 'latest' (default: production, else latest)")
    variant: Literal[VARIANTS + GENERATION_ONLY_VARIANTS] | None = None
    inputs: list[str] | None = Field(None, description="texts, for a text model; prompts, for a text-generation model")
    images: list[str] | None = Field(None, description="base64-encoded images (JPEG, PNG, ...), for an image model")
    top_k: int | None = Field(None, ge=1)
    # Text-generation models only.
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS,
                                       description=f"text generation: the longest answer in tokens (default {DEFAULT_NEW_TOKENS})")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="text generation: 0 (default) is greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="text generation: nucleus sampling (with temperature > 0)")
    stop: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS,
                                   description="text generation: answers end before the first of these strings")
    seed: int | None = Field(None, description="text generation: makes sampling repeatable")
    stream: bool | None = Field(None, description="text generation: answer as server-sent events (text/event-stream), "
                                                  "each text piece as it is generated, then data: [DONE]")

    def generation_fields(self) -> tuple[str, ...]:
        return tuple(name for name in GENERATION_FIELDS if getattr(self, name) is not None)

    def sampling(self) -> Sampling | None:
        """The generation settings asked for, or None when none were (a classification request)."""
        if all(getattr(self, name) is None for name in GENERATION_FIELDS):
            return None
        return Sampling(max_new_tokens=self.max_new_tokens or DEFAULT_NEW_TOKENS, temperature=self.temperature or 0.0,
                        top_p=self.top_p if self.top_p is not None else 1.0, stop=tuple(self.stop or ()), seed=self.seed)


GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_p", "stop", "seed", "stream")


class EvaluateRequest(Strict):
    model: str
    version: str | None = None
    variant: Literal[VARIANTS + GENERATION_ONLY_VARIANTS] | None = None
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


def job_spec(request: FinetuneRequest, dataset_paths: dict[str, str], data_defaults: dict | None = None,
             distill_data: str | None = None) -> dict:
    """Validate a fine-tune request through the core's config and return the job spec to store.

    data_defaults: data fields the datasets supply (an image list's columns, image_root) unless the request sets them.
    distill_data: the path of the dataset `distillation.distill_data` names.
    """
    try:
        validate_name(request.model_name)
    except ConfigError as err:
        raise FieldError("model_name", f"model_name: {err}") from None
    if request.task == GENERATION_TASK:
        return _generation_spec(request, dataset_paths)
    for name in ("system_prompt", "adapter", "packing"):
        if getattr(request, name) is not None:
            raise FieldError(name, f"{name}: is for text-generation jobs; this is a {request.task} job")
    hp = request.hyperparameters.model_dump(exclude_none=True)
    data = {"task": request.task, **(data_defaults or {}), **dataset_paths}
    for name in ("text_column", "image_column", "label_column"):
        if getattr(request, name) is not None:
            data[name] = getattr(request, name)
    for name in ("max_length", "truncation", "split_seed", "min_rows_per_class", "image_size", "augment", "horizontal_flip"):
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
    spec = {"config": cfg.to_dict(), "model_name": request.model_name, "variants": _variants(request.variants)}
    if any(v in DISTILLED_VARIANTS for v in spec["variants"]):
        spec["distill"] = _distill_config(request.distillation, distill_data)
    elif request.distillation is not None:
        raise FieldError("distillation", "distillation: given, but variants ask for no distilled variant; add "
                                         "'distilled' (and 'distilled-int8') to variants, or leave distillation out")
    if request.search is not None:  # its errors already name the request field (search.space.learning_rate.low: ...)
        spec["search"] = search_spec_from_dict(request.search.model_dump(exclude_none=True), cfg).to_dict()
    return spec


# Hyperparameters of the other tasks, refused in a text-generation job rather than silently ignored.
_NOT_FOR_GENERATION = ("truncation", "freeze", "min_rows_per_class", "image_size", "augment", "horizontal_flip",
                       "class_weights", "label_smoothing", "regression_loss")
_GENERATION_FIELD = re.compile(r"^(data|adapter|train)\.([a-z_]+):\s*")


def _generation_spec(request: FinetuneRequest, dataset_paths: dict[str, str]) -> dict:
    """A text-generation job: its GenerationJob as a dict, checked by the core, under "generation"."""
    for name in ("variants", "distillation", "search"):
        if name in request.model_fields_set:
            raise FieldError(name, f"{name}: a text-generation version always holds the merged model (pytorch) and its "
                                   f"proven ONNX form (onnx-genai); leave {name} out")
    hp = request.hyperparameters.model_dump(exclude_none=True)
    for name in _NOT_FOR_GENERATION:
        if name in hp:
            raise FieldError(f"hyperparameters.{name}", f"hyperparameters.{name}: is not a text-generation setting")
    data = {**dataset_paths, "prompt_column": request.text_column or "prompt",
            "completion_column": request.label_column or "completion", "system_prompt": request.system_prompt,
            "packing": request.packing}
    for name in ("max_length", "split_seed"):
        if name in hp:
            data[name] = hp.pop(name)
    raw = {"data": {k: v for k, v in data.items() if v is not None}, "base_model": request.base_model,
           "adapter": request.adapter.model_dump(exclude_none=True) if request.adapter else {}, "train": hp}
    try:
        job = generation_job_from_dict(raw)
    except ConfigError as err:
        message = str(err)
        match = _GENERATION_FIELD.match(message)
        if match is None:
            raise FieldError(None, message) from None
        section, name = match.group(1), match.group(2)
        field = f"adapter.{name}" if section == "adapter" else {
            "prompt_column": "text_column", "completion_column": "label_column"}.get(name) or request_field(f"{section}.{name}")
        raise FieldError(field, f"{field}: {message[match.end():]}") from None
    return {"generation": job.to_dict(), "model_name": request.model_name, "variants": list(GENERATION_VARIANTS)}


def _variants(asked: list[str]) -> list[str]:
    """Each once, in order; distilled-int8 brings distilled (it is served with the student's folder)."""
    variants = list(dict.fromkeys(asked))
    if "distilled-int8" in variants and "distilled" not in variants:
        variants.insert(variants.index("distilled-int8"), "distilled")
    return variants


def _distill_config(request: DistillRequest | None, distill_data: str | None) -> dict:
    """The core's DistillConfig as a dict, its errors naming the request field (distillation.alpha)."""
    raw = (request or DistillRequest()).model_dump(exclude_none=True)
    if distill_data is not None:
        raw["distill_data"] = distill_data
    try:
        return distill_config_from_dict(raw).to_dict()
    except ConfigError as err:
        message = str(err)
        if message.startswith("distill."):
            field = "distillation." + message.split(":", 1)[0].removeprefix("distill.")
            raise FieldError(field, "distillation." + message.removeprefix("distill.")) from None
        raise FieldError("distillation", message) from None


def distill_spec(name: str, version: str, request: DistillVersionRequest, paths: dict[str, str],
                 distill_data: str | None = None) -> dict:
    """The job spec of POST /models/{name}/versions/{version}/distill: distil that version into a new one.

    paths: the `train` and `validation` datasets' paths, when given (both or neither).
    """
    if ("train" in paths) != ("validation" in paths):
        raise FieldError("validation" if "train" in paths else "train",
                         "train and validation: give both datasets, or neither to use the version's own splits")
    spec = {"model_name": name, "distill_from": {"name": name, "version": version},
            "distill": _distill_config(request.distillation, distill_data), "variants": list(DISTILLED_VARIANTS)}
    if paths:
        spec["data"] = dict(paths)
    return spec
