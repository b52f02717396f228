"""Turn a trained model into deployable files and prove each one before it is registered.

fp32 artifacts (ONNX, TorchScript) must match eager PyTorch within a stated tolerance on real
validation inputs (`check_parity`); lossy ones (int8, bf16) are measured on the validation split
and refused when they lose more accuracy than the gate allows (`accuracy_gate`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import FinetuneError
from .model import logits_of

log = logging.getLogger(__name__)

# The inputs BERT-like models take, in the order the traced/exported graph expects them.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "logits"
# fp32 ONNX/TorchScript logits stay within ~1e-6 of eager PyTorch for MiniLM and within 2e-5 for
# EfficientNet-Lite0 (hymenoptera at 224 px, logits up to ~8: ONNX 1.0e-5, TorchScript 5.2e-6; the
# 64 px MNIST test model: 2.0e-5, 1.8e-5); 1e-4 leaves room for other kernels.
PARITY_ATOL = 1e-4
# Accuracy points (percent) an int8 or bf16 variant may lose against fp32 and still be accepted.
DEFAULT_GATE_POINTS = 1.0
# One int8 scale per weight row rather than per tensor. Measured on all-MiniLM-L6-v2 fine-tuned on
# SST-2 (dev, 872 rows; fp32 84.40): per-channel 85.44, per-tensor 84.63, at the same speed.
DEFAULT_PER_CHANNEL = True

# Static int8 (images) calibrates activation ranges on this many training images, evaluation transform.
CALIBRATION_ROWS = 64
CALIBRATION_BATCH = 16
# How activation ranges are picked from the calibration outputs. EfficientNet-Lite0 fine-tuned on
# hymenoptera (224 px, val 153 images, fp32 94.77), 64 calibration images, per-channel: minmax,
# percentile (99.999) and entropy all 94.12 (99.3% argmax agreement with fp32), so the cheapest:
# minmax calibrates about 3x faster (6 s against 18-19 s). Per-tensor minmax: 91.50, so per-channel.
DEFAULT_CALIBRATION = "minmax"
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")

Batch = Mapping[str, np.ndarray]  # model inputs by name: int64 token ids, or float32 pixel_values
Forward = Callable[[Batch], np.ndarray]  # a batch -> float32 logits (rows, outputs)


class ParityError(FinetuneError):
    """An exported artifact does not reproduce the PyTorch model's outputs."""


@dataclass(frozen=True)
class ModelInputs:
    """What the exported graph takes, as data: input names in order, example tensors, dynamic axes."""

    names: list[str]
    examples: tuple[torch.Tensor, ...]  # traced through the model, one per name
    dynamic_axes: dict[str, dict[int, str]]


def model_input_names(tokenizer) -> list[str]:
    """The graph inputs: those of INPUT_NAMES the tokenizer produces, in INPUT_NAMES order."""
    produced = set(tokenizer.model_input_names)
    return [name for name in INPUT_NAMES if name in produced]


def text_inputs(tokenizer) -> ModelInputs:
    """Token ids (and masks) with dynamic batch and sequence axes."""
    names = model_input_names(tokenizer)
    # Two rows of different lengths, so the traced graph sees padding and a batch above one.
    encoded = tokenizer(["an example sentence to trace the model with", "short"], padding=True, return_tensors="pt")
    return ModelInputs(names, tuple(encoded[name] for name in names), {name: {0: "batch", 1: "sequence"} for name in names})


def image_inputs(image_size: int) -> ModelInputs:
    """float32 pixel_values [batch, 3, size, size]: the batch is dynamic, the size is the model's own."""
    example = torch.zeros(2, 3, image_size, image_size)  # two rows: the traced graph sees a batch above one
    return ModelInputs(["pixel_values"], (example,), {"pixel_values": {0: "batch"}})


class _LogitsOnly(nn.Module):
    """Positional tensors in, logits out: the signature tracing and ONNX export need."""

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(**dict(zip(self.input_names, inputs))))


def to_onnx(model: nn.Module, inputs: ModelInputs, path: str | Path, opset: int = 17) -> Path:
    """Export logits to ONNX with the inputs' dynamic axes (TorchScript-based exporter)."""
    path = Path(path)
    # export() restores the wrapper's training flag afterwards, which would put `model` in train mode.
    wrapper = _LogitsOnly(model.eval(), inputs.names).eval()
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings about Python-level shape checks in transformers: parity below is the real check.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            inputs.examples,
            str(path),
            input_names=inputs.names,
            output_names=[OUTPUT_NAME],
            dynamic_axes={**inputs.dynamic_axes, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path


def to_torchscript(model: nn.Module, inputs: ModelInputs, path: str | Path) -> Path:
    """Trace and freeze the model (TorchScript is deprecated: this is the one place that uses it)."""
    path = Path(path)
    wrapper = _LogitsOnly(model.eval(), inputs.names).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, inputs.examples)
        torch.jit.save(torch.jit.freeze(traced), str(path))
    return path


