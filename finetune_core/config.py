"""Typed, frozen configuration: the one place defaults live.

A job is three sections, `data`, `model` and `train`, each a frozen dataclass. A value comes from the
user, else from the task's defaults (TASK_DEFAULTS, each with the measurement that chose it), else
from the dataclass. "auto" values (epochs, max_length, image size, freeze, learning rate, augment)
are chosen from the data by auto.py once it is loaded. `JobConfig.sources` records where every value
came from ("user", "task default", "default", "auto", "search": a trial's value); the run's config.json
keeps it.

Values are checked on construction with an error that names the field and the allowed values;
`load_config` reads YAML or JSON and refuses unknown keys.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

# "default" is the bundled all-MiniLM-L6-v2 for text and the bundled EfficientNet-Lite0 for images.
DEFAULT_BASE_MODEL = "default"
FREEZE_POLICIES = ("none", "embeddings", "bottom:N", "all-but-head")
TASKS = ("text-classification", "text-regression", "image-classification", "image-regression")
AUTO = "auto"
SOURCES = ("user", "task default", "default", "auto", "search")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
METRICS = ("accuracy", "macro_f1", "loss", "mse", "mae", "r2")
LOWER_IS_BETTER = frozenset({"loss", "mse", "mae"})
REGRESSION_LOSSES = ("mse", "huber")
TRUNCATIONS = ("head", "head+tail")


@dataclass(frozen=True)
class DataConfig:
    # JSONL or CSV (Parquet too); required. Image tasks: a class folder (DIR/<class>/*.jpg), a dataset
    # root holding train/ (and val/ or validation/, test/), or a JSONL/CSV list of image paths.
    train: str = ""
    validation: str | None = None  # used as is when given; else 10% of train (seeded, stratified)
    test: str | None = None  # used as is when given; else 10% of train when validation is also absent, else none
    text_column: str = "text"
    label_column: str = "label"
    task: str = "text-classification"  # one of TASKS
    max_length: int | str = AUTO  # tokens, or auto: from the training rows' lengths (auto.py); longer texts are truncated
    # What a longer text keeps: its first max_length tokens (head), or its first quarter and last three quarters
    # (head+tail, for reviews and articles whose conclusion is at the end); auto: head+tail when many rows are long.
    truncation: str = AUTO
    lowercase: bool = False  # MiniLM's tokenizer lower-cases already
    min_rows_per_class: int = 5  # fewer rows in a class than this is an error before training
    split_seed: int = 0  # seeds the 80/10/10 split, independent of the training seed
    image_column: str = "image"  # image lists: the column holding paths (relative to the list's folder)
    # Pixels, square; 0 keeps the base model's own input size (224 for EfficientNet-Lite0); auto: from the images.
    image_size: int | str = 0
    augment: bool | str = True  # training images: random resized crop, flip, small rotation, colour jitter
    horizontal_flip: bool = True  # part of augment; turn off where mirroring changes the label (digits, text)
    image_root: str | None = None  # image lists: paths must stay inside this folder (the service sets it)

    def __post_init__(self):
        if not self.train:
            raise ConfigError("data.train: a training file is required")
        _choice("data.task", self.task, TASKS)
        if self.max_length != AUTO:
            _positive_int("data.max_length", self.max_length, upper=8192)
        _choice("data.truncation", self.truncation, (*TRUNCATIONS, AUTO))
        _positive_int("data.min_rows_per_class", self.min_rows_per_class)
        if self.augment not in (True, False, AUTO):
            raise ConfigError(f"data.augment: must be true, false or 'auto', got {self.augment!r}")
        if self.image_size and self.image_size != AUTO:
            _positive_int("data.image_size", self.image_size, upper=1024)
            if self.image_size < 32:
                raise ConfigError(f"data.image_size: must be 0 (the model's own) or >= 32 pixels, got {self.image_size}")
        for name in ("text_column", "label_column", "image_column"):
            if not getattr(self, name):
                raise ConfigError(f"data.{name}: must be a non-empty column name")


@dataclass(frozen=True)
class ModelConfig:
    # "default": the bundled all-MiniLM-L6-v2 for text, the bundled EfficientNet-Lite0 for images.
    # Else a local folder, a hub id (text) or a timm model name (images).
    base_model: str = DEFAULT_BASE_MODEL
    # none | embeddings | bottom:N | all-but-head, or auto. For CNNs the "embeddings" are the stem and N counts stages.
    freeze: str = "none"

    def __post_init__(self):
        if self.freeze != AUTO:
            check_freeze_policy(self.freeze)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int | str = AUTO  # or auto: enough optimizer steps for small sets, fewer passes on large ones (auto.py)
    batch_size: int = 32
    # Chosen by measurement on SST-2 with MiniLM: 5e-5 (the Trainer default) under-trains in one epoch.
    learning_rate: float | str = 1e-4
    weight_decay: float = 0.01
    optimizer: str = "adamw"  # one of OPTIMIZERS
    schedule: str = "linear"  # one of SCHEDULES; decays to 0 after warm-up (constant stays flat)
    warmup_ratio: float = 0.06  # share of all optimizer steps spent warming up linearly from 0
    max_grad_norm: float = 1.0  # clip gradients to this norm; 0 disables clipping
    gradient_accumulation: int = 1  # batches per optimizer step
    group_by_length: bool = True  # batches of similar length: less padding, a large win on CPU
    precision: str = "auto"  # bf16 autocast where the hardware has it (CUDA, AVX512-BF16/AMX CPUs), else fp32
    class_weights: bool = False  # weight the loss by inverse class frequency (imbalanced data)
    regression_loss: str = "mse"  # mse | huber (robust to outliers), on standardised targets
    label_smoothing: float = 0.0
    early_stopping_metric: str = "accuracy"  # one of METRICS, on the validation split
    early_stopping_patience: int = 2  # epochs without improvement before stopping; 0 disables
    eval_every_steps: int = 0  # also evaluate every N optimizer steps (0: once per epoch)
    checkpoint_every_steps: int = 200  # save the "last" checkpoint this often (and every epoch)
    log_every_steps: int = 10  # emit a step event (loss, learning rate, samples/s) this often
    seed: int = 0
    num_threads: int = 0  # torch CPU threads; 0 leaves torch's default
    eval_batch_size: int = 128

    def __post_init__(self):
        if self.epochs != AUTO:
            _positive_int("train.epochs", self.epochs, upper=1000)
        _positive_int("train.batch_size", self.batch_size, upper=65536)
        _positive_int("train.eval_batch_size", self.eval_batch_size, upper=65536)
        _positive_int("train.gradient_accumulation", self.gradient_accumulation, upper=1024)
        if self.learning_rate != AUTO:
            _number("train.learning_rate", self.learning_rate, low=0.0, high=1.0, low_open=True)
        _number("train.weight_decay", self.weight_decay, low=0.0, high=1.0)
        _number("train.warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        _number("train.max_grad_norm", self.max_grad_norm, low=0.0, high=1e6)
        _number("train.label_smoothing", self.label_smoothing, low=0.0, high=0.5)
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _choice("train.schedule", self.schedule, SCHEDULES)
        _choice("train.precision", self.precision, PRECISIONS)
        _choice("train.early_stopping_metric", self.early_stopping_metric, METRICS)
        _choice("train.regression_loss", self.regression_loss, REGRESSION_LOSSES)
        _positive_int("train.log_every_steps", self.log_every_steps)
        for name in ("early_stopping_patience", "eval_every_steps", "checkpoint_every_steps", "num_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"train.{name}: must be a whole number >= 0, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"train.seed: must be a whole number, got {self.seed!r}")


@dataclass(frozen=True)
class JobConfig:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # "section.field" -> where its value came from (one of SOURCES); config_from_dict fills it.
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        regression = self.data.task.endswith("regression")
        if regression and self.train.early_stopping_metric in ("accuracy", "macro_f1"):
            raise ConfigError(
                f"train.early_stopping_metric: '{self.train.early_stopping_metric}' is a classification metric; "
                "for regression use one of loss, mse, mae, r2"
            )
        if not regression and self.train.early_stopping_metric in ("mse", "mae", "r2"):
            raise ConfigError(
                f"train.early_stopping_metric: '{self.train.early_stopping_metric}' is a regression metric; "
                "for classification use one of accuracy, macro_f1, loss"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved(self, values: dict[str, object]) -> JobConfig:
        """A copy with {"section.field": value} set and their source marked auto."""
        sections = {name: {} for name in _SECTIONS}
        for key, value in values.items():
            section, _, name = key.partition(".")
            sections[section][name] = value
        return JobConfig(**{name: dataclasses.replace(getattr(self, name), **sections[name]) for name in _SECTIONS},
                         sources={**self.sources, **{key: "auto" for key in values}})


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}

# Per-task defaults: what a job gets for a value the user did not give. Measured on this project's
# 2-core CPU machines with the bundled base models; the figures are in the README ("Defaults").
# - Text: MiniLM at lr 1e-4 (5e-5, the Trainer's default, under-trains in a few epochs), max_length
#   and epochs chosen from the data (auto.py), early stopping on the validation split, best weights kept.
# - Images: the input size, the freeze policy, the learning rate and augmentation are chosen from
#   the images' own size (auto.py): photos at the model's size train the head of a frozen ImageNet
#   network (hymenoptera: 96% in 17 s, where the whole network at lr 1e-4 learnt nothing in 8 steps);
#   small images (digits, icons) train the whole network at a small input size.
# - Regression stops early on the validation loss (the classification metrics do not apply).
TASK_DEFAULTS: dict[str, dict[str, dict]] = {
    "text-classification": {"train": {"early_stopping_metric": "accuracy", "early_stopping_patience": 2}},
    "text-regression": {"train": {"early_stopping_metric": "loss", "early_stopping_patience": 2}},
    "image-classification": {
        "data": {"image_size": AUTO, "augment": AUTO},
        "model": {"freeze": AUTO},
        "train": {"learning_rate": AUTO, "batch_size": 16, "early_stopping_metric": "accuracy",
                  "early_stopping_patience": 3},
    },
    "image-regression": {
        "data": {"image_size": AUTO, "augment": AUTO},
        "model": {"freeze": AUTO},
        "train": {"learning_rate": AUTO, "batch_size": 16, "early_stopping_metric": "loss",
                  "early_stopping_patience": 3},
    },
}


def config_from_dict(raw: dict) -> JobConfig:
    """Build a JobConfig from nested dicts, refusing unknown sections and keys by name.

    What `raw` gives is the user's; the task's defaults fill in the rest. A `sources` section (a
    saved config.json) keeps the provenance it recorded.
    """
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a mapping with sections data, model, train")
    unknown = set(raw) - set(_SECTIONS) - {"sources"}
    if unknown:
        raise ConfigError(f"config: unknown section(s) {sorted(unknown)}; allowed: {sorted(_SECTIONS)}")
    given = {name: raw.get(name) or {} for name in _SECTIONS}
    for name, values in given.items():
        if not isinstance(values, dict):
            raise ConfigError(f"config.{name}: expected a mapping, got {type(values).__name__}")
    if "train" not in given["data"]:
        raise ConfigError("data.train: a training file is required")
    task = given["data"].get("task", DataConfig.task)
    _choice("data.task", task, TASKS)
    task_defaults = TASK_DEFAULTS[task]
    sections, sources = {}, {}
    for name, cls in _SECTIONS.items():
        values = given[name]
        allowed = {f.name for f in dataclasses.fields(cls)}
        bad = set(values) - allowed
        if bad:
            raise ConfigError(f"{name}.{sorted(bad)[0]}: unknown field; allowed: {', '.join(sorted(allowed))}")
        for key, value in values.items():
            _check_type(f"{name}.{key}", value, cls.__dataclass_fields__[key].type)
        defaults = {k: v for k, v in task_defaults.get(name, {}).items() if k not in values}
        sections[name] = cls(**{**defaults, **values})
        for key in allowed:
            sources[f"{name}.{key}"] = "user" if key in values else "task default" if key in defaults else "default"
    return JobConfig(**sections, sources={**sources, **(raw.get("sources") or {})})


def load_config(path: str | Path) -> dict:
    """Read a YAML or JSON config file into nested dicts (merge CLI flags over it, then config_from_dict)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text) or {}
    except (ValueError, Exception) as err:  # yaml.YAMLError and json.JSONDecodeError both land here
        raise ConfigError(f"config file '{path}' cannot be parsed: {err}") from None


