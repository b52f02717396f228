"""Task losses for fit(): each is a LossFn (train.py), a function of the logits and the whole batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .train import Batch, LossFn


def make_loss(regression: bool, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0,
              regression_loss: str = "mse") -> LossFn:
    """Cross-entropy (optionally class-weighted and smoothed), or MSE/Huber on the one regression output."""
    if regression and regression_loss == "huber":
        return lambda logits, batch: F.huber_loss(logits[:, 0], batch["labels"])
    if regression:
        return lambda logits, batch: F.mse_loss(logits[:, 0], batch["labels"])

    def cross_entropy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits, batch["labels"], weight=class_weights, label_smoothing=label_smoothing)

    return cross_entropy


def inverse_frequency_weights(targets: list[int], k: int) -> torch.Tensor:
    """Class c weighs rows / (k * rows of c): a balanced set gets 1 everywhere, rare classes count more."""
    counts = torch.bincount(torch.tensor(targets), minlength=k).float().clamp(min=1)
    return counts.sum() / (k * counts)
