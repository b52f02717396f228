"""Metrics, per-class report, confusion matrix and the pictures people look at."""

from __future__ import annotations


import numpy as np
import torch
from torch import nn

from .data import batch_order
from .model import logits_of


@torch.no_grad()
def predict_logits(model: nn.Module, encoded, batch_size: int = 128, precision: str = "fp32") -> np.ndarray:
    """Logits for every row in the original order; batches are length-sorted to pad little."""
    model.eval()
    device = next(model.parameters()).device
    order = batch_order(encoded.lengths, batch_size, shuffle=False, group_by_length=True)
    out: list[np.ndarray] = [None] * len(encoded.targets)
    for indices, batch in zip(order, encoded.loader(order)):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = logits_of(model(**{k: v.to(device) for k, v in batch["inputs"].items()}))
        for i, row in zip(indices, logits.float().cpu().numpy()):
            out[i] = row
    return np.stack(out)


def classification_metrics(y_true, y_pred, names: list[str]) -> dict:
    """Accuracy, macro and weighted F1, per-class precision/recall/F1/support, confusion matrix."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    k = len(names)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(float)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = support > 0
    return {
        "n": int(len(y_true)),
        "accuracy": float(tp.sum() / max(1, len(y_true))),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / max(1, support.sum())),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(names)
        },
        "confusion_matrix": cm.tolist(),
        "labels": list(names),
    }


def regression_metrics(y_true, y_pred) -> dict:
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    err = p - y
    total = ((y - y.mean()) ** 2).sum()
    return {
        "n": int(len(y)),
        "mse": float((err**2).mean()),
        "mae": float(np.abs(err).mean()),
        "r2": float(1 - (err**2).sum() / total) if total > 0 else 0.0,
        "pearson": _correlation(y, p),
        "spearman": _correlation(_ranks(y), _ranks(p)),
    }


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's correlation needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def evaluate(model: nn.Module, encoded, loss_fn, *, label_names: list[str] | None,
             target_mean: float | None = None, target_std: float | None = None,
             batch_size: int = 128, precision: str = "fp32") -> dict:
    """All metrics for one split. `encoded.targets` are class ids, or standardised regression targets."""
    logits = predict_logits(model, encoded, batch_size, precision)
    regression = label_names is None
    targets = torch.tensor(encoded.targets, dtype=torch.float32 if regression else torch.long)
    loss = float(loss_fn(torch.from_numpy(logits), {"labels": targets}))
    if regression:
        scale = lambda v: np.asarray(v) * target_std + target_mean  # noqa: E731 - undo the standardisation
        return {"loss": loss, **regression_metrics(scale(encoded.targets), scale(logits[:, 0]))}
    return {"loss": loss, **classification_metrics(encoded.targets, logits.argmax(axis=1), label_names)}


def scalars(metrics: dict) -> dict:
    """The numeric headline figures of a metrics dict (what the training history keeps)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "n"}
