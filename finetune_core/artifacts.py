"""Export a trained model folder into a new registered version: build, prove, measure, register.

Each variant is built into a staging folder, proved (fp32: parity with PyTorch, or the export
fails; int8/bf16: the accuracy gate, refusals are recorded but not stored), measured on the
validation split (accuracy/macro-F1 or regression errors, batch-1 latency, throughput), and the
whole folder is registered as one immutable version. Text and image models differ only in how the
subject is loaded (`_text_subject`, `_image_subject`) and in int8: dynamic for text, static with
calibration on training images for images.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import export, registry
from .config import DISTILL_GATE_POINTS
from .data import clean
from .errors import ConfigError, DataError
from .evaluate import classification_metrics, regression_metrics
from .metadata import Columns, Manifest, ModelMeta, VariantRecord, read_meta
from .model import load_trained
from .predict import (DISTILLED_VARIANTS, ImagePredictor, Predictor, TextPredictor, eager_backend, measuring_machine,
                      onnx_backend, regression_values, torchscript_backend)
from .tables import encode_labels, read_examples, regression_targets

log = logging.getLogger(__name__)

TEACHER_VARIANTS = ("onnx", "torchscript", "int8", "bf16")  # built from the trained model; the default
EXPORT_VARIANTS = TEACHER_VARIANTS + DISTILLED_VARIANTS
MODEL_FOLDER = "model"
DISTILLED_FOLDER = "distilled"  # the `distilled` variant: the student's model folder with its ONNX export inside
# The teacher's ONNX file and the student's (inside its folder) share a name; the registry serves the student by it.
FILES = {"onnx": registry.STUDENT_ONNX, "torchscript": "model.torchscript.pt", "int8": "model.int8.onnx",
         "distilled-int8": "distilled.int8.onnx"}
# Single-input calls timed for the latency figure; the throughput figure is the whole validation pass.
LATENCY_SAMPLES = 20
THROUGHPUT_PASSES = 5  # whole-split passes timed at most; the fastest counts
THROUGHPUT_SECONDS = 2.0  # no further pass once this much time has gone into them


@dataclass
class _Subject:
    """The trained model and what proves it: its inputs, a reference predictor, validation rows."""

    model: nn.Module
    model_dir: Path
    meta: ModelMeta
    inputs: export.ModelInputs
    reference: Predictor  # eager fp32
    examples: list  # validation texts or image paths
    targets: np.ndarray
    batches: list[export.Batch]  # parity inputs
    predictor: Callable[[export.Forward, str], Predictor]  # the same preprocessing around another backend
    calibration: Callable[[], tuple[list[export.Batch], dict]] | None  # static int8 (images); None: dynamic


def export_version(
    model_dir: str | Path,
    name: str,
    variants: Sequence[str] = TEACHER_VARIANTS,
    validation: str | Path | None = None,
    gate_points: float = export.DEFAULT_GATE_POINTS,
    text_column: str | None = None,
    label_column: str | None = None,
    image_column: str | None = None,
    *,
    student: str | Path | None = None,
    distill_gate: float = DISTILL_GATE_POINTS,
    run_dir: str | Path | None = None,
) -> registry.VersionInfo:
    """Build the asked-for variants of RUN_DIR/model, prove and measure each, register a new version.

    validation defaults to RUN_DIR/splits/validation.jsonl (RUN_DIR: `run_dir`, else the model folder's
    parent; its metrics.json and, for image int8, its splits/train.jsonl are used too). Raises
    ParityError when an fp32 artifact does not match PyTorch; int8/bf16 variants failing the gate
    are recorded as refused. The columns name a given validation file's columns; by default the ones
    the model was trained with. `distilled` / `distilled-int8` need `student`, a distilled model
    folder (finetune_core.distill): it is proved like the teacher and gated against it by distill_gate.
    """
    registry.validate_name(name)
    unknown = [v for v in variants if v not in EXPORT_VARIANTS]
    if unknown:
        raise ConfigError(f"variants: unknown {unknown}; choose from {', '.join(EXPORT_VARIANTS)}")
    distilled = [v for v in DISTILLED_VARIANTS if v in variants]
    if distilled and student is None:
        raise ConfigError(f"variants: {distilled} need a distilled student; distil first (`finetune-serve distill`, "
                          "or ask for them in POST /finetune), or leave them out")
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    run_dir = Path(run_dir) if run_dir is not None else model_dir.parent
    columns = meta.columns(text_column, label_column, image_column)
    if validation is None:  # the run's own split, written with the standard column names
        validation, columns = run_dir / "splits" / "validation.jsonl", Columns()
    validation = Path(validation)
    if not validation.exists():
        raise DataError(f"validation file '{validation}' does not exist; pass --validation FILE (JSONL with "
                        f"text and label; for image models an image list or a class folder)")
    train_list = run_dir / "splits" / "train.jsonl"
    wants_int8 = "int8" in variants or "distilled-int8" in variants
    if meta.is_image:
        subject = _image_subject(model_dir, validation, train_list, wants_int8, columns)
    else:
        subject = _text_subject(model_dir, validation, columns)

    fp32 = _measure(subject.reference, subject.examples, subject.targets)
    records = {"pytorch": VariantRecord(True, "the trained model (reference)", file=MODEL_FOLDER, figures=fp32)}
    with tempfile.TemporaryDirectory(prefix="finetune-export-") as scratch:
        staging = Path(scratch) / "version"
        shutil.copytree(model_dir, staging / MODEL_FOLDER)
        for variant in (v for v in variants if v in TEACHER_VARIANTS):
            start = time.perf_counter()
            records[variant] = _prove(variant, subject, fp32, gate_points, staging, Path(scratch))
            log.info("%s: %s in %.1fs: %s", name, variant, time.perf_counter() - start, records[variant].reason)
        if distilled:  # distilled-int8 alone brings distilled: it is served with the student's folder
            with_int8 = "distilled-int8" in variants
            if meta.is_image:
                student_subject = _image_subject(Path(student), validation, train_list, with_int8, columns)
            else:
                student_subject = _text_subject(Path(student), validation, columns)
            records |= _distilled(student_subject, fp32, records, with_int8, gate_points, distill_gate, staging,
                                  Path(scratch))
        metrics = run_metrics(run_dir)
        proof = {"validation_file": str(validation.resolve()), "rows": len(subject.examples), "gate_points": gate_points,
                 "parity_atol": export.PARITY_ATOL, "machine": measuring_machine()}
        if distilled:
            proof["distill_gate"] = distill_gate
            proof["student"] = str(Path(student).resolve())  # how a job's registration is found again (registry)
        manifest = Manifest(
            model=subject.meta,
            variants=records,
            proof=proof,
            source_run=str(run_dir.resolve()),
            training_metrics=metrics.get("train"),
            validation_metrics=metrics.get("validation"),
        )
        return registry.register(name, staging, manifest)


def _prove(variant: str, subject: _Subject, fp32: dict, gate_points: float, staging: Path, scratch: Path,
           against: str = "fp32") -> VariantRecord:
    """Build one variant into staging, prove it (fp32: parity, raising when off; lossy: the gate), measure it."""
    path, backend, quantization = _build(variant, subject, staging, scratch)
    candidate = subject.predictor(backend, variant)
    if variant in ("onnx", "torchscript"):
        proof = export.check_parity(subject.reference.backend, backend, subject.batches)  # raises when off
        accepted, reason = True, f"matches PyTorch within {proof['atol']:g} (max abs diff {proof['max_abs_diff']:.2g})"
        measured = _measure(candidate, subject.examples, subject.targets)
    else:
        proof = export.parity_figures(subject.reference.backend, backend, subject.batches)
        if quantization:
            proof["quantization"] = quantization
        measured = _measure(candidate, subject.examples, subject.targets)
        accepted, reason = export.accuracy_gate(fp32, measured, gate_points, against)
        if not accepted and path.is_file():
            path.unlink()  # a refused variant is recorded, not stored
    stored = path.relative_to(staging).as_posix() if accepted else None
    return VariantRecord(accepted, reason, file=stored, proof=proof, figures=measured)


def _distilled(student: _Subject, teacher_fp32: dict, teacher: dict[str, VariantRecord], with_int8: bool,
               gate_points: float, distill_gate: float, staging: Path, scratch: Path) -> dict[str, VariantRecord]:
    """The student proved like the teacher, gated against it, stored as `distilled` (and `distilled-int8`).

    distilled: the student's folder (its model files and model.onnx, which serves it). Its ONNX and
    TorchScript exports must match the eager student within the parity tolerance (ParityError
    otherwise); it is accepted when its accuracy is within distill_gate points of the teacher's fp32.
    distilled-int8: int8 from the student's ONNX, accepted within gate_points of the student's fp32 and
    within distill_gate of the teacher's. Both record the teacher's figure and the speed-up against
    each of the teacher's measured variants (batch 1: latency; batch 32: throughput).
    """
    folder = staging / DISTILLED_FOLDER
    shutil.copytree(student.model_dir, folder)
    student_fp32 = _measure(student.reference, student.examples, student.targets)
    about = run_metrics(student.model_dir.parent)
    onnx_record = _prove("onnx", student, student_fp32, gate_points, folder, scratch)  # writes folder/model.onnx
    torchscript_record = _prove("torchscript", student, student_fp32, gate_points, scratch, scratch)  # a proof only
    (scratch / FILES["torchscript"]).unlink()
    measured = onnx_record.figures
    accepted, reason = export.accuracy_gate(teacher_fp32, measured, distill_gate, against="the teacher")
    proof = {"onnx": onnx_record.proof, "torchscript": torchscript_record.proof, "eager_fp32": student_fp32,
             "distillation": about.get("distillation"), "training": about.get("train")}
    if student.meta.is_image:  # the student's own input, which may be smaller than the teacher's
        proof["input"] = {"image_size": student.meta.image_size, "resize_size": student.meta.resize_size}
    if not accepted:
        shutil.rmtree(folder)  # refused: recorded, not stored
    records = {"distilled": VariantRecord(accepted, reason, file=DISTILLED_FOLDER if accepted else None, proof=proof,
                                          figures={**measured, **_beside_teacher(measured, teacher_fp32, teacher)})}
    if not with_int8:
        return records
    if not accepted:
        records["distilled-int8"] = VariantRecord(False, f"not built: the distilled student was refused ({reason})")
        return records
    int8 = _prove("int8", student, student_fp32, gate_points, folder, scratch, against="the student's fp32")
    built = folder / FILES["int8"]
    if built.is_file():  # beside the student's folder, not in it: each variant's file has its own checksum
        os.replace(built, staging / FILES["distilled-int8"])
    ok_teacher, against_teacher = export.accuracy_gate(teacher_fp32, int8.figures, distill_gate, against="the teacher")
    accepted = int8.accepted and ok_teacher
    if not accepted and (staging / FILES["distilled-int8"]).is_file():
        (staging / FILES["distilled-int8"]).unlink()
    records["distilled-int8"] = VariantRecord(
        accepted, f"{int8.reason}; {against_teacher}", file=FILES["distilled-int8"] if accepted else None,
        proof=int8.proof, figures={**int8.figures, **_beside_teacher(int8.figures, teacher_fp32, teacher)})
    return records


def _beside_teacher(measured: dict, teacher_fp32: dict, teacher: dict[str, VariantRecord]) -> dict:
    """The teacher's quality figure and the speed-ups against each teacher variant measured in this export."""
    metric = "accuracy" if "accuracy" in teacher_fp32 else "r2"
    speedup = {name: {"batch1": round(record.figures["latency_ms_batch1"] / measured["latency_ms_batch1"], 3),
                      "batch32": round(measured["throughput_per_s"] / record.figures["throughput_per_s"], 3)}
               for name, record in teacher.items() if record.accepted and "throughput_per_s" in record.figures}
    return {f"teacher_{metric}": teacher_fp32[metric], "speedup": speedup}