def merge(raw: dict, overrides: dict) -> dict:
    """Overlay {"section": {"key": value}} overrides (None values skipped) on a raw config dict."""
    out = {name: dict(raw.get(name) or {}) for name in raw}
    for section, values in overrides.items():
        for key, value in values.items():
            if value is not None:
                out.setdefault(section, {})[key] = value
    return out


def check_freeze_policy(policy: str) -> None:
    """Validate a freeze policy's spelling before any model is loaded."""
    if policy in ("none", "embeddings", "all-but-head"):
        return
    if isinstance(policy, str) and policy.startswith("bottom:"):
        bottom_count(policy)
        return
    raise ConfigError(f"freeze: unknown policy '{policy}'; allowed: {', '.join(FREEZE_POLICIES)}")


def bottom_count(policy: str) -> int:
    """N of a 'bottom:N' freeze policy."""
    value = policy.split(":", 1)[1]
    if not value.isdigit():
        raise ConfigError(f"freeze: '{policy}' must be bottom:N with N a whole number, e.g. bottom:2")
    return int(value)


def _check_type(name: str, value, annotation: str) -> None:
    expected = {"int": int, "float": (int, float), "bool": bool, "str": str}
    base = annotation.replace(" | None", "")
    if value is None and "None" in annotation:
        return
    may_be_auto = base.endswith(" | str")  # int | str, float | str, bool | str: the value or "auto"
    base = base.removesuffix(" | str")
    if may_be_auto and value == AUTO:
        return
    kind = expected.get(base)
    if kind is None:
        return
    wrong = not isinstance(value, kind) or (base in ("int", "float") and isinstance(value, bool))
    if wrong:
        wanted = f"{base} or 'auto'" if may_be_auto else base
        raise ConfigError(f"{name}: expected {wanted}, got {type(value).__name__} {value!r}")


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: '{value}' is not allowed; choose one of {', '.join(allowed)}")


