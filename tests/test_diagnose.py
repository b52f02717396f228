"""The run's own curves say over-fitting, under-fitting or converged, and name the values to change."""

from __future__ import annotations

import numpy as np

from finetune_core.config import config_from_dict
from finetune_core.diagnose import diagnose, label_issues

CFG = config_from_dict({"data": {"train": "t"}, "train": {"epochs": 6, "learning_rate": 1e-4}, "model": {"freeze": "all-but-head"}})


def steps(*losses):
    return [{"loss": v} for v in losses]


def evals(val_losses, accuracies):
    return [{"epoch": i + 1, "loss": v, "accuracy": a} for i, (v, a) in enumerate(zip(val_losses, accuracies))]


def test_rising_validation_loss_while_training_loss_falls_is_over_fitting():
    found = diagnose(steps(*np.linspace(1.0, 0.05, 40)), evals([0.5, 0.4, 0.55, 0.7], [0.8, 0.85, 0.84, 0.83]),
                     "accuracy", True, CFG)
    assert found["state"] == "over-fitting" and "rose 75%" in found["evidence"]
    changes = {r["field"]: r["value"] for r in found["remedies"]}
    assert changes["train.epochs"] == 2 and changes["train.label_smoothing"] == 0.1 and changes["train.weight_decay"] == 0.05
    assert found["summary"].startswith("over-fitting: ") and "train.epochs=2" in found["summary"]


def test_high_and_still_falling_curves_are_under_fitting():
    found = diagnose(steps(*np.linspace(0.70, 0.55, 40)), evals([0.69, 0.66, 0.62], [0.52, 0.58, 0.63]),
                     "accuracy", True, CFG)
    assert found["state"] == "under-fitting"
    changes = {r["field"]: r["value"] for r in found["remedies"]}
    assert changes == {"train.epochs": 6, "train.learning_rate": 0.0003, "model.freeze": "bottom:2"}


def test_rising_loss_while_accuracy_still_improves_is_not_over_fitting():
    found = diagnose(steps(*np.linspace(0.7, 0.01, 40)), evals([0.45, 0.48, 0.55, 0.65], [0.79, 0.8, 0.82, 0.83]),
                     "accuracy", True, CFG)
    assert found["state"] == "converged" and "rose 44% from its lowest as predictions grew confident" in found["evidence"]


def test_a_levelled_run_has_converged():
    found = diagnose(steps(*np.linspace(0.7, 0.1, 40)), evals([0.4, 0.3, 0.29, 0.3], [0.85, 0.9, 0.91, 0.9]),
                     "accuracy", True, CFG)
    assert found["state"] == "converged" and found["remedies"] == []


def test_one_evaluation_is_undetermined():
    assert diagnose(steps(0.7, 0.6), evals([0.5], [0.8]), "accuracy", True, CFG)["state"] == "undetermined"


def test_label_issues_rank_confident_contradictions_first():
    logits = np.array([[4.0, -4.0], [0.2, 0.0], [-3.0, 3.0], [2.0, -2.0]])
    targets = [0, 1, 0, 1]  # row 0 agrees; rows 1, 2, 3 disagree with growing confidence: 1 < 3 < 2
    found = label_issues(logits, targets, ["neg", "pos"], ["a", "b", "c", "d"])
    assert [i["input"] for i in found] == ["c", "d", "b"]
    assert found[0]["label"] == "neg" and found[0]["predicted"] == "pos" and found[0]["p_label"] < 0.01


def test_regression_label_issues_are_rows_far_from_their_prediction():
    logits = np.array([[0.0], [0.1], [5.0]])
    found = label_issues(logits, [0.0, 0.0, 0.0], None, ["a", "b", "c"], target_std=2.0, target_mean=10.0)
    assert found == [{"row": 2, "input": "c", "label": 10.0, "predicted": 20.0, "deviations": 5.0}]
