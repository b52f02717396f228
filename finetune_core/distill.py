"""Distillation: a smaller student learns from a fine-tuned teacher through the same fit() loop.

The teacher's outputs reach the loss as one more batch key, "teacher_logits" (TeacherRows), and
losses.distillation_loss mixes them with the labels. They are computed once per row, in inference
mode (bf16 where the hardware has it), when every epoch shows the rows unchanged; with image
augmentation the teacher runs on each augmented batch instead. The student trains on the teacher's
training split, plus any unlabelled rows (distill_data) labelled by the teacher, with early stopping
on the validation split. A student run folder is written like a training run's:

  model/          the student (save_pretrained or safetensors) with its finetune_serve.json
  metrics.json    {"validation": student, "teacher": {"validation": ...}, "train": ..., "distillation": ...}
  config.json     {"distill": DistillConfig, "train": the TrainConfig fit() ran with, "teacher": folder}
  events.jsonl    fit()'s events, each with "phase": "distill"
  checkpoints/    best.pt and last.pt

`distill_run` distils a teacher run folder (RUN_DIR: model/, splits/, config.json); `distill_version`
distils a registered version and registers a new version holding the teacher, its variants and the
`distilled` / `distilled-int8` variants (artifacts.export_version proves and gates them).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from . import registry
from .config import (STUDENT_FOLDER, TEXT_HIDDEN_WEIGHT, TEXT_STUDENT_LEARNING_RATE, DistillConfig, JobConfig, TrainConfig,
                     config_from_dict)
from .errors import ConfigError, DataError
from .evaluate import evaluate, predict_logits, scalars
from .losses import distillation_loss, hidden_matching, make_loss
from .metadata import Columns, ModelMeta, read_meta
from .model import load_trained, logits_of, save_trained
from .tables import encode_labels, read_table, regression_targets
from .train import Batch, EventFn, Rows, fit, pick_precision



@dataclass
class TeacherRows:
    """Rows whose batches also carry "teacher_logits": cached per row, or from `teacher` on each batch
    (which may add "teacher_hidden" too, see live_teacher)."""

    rows: Rows
    cached: torch.Tensor | None = None  # (rows, outputs), in row order
    teacher: Callable[[dict], dict] | None = None  # batch inputs -> {"teacher_logits", ...}

    @property
    def targets(self) -> list:
        return self.rows.targets

    @property
    def lengths(self) -> list[int]:
        return self.rows.lengths

    def loader(self, batches: list[list[int]], epoch: int = 0) -> Iterable[Batch]:
        for indices, batch in zip(batches, self.rows.loader(batches, epoch)):
            outputs = {"teacher_logits": self.cached[indices]} if self.cached is not None else self.teacher(batch["inputs"])
            yield {**batch, **outputs}


def layer_outputs(layers: list[nn.Module]) -> tuple[list, Callable[[], None]]:
    """Forward hooks keeping each layer's output hidden states of the latest forward pass, and their removal."""
    kept: list = [None] * len(layers)

    def keeper(k: int):
        def keep(module, args, output):
            kept[k] = output[0] if isinstance(output, tuple) else output

        return keep

    handles = [layer.register_forward_hook(keeper(k)) for k, layer in enumerate(layers)]
    return kept, lambda: [handle.remove() for handle in handles]