def _positive_int(name: str, value, upper: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (upper and value > upper):
        limit = f" and <= {upper}" if upper else ""
        raise ConfigError(f"{name}: must be a whole number >= 1{limit}, got {value!r}")


def _number(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name}: must be a number in {bracket}{low}, {high}], got {value!r}")


# Distillation (finetune_core/distill.py): a smaller student learns from a fine-tuned teacher. Measured with
# bench/distill.py on 2 CPU cores (README, "Measured figures"): MiniLM's 3-layer student of a MiniLM teacher
# (SST-2, 4,000 rows, dev 84.17), 4,000 rows x 2 epochs, dev accuracy, mean of 3 seeds: alpha 0.5 T 4 at
# 3e-4 82.49, alpha 0.9 T 4 82.38, labels alone (alpha 0) 81.50; at the teacher's 1e-4: alpha 0.5 T 2 81.57,
# labels alone 81.12. Seed 0 alone: T 8 82.22, alpha 0.7 T 4 82.80; at 2e-4 82.22, at 1e-4 (T 4) 81.42.
# Images (hymenoptera, EfficientNet-Lite0, val 96.73): the teacher at 160 px kept 94.77 at 2.2-3.0x the
# images/s; fewer blocks at 224 (1-2-2-3-2-2-1) 95.42 at only 1.2-1.5x; both at 192 92.81 at 1.8-2.4x.
STUDENT_FOLDER = "model"  # where a distillation keeps its student, under its work folder
DISTILL_GATE_POINTS = 1.5  # accuracy points a distilled variant may lose against the teacher (r2 points for regression)
# A text student's rate when none is given: its layers, copied from apart in the teacher, must learn to fit
# together, and the teacher's own 1e-4 left it a point behind (above).
TEXT_STUDENT_LEARNING_RATE = 3e-4
# Hidden-state matching for a text student made of the teacher's layers, measured the same way (4,000 rows x 2
# epochs, 3 seeds, alpha 0.5 T 4): weight 1 82.19 -> 83.07 (every seed up), 0.1 82.68, for 1.7x the time per run.
TEXT_HIDDEN_WEIGHT = 1.0


