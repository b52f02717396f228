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

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import data as D
from .config import JobConfig, config_from_dict
from .errors import ConfigError
from .evaluate import evaluate, plot_confusion, plot_curves, scalars
from .model import build_model, freeze, save_trained
from .train import EventFn, fit, pick_precision


def make_loss(regression: bool, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0):
    if regression:
        return lambda logits, labels: F.mse_loss(logits[:, 0], labels)
    return lambda logits, labels: F.cross_entropy(logits, labels, weight=class_weights, label_smoothing=label_smoothing)


def inverse_frequency_weights(targets: list[int], k: int) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(targets), minlength=k).float().clamp(min=1)
    return counts.sum() / (k * counts)


def run_training(cfg: JobConfig | None, output: str | Path, *, resume: bool = False, on_event: EventFn | None = None,
                 should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Train, evaluate and write a run folder; returns the metrics dict (also in metrics.json).

    With resume=True the run folder's own config.json is used (cfg may be None) and training continues
    from checkpoints/last.pt.
    """
    output = Path(output)
    if resume:
        saved = output / "config.json"
        if not saved.is_file():
            raise ConfigError(f"resume: '{output}' has no config.json; it is not a run folder to resume")
        cfg = config_from_dict(json.loads(saved.read_text()))
    output.mkdir(parents=True, exist_ok=True)
    if not resume:
        _clear_previous_run(output)
    (output / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    started = time.perf_counter()
    tc = cfg.train
    threads = torch.get_num_threads()
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    try:
        return _run(cfg, output, resume, on_event, should_stop, started)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: JobConfig, output: Path, resume: bool, on_event, should_stop, started: float) -> dict:
    tc = cfg.train
    regression = cfg.data.task.endswith("regression")

    dataset = D.load_dataset(cfg.data)
    _write_splits(dataset, output / "splits")
    torch.manual_seed(tc.seed)  # the new head's initial weights
    model, tokenizer = build_model(cfg.model.base_model, dataset.label_names)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    params = freeze(model, cfg.model.freeze)

    encoded, token_lengths = {}, {}
    for role, split in dataset.splits.items():
        targets = split.targets
        if regression:
            targets = [(t - dataset.target_mean) / dataset.target_std for t in targets]
        encoded[role], token_lengths[role] = D.encode(tokenizer, split.texts, targets, cfg.data.max_length)
    report = {**dataset.report, "tokens": {r: D.token_report(v, cfg.data.max_length) for r, v in token_lengths.items()},
              "parameters": params}
    (output / "data_report.json").write_text(json.dumps(report, indent=2))

    weights = None
    if tc.class_weights and not regression:
        weights = inverse_frequency_weights(encoded["train"].targets, len(dataset.label_names)).to(device)
    loss_fn = make_loss(regression, weights, tc.label_smoothing)
    precision = pick_precision(tc.precision)

    def evaluate_split(role: str) -> dict:
        return evaluate(model, encoded[role], loss_fn, label_names=dataset.label_names, target_mean=dataset.target_mean,
                        target_std=dataset.target_std, batch_size=tc.eval_batch_size, precision=precision)

    sink = _EventLog(output, on_event)
    try:
        sink({"type": "data", "report": {k: report[k] for k in ("rows", "cleaning")}, "parameters": params})
        result = fit(model, encoded["train"], tc, loss_fn=loss_fn, evaluate_fn=lambda m: scalars(evaluate_split("validation")),
                     regression=regression, checkpoint_dir=output / "checkpoints", resume=resume,
                     on_event=sink, should_stop=should_stop)
        train_info = {"status": result.status, "samples_per_second": round(result.samples_per_second, 2),
                      "wall_seconds": round(time.perf_counter() - started, 2), "train_seconds": round(result.wall_seconds, 2),
                      "epochs_run": result.epochs_run, "steps": result.global_step,
                      "stopped_early": result.status == "stopped_early", "precision": result.precision,
                      "best_step": result.best_step, "best_" + tc.early_stopping_metric: result.best_metric,
                      "device": device.type}
        if result.status == "cancelled":
            return {"validation": None, "test": None, "train": train_info}

        metrics = {"validation": evaluate_split("validation"),
                   "test": evaluate_split("test") if "test" in encoded else None, "train": train_info}
        meta = {"task": cfg.data.task, "labels": dataset.label_names, "base_model": cfg.model.base_model,
                "max_length": cfg.data.max_length, "target_mean": dataset.target_mean, "target_std": dataset.target_std,
                "lowercase": cfg.data.lowercase}
        model.to("cpu")
        save_trained(model, tokenizer, meta, output / "model")
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plots = output / "plots"
        plots.mkdir(exist_ok=True)
        plot_curves(sink.steps, result.history, tc.early_stopping_metric, plots / "curves.png")
        for role, name in (("validation", "confusion.png"), ("test", "confusion_test.png")):
            if not regression and metrics[role]:
                plot_confusion(metrics[role]["confusion_matrix"], dataset.label_names, plots / name, f"Confusion matrix ({role})")
        sink({"type": "done", "metrics": {r: scalars(m) for r, m in metrics.items() if m and r != "train"}})
        return metrics
    finally:
        sink.close()


_RUN_OUTPUTS = ("model", "splits", "plots", "checkpoints", "tensorboard", "events.jsonl", "metrics.json", "data_report.json")


def _clear_previous_run(output: Path) -> None:
    """A fresh run into a used folder starts clean: stale checkpoints or events would mix with the new run."""
    for name in _RUN_OUTPUTS:
        path = output / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _write_splits(dataset: D.Dataset, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for role, split in dataset.splits.items():
        names = dataset.label_names
        with (folder / f"{role}.jsonl").open("w") as f:
            for text, target in zip(split.texts, split.targets):
                f.write(json.dumps({"text": text, "label": names[target] if names else target}) + "\n")


class _EventLog:
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
