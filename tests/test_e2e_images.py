"""The issue's quality bar on real data with the real EfficientNet-Lite0 weights.

hymenoptera (ants vs bees, 245 train / 153 val photos) >= 0.93 validation accuracy; mnist_png_small
>= 0.90 test accuracy; digits (8x8 scans) regressed to their value with R2 >= 0.8 on the test set.
The settings are the ones the README recommends for small image sets on CPU.
"""

import json

import numpy as np
import pytest
from PIL import Image

from finetune_core.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from finetune_core.pipeline import run_training

from conftest import SHARED_DATA

pytestmark = pytest.mark.slow


def test_hymenoptera_reaches_093_validation_accuracy(tmp_path):
    """A frozen ImageNet backbone and a new head: the fast recipe on CPU (README, "Images")."""
    cfg = JobConfig(DataConfig(train=str(SHARED_DATA / "hymenoptera"), task="image-classification"),
                    ModelConfig(freeze="all-but-head"),
                    TrainConfig(epochs=2, batch_size=16, learning_rate=3e-3, early_stopping_patience=0))
    metrics = run_training(cfg, tmp_path / "run")
    print("hymenoptera", {k: metrics["validation"][k] for k in ("accuracy", "macro_f1")}, metrics["train"])
    assert metrics["validation"]["n"] == 153 and metrics["test"] is None
    assert metrics["validation"]["accuracy"] >= 0.93, metrics["validation"]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["rows"] == {"train": 245, "validation": 153}


def test_mnist_png_small_reaches_090_test_accuracy(tmp_path):
    cfg = JobConfig(DataConfig(train=str(SHARED_DATA / "mnist_png_small"), task="image-classification", image_size=64,
                               augment=False),
                    ModelConfig(), TrainConfig(epochs=3, batch_size=16, learning_rate=1e-3, early_stopping_patience=0))
    metrics = run_training(cfg, tmp_path / "run")
    print("mnist", {k: metrics["test"][k] for k in ("accuracy", "macro_f1")}, metrics["train"])
    assert metrics["test"]["n"] == 200
    assert metrics["test"]["accuracy"] >= 0.90, metrics["test"]


def _digits_as_pngs(folder):
    """The 8x8 scans (values 0-16) as PNG files and a JSONL list per split, the digit as a number."""
    for split in ("train", "test"):
        data = np.load(SHARED_DATA / "digits" / f"{split}.npz")
        (folder / split).mkdir(parents=True)
        rows = []
        for i, (pixels, digit) in enumerate(zip(data["images"], data["labels"])):
            Image.fromarray((pixels.astype(np.float32) * 255 / 16).round().astype(np.uint8), "L").save(folder / split / f"{i}.png")
            rows.append({"image": f"{split}/{i}.png", "label": float(digit)})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_digits_value_regression_reaches_r2_08(tmp_path):
    _digits_as_pngs(tmp_path / "digits")
    cfg = JobConfig(DataConfig(train=str(tmp_path / "digits" / "train.jsonl"), test=str(tmp_path / "digits" / "test.jsonl"),
                               task="image-regression", image_size=32, augment=False),
                    ModelConfig(), TrainConfig(epochs=4, batch_size=32, learning_rate=1e-3, early_stopping_metric="r2",
                                               early_stopping_patience=0))
    metrics = run_training(cfg, tmp_path / "run")
    print("digits", {k: metrics["test"][k] for k in ("r2", "mae", "pearson")}, metrics["train"])
    assert metrics["test"]["n"] == 360
    assert metrics["test"]["r2"] >= 0.8, metrics["test"]
    assert metrics["test"]["mae"] < 1.5  # digits, in their own units