def _text_subject(model_dir: Path, validation: Path, columns: Columns) -> _Subject:
    model, tokenizer, meta = load_trained(model_dir)
    texts, labels, _ = clean(*read_examples(validation, columns.text, columns.label, "validation"), meta.lowercase)
    reference = TextPredictor(tokenizer, meta, eager_backend(model), "pytorch")
    return _Subject(
        model=model, model_dir=model_dir, meta=meta, inputs=export.text_inputs(tokenizer), reference=reference, examples=texts,
        targets=_targets(labels, meta), batches=export.parity_batches(reference.encode, texts, meta.max_length),
        predictor=lambda backend, variant: TextPredictor(tokenizer, meta, backend, variant), calibration=None,
    )


def _image_subject(model_dir: Path, validation: Path, train_list: Path, needs_calibration: bool,
                   columns: Columns) -> _Subject:
    from .image_model import load_image_model

    if needs_calibration and not train_list.is_file():
        raise DataError(f"int8 for image models calibrates on the run's training images, '{train_list}', which does "
                        f"not exist; export from a run folder, or leave int8 out (--variants onnx,torchscript,bf16)")
    model, meta = load_image_model(model_dir)
    paths, labels = _image_rows(validation, "validation", columns)
    reference = ImagePredictor(meta, eager_backend(model), "pytorch")
    # The first 16 validation images as the model sees them in serving: batches of 1, 4 and 16.
    batches = export.image_parity_batches(reference.pixels(paths[:16]))
    return _Subject(
        model=model, model_dir=model_dir, meta=meta, inputs=export.image_inputs(meta.image_size), reference=reference, examples=paths,
        targets=_targets(labels, meta), batches=batches,
        predictor=lambda backend, variant: ImagePredictor(meta, backend, variant),
        calibration=lambda: calibration_batches(train_list, reference),
    )