def live_teacher(teacher: nn.Module, precision: str, image_size: int | None = None,
                 hidden_layers: list[int] | None = None) -> Callable[[dict], dict]:
    """The teacher as a function of a batch's inputs, in inference mode (bf16 autocast when chosen):
    {"teacher_logits"}, plus "teacher_hidden" (the outputs of the encoder layers `hidden_layers`,
    stacked) for hidden-state matching.

    An image student smaller than the teacher sends its own pixels, resized to the teacher's size:
    the same augmented view, where decoding it again at the teacher's size would crop differently.
    """
    from .student import encoder_layers

    device = next(teacher.parameters()).device
    teacher.eval()
    hidden = None
    if hidden_layers:
        layers = encoder_layers(teacher)
        hidden, _ = layer_outputs([layers[i] for i in hidden_layers])

    def forward(inputs: dict) -> torch.Tensor:
        inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
        pixels = inputs.get("pixel_values")
        if image_size and pixels is not None and pixels.shape[-1] != image_size:
            inputs["pixel_values"] = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear",
                                                   align_corners=False)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = logits_of(teacher(**inputs)).float()
            stacked = torch.stack([h.float() for h in hidden]) if hidden else None
        # Normal tensors, outside inference mode: the loss may save them for backward.
        outputs = {"teacher_logits": logits.clone()}
        return outputs if stacked is None else {**outputs, "teacher_hidden": stacked.clone()}

    return forward


def cached_teacher(teacher: nn.Module, rows: Rows, batch_size: int, precision: str) -> torch.Tensor:
    """The teacher's logits for every row, once, in inference mode (bf16 autocast when chosen)."""
    with torch.inference_mode():
        return torch.from_numpy(predict_logits(teacher, rows, batch_size, precision)).clone()


@dataclass
class _Parts:
    """What differs between text and images: the models, the rows each sees, how the student is saved."""

    teacher: nn.Module
    student: nn.Module
    meta: ModelMeta
    teacher_view: Callable[[list, list], Rows]  # (inputs, targets) -> rows as the teacher sees them
    student_view: Callable[[list, list, bool], Rows]  # (inputs, targets, augment) -> the student's rows
    augment: bool  # training rows are augmented: the teacher runs on each batch
    teacher_size: int | None  # image teachers: their input size
    save: Callable[[nn.Module, Path], None]
    about: dict  # the student: what was kept, parameters


