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


def distillation_loss(hard: LossFn, alpha: float, temperature: float, regression: bool = False) -> LossFn:
    """(1 - alpha) * hard(logits, batch) + alpha * a term pulling the student towards batch["teacher_logits"].

    Classification: T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over classes and
    averaged over rows ("batchmean"; a plain mean would also divide by the class count and shrink the
    term k-fold). T^2 keeps its gradients on the scale of the hard loss's as T changes (Hinton et al.).
    Regression: MSE between the student's and the teacher's (standardised) outputs.
    """

    def loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        teacher = batch["teacher_logits"]
        if regression:
            soft = F.mse_loss(logits[:, 0], teacher[:, 0])
        else:
            soft = temperature**2 * F.kl_div(F.log_softmax(logits / temperature, dim=-1),
                                             F.log_softmax(teacher / temperature, dim=-1),
                                             reduction="batchmean", log_target=True)
        return (1.0 - alpha) * hard(logits, batch) + alpha * soft

    return loss


def hidden_matching(loss: LossFn, student_hidden: list, weight: float) -> LossFn:
    """loss + weight * the MSE between the student's and the teacher's hidden states, at real tokens only.

    `student_hidden` holds the student's layer outputs of the latest forward pass (distill.layer_outputs);
    batch["teacher_hidden"] the teacher's matching layers, stacked as (layers, rows, tokens, width).
    Padding positions are left out, so a batch's padding does not dilute the term.
    """

    def combined(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        mask = batch["inputs"]["attention_mask"].unsqueeze(-1).float()
        student = torch.stack([h.float() for h in student_hidden])
        squared = (student - batch["teacher_hidden"]) ** 2 * mask
        return loss(logits, batch) + weight * squared.sum() / (mask.sum() * student.shape[0] * student.shape[-1])

    return combined
