"""What a hyperparameter search tries: the search spec, checked before any trial runs (no Optuna here).

A spec is `trials`, `timeout_s`, `sampler`, `pruner`, `metric` and a `space` of config fields:
`{"learning_rate": {"low": 1e-5, "high": 3e-4, "log": true}, "freeze": ["none", "bottom:2"]}`, a range
for a number field, a list of values for any field. Every error names the field at fault in the
request's own words (`search.space.learning_rate.low: must be > 0 with log: true, got 0`), and every
value a trial could get is checked against the job's config up front, so a trial never fails on one.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from .config import DataConfig, JobConfig, ModelConfig, TrainConfig, config_from_dict, merge
from .errors import ConfigError

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
MAX_TRIALS = 1000
# The config fields a search may vary, and the section each lives in. Fields that change what is
# measured (early_stopping_metric, the data files) or only how fast (threads, logging) are not here.
SEARCHABLE = {
    "learning_rate": "train", "weight_decay": "train", "warmup_ratio": "train", "batch_size": "train",
    "epochs": "train", "label_smoothing": "train", "max_grad_norm": "train", "gradient_accumulation": "train",
    "optimizer": "train", "schedule": "train", "class_weights": "train", "early_stopping_patience": "train",
    "regression_loss": "train", "seed": "train", "freeze": "model", "max_length": "data", "image_size": "data",
    "augment": "data", "horizontal_flip": "data",
}
# The space a search gets when it names none. Text: MiniLM's measured best rate (1e-4) sits mid-way, on
# a log scale, between 1e-5 (slow to learn in a few epochs) and 3e-4 (where small sets start to
# diverge); warm-up around the default 0.06; freezing the bottom layers can help a small set and
# trains faster. Images: a frozen ImageNet network's head trains best near 3e-3 and the whole network
# near 1e-3 or below (README, "Images"), so the rate spans both, with the freeze policies between them.
DEFAULT_SPACES = {
    "text": {"learning_rate": {"low": 1e-5, "high": 3e-4, "log": True}, "warmup_ratio": {"low": 0.0, "high": 0.2},
             "freeze": ["none", "embeddings", "bottom:2"]},
    "image": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "freeze": ["all-but-head", "bottom:4", "none"]},
}
_FIELDS = ("trials", "timeout_s", "sampler", "pruner", "space", "metric")
_CORE_PREFIX = re.compile(r"^(?:(?:data|model|train)\.[a-z_]+|freeze):\s*")


@dataclass(frozen=True)
class Range:
    """A number drawn from [low, high]; on a log scale when `log`; whole numbers for an int field."""

    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class Choice:
    """One of a list of values."""

    name: str
    values: tuple


@dataclass(frozen=True)
class SearchSpec:
    trials: int
    timeout_s: float | None  # no new trial starts after this many seconds of a search run
    sampler: str  # one of SAMPLERS
    pruner: str  # one of PRUNERS
    space: tuple[Range | Choice, ...]
    metric: str  # "validation.<metric>", one the training loop evaluates

    @property
    def metric_name(self) -> str:
        return self.metric.removeprefix("validation.")

    @property
    def grid_size(self) -> int:
        """Points of a grid over the space (a grid spec holds lists only)."""
        return math.prod(len(p.values) for p in self.space if isinstance(p, Choice))

    def to_dict(self) -> dict:
        space = {p.name: list(p.values) if isinstance(p, Choice) else {"low": p.low, "high": p.high, "log": p.log}
                 for p in self.space}
        return {"trials": self.trials, "timeout_s": self.timeout_s, "sampler": self.sampler, "pruner": self.pruner,
                "space": space, "metric": self.metric}


def search_spec_from_dict(raw: dict | None, cfg: JobConfig) -> SearchSpec:
    """Check a `search` block against the job it tunes; omitted values get defaults (the space: per task)."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"search: expected a mapping with {', '.join(_FIELDS)}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"search.{unknown[0]}: unknown field; allowed: {', '.join(_FIELDS)}")
    trials = raw.get("trials", 10)
    if not isinstance(trials, int) or isinstance(trials, bool) or not 1 <= trials <= MAX_TRIALS:
        raise ConfigError(f"search.trials: must be a whole number >= 1 and <= {MAX_TRIALS}, got {trials!r}")
    timeout = raw.get("timeout_s")
    if timeout is not None and (not _is_number(timeout) or timeout <= 0):
        raise ConfigError(f"search.timeout_s: must be a number of seconds > 0, got {timeout!r}")
    sampler, pruner = raw.get("sampler", "tpe"), raw.get("pruner", "median")
    for name, value, allowed in (("sampler", sampler, SAMPLERS), ("pruner", pruner, PRUNERS)):
        if value not in allowed:
            raise ConfigError(f"search.{name}: '{value}' is not allowed; choose one of {', '.join(allowed)}")
    metric = raw.get("metric") or f"validation.{cfg.train.early_stopping_metric}"
    _check_metric(metric, cfg)
    space_raw = raw.get("space")
    if space_raw is None:
        space_raw = DEFAULT_SPACES["image" if cfg.data.task.startswith("image") else "text"]
    space = _space(space_raw, cfg)
    if sampler == "grid":
        ranged = [p.name for p in space if isinstance(p, Range)]
        if ranged:
            raise ConfigError(f"search.space.{ranged[0]}: the grid sampler takes lists of values only, e.g. [1e-4, 3e-4]; "
                              "give a list or use sampler tpe or random")
    return SearchSpec(trials, None if timeout is None else float(timeout), sampler, pruner, space, metric)