def quantize_int8(onnx_path: str | Path, out_path: str | Path, per_channel: bool, reduce_range: bool = False) -> Path:
    """Dynamic int8 quantization (text models): int8 weights, activations quantized at run time per batch.

    reduce_range=True quantizes weights to 7 bits. Which is better depends on the CPU that runs the
    model, so artifacts.py builds both and keeps the one closer to fp32 (dynamic_int8): on a CPU
    with VNNI (AVX512-VNNI/AMX), 7 bits cost MiniLM 0.7 points of SST-2 dev accuracy per-channel;
    on an AVX2-only CPU, 8-bit weights saturate ORT's 16-bit accumulation (vpmaddubsw) and a tiny
    BERT's logits moved by 0.67, against 0.005 with 7 bits.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_path = Path(out_path)
    quantize_dynamic(str(onnx_path), str(out_path), per_channel=per_channel, reduce_range=reduce_range,
                     weight_type=QuantType.QInt8)
    return out_path


def dynamic_int8(onnx_path: str | Path, out_path: str | Path, reference_fn: Forward, batches: Sequence[Batch],
                 load: Callable[[Path], Forward], per_channel: bool = DEFAULT_PER_CHANNEL) -> tuple[Path, dict]:
    """Dynamic int8 with 8- and 7-bit weights; keep the one whose outputs are closer to `reference_fn` here.

    `load` runs an ONNX file (predict.onnx_backend). Returns the path and the details for the proof:
    the choice and both candidates' parity figures.
    """
    out_path = Path(out_path)
    figures = {}
    for reduce_range in (False, True):
        candidate = out_path.with_name(f"{out_path.stem}.{'7bit' if reduce_range else '8bit'}{out_path.suffix}")
        quantize_int8(onnx_path, candidate, per_channel, reduce_range)
        found = parity_figures(reference_fn, load(candidate), batches)
        figures[reduce_range] = (candidate, found)
    # Fewer changed decisions first, then the smaller worst difference.
    best = min(figures, key=lambda rr: (-figures[rr][1]["argmax_agreement"], figures[rr][1]["max_abs_diff"]))
    for reduce_range, (candidate, _) in figures.items():
        if reduce_range == best:
            os.replace(candidate, out_path)
        else:
            candidate.unlink()
    details = {"kind": "dynamic", "per_channel": per_channel, "weight_bits": 7 if best else 8,
               "chosen_by": "closest to fp32 on the parity batches on the exporting machine",
               "candidates": {f"{7 if rr else 8}bit": {k: f[k] for k in ("max_abs_diff", "argmax_agreement")}
                              for rr, (_, f) in figures.items()}}
    return out_path, details


def quantize_static_int8(onnx_path: str | Path, out_path: str | Path, calibration: Sequence[Batch],
                         method: str = DEFAULT_CALIBRATION, per_channel: bool = DEFAULT_PER_CHANNEL) -> tuple[Path, dict]:
    """Static int8 (QDQ) for convolutional models: activation ranges fixed beforehand on `calibration`.

    Dynamic quantization does little for convolutions (it quantizes MatMul-like weights and leaves
    the convs in fp32). The model first goes through ORT's quant_pre_process (shape inference and
    graph optimisation, as ORT recommends); when that fails the export is quantized as it is and the
    details say why. Returns the path and the details recorded in the proof.
    """
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise FinetuneError(f"calibration method '{method}' is unknown; choose one of {', '.join(CALIBRATION_METHODS)}")
    if not calibration:
        raise FinetuneError("static int8: no calibration batches; the training split has no usable images")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="finetune-quant-") as scratch:
        source, preprocessed = Path(onnx_path), "quant_pre_process"
        try:
            quant_pre_process(str(source), str(Path(scratch) / "pre.onnx"))
            source = Path(scratch) / "pre.onnx"
        except Exception as err:  # any failure of the optional pass: quantize the export as it is
            preprocessed = f"skipped: quant_pre_process failed ({type(err).__name__}: {err})"
            log.warning("static int8: %s", preprocessed)
        shape_nodes = shape_arithmetic_nodes(str(source))
        quantize_static(
            str(source),
            str(out_path),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            # uint8 activations, int8 weights (U8S8): ORT's x86 kernels fuse every conv into QLinearConv.
            # With int8 activations 18 of EfficientNet-Lite0's 49 convs stayed as DequantizeLinear ->
            # fp32 Conv -> QuantizeLinear (plus transposes), no faster than fp32. 224 px, 1 thread,
            # ms at batch 1 / 32: fp32 13.3 / 492, S8S8 13.4 / 509, U8S8 8.3 / 286.
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            nodes_to_exclude=shape_nodes,
        )
    details = {
        "kind": "static",
        "format": "QDQ",
        "types": "uint8 activations, int8 weights",
        "method": method,
        "rows": int(sum(len(next(iter(b.values()))) for b in calibration)),
        "per_channel": per_channel,
        "preprocessing": preprocessed,
        "shape_nodes_kept_fp32": len(shape_nodes),
    }
    return out_path, details


def shape_arithmetic_nodes(onnx_path: str) -> list[str]:
    """Nodes that compute on tensor shapes rather than on the input's values: never to be quantized.

    timm's TF-style "same" padding (EfficientNet-Lite's strided convs) is computed in the graph from
    Shape through float Clip/Div; quantizing those scalars rounded pads to the wrong size, and at 64
    px the int8 model shrank an 8x8 map to 7x7 and gave 0.0 logits. Keeping them fp32, on MNIST at
    64 px (fp32 90.00): int8 38.33 -> 86.67; on hymenoptera at 224 argmax agreement with fp32 went
    98.0% -> 99.3%, max logit error 2.45 -> 1.34. A node is data when one of its inputs is data (the
    graph inputs, then anything computed from them); Shape's output is not data.
    """
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    data = {i.name for i in graph.input}
    shape_nodes = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type != "Shape" and any(name in data for name in node.input):
            data.update(node.output)
        elif node.name:
            shape_nodes.append(node.name)
    return shape_nodes


class _Batches:
    """ONNX Runtime's calibration reader contract (get_next until None) over prepared batches."""

    def __init__(self, batches: Sequence[Batch]):
        self._batches = iter(batches)

    def get_next(self) -> Batch | None:
        return next(self._batches, None)


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


