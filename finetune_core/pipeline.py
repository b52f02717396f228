"""run_training(): the recipe that wires data, model, loop, evaluation and outputs together.

Outputs in the run folder:
  model/             save_pretrained model + tokenizer + finetune_serve.json (task, labels, limits)
  splits/            the cleaned train/validation/test rows actually used ({"text", "label"} JSONL)
  metrics.json       {"validation": {...}, "test": {...} | null, "train": {...}}
  data_report.json   rows in/out and why, class counts, imbalance, token-length percentiles
  plots/             curves.png, confusion.png (validation) and confusion_test.png
  events.jsonl       one JSON event per line; tensorboard/ has the same figures
  checkpoints/       best.pt and last.pt (resume with resume=True)
  config.json        the full configuration used
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from . import auto
from . import data as D
from .config import LOWER_IS_BETTER, JobConfig, config_from_dict
from .errors import ConfigError, DataError
from .diagnose import diagnose, label_issues
from .evaluate import evaluate, predict_logits, scalars
from .plots import plot_confusion, plot_curves
from .losses import inverse_frequency_weights, make_loss
from .metadata import ModelMeta, read_meta
from .model import build_model, freeze, load_trained, save_trained
from .tables import encode_labels, read_examples, regression_targets
from .train import EventFn, fit, pick_precision


def run_training(cfg: JobConfig | None, output: str | Path, *, resume: bool = False, on_event: EventFn | None = None,
                 should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Train, evaluate and write a run folder; returns the metrics dict (also in metrics.json).

    With resume=True the run folder's own config.json is used (cfg may be None) and training continues
    from checkpoints/last.pt.
    """
    output = Path(output)
    if resume:
        cfg = config_from_dict(saved_config(output))
    prepare_run_folder(output, resume, cfg.to_dict())
    started = time.perf_counter()
    with torch_threads(cfg.train.num_threads):
        return _run(cfg, output, resume, on_event, should_stop, started)


def saved_config(output: Path) -> dict:
    """The configuration a run folder was started with, to resume it."""
    saved = output / "config.json"
    if not saved.is_file():
        raise ConfigError(f"resume: '{output}' has no config.json; it is not a run folder to resume")
    return json.loads(saved.read_text())


def prepare_run_folder(output: Path, resume: bool, config: dict, extra_outputs: tuple[str, ...] = ()) -> None:
    """Create the folder, clear an earlier run's outputs unless resuming, and write config.json."""
    output.mkdir(parents=True, exist_ok=True)
    if not resume:
        clear_previous_run(output, extra_outputs)
    (output / "config.json").write_text(json.dumps(config, indent=2))


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's CPU threads set to count (0: left alone) for the block, then put back."""
    threads = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run(cfg: JobConfig, output: Path, resume: bool, on_event, should_stop, started: float) -> dict:
    regression = cfg.data.task.endswith("regression")

    dataset = D.load_dataset(cfg.data)
    _write_splits(dataset, output / "splits", "image" if cfg.data.task.startswith("image") else "text")
    torch.manual_seed(cfg.train.seed)  # the new head's initial weights
    prepare = _prepare_images if cfg.data.task.startswith("image") else _prepare_text
    cfg, model, rows, report_extra, save = prepare(cfg, dataset)
    (output / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))  # auto values resolved: resume reuses them
    tc = cfg.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    report = {**dataset.report, **report_extra}
    (output / "data_report.json").write_text(json.dumps(report, indent=2))

    weights = None
    if tc.class_weights and not regression:
        weights = inverse_frequency_weights(rows["train"].targets, len(dataset.label_names)).to(device)
    loss_fn = make_loss(regression, weights, tc.label_smoothing, tc.regression_loss)
    precision = pick_precision(tc.precision)

    def evaluate_split(role: str, precision: str = precision) -> dict:
        return evaluate(model, rows[role], loss_fn, label_names=dataset.label_names, target_mean=dataset.target_mean,
                        target_std=dataset.target_std, batch_size=tc.eval_batch_size, precision=precision)

    sink = EventLog(output, on_event)
    try:
        sink({"type": "data", "report": {k: report[k] for k in ("rows", "cleaning")}, "parameters": report["parameters"]})
        result = fit(model, rows["train"], tc, loss_fn=loss_fn, evaluate_fn=lambda m: scalars(evaluate_split("validation")),
                     checkpoint_dir=output / "checkpoints", resume=resume,
                     on_event=sink, should_stop=should_stop)
        train_info = {"status": result.status, "samples_per_second": round(result.samples_per_second, 2),
                      "wall_seconds": round(time.perf_counter() - started, 2), "train_seconds": round(result.wall_seconds, 2),
                      "epochs_run": result.epochs_run, "steps": result.global_step,
                      "stopped_early": result.status == "stopped_early", "precision": result.precision,
                      "best_step": result.best_step, "best_" + tc.early_stopping_metric: result.best_metric,
                      "device": device.type}
        if result.status == "cancelled":
            return {"validation": None, "test": None, "train": train_info}

        # The reported figures are fp32, as the model is exported and served; the loop's own evaluations
        # may use bf16 autocast for speed, which moved a small CNN's accuracy by a few rows.
        metrics = {"validation": evaluate_split("validation", "fp32"),
                   "test": evaluate_split("test", "fp32") if "test" in rows else None, "train": train_info}
        metrics["diagnosis"] = diagnose(sink.steps, result.history, tc.early_stopping_metric,
                                        tc.early_stopping_metric not in LOWER_IS_BETTER, cfg)
        _check_labels(model, rows["train"], dataset, tc.eval_batch_size, report, output)
        meta = ModelMeta(task=cfg.data.task, labels=dataset.label_names, base_model=cfg.model.base_model,
                         target_mean=dataset.target_mean, target_std=dataset.target_std,
                         text_column=cfg.data.text_column, label_column=cfg.data.label_column,
                         image_column=cfg.data.image_column)
        model.to("cpu")
        save(model, meta, output / "model")
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plots = output / "plots"
        plots.mkdir(exist_ok=True)
        plot_curves(sink.steps, result.history, tc.early_stopping_metric, plots / "curves.png")
        for role, name in (("validation", "confusion.png"), ("test", "confusion_test.png")):
            if not regression and metrics[role]:
                plot_confusion(metrics[role]["confusion_matrix"], dataset.label_names, plots / name, f"Confusion matrix ({role})")
        sink({"type": "done", "metrics": {r: scalars(metrics[r]) for r in ("validation", "test") if metrics[r]},
              "diagnosis": metrics["diagnosis"]["summary"]})
        return metrics
    finally:
        sink.close()