def apply_params(cfg: JobConfig, params: dict) -> JobConfig:
    """The job's config with a trial's values set, checked by the config's own rules."""
    overrides: dict[str, dict] = {}
    for name, value in params.items():
        overrides.setdefault(SEARCHABLE[name], {})[name] = value
    raw = merge(cfg.to_dict(), overrides)
    # A searched value is the user's choice (they chose the space), not a default.
    raw["sources"] = {**cfg.sources, **{f"{SEARCHABLE[name]}.{name}": "search" for name in params}}
    return config_from_dict(raw)


def _check_metric(metric, cfg: JobConfig) -> None:
    if not isinstance(metric, str) or not metric.startswith("validation."):
        raise ConfigError(f"search.metric: must be validation.<metric> (trials are compared on the validation split), "
                          f"got {metric!r}")
    name = metric.removeprefix("validation.")
    try:  # the same rules as the early-stopping metric: evaluated by the loop, and fit for the task
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, early_stopping_metric=name))
    except ConfigError as err:
        raise ConfigError(f"search.metric: {_CORE_PREFIX.sub('', str(err))}") from None


def _space(raw, cfg: JobConfig) -> tuple[Range | Choice, ...]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("search.space: expected a mapping of config fields to ranges or lists, e.g. "
                          '{"learning_rate": {"low": 1e-5, "high": 3e-4, "log": true}, "freeze": ["none", "bottom:2"]}')
    params = []
    for name, value in raw.items():
        where = f"search.space.{name}"
        if name not in SEARCHABLE:
            raise ConfigError(f"{where}: unknown field; searchable: {', '.join(sorted(SEARCHABLE))}")
        if isinstance(value, list):
            params.append(_choice(where, name, value, cfg))
        elif isinstance(value, dict):
            params.append(_range(where, name, value, cfg))
        else:
            raise ConfigError(f"{where}: expected a list of values or {{low, high, log}}, got {value!r}")
    return tuple(params)


def _choice(where: str, name: str, values: list, cfg: JobConfig) -> Choice:
    if not values:
        raise ConfigError(f"{where}: the list of values is empty")
    for i, value in enumerate(values):
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"{where}[{i}]: expected a number, text or true/false, got {value!r}")
        _check_value(f"{where}[{i}]", name, value, cfg)
    if len(set(map(repr, values))) < len(values):
        raise ConfigError(f"{where}: values repeat; list each once")
    return Choice(name, tuple(values))


def _range(where: str, name: str, spec: dict, cfg: JobConfig) -> Range:
    unknown = sorted(set(spec) - {"low", "high", "log"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; a range is {{low, high, log}}")
    kind = _field_type(name)
    if kind not in ("int", "float"):
        raise ConfigError(f"{where}: {name} is not a number; give a list of values instead, e.g. [..., ...]")
    for key in ("low", "high"):
        value = spec.get(key)
        if not _is_number(value) or (kind == "int" and not isinstance(value, int)):
            raise ConfigError(f"{where}.{key}: expected {'a whole number' if kind == 'int' else 'a number'}, got {value!r}")
        _check_value(f"{where}.{key}", name, value, cfg)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: expected true or false, got {log!r}")
    low, high = spec["low"], spec["high"]
    if log and low <= 0:
        raise ConfigError(f"{where}.low: must be > 0 with log: true, got {low!r}")
    if low >= high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
    return Range(name, low, high, log, kind == "int")


def _check_value(where: str, name: str, value, cfg: JobConfig) -> None:
    try:
        apply_params(cfg, {name: value})
    except ConfigError as err:
        raise ConfigError(f"{where}: {_CORE_PREFIX.sub('', str(err))}") from None


def _field_type(name: str) -> str:
    """The config field's own type, "int" from "int | str" (a number or "auto")."""
    cls = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}[SEARCHABLE[name]]
    return cls.__dataclass_fields__[name].type.split(" | ")[0]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
