"""Turn a trained model into deployable files and prove each one before it is registered.

fp32 artifacts (ONNX, TorchScript) must match eager PyTorch within a stated tolerance on real
validation inputs (`check_parity`); lossy ones (int8, bf16) are measured on the validation split
and refused when they lose more accuracy than the gate allows (`accuracy_gate`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import FinetuneError

# The inputs BERT-like models take, in the order the traced/exported graph expects them.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "logits"
# fp32 ONNX/TorchScript logits stay within ~1e-6 of eager PyTorch; 1e-4 leaves room for other kernels.
PARITY_ATOL = 1e-4
# Accuracy points (percent) an int8 or bf16 variant may lose against fp32 and still be accepted.
DEFAULT_GATE_POINTS = 1.0
# One int8 scale per weight row rather than per tensor. Measured on all-MiniLM-L6-v2 fine-tuned on
# SST-2 (dev, 872 rows; fp32 84.40): per-channel 85.44, per-tensor 84.63, at the same speed.
DEFAULT_PER_CHANNEL = True

Batch = Mapping[str, np.ndarray]  # int64 model inputs by name
Forward = Callable[[Batch], np.ndarray]  # a batch -> float32 logits (rows, outputs)


class ParityError(FinetuneError):
    """An exported artifact does not reproduce the PyTorch model's outputs."""


def model_input_names(tokenizer) -> list[str]:
    """The graph inputs: those of INPUT_NAMES the tokenizer produces, in INPUT_NAMES order."""
    produced = set(tokenizer.model_input_names)
    return [name for name in INPUT_NAMES if name in produced]


class _LogitsOnly(nn.Module):
    """Positional tensors in, logits out: the signature tracing and ONNX export need."""

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs))).logits


def _example_inputs(tokenizer, names: list[str]) -> tuple[torch.Tensor, ...]:
    # Two rows of different lengths, so the traced graph sees padding and a batch above one.
    encoded = tokenizer(["an example sentence to trace the model with", "short"], padding=True, return_tensors="pt")
    return tuple(encoded[name] for name in names)


def to_onnx(model: nn.Module, tokenizer, path: str | Path, opset: int = 17) -> Path:
    """Export logits to ONNX with dynamic batch and sequence axes (TorchScript-based exporter)."""
    path = Path(path)
    names = model_input_names(tokenizer)
    # export() restores the wrapper's training flag afterwards, which would put `model` in train mode.
    wrapper = _LogitsOnly(model.eval(), names).eval()
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in names}
    dynamic_axes[OUTPUT_NAME] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings about Python-level shape checks in transformers: parity below is the real check.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            _example_inputs(tokenizer, names),
            str(path),
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    return path


def to_torchscript(model: nn.Module, tokenizer, path: str | Path) -> Path:
    """Trace and freeze the model (TorchScript is deprecated: this is the one place that uses it)."""
    path = Path(path)
    names = model_input_names(tokenizer)
    wrapper = _LogitsOnly(model.eval(), names).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, _example_inputs(tokenizer, names))
        torch.jit.save(torch.jit.freeze(traced), str(path))
    return path


def quantize_int8(onnx_path: str | Path, out_path: str | Path, per_channel: bool) -> Path:
    """Dynamic int8 quantization: int8 weights, activations quantized at run time per batch.

    reduce_range stays off: it is meant for CPUs without VNNI, and on SST-2 dev it cost MiniLM
    0.7 points per-channel and 2.6 points per-tensor.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_path = Path(out_path)
    quantize_dynamic(str(onnx_path), str(out_path), per_channel=per_channel, weight_type=QuantType.QInt8)
    return out_path


def parity_batches(encode: Callable[[list[str], int], Batch], texts: Sequence[str], max_length: int) -> list[Batch]:
    """Real inputs at several batch sizes and lengths, padding included.

    `encode(texts, max_length)` tokenizes with padding to the longest and truncation. Batches: 1, 4
    and 16 rows mixing short and long texts, each at a short cut (16 tokens) and the full max_length.
    """
    if not texts:
        raise FinetuneError("parity check: no validation texts to compare outputs on")
    by_length = sorted(texts, key=len)
    # Alternate shortest and longest texts so every batch above one row carries padding.
    mixed = [t for pair in zip(by_length, reversed(by_length)) for t in pair][: len(texts)]
    batches = []
    for size in (1, 4, 16):
        rows = mixed[:size] if size > 1 else by_length[-1:]
        for length in sorted({min(16, max_length), max_length}):
            batches.append(encode(list(rows), length))
    return batches


def parity_figures(reference_fn: Forward, candidate_fn: Forward, batches: Sequence[Batch]) -> dict:
    """Compare two forwards on each batch: max abs difference, argmax agreement, the worst input."""
    worst = {"max_abs_diff": -1.0}
    agree = total = 0
    for index, batch in enumerate(batches):
        reference = np.asarray(reference_fn(batch), dtype=np.float32)
        candidate = np.asarray(candidate_fn(batch), dtype=np.float32)
        if reference.shape != candidate.shape:
            raise ParityError(f"parity: output shapes differ on batch {index}: {reference.shape} vs {candidate.shape}")
        diff = np.abs(reference - candidate)
        if float(diff.max()) > worst["max_abs_diff"]:
            row = int(diff.max(axis=-1).argmax())
            worst = {"max_abs_diff": float(diff.max()), "batch": index, "row": row, "batch_shape": list(batch["input_ids"].shape)}
        if reference.shape[-1] > 1:
            agree += int((reference.argmax(-1) == candidate.argmax(-1)).sum())
        else:
            agree += reference.shape[0]  # regression: one output, nothing to disagree on
        total += reference.shape[0]
    return {
        "max_abs_diff": worst["max_abs_diff"],
        "argmax_agreement": agree / total,
        "worst_input": {k: v for k, v in worst.items() if k != "max_abs_diff"},
        "batch_shapes": [list(b["input_ids"].shape) for b in batches],
    }


def check_parity(reference_fn: Forward, candidate_fn: Forward, batches: Sequence[Batch], atol: float = PARITY_ATOL) -> dict:
    """parity_figures, raising ParityError when any logit differs from the reference by more than atol."""
    figures = dict(parity_figures(reference_fn, candidate_fn, batches), atol=atol)
    if figures["max_abs_diff"] > atol:
        where = figures["worst_input"]
        raise ParityError(
            f"exported model differs from PyTorch by {figures['max_abs_diff']:.3g} (tolerance {atol:g}) on "
            f"batch {where['batch']} (shape {where['batch_shape']}), row {where['row']}; argmax agreement "
            f"{figures['argmax_agreement']:.2%}. The export is wrong: report it with the model's config.json"
        )
    return figures


def accuracy_gate(reference: dict, candidate: dict, gate_points: float = DEFAULT_GATE_POINTS) -> tuple[bool, str]:
    """Accept a lossy variant when its metric drops by at most gate_points against fp32.

    The metric is accuracy for classification and r2 for regression, both in points (x100).
    """
    metric = "accuracy" if "accuracy" in reference else "r2"
    drop = 100.0 * (reference[metric] - candidate[metric])
    verdict = "within" if drop <= gate_points else "exceeds"
    reason = f"{metric} drop {drop:.2f} points vs fp32 ({100 * reference[metric]:.2f} -> {100 * candidate[metric]:.2f}) {verdict} the gate of {gate_points:g}"
    return drop <= gate_points, reason