def _check_labels(model, train_rows, dataset: D.Dataset, batch_size: int, report: dict, output: Path) -> None:
    """Rank the training rows the model most confidently contradicts: label_issues.jsonl and the data report."""
    if getattr(train_rows, "augment", False):
        train_rows = replace(train_rows, augment=False)  # the images as evaluation sees them
    logits = predict_logits(model, train_rows, batch_size)
    issues = label_issues(logits, train_rows.targets, dataset.label_names, dataset.splits["train"].inputs,
                          dataset.target_std, dataset.target_mean)
    with (output / "label_issues.jsonl").open("w") as f:
        f.writelines(json.dumps(issue) + "\n" for issue in issues)
    report["label_issues"] = {"checked": len(train_rows.targets), "listed": len(issues), "top": issues[:10],
                              "file": "label_issues.jsonl"}
    (output / "data_report.json").write_text(json.dumps(report, indent=2))


def _standardised(dataset: D.Dataset, targets: list) -> list:
    if dataset.target_mean is None:
        return targets
    return [(t - dataset.target_mean) / dataset.target_std for t in targets]


def _prepare_text(cfg: JobConfig, dataset: D.Dataset):
    """MiniLM (or another transformers model) with a new head, the auto values, and tokenized rows per split."""
    regression = dataset.label_names is None
    model, tokenizer = build_model(cfg.model.base_model, dataset.label_names)
    token_lengths = {role: D.token_lengths(tokenizer, split.inputs) for role, split in dataset.splits.items()}
    limit = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", tokenizer.model_max_length))
    cfg, chosen = auto.resolve_text(cfg, token_lengths["train"], limit)
    params = freeze(model, cfg.model.freeze)
    rows = {role: D.encode(tokenizer, split.inputs, _standardised(dataset, split.targets), cfg.data.max_length, regression,
                          cfg.data.truncation) for role, split in dataset.splits.items()}
    extra = {"tokens": {r: D.token_report(v, cfg.data.max_length) for r, v in token_lengths.items()}, "parameters": params,
             "auto": chosen}

    def save(model, meta: ModelMeta, model_dir: Path) -> None:
        save_trained(model, tokenizer, replace(meta, max_length=cfg.data.max_length, truncation=cfg.data.truncation,
                                                     lowercase=cfg.data.lowercase), model_dir)

    return cfg, model, rows, extra, save