def run_distillation(teacher_dir: str | Path, output: str | Path, dcfg: DistillConfig, *, train: str | Path,
                     validation: str | Path, job: JobConfig | None = None, columns: Columns = Columns(),
                     resume: bool = False, on_event: EventFn | None = None,
                     should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Distil the model folder `teacher_dir` into a student run folder `output`; returns its metrics.

    `train`/`validation` are labelled files (JSONL/CSV...; images: a class folder or an image list) in
    `columns`; `job` is the teacher's configuration (its training settings, freeze policy and image
    augmentation), None for the defaults. With resume=True an interrupted distillation continues
    from output/checkpoints/last.pt.
    """
    output = Path(output)
    resume = resume and (output / "checkpoints" / "last.pt").is_file()
    if not resume and output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    meta = read_meta(teacher_dir)
    tc = _student_train_config(job, dcfg, meta)
    (output / "config.json").write_text(json.dumps({"distill": dcfg.to_dict(), "train": dataclasses.asdict(tc),
                                                    "teacher": str(Path(teacher_dir).resolve())}, indent=2))
    threads = torch.get_num_threads()
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    events = (output / "events.jsonl").open("a")

    def sink(event: dict) -> None:
        event = {"time": round(time.time(), 3), **event, "phase": "distill"}
        events.write(json.dumps(event) + "\n")
        events.flush()
        if on_event:
            on_event(event)

    try:
        return _distil(Path(teacher_dir), output, dcfg, tc, job, Path(train), Path(validation), columns, resume,
                       sink, should_stop)
    finally:
        events.close()
        torch.set_num_threads(threads)


def _distil(teacher_dir: Path, output: Path, dcfg: DistillConfig, tc: TrainConfig, job: JobConfig | None,
            train: Path, validation: Path, columns: Columns, resume: bool, sink: EventFn,
            should_stop: Callable[[], bool]) -> dict:
    started = time.perf_counter()
    meta = read_meta(teacher_dir)
    torch.manual_seed(dcfg.seed)  # a folder student's new head
    parts = (_image_parts if meta.is_image else _text_parts)(teacher_dir, dcfg, job)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts.teacher.to(device).eval()
    parts.student.to(device)
    precision = pick_precision(tc.precision)

    inputs, targets = _labelled(train, "train", meta, columns)
    extra = _unlabelled(dcfg.distill_data, meta, columns) if dcfg.distill_data else []
    val_inputs, val_targets = _labelled(validation, "validation", meta, columns)
    chosen = _sample(len(inputs) + len(extra), dcfg.max_rows, dcfg.seed)
    pool = inputs + extra
    rows_in = [pool[i] for i in chosen]
    rows_targets = [targets[i] if i < len(inputs) else None for i in chosen]  # None: the teacher's answer, below
    layers = parts.about["student"].get("layers")  # a text student made of the teacher's own layers
    weight = (TEXT_HIDDEN_WEIGHT if layers else 0.0) if dcfg.hidden_weight is None else dcfg.hidden_weight
    matched = layers if weight else None
    train_rows, teacher_outputs = _with_teacher(parts, rows_in, rows_targets, tc.eval_batch_size, precision, device,
                                                matched)

    hard = make_loss(meta.is_regression, label_smoothing=tc.label_smoothing, regression_loss=tc.regression_loss)
    loss_fn = distillation_loss(hard, dcfg.alpha, dcfg.temperature, meta.is_regression)
    unhook = lambda: None  # noqa: E731
    if matched:
        from .student import encoder_layers

        student_hidden, unhook = layer_outputs(list(encoder_layers(parts.student)))
        loss_fn = hidden_matching(loss_fn, student_hidden, weight)
    student_val = parts.student_view(val_inputs, val_targets, False)

    def evaluate_student(precision: str = precision) -> dict:
        return evaluate(parts.student, student_val, hard, label_names=meta.labels, target_mean=meta.target_mean,
                        target_std=meta.target_std, batch_size=tc.eval_batch_size, precision=precision)

    unlabelled = sum(i >= len(inputs) for i in chosen)
    sink({"type": "distill_start", "rows": len(rows_in), "unlabelled_rows": unlabelled,
          "teacher_outputs": teacher_outputs, **parts.about})
    try:
        result = fit(parts.student, train_rows, tc, loss_fn=loss_fn, evaluate_fn=lambda m: scalars(evaluate_student()),
                     checkpoint_dir=output / "checkpoints", resume=resume, on_event=sink, should_stop=should_stop)
    finally:
        unhook()
    train_info = {"status": result.status, "steps": result.global_step, "epochs_run": result.epochs_run,
                  "samples_per_second": round(result.samples_per_second, 2), "train_seconds": round(result.wall_seconds, 2),
                  "wall_seconds": round(time.perf_counter() - started, 2), "precision": result.precision,
                  "best_step": result.best_step, "stopped_early": result.status == "stopped_early", "device": device.type}
    if result.status == "cancelled":
        return {"validation": None, "teacher": None, "train": train_info}
    teacher_val = parts.teacher_view(val_inputs, val_targets)
    teacher_metrics = evaluate(parts.teacher, teacher_val, hard, label_names=meta.labels, target_mean=meta.target_mean,
                               target_std=meta.target_std, batch_size=tc.eval_batch_size)
    metrics = {
        "validation": evaluate_student("fp32"),
        "teacher": {"validation": teacher_metrics},
        "train": train_info,
        "distillation": {**parts.about, "alpha": dcfg.alpha, "temperature": dcfg.temperature,
                         "hidden_weight": weight,
                         "rows": {"train_split": len(inputs), "distill_data": len(extra), "used": len(rows_in),
                                  "unlabelled_used": unlabelled, "max_rows": dcfg.max_rows},
                         "teacher_outputs": teacher_outputs, "learning_rate": tc.learning_rate, "epochs": tc.epochs},
    }
    parts.student.to("cpu")
    parts.save(parts.student, output / STUDENT_FOLDER)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    sink({"type": "distill_done", "validation": scalars(metrics["validation"]),
          "teacher_validation": scalars(teacher_metrics)})
    return metrics


def _with_teacher(parts: _Parts, inputs: list, targets: list, batch_size: int, precision: str,
                  device: torch.device, hidden_layers: list[int] | None = None) -> tuple[TeacherRows, str]:
    """The student's training rows carrying the teacher's outputs, and how they were computed.

    Rows whose target is None (distill_data) are labelled with the teacher's answer: its class, or
    its value for regression. Without augmentation the teacher runs once over every row; with it,
    on each augmented batch during training (and once over the unlabelled rows, for their labels).
    Hidden-state matching (`hidden_layers`) also runs the teacher on each batch: its hidden states
    are too big to keep for every row.
    """
    live = parts.augment or bool(hidden_layers)
    unlabelled = [k for k, target in enumerate(targets) if target is None]
    blank = 0.0 if parts.meta.is_regression else 0
    targets = [blank if t is None else t for t in targets]
    if live:
        answers = (cached_teacher(parts.teacher, parts.teacher_view([inputs[k] for k in unlabelled], [blank] * len(unlabelled)),
                                  batch_size, precision) if unlabelled else [])
    else:
        cached = cached_teacher(parts.teacher, parts.teacher_view(inputs, targets), batch_size, precision)
        answers = cached[unlabelled]
    for k, logits in zip(unlabelled, answers):
        targets[k] = float(logits[0]) if parts.meta.is_regression else int(logits.argmax())
    rows = parts.student_view(inputs, targets, parts.augment)
    if live:
        why = "each augmented batch" if parts.augment else "each batch, for its hidden states"
        return (TeacherRows(rows, teacher=live_teacher(parts.teacher, precision, parts.teacher_size, hidden_layers)),
                f"live: the teacher runs on {why}")
    return TeacherRows(rows, cached=cached.to(device)), "cached: computed once per row"


def _student_train_config(job: JobConfig | None, dcfg: DistillConfig, meta: ModelMeta) -> TrainConfig:
    """The teacher's training settings with the distillation's epochs, rate and seed."""
    base = job.train if job is not None else TrainConfig(early_stopping_metric="loss" if meta.is_regression else "accuracy")
    rate = dcfg.learning_rate
    if rate is None:
        rate = base.learning_rate if meta.is_image else TEXT_STUDENT_LEARNING_RATE
    if not isinstance(rate, float):  # "auto" left in a config that was never resolved: the dataclass default
        rate = TrainConfig.learning_rate
    return dataclasses.replace(base, epochs=dcfg.epochs, learning_rate=rate, seed=dcfg.seed, class_weights=False)


def _text_parts(teacher_dir: Path, dcfg: DistillConfig, job: JobConfig | None) -> _Parts:
    from .student import folder_student, layer_drop_student

    teacher, tokenizer, meta = load_trained(teacher_dir)
    if dcfg.student:
        student = folder_student(dcfg.student, meta.labels, tokenizer)
        about = {"student": {"kind": "folder", "folder": str(Path(dcfg.student).resolve())}}
    else:
        student, layers = layer_drop_student(teacher, dcfg.student_layers)
        about = {"student": {"kind": "layers", "layers": layers, "of": teacher.config.num_hidden_layers}}
    about["student"] |= {"parameters": _count(student), "teacher_parameters": _count(teacher)}

    def rows(texts: list, targets: list, augment: bool = False) -> D.Encoded:
        return D.encode(tokenizer, texts, targets, meta.max_length, meta.is_regression, meta.truncation)

    def save(model: nn.Module, folder: Path) -> None:
        save_trained(model, tokenizer, meta, folder)

    return _Parts(teacher, student.train(), meta, rows, rows, False, None, save, about)


def _image_parts(teacher_dir: Path, dcfg: DistillConfig, job: JobConfig | None) -> _Parts:
    from .image_model import freeze_image_model, load_image_model, save_image_model, stage_depths
    from .images import ImageRows, ImageSpec
    from .student import image_student

    if dcfg.student or dcfg.student_layers or dcfg.hidden_weight:
        raise ConfigError("distill.student, distill.student_layers and distill.hidden_weight are for text models; an "
                          "image student is set with distill.image_size and distill.block_depths")
    teacher, meta = load_image_model(teacher_dir)
    spec = ImageSpec.from_meta(meta)
    full = stage_depths(teacher.net)
    student, student_spec, kept = image_student(teacher, spec, dcfg.image_size, dcfg.block_depths)
    frozen = freeze_image_model(student, job.model.freeze if job is not None else "none")
    augment = bool(job.data.augment) if job is not None and job.data.augment != "auto" else False
    flip = job.data.horizontal_flip if job is not None else True
    seed = dcfg.seed
    about = {"student": {"kind": "image", "image_size": student_spec.size, "teacher_image_size": spec.size,
                         "block_depths": kept, "teacher_block_depths": full, "freeze": frozen["policy"],
                         "parameters": _count(student), "teacher_parameters": _count(teacher)}}

    def teacher_rows(paths: list, targets: list) -> ImageRows:
        return ImageRows(paths, targets, spec, meta.is_regression)

    def student_rows(paths: list, targets: list, augment: bool) -> ImageRows:
        return ImageRows(paths, targets, student_spec, meta.is_regression, augment=augment, flip=flip, seed=seed)

    def save(model: nn.Module, folder: Path) -> None:
        depths = kept if kept != full else None
        save_image_model(model, dataclasses.replace(meta, block_depths=depths, **student_spec.meta()), folder)

    return _Parts(teacher, student.train(), meta, teacher_rows, student_rows, augment,
                  spec.size if student_spec.size != spec.size else None, save, about)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sample(total: int, limit: int, seed: int) -> list[int]:
    """All row indices, or a seeded sample of `limit` of them in their original order."""
    if not limit or total <= limit:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), limit))


def _labelled(source: Path, role: str, meta: ModelMeta, columns: Columns) -> tuple[list, list]:
    """Cleaned inputs (texts or image paths) and their targets (class ids, or standardised values)."""
    if meta.is_image:
        from .images import read_images

        inputs, labels, report = read_images(source, role, columns.image, columns.label)
    else:
        inputs, labels, report = D.clean(*_read_columns(source, role, columns), meta.lowercase)
    if not inputs:
        raise DataError(f"{role} '{source}' has no usable rows for distillation: {report['dropped']}")
    if meta.is_regression:
        values = regression_targets(labels, role)
        return inputs, [(v - meta.target_mean) / meta.target_std for v in values]
    return inputs, encode_labels(labels, meta.labels, role)


def _read_columns(source: Path, role: str, columns: Columns) -> tuple[list, list]:
    from .tables import read_examples

    if not source.exists():
        raise DataError(f"{role} file '{source}' does not exist")
    return read_examples(source, columns.text, columns.label, role)


def _unlabelled(source: str, meta: ModelMeta, columns: Columns) -> list:
    """distill_data: texts (a table's text column) or images (a folder of images, or an image list)."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"distill.distill_data: '{source}' does not exist")
    if meta.is_image:
        return _unlabelled_images(path, columns.image)
    rows, found = read_table(path, "distill_data")
    if columns.text not in found:
        raise DataError(f"distill.distill_data: '{source}' has no text column '{columns.text}'; columns are "
                        f"{', '.join(sorted(found)) or 'none'}")
    texts = [D.clean_text(r[columns.text], meta.lowercase) for r in rows if isinstance(r.get(columns.text), str)]
    texts = [t for t in texts if t]
    if not texts:
        raise DataError(f"distill.distill_data: '{source}' has no non-empty texts in column '{columns.text}'")
    return texts


def _unlabelled_images(path: Path, image_column: str) -> list[str]:
    from .images import IMAGE_SUFFIXES, check_image, read_list

    if path.is_dir():
        candidates = [str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    else:
        rows, found = read_table(path, "distill_data")
        if image_column not in found:
            raise DataError(f"distill.distill_data: '{path}' has no image column '{image_column}'")
        candidates = [p for p in read_list(path, image_column, image_column, "distill_data", None)[0] if p]
    readable = [p for p in candidates if check_image(p) is None]
    if not readable:
        raise DataError(f"distill.distill_data: no readable images in '{path}'")
    return readable


def distill_run(run_dir: str | Path, output: str | Path, dcfg: DistillConfig, *, resume: bool = False,
                on_event: EventFn | None = None, should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Distil the model of a training run folder, on its own splits and with its own settings."""
    run_dir = Path(run_dir)
    splits = run_dir / "splits"
    for role in ("train", "validation"):
        if not (splits / f"{role}.jsonl").is_file():
            raise DataError(f"distill: '{run_dir}' has no splits/{role}.jsonl; distil a run folder written by training")
    job = run_config(run_dir)
    return run_distillation(run_dir / "model", output, dcfg, train=splits / "train.jsonl",
                            validation=splits / "validation.jsonl", job=job, resume=resume, on_event=on_event,
                            should_stop=should_stop)


def run_config(run_dir: Path) -> JobConfig | None:
    saved = run_dir / "config.json"
    return config_from_dict(json.loads(saved.read_text())) if saved.is_file() else None


def distill_version(name: str, ref: str | None, dcfg: DistillConfig, work_dir: str | Path, *,
                    train: str | None = None, validation: str | None = None, resume: bool = False,
                    on_event: EventFn | None = None,
                    should_stop: Callable[[], bool] = lambda: False) -> registry.VersionInfo | None:
    """Distil a registered version into a new version of the same model; None when cancelled.

    The data is the version's source run's splits unless `train` and `validation` are given (files in
    the columns the model was trained with). The new version holds the teacher, the variants the old
    one had accepted (built and proved again) and `distilled` / `distilled-int8`. resume=True continues
    an interrupted distillation in `work_dir`.
    """
    from .artifacts import export_version
    from .export import DEFAULT_GATE_POINTS
    from .predict import DISTILLED_VARIANTS

    info = registry.resolve(name, ref)
    run_dir = Path(info.manifest.source_run) if info.manifest.source_run else None
    teacher_dir = registry.model_dir(info)
    meta = info.manifest.model
    if train is None or validation is None:
        splits = run_dir / "splits" if run_dir else None
        if splits is None or not (splits / "train.jsonl").is_file() or not (splits / "validation.jsonl").is_file():
            raise DataError(f"distill: {info.ref} was trained in '{run_dir}', whose splits/train.jsonl and "
                            "validation.jsonl are gone; give the training and validation files (--train, --validation)")
        train_file, validation_file, columns = splits / "train.jsonl", splits / "validation.jsonl", Columns()
    else:
        train_file, validation_file, columns = Path(train), Path(validation), meta.columns()
    job = run_config(run_dir) if run_dir and run_dir.is_dir() else None
    work_dir = Path(work_dir)
    metrics = run_distillation(teacher_dir, work_dir, dcfg, train=train_file, validation=validation_file, job=job,
                               columns=columns, resume=resume, on_event=on_event, should_stop=should_stop)
    if metrics["train"]["status"] == "cancelled":
        return None
    kept = [v for v in info.manifest.accepted() if v != "pytorch" and v not in DISTILLED_VARIANTS]
    if on_event:
        on_event({"type": "exporting", "variants": kept + list(DISTILLED_VARIANTS)})
    return export_version(teacher_dir, name, kept + list(DISTILLED_VARIANTS), validation_file,
                          info.manifest.proof.get("gate_points", DEFAULT_GATE_POINTS),
                          text_column=columns.text, label_column=columns.label, image_column=columns.image,
                          student=work_dir / STUDENT_FOLDER, distill_gate=dcfg.distill_gate,
                          run_dir=run_dir if run_dir and run_dir.is_dir() else None)