def _image_rows(source: Path, role: str, columns: Columns = Columns()) -> tuple[list[str], list]:
    """Readable image paths and their labels from a class folder or an image list."""
    from .images import read_images

    paths, labels, report = read_images(source, role, columns.image, columns.label)
    if not paths:
        raise DataError(f"{role} '{source}' has no readable images: {report['dropped']}")
    return paths, labels


def calibration_batches(train_list: Path, predictor: ImagePredictor, rows: int = export.CALIBRATION_ROWS,
                        batch_size: int = export.CALIBRATION_BATCH) -> tuple[list[export.Batch], dict]:
    """Evenly spaced training images (every class, since splits are written class by class), preprocessed.

    Returns the batches and where they came from, for the proof.
    """
    paths, _ = _image_rows(train_list, "calibration")
    picked = sorted(set(np.linspace(0, len(paths) - 1, min(rows, len(paths))).round().astype(int).tolist()))
    pixels = predictor.pixels([paths[i] for i in picked])
    batches = [{"pixel_values": pixels[i : i + batch_size]} for i in range(0, len(pixels), batch_size)]
    return batches, {"source": str(train_list.resolve()), "selection": f"{len(picked)} evenly spaced of {len(paths)}",
                     "transform": "evaluation (resize, centre crop, normalise)"}