def image_parity_batches(pixel_values: np.ndarray) -> list[Batch]:
    """Real preprocessed images (float32 rows, 3, size, size) at batch 1, 4 and 16 (fewer if fewer rows)."""
    if len(pixel_values) == 0:
        raise FinetuneError("parity check: no validation images to compare outputs on")
    return [{"pixel_values": pixel_values[:size]} for size in (1, 4, 16)]


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
            worst = {"max_abs_diff": float(diff.max()), "batch": index, "row": row, "batch_shape": _shape(batch)}
        if reference.shape[-1] > 1:
            agree += int((reference.argmax(-1) == candidate.argmax(-1)).sum())
        else:
            agree += reference.shape[0]  # regression: one output, nothing to disagree on
        total += reference.shape[0]
    return {
        "max_abs_diff": worst["max_abs_diff"],
        "argmax_agreement": agree / total,
        "worst_input": {k: v for k, v in worst.items() if k != "max_abs_diff"},
        "batch_shapes": [_shape(b) for b in batches],
    }


def _shape(batch: Batch) -> list[int]:
    return list(next(iter(batch.values())).shape)  # the first input: token ids or pixel_values


def check_parity(reference_fn: Forward, candidate_fn: Forward, batches: Sequence[Batch], atol: float = PARITY_ATOL) -> dict:
    """parity_figures, raising ParityError when any logit differs from the reference by more than atol."""
    figures = dict(parity_figures(reference_fn, candidate_fn, batches), atol=atol)
    if figures["max_abs_diff"] > atol:
        where = figures["worst_input"]
        raise ParityError(
            f"exported model differs from PyTorch by {figures['max_abs_diff']:.3g} (tolerance {atol:g}) on "
            f"batch {where['batch']} (shape {where['batch_shape']}), row {where['row']}; argmax agreement "
            f"{figures['argmax_agreement']:.2%}. The export is wrong: report it with the model folder's config files"
        )
    return figures


def accuracy_gate(reference: dict, candidate: dict, gate_points: float = DEFAULT_GATE_POINTS,
                  against: str = "fp32") -> tuple[bool, str]:
    """Accept a lossy variant (or a distilled student) when its metric drops by at most gate_points.

    The metric is accuracy for classification and r2 for regression, both in points (x100);
    `against` names the reference in the reason ("fp32", "the teacher").
    """
    metric = "accuracy" if "accuracy" in reference else "r2"
    drop = 100.0 * (reference[metric] - candidate[metric])
    verdict = "within" if drop <= gate_points else "exceeds"
    reason = (f"{metric} drop {drop:.2f} points vs {against} ({100 * reference[metric]:.2f} -> "
              f"{100 * candidate[metric]:.2f}) {verdict} the gate of {gate_points:g}")
    return drop <= gate_points, reason
