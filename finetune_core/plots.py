"""The pictures a run and a search write: PNG files through matplotlib's Agg backend.

A leaf (numpy and matplotlib only, no torch), so a search process that draws its plots after every
trial stays small while its trials train in child processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_curves(step_events: list[dict], history: list[dict], metric: str, path: str | Path) -> None:
    """Training loss per logged step and validation loss and metric per evaluation."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if step_events:
        left.plot([e["step"] for e in step_events], [e["loss"] for e in step_events], label="train loss", alpha=0.7)
    if history:
        left.plot([h["step"] for h in history], [h["loss"] for h in history], "o-", label="validation loss")
        right.plot([h["step"] for h in history], [h[metric] for h in history], "o-", color="tab:green")
    left.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    left.legend()
    right.set(xlabel="optimizer step", ylabel=metric, title=f"Validation {metric}")
    right.grid(alpha=0.3)
    left.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: str | Path, title: str = "Confusion matrix") -> None:
    """Counts with row-normalised colour, true labels down, predictions across."""
    plt = pyplot()
    cm = np.asarray(matrix)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_search_history(trials, direction: str, metric: str, path: str | Path) -> None:
    """Each trial's metric by trial number (pruned ones at their last evaluation) and the best so far.

    trials: records with .number, .state ("complete", "pruned", ...) and .value.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for state, style in (("complete", {"color": "tab:blue", "marker": "o"}), ("pruned", {"color": "tab:grey", "marker": "x"})):
        shown = [t for t in trials if t.state == state and t.value is not None]
        ax.scatter([t.number for t in shown], [t.value for t in shown], label=state, **style)
    pick = min if direction == "minimize" else max
    best, steps = None, []
    for trial in trials:
        if trial.state == "complete":
            best = trial.value if best is None else pick(best, trial.value)
            steps.append((trial.number, best))
    if steps:
        ax.step([n for n, _ in steps], [v for _, v in steps], where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title=f"Optimization history ({direction})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_importances(importances: dict[str, float], path: str | Path) -> None:
    plt = pyplot()
    names = list(importances)[::-1]  # most important on top
    fig, ax = plt.subplots(figsize=(7, 1 + 0.5 * len(names)))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set(xlabel="importance (share of the metric's variation)", title="Parameter importances")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