def _build(variant: str, subject: _Subject, staging: Path, scratch: Path) -> tuple[Path, export.Forward, dict | None]:
    """Write one variant into staging; return its path, a backend running it, and int8's quantization details."""
    model, inputs = subject.model, subject.inputs
    if variant == "onnx":
        path = export.to_onnx(model, inputs, staging / FILES["onnx"])
        return path, onnx_backend(path), None
    if variant == "torchscript":
        path = export.to_torchscript(model, inputs, staging / FILES["torchscript"])
        return path, torchscript_backend(path, inputs.names), None
    if variant == "int8":
        fp32_onnx = staging / FILES["onnx"]
        if not fp32_onnx.is_file():
            fp32_onnx = export.to_onnx(model, inputs, scratch / FILES["onnx"])
        if subject.calibration is None:
            path, details = export.dynamic_int8(fp32_onnx, staging / FILES["int8"], subject.reference.backend,
                                                subject.batches, onnx_backend)
            return path, onnx_backend(path), details
        batches, source = subject.calibration()
        path, details = export.quantize_static_int8(fp32_onnx, staging / FILES["int8"], batches)
        return path, onnx_backend(path), {**details, **source}
    # bf16: the model folder's weights converted at load time, so no file of its own.
    return staging / MODEL_FOLDER, eager_backend(copy.deepcopy(model), torch.bfloat16), None


def _measure(predictor: Predictor, examples: list, targets: np.ndarray) -> dict:
    """Quality on the validation split, batch-1 latency and whole-split throughput (preprocessing included)."""
    if isinstance(predictor, TextPredictor):
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]))  # less padding per chunk
    else:
        order = list(range(len(examples)))
    # One untimed call first: a backend's first run allocates and plans (oneDNN primitives, ORT arenas), and
    # the default variant is chosen by these figures, so each is timed warm.
    predictor.logits(examples[:1])
    # The fastest of a few passes over the split (at least one, until THROUGHPUT_SECONDS have passed or
    # THROUGHPUT_PASSES were made): one pass over a small split lasts milliseconds, and a single reading
    # of that made the served default (the fastest variant) flip between runs.
    ordered, passes, spent = [examples[i] for i in order], [], 0.0
    while not passes or (len(passes) < THROUGHPUT_PASSES and spent < THROUGHPUT_SECONDS):
        start = time.perf_counter()
        sorted_logits = predictor.logits(ordered)
        passes.append(time.perf_counter() - start)
        spent += passes[-1]
    elapsed = min(passes)
    logits = np.empty_like(sorted_logits)
    logits[order] = sorted_logits
    timings = []
    for example in examples[:LATENCY_SAMPLES]:
        start = time.perf_counter()
        predictor.logits([example])
        timings.append(1000 * (time.perf_counter() - start))
    if predictor.meta.is_regression:
        quality = regression_metrics(targets, regression_values(logits, predictor.meta))
    else:
        quality = classification_metrics(targets, logits.argmax(-1), predictor.meta.labels)
    return dict(quality, latency_ms_batch1=statistics.median(timings), throughput_per_s=len(examples) / elapsed)


def _targets(raw: list, meta: ModelMeta) -> np.ndarray:
    if meta.is_regression:
        return np.array(regression_targets(raw, "validation"))
    return np.array(encode_labels(raw, meta.labels, "validation"))


def run_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}
