"""After training: did the run over-fit, under-fit or converge, and which training rows look mislabelled.

The diagnosis reads the run's own curves (training loss per logged step, validation figures per
evaluation) and names the usual remedies with the values it would change. The label check ranks the
training rows whose given label the trained model most confidently contradicts ("garbage in,
garbage out"), so a user can fix the data.
"""

from __future__ import annotations

import numpy as np

# Validation loss this far above its best, with the training loss still falling, is over-fitting.
OVERFIT_RISE = 0.10
# Training loss still above this share of where it started at the end, while validation still improves,
# is under-fitting.
UNDERFIT_SHARE = 0.5
LABEL_ISSUES_REPORTED = 100


def diagnose(steps: list[dict], history: list[dict], metric: str, higher_is_better: bool, cfg) -> dict:
    """{"state", "evidence", "remedies": [{"field", "value", "why"}], "summary"} from a run's curves.

    steps: step events ("loss"); history: evaluations ("epoch", "loss", the early-stopping metric);
    cfg: the run's JobConfig (the values a remedy would change).
    """
    if len(history) < 2 or len(steps) < 2:
        return _verdict("undetermined", "fewer than two evaluations or logged steps: no curve to read", [])
    losses = [s["loss"] for s in steps]
    k = max(1, len(losses) // 10)
    train_start, train_end = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    values = [h[metric] for h in history]
    best = int(np.argmax(values) if higher_is_better else np.argmin(values))
    val_losses = [h["loss"] for h in history]
    low = min(range(len(val_losses)), key=val_losses.__getitem__)
    rise = (val_losses[-1] - val_losses[low]) / max(abs(val_losses[low]), 1e-9)
    tc, epochs_at_best = cfg.train, max(1, round(history[best]["epoch"]))

    # Rising validation loss alone can be growing confidence while accuracy still improves: over-fitting
    # needs the early-stopping figure to have peaked before the end too.
    peaked = best < len(values) - 1 or metric == "loss"
    if low < len(val_losses) - 1 and rise > OVERFIT_RISE and train_end < train_start and peaked:
        evidence = (f"validation loss rose {rise:.0%} from its lowest (epoch {history[low]['epoch']:.1f}) while "
                    f"training loss fell to {train_end:.3g} ({train_end / max(train_start, 1e-9):.0%} of its start); "
                    f"the best {metric} came at epoch {history[best]['epoch']:.1f}")
        remedies = [{"field": "train.epochs", "value": epochs_at_best,
                     "why": f"the best {metric} came at epoch {epochs_at_best}"}] if best < len(values) - 1 else []
        remedies.append({"field": "train.weight_decay", "value": min(0.1, max(0.05, tc.weight_decay * 5)),
                         "why": "more regularisation"})
        if cfg.data.task.startswith("image") and cfg.data.augment is False:
            remedies.append({"field": "data.augment", "value": True, "why": "more varied training images"})
        if not cfg.data.task.endswith("regression") and tc.label_smoothing == 0:
            remedies.append({"field": "train.label_smoothing", "value": 0.1, "why": "less confident fits to each row"})
        return _verdict("over-fitting", evidence, remedies)

    if best == len(values) - 1 and train_end > UNDERFIT_SHARE * train_start:
        evidence = (f"training loss ended at {train_end / max(train_start, 1e-9):.0%} of its start and the best "
                    f"{metric} came at the last evaluation: both still falling")
        remedies = [{"field": "train.epochs", "value": min(1000, 2 * max(1, round(history[-1]["epoch"]))),
                     "why": "the curves had not levelled off"},
                    {"field": "train.learning_rate", "value": _rate(tc.learning_rate * 3), "why": "bigger steps"}]
        looser = _less_frozen(cfg.model.freeze)
        if looser:
            remedies.append({"field": "model.freeze", "value": looser, "why": "let more layers adapt"})
        return _verdict("under-fitting", evidence, remedies)

    where = "the last evaluation" if best == len(values) - 1 else f"epoch {history[best]['epoch']:.1f}"
    confident = f"; validation loss rose {rise:.0%} from its lowest as predictions grew confident" if rise > OVERFIT_RISE else ""
    return _verdict("converged", f"the best {metric} came at {where}; training loss fell to "
                                 f"{train_end / max(train_start, 1e-9):.0%} of its start{confident}", [])


def label_issues(logits: np.ndarray, targets: list, label_names: list[str] | None, inputs: list[str],
                 target_std: float | None = None, target_mean: float | None = None) -> list[dict]:
    """Training rows whose given label the model most confidently contradicts, most suspicious first.

    Classification: rows the model assigns to another class, ranked by the probability it gives their
    own label (lowest first). Regression: rows predicted more than 3 standard deviations away.
    """
    if label_names is None:
        z = logits[:, 0] - np.asarray(targets, dtype=np.float64)  # both standardised
        order = [i for i in np.argsort(-np.abs(z)) if abs(z[i]) > 3]
        scale = lambda v: float(v * target_std + target_mean)  # noqa: E731 - back to the target's units
        return [{"row": int(i), "input": inputs[i], "label": scale(targets[i]), "predicted": scale(logits[i, 0]),
                 "deviations": round(float(z[i]), 2)} for i in order[:LABEL_ISSUES_REPORTED]]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    given = probs[np.arange(len(targets)), targets]
    predicted = probs.argmax(-1)
    order = [i for i in np.argsort(given, kind="stable") if predicted[i] != targets[i]]
    return [{"row": int(i), "input": inputs[i], "label": label_names[targets[i]],
             "predicted": label_names[predicted[i]], "p_label": round(float(given[i]), 4),
             "p_predicted": round(float(probs[i, predicted[i]]), 4)} for i in order[:LABEL_ISSUES_REPORTED]]


def _verdict(state: str, evidence: str, remedies: list[dict]) -> dict:
    changes = ", ".join(f"{r['field']}={r['value']}" for r in remedies)
    summary = f"{state}: {evidence}" + (f"; try {changes}" if changes else "")
    return {"state": state, "evidence": evidence, "remedies": remedies, "summary": summary}


def _rate(value: float) -> float:
    return float(f"{min(value, 1.0):.2g}")


def _less_frozen(policy: str) -> str | None:
    """The next policy that trains more: all-but-head -> bottom:2 -> embeddings -> none."""
    if policy == "all-but-head":
        return "bottom:2"
    if policy.startswith("bottom:"):
        n = int(policy.split(":", 1)[1])
        return f"bottom:{n // 2}" if n > 1 else "embeddings"
    if policy == "embeddings":
        return "none"
    return None