@dataclass(frozen=True)
class DistillConfig:
    alpha: float = 0.5  # weight of the distillation term; the labels' loss gets 1 - alpha
    temperature: float = 4.0  # softens both distributions in the KL term
    # Text: the teacher's encoder layers the student keeps (0-based); None: every other one, the last kept
    # (MiniLM's 6 -> [1, 3, 5]). Or `student`: a local model folder that uses the teacher's tokenizer.
    student_layers: list[int] | None = None
    student: str | None = None
    # Text, layer-dropping students: weight of an extra term, the MSE between each kept layer's output and
    # the teacher's same layer (at real tokens); 0 turns it off, None: TEXT_HIDDEN_WEIGHT for such a student.
    # It runs the teacher on every batch (hidden states are too big to keep per row).
    hidden_weight: float | None = None
    # Images: the student's input size (0: the teacher's) and the blocks it keeps per stage (None: all).
    image_size: int = 160
    block_depths: list[int] | None = None
    distill_data: str | None = None  # extra unlabelled rows (texts, or images) labelled by the teacher alone
    max_rows: int = 20_000  # rows distilled on: a seeded sample of the training split and distill_data; 0: all
    epochs: int = 3  # with early stopping on the validation split (the teacher's patience and metric)
    learning_rate: float | None = None  # None: text TEXT_STUDENT_LEARNING_RATE, images the teacher's
    distill_gate: float = DISTILL_GATE_POINTS
    seed: int = 0

    def __post_init__(self):
        _number("distill.alpha", self.alpha, low=0.0, high=1.0)
        _number("distill.temperature", self.temperature, low=0.0, high=100.0, low_open=True)
        if self.student_layers is not None:
            layers = self.student_layers
            if (not isinstance(layers, list) or not layers
                    or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers)):
                raise ConfigError(f"distill.student_layers: must be a non-empty list of layer numbers >= 0, got {layers!r}")
            if len(set(layers)) != len(layers) or sorted(layers) != layers:
                raise ConfigError(f"distill.student_layers: list each layer once, in increasing order, got {layers}")
        if self.student is not None and self.student_layers is not None:
            raise ConfigError("distill.student: give a student folder or student_layers, not both")
        if self.hidden_weight is not None:
            _number("distill.hidden_weight", self.hidden_weight, low=0.0, high=1000.0)
        if self.hidden_weight and self.student is not None:
            raise ConfigError("distill.hidden_weight: hidden-state matching needs a student made of the teacher's own "
                              "layers (student_layers); a student folder's layers need not match the teacher's")
        if self.image_size:
            _positive_int("distill.image_size", self.image_size, upper=1024)
            if self.image_size < 32:
                raise ConfigError(f"distill.image_size: must be 0 (the teacher's) or >= 32 pixels, got {self.image_size}")
        if self.block_depths is not None and (not isinstance(self.block_depths, list) or not self.block_depths or any(
                not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in self.block_depths)):
            raise ConfigError(f"distill.block_depths: must be a list of block counts >= 1, one per stage, got {self.block_depths!r}")
        if not isinstance(self.max_rows, int) or isinstance(self.max_rows, bool) or self.max_rows < 0:
            raise ConfigError(f"distill.max_rows: must be a whole number >= 0 (0: all rows), got {self.max_rows!r}")
        _positive_int("distill.epochs", self.epochs, upper=1000)
        if self.learning_rate is not None:
            _number("distill.learning_rate", self.learning_rate, low=0.0, high=1.0, low_open=True)
        _number("distill.distill_gate", self.distill_gate, low=-100.0, high=100.0)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"distill.seed: must be a whole number, got {self.seed!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def distill_config_from_dict(raw: dict | None) -> DistillConfig:
    """A DistillConfig from a mapping (a request's or a config file's `distill` block), unknown keys refused."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"distill: expected a mapping, got {type(raw).__name__}")
    allowed = {f.name for f in dataclasses.fields(DistillConfig)}
    bad = sorted(set(raw) - allowed)
    if bad:
        raise ConfigError(f"distill.{bad[0]}: unknown field; allowed: {', '.join(sorted(allowed))}")
    for key, value in raw.items():
        if key not in ("student_layers", "block_depths"):
            _check_type(f"distill.{key}", value, DistillConfig.__dataclass_fields__[key].type)
    return DistillConfig(**raw)