def _prepare_images(cfg: JobConfig, dataset: D.Dataset):
    """A pretrained CNN with a new head, the auto values, and image rows per split (augmented for training only)."""
    from .image_model import build_image_model, freeze_image_model, save_image_model
    from .images import ImageRows, size_report

    regression = dataset.label_names is None
    sizes = size_report(dataset.splits["train"].inputs)
    model, spec = build_image_model(cfg.model.base_model, 1 if regression else len(dataset.label_names))
    cfg, chosen = auto.resolve_images(cfg, len(dataset.splits["train"].inputs), sizes["short_side"]["p50"], spec.size)
    if cfg.data.image_size:
        spec = spec.at_size(cfg.data.image_size)
    model.to(memory_format=torch.channels_last)  # matches the batches' layout: oneDNN's fast path for convolutions
    params = freeze_image_model(model, cfg.model.freeze)
    rows = {
        role: ImageRows(split.inputs, _standardised(dataset, split.targets), spec, regression,
                        augment=cfg.data.augment and role == "train", flip=cfg.data.horizontal_flip, seed=cfg.train.seed)
        for role, split in dataset.splits.items()
    }
    extra = {"images": {"input": spec.meta(), "train": sizes}, "parameters": params, "auto": chosen}

    def save(model, meta: ModelMeta, model_dir: Path) -> None:
        save_image_model(model, replace(meta, **spec.meta()), model_dir)

    return cfg, model, rows, extra, save


def evaluate_saved(model_dir: str | Path, data: str, text_column: str | None = None, label_column: str | None = None,
                   image_column: str | None = None, batch_size: int = 128) -> dict:
    """Metrics of a saved model folder (RUN_DIR/model) on a labelled file, or an image folder or list.

    Columns default to the ones the model was trained with (recorded in its finetune_serve.json).
    """
    meta = read_meta(model_dir)
    columns = meta.columns(text_column, label_column, image_column)
    if meta.is_image:
        from .image_model import load_image_model
        from .images import ImageRows, ImageSpec, read_images

        model, meta = load_image_model(model_dir)
        inputs, labels, report = read_images(data, "evaluation", columns.image, columns.label)
    else:
        model, tokenizer, meta = load_trained(model_dir)
        inputs, labels, report = D.clean(*read_examples(data, columns.text, columns.label, "evaluation"), meta.lowercase)
    if not inputs:
        raise DataError(f"evaluation data '{data}' has no usable rows after cleaning: {report['dropped']}")
    if meta.is_regression:
        targets = [(t - meta.target_mean) / meta.target_std for t in regression_targets(labels, "evaluation")]
    else:
        targets = encode_labels(labels, meta.labels, "evaluation")
    if meta.is_image:
        rows = ImageRows(inputs, targets, ImageSpec.from_meta(meta), meta.is_regression)
    else:
        rows = D.encode(tokenizer, inputs, targets, meta.max_length, meta.is_regression, meta.truncation)
    metrics = evaluate(model, rows, make_loss(meta.is_regression), label_names=meta.labels, target_mean=meta.target_mean,
                       target_std=meta.target_std, batch_size=batch_size)
    return {**metrics, "cleaning": report}


_RUN_OUTPUTS = ("model", "splits", "plots", "checkpoints", "tensorboard", "events.jsonl", "metrics.json", "data_report.json",
                "label_issues.jsonl")


def clear_previous_run(output: Path, extra: tuple[str, ...] = ()) -> None:
    """A fresh run into a used folder starts clean: stale checkpoints or events would mix with the new run."""
    for name in _RUN_OUTPUTS + extra:
        path = output / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _write_splits(dataset: D.Dataset, folder: Path, column: str) -> None:
    """The rows each split used, as {column: text or image path, "label": name or value} JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    for role, split in dataset.splits.items():
        names = dataset.label_names
        with (folder / f"{role}.jsonl").open("w") as f:
            for item, target in zip(split.inputs, split.targets):
                f.write(json.dumps({column: item, "label": names[target] if names else target}) + "\n")


class EventLog:
    """Appends every event to events.jsonl and TensorBoard, keeps step events for the curves, forwards the rest."""

    def __init__(self, output: Path, forward: EventFn | None):
        from torch.utils.tensorboard import SummaryWriter

        self.file = (output / "events.jsonl").open("a")
        self.writer = SummaryWriter(str(output / "tensorboard"))
        self.forward = forward
        self.steps: list[dict] = [json.loads(line) for line in (output / "events.jsonl").open() if '"type": "step"' in line]

    def __call__(self, event: dict) -> None:
        event = {"time": round(time.time(), 3), **event}
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()
        if event["type"] == "step":
            self.steps.append(event)
            for key in ("loss", "learning_rate", "samples_per_second"):
                self.writer.add_scalar(f"train/{key}", event[key], event["step"])
        elif event["type"] == "eval":
            for key, value in event["metrics"].items():
                self.writer.add_scalar(f"validation/{key}", value, event["step"])
        if self.forward:
            self.forward(event)

    def close(self) -> None:
        self.file.close()
        self.writer.close()
