"""The training loop on a tiny random BERT: it learns, stops early, resumes exactly, cancels cleanly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune_core.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from finetune_core.pipeline import run_training

from conftest import toy_rows, write_jsonl


def job(train_path, tiny_base, **train) -> JobConfig:
    # One thread: a tiny model gains nothing from two, and it keeps the tests quick beside other work.
    base = dict(epochs=6, batch_size=16, learning_rate=2e-3, precision="fp32", log_every_steps=1, seed=1, num_threads=1)
    return JobConfig(DataConfig(train=str(train_path), min_rows_per_class=2), ModelConfig(base_model=str(tiny_base)),
                     TrainConfig(**{**base, **train}))


def events(run) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def test_loss_goes_down_and_the_run_folder_is_complete(tmp_path, toy_train, tiny_base):
    run = tmp_path / "run"
    metrics = run_training(job(toy_train, tiny_base, early_stopping_patience=0), run)
    losses = [e["loss"] for e in events(run) if e["type"] == "step"]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert metrics["validation"]["accuracy"] >= 0.9 and metrics["test"]["accuracy"] >= 0.85
    assert metrics["train"]["epochs_run"] == 6 and not metrics["train"]["stopped_early"]
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/finetune_serve.json",
                 "metrics.json", "data_report.json", "plots/curves.png", "plots/confusion.png", "plots/confusion_test.png",
                 "checkpoints/best.pt", "checkpoints/last.pt", "splits/train.jsonl", "config.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    saved = json.loads((run / "metrics.json").read_text())
    assert set(saved) == {"validation", "test", "train"}
    assert {"accuracy", "macro_f1", "loss", "per_class", "confusion_matrix"} <= set(saved["validation"])
    report = json.loads((run / "data_report.json").read_text())
    assert report["tokens"]["train"]["truncated_share"] == 0.0 and report["parameters"]["trainable_parameters"] > 0


def test_early_stopping_stops_when_the_metric_does_not_improve(tmp_path, toy_train, tiny_base):
    cfg = job(toy_train, tiny_base, epochs=10, learning_rate=1e-9, schedule="constant", warmup_ratio=0.0,
              early_stopping_patience=1, early_stopping_metric="accuracy")
    metrics = run_training(cfg, tmp_path / "run")
    assert metrics["train"]["stopped_early"] and metrics["train"]["epochs_run"] == 2


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, toy_train, tiny_base):
    cfg = job(toy_train, tiny_base, epochs=2, checkpoint_every_steps=4, learning_rate=5e-4)
    straight = run_training(cfg, tmp_path / "straight")

    calls = {"n": 0}

    def stop_after_seven_steps():
        calls["n"] += 1
        return calls["n"] >= 7  # mid-epoch 1 (12 steps per epoch): between two step checkpoints

    cancelled = run_training(cfg, tmp_path / "resumed", should_stop=stop_after_seven_steps)
    assert cancelled["train"]["status"] == "cancelled" and not (tmp_path / "resumed" / "model").exists()
    resumed = run_training(None, tmp_path / "resumed", resume=True)

    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"
    assert resumed["validation"]["loss"] == pytest.approx(straight["validation"]["loss"], abs=1e-6)
    assert resumed["train"]["steps"] == straight["train"]["steps"] == 24


def test_class_weights_label_smoothing_sgd_and_accumulation_run(tmp_path, tiny_base):
    rows = toy_rows(200)[:150] + [r for r in toy_rows(200) if r["label"] == "negative"][:10]
    path = write_jsonl(tmp_path / "imbalanced.jsonl", rows)
    cfg = job(path, tiny_base, epochs=1, optimizer="sgd", learning_rate=0.05, class_weights=True,
              label_smoothing=0.1, gradient_accumulation=2, schedule="cosine", early_stopping_metric="macro_f1")
    metrics = run_training(cfg, tmp_path / "run")
    assert metrics["train"]["steps"] == 4  # ceil(ceil(128 rows / 16) / 2)
    assert torch.isfinite(torch.tensor(metrics["validation"]["loss"]))


def test_bf16_autocast_trains_as_well_as_fp32(tmp_path, toy_train, tiny_base):
    fp32 = run_training(job(toy_train, tiny_base), tmp_path / "fp32")
    bf16 = run_training(job(toy_train, tiny_base, precision="bf16"), tmp_path / "bf16")
    assert bf16["train"]["precision"] == "bf16"
    assert abs(bf16["validation"]["accuracy"] - fp32["validation"]["accuracy"]) <= 0.05


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_text_regression_learns_a_numeric_target(tmp_path, tiny_base, loss):
    import random

    rng = random.Random(0)
    rows = []
    for i in range(240):
        k = i % 4
        words = ["great"] * k + rng.choices(["the", "film", "plot", "was", "a"], k=rng.randint(2, 6))
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "score": 10.0 + 5.0 * k})  # learnable: 10 + 5 x (great count)
    path = write_jsonl(tmp_path / "reg.jsonl", rows)
    cfg = JobConfig(DataConfig(train=str(path), task="text-regression", text_column="sentence", label_column="score"),
                    ModelConfig(base_model=str(tiny_base)),
                    TrainConfig(epochs=8, batch_size=16, learning_rate=3e-3, precision="fp32", num_threads=1,
                                early_stopping_metric="r2", early_stopping_patience=0, regression_loss=loss))
    metrics = run_training(cfg, tmp_path / "run")
    assert {"mse", "mae", "r2", "pearson", "spearman"} <= set(metrics["validation"])
    assert metrics["validation"]["r2"] >= 0.8 and metrics["test"]["r2"] >= 0.8, metrics
    assert metrics["test"]["mae"] < 3.0  # in the target's own units (10 to 25), not standardised ones
    meta = json.loads((tmp_path / "run" / "model" / "finetune_serve.json").read_text())
    assert meta["task"] == "text-regression" and meta["labels"] is None and 15 < meta["target_mean"] < 20

