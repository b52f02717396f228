"""Export a trained model folder into a new registered version: build, prove, measure, register.

Each variant is built into a staging folder, proved (fp32: parity with PyTorch, or the export
fails; int8/bf16: the accuracy gate, refusals are recorded but not stored), measured on the
validation split (accuracy/macro-F1 or regression errors, batch-1 latency, throughput), and the
whole folder is registered as one immutable version.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import export, registry
from .data import clean, encode_labels, read_examples, regression_targets
from .errors import ConfigError, DataError
from .evaluate import classification_metrics, regression_metrics
from .model import load_trained
from .predict import TextPredictor, eager_backend, onnx_backend, regression_values, torchscript_backend

log = logging.getLogger(__name__)

EXPORT_VARIANTS = ("onnx", "torchscript", "int8", "bf16")
MODEL_FOLDER = "model"
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "int8": "model.int8.onnx"}
# Single-text calls timed for the latency figure; the throughput figure is the whole validation pass.
LATENCY_SAMPLES = 20


def export_version(
    model_dir: str | Path,
    name: str,
    variants: Sequence[str] = EXPORT_VARIANTS,
    validation: str | Path | None = None,
    gate_points: float = export.DEFAULT_GATE_POINTS,
) -> registry.VersionInfo:
    """Build the asked-for variants of RUN_DIR/model, prove and measure each, register a new version.

    validation defaults to RUN_DIR/splits/validation.jsonl. Raises ParityError when an fp32 artifact
    does not match PyTorch; int8/bf16 variants failing the gate are recorded as refused.
    """
    registry.validate_name(name)
    unknown = [v for v in variants if v not in EXPORT_VARIANTS]
    if unknown:
        raise ConfigError(f"variants: unknown {unknown}; choose from {', '.join(EXPORT_VARIANTS)}")
    model_dir = Path(model_dir)
    run_dir = model_dir.parent
    validation = Path(validation) if validation else run_dir / "splits" / "validation.jsonl"
    if not validation.is_file():
        raise DataError(f"validation file '{validation}' does not exist; pass --validation FILE (JSONL with text and label)")
    model, tokenizer, meta = load_trained(model_dir)
    texts, labels, _ = clean(*read_examples(validation, role="validation"))
    targets = _targets(labels, meta)

    reference = TextPredictor(tokenizer, meta, eager_backend(model), "pytorch")
    batches = export.parity_batches(reference.encode, texts, meta["max_length"])
    fp32 = _measure(reference, texts, targets)
    entries = {"pytorch": dict(fp32, file=MODEL_FOLDER, accepted=True, reason="the trained model (reference)")}
    with tempfile.TemporaryDirectory(prefix="finetune-export-") as scratch:
        staging = Path(scratch) / "version"
        shutil.copytree(model_dir, staging / MODEL_FOLDER)
        for variant in variants:
            start = time.perf_counter()
            path, backend = _build(variant, model, tokenizer, staging, Path(scratch))
            candidate = TextPredictor(tokenizer, meta, backend, variant)
            if variant in ("onnx", "torchscript"):
                proof = export.check_parity(reference.backend, backend, batches)  # raises when off
                accepted, reason = True, f"matches PyTorch within {proof['atol']:g} (max abs diff {proof['max_abs_diff']:.2g})"
                measured = _measure(candidate, texts, targets)
            else:
                proof = export.parity_figures(reference.backend, backend, batches)
                measured = _measure(candidate, texts, targets)
                accepted, reason = export.accuracy_gate(fp32, measured, gate_points)
                if not accepted and path.is_file():
                    path.unlink()  # a refused variant is recorded, not stored
            stored = path.relative_to(staging).as_posix() if accepted else None
            entries[variant] = dict(measured, file=stored, proof=proof, accepted=accepted, reason=reason)
            log.info("%s: %s in %.1fs: %s", name, variant, time.perf_counter() - start, reason)
        metrics = _run_metrics(run_dir)
        manifest = {
            "task": meta["task"],
            "labels": meta["labels"],
            "base_model": meta["base_model"],
            "max_length": meta["max_length"],
            "source_run": str(run_dir.resolve()),
            "training_metrics": metrics.get("train"),
            "validation_metrics": metrics.get("validation"),
            "proof": {
                "validation_file": str(validation.resolve()),
                "rows": len(texts),
                "gate_points": gate_points,
                "parity_atol": export.PARITY_ATOL,
            },
            "variants": entries,
        }
        return registry.register(name, staging, manifest)


def _build(variant: str, model, tokenizer, staging: Path, scratch: Path) -> tuple[Path, export.Forward]:
    """Write one variant into staging; return its path and a backend running it."""
    if variant == "onnx":
        path = export.to_onnx(model, tokenizer, staging / FILES["onnx"])
        return path, onnx_backend(path)
    if variant == "torchscript":
        path = export.to_torchscript(model, tokenizer, staging / FILES["torchscript"])
        return path, torchscript_backend(path, export.model_input_names(tokenizer))
    if variant == "int8":
        fp32_onnx = staging / FILES["onnx"]
        if not fp32_onnx.is_file():
            fp32_onnx = export.to_onnx(model, tokenizer, scratch / FILES["onnx"])
        path = export.quantize_int8(fp32_onnx, staging / FILES["int8"], per_channel=export.DEFAULT_PER_CHANNEL)
        return path, onnx_backend(path)
    # bf16: the model folder's weights converted at load time, so no file of its own.
    return staging / MODEL_FOLDER, eager_backend(copy.deepcopy(model), torch.bfloat16)


def _measure(predictor: TextPredictor, texts: list[str], targets: np.ndarray) -> dict:
    """Quality on the validation split, batch-1 latency and whole-split throughput."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per chunk
    start = time.perf_counter()
    sorted_logits = predictor.logits([texts[i] for i in order])
    elapsed = time.perf_counter() - start
    logits = np.empty_like(sorted_logits)
    logits[order] = sorted_logits
    timings = []
    for text in texts[:LATENCY_SAMPLES]:
        start = time.perf_counter()
        predictor.logits([text])
        timings.append(1000 * (time.perf_counter() - start))
    if predictor.meta["task"] == "text-regression":
        quality = regression_metrics(targets, regression_values(logits, predictor.meta))
    else:
        quality = classification_metrics(targets, logits.argmax(-1), predictor.meta["labels"])
    return dict(quality, latency_ms_batch1=statistics.median(timings), throughput_per_s=len(texts) / elapsed)


def _targets(raw: list, meta: dict) -> np.ndarray:
    if meta["task"] == "text-regression":
        return np.array(regression_targets(raw, "validation"))
    return np.array(encode_labels(raw, meta["labels"], "validation"))


def _run_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}
