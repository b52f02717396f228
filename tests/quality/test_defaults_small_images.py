"""Quality bars of the defaults on small images, with the real EfficientNet-Lite0 weights (`make quality`).

mnist_png_small (all 1,200 PNGs, tests/assets) >= 0.90 test accuracy; digits (8x8 scans, tests/assets)
regressed to their value with R2 >= 0.8 on the test set. No hyperparameter is given: the task's defaults and
the auto values (auto.py) must reach the bars. The data is in the repo; the runs take minutes, so they
live with the other quality bars rather than in `make test`.
"""

import json

import numpy as np
import pytest
from PIL import Image

from finetune_core.config import config_from_dict
from finetune_core.pipeline import run_training

from conftest import ASSETS

pytestmark = pytest.mark.slow


def test_mnist_png_small_reaches_090_test_accuracy(tmp_path):
    cfg = config_from_dict({"data": {"train": str(ASSETS / "mnist_png_small"), "task": "image-classification"}})
    metrics = run_training(cfg, tmp_path / "run")
    chosen = json.loads((tmp_path / "run" / "data_report.json").read_text())["auto"]
    assert chosen["data.image_size"]["value"] == 64 and chosen["model.freeze"]["value"] == "none"  # 28 px digits
    print("mnist", {k: metrics["test"][k] for k in ("accuracy", "macro_f1")}, metrics["train"])
    assert metrics["test"]["n"] == 200
    assert metrics["test"]["accuracy"] >= 0.90, metrics["test"]


def _digits_as_pngs(folder):
    """The 8x8 scans (values 0-16) as PNG files and a JSONL list per split, the digit as a number."""
    for split in ("train", "test"):
        data = np.load(ASSETS / "digits" / f"{split}.npz")
        (folder / split).mkdir(parents=True)
        rows = []
        for i, (pixels, digit) in enumerate(zip(data["images"], data["labels"])):
            Image.fromarray((pixels.astype(np.float32) * 255 / 16).round().astype(np.uint8), "L").save(folder / split / f"{i}.png")
            rows.append({"image": f"{split}/{i}.png", "label": float(digit)})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_digits_value_regression_reaches_r2_08(tmp_path):
    from finetune_core.image_model import load_image_model
    from finetune_core.predict import ImagePredictor, eager_backend

    _digits_as_pngs(tmp_path / "digits")
    cfg = config_from_dict({"data": {"train": str(tmp_path / "digits" / "train.jsonl"),
                                     "test": str(tmp_path / "digits" / "test.jsonl"), "task": "image-regression"}})
    metrics = run_training(cfg, tmp_path / "run")
    print("digits", {k: metrics["test"][k] for k in ("r2", "mae", "pearson")}, metrics["train"])
    assert metrics["test"]["n"] == 360
    assert metrics["test"]["r2"] >= 0.8, metrics["test"]
    assert metrics["test"]["mae"] < 1.5  # digits, in their own units

    # The saved model served as a predictor gives values in digit units, not standardised ones: its error
    # on the test images is the one training measured.
    model, meta = load_image_model(tmp_path / "run" / "model")
    predictor = ImagePredictor(meta, eager_backend(model), "pytorch")
    rows = [json.loads(line) for line in (tmp_path / "digits" / "test.jsonl").read_text().splitlines()]
    values = np.array([r["value"] for r in predictor.predict([str(tmp_path / "digits" / r["image"]) for r in rows])])
    targets = np.array([r["label"] for r in rows])
    assert np.abs(values - targets).mean() == pytest.approx(metrics["test"]["mae"], abs=0.05)
    for digit in (0, 9):
        assert abs(np.median(values[targets == digit]) - digit) < 1.5, (digit, values[targets == digit])
