"""Image tasks through run_training and the CLI: the real EfficientNet-Lite0 at a small input size."""

import json
import os
import subprocess

import numpy as np
import pytest
from safetensors.torch import load_file

from finetune_core.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from finetune_core.pipeline import evaluate_saved, run_training

from conftest import ASSETS, REPO

pytestmark = pytest.mark.slow  # every test trains the real EfficientNet-Lite0 on real MNIST digits


def image_job(train, task="image-classification", augment=False, **train_cfg) -> JobConfig:
    base = dict(epochs=4, batch_size=8, learning_rate=2e-3, seed=0, num_threads=1, log_every_steps=1)
    data = DataConfig(train=str(train), task=task, image_size=48, augment=augment, horizontal_flip=False, min_rows_per_class=2)
    return JobConfig(data, ModelConfig(), TrainConfig(**{**base, **train_cfg}))


def test_an_image_run_learns_and_writes_the_same_outputs_as_text(tmp_path, digit_images):
    (digit_images / "train" / "7" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    run = tmp_path / "run"
    metrics = run_training(image_job(digit_images), run)
    assert metrics["validation"]["accuracy"] >= 0.9, metrics["validation"]
    for name in ("model/model.safetensors", "model/finetune_serve.json", "metrics.json", "data_report.json",
                 "plots/curves.png", "plots/confusion.png", "checkpoints/best.pt", "splits/train.jsonl", "config.json"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "model" / "finetune_serve.json").read_text())
    assert meta | {"base_model": "default"} == meta and meta["labels"] == ["0", "1", "7"]
    assert (meta["arch"], meta["image_size"], meta["mean"]) == ("tf_efficientnet_lite0", 48, [0.5, 0.5, 0.5])
    report = json.loads((run / "data_report.json").read_text())
    assert report["cleaning"]["train"]["dropped"] == {"bad_image": 1}
    assert report["images"]["train"]["width"]["max"] == 28 and report["images"]["input"]["image_size"] == 48
    first = json.loads((run / "splits" / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"image", "label"} and first["image"].endswith(".png")
    again = evaluate_saved(run / "model", str(digit_images / "val"))
    assert again["accuracy"] == pytest.approx(metrics["validation"]["accuracy"])


def test_an_interrupted_image_run_resumes_to_the_same_weights(tmp_path, digit_images):
    cfg = image_job(digit_images, augment=True, epochs=2, batch_size=16, checkpoint_every_steps=2, learning_rate=5e-4,
                    precision="fp32")
    run_training(cfg, tmp_path / "straight")
    calls = {"n": 0}

    def stop_after_three_steps():
        calls["n"] += 1
        return calls["n"] >= 3  # mid-epoch (4 steps per epoch), between two step checkpoints

    assert run_training(cfg, tmp_path / "resumed", should_stop=stop_after_three_steps)["train"]["status"] == "cancelled"
    run_training(None, tmp_path / "resumed", resume=True)
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-5, f"resumed weights differ by {worst}: augmentation or data order did not replay"


def test_image_regression_from_an_image_list(tmp_path, digit_images):
    """The digit's value (0 or 7) as the target, from a JSONL list of real MNIST images.

    A smoke test of the path (tests/quality/test_defaults_small_images.py holds the real quality check on all ten digits).
    The split carved from 56 images leaves 6 validation rows, too few to judge by, so the saved model is
    judged on the 40 held-out test PNGs of those digits instead.
    """
    from finetune_core.evaluate import regression_metrics
    from finetune_core.image_model import load_image_model
    from finetune_core.predict import ImagePredictor, eager_backend

    rows = [{"image": str(p.relative_to(digit_images)), "label": float(p.parent.name)}
            for p in sorted(digit_images.rglob("*.png")) if p.parent.name != "1"]
    listing = digit_images / "values.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = image_job(listing, task="image-regression", learning_rate=1e-3, early_stopping_metric="r2", early_stopping_patience=0)
    metrics = run_training(cfg, tmp_path / "run")
    assert {"mse", "mae", "r2", "pearson", "spearman"} <= set(metrics["validation"]) and metrics["validation"]["n"] == 6
    meta = json.loads((tmp_path / "run" / "model" / "finetune_serve.json").read_text())
    assert meta["labels"] is None and 2.5 < meta["target_mean"] < 4.5

    # The saved model predicts in the target's units. Measured: R2 0.60, MAE 1.82, medians 2.4 (0s) and 7.2 (7s);
    # predicting the mean (3.5) would score R2 0 and MAE 3.5, and values left standardised about the same.
    model, meta = load_image_model(tmp_path / "run" / "model")
    predictor = ImagePredictor(meta, eager_backend(model), "pytorch")
    held_out = {digit: sorted((ASSETS / "mnist_png_small" / "test" / digit).iterdir()) for digit in ("0", "7")}
    values = {digit: [r["value"] for r in predictor.predict([str(p) for p in paths])] for digit, paths in held_out.items()}
    scores = regression_metrics([float(d) for d, v in values.items() for _ in v], [x for v in values.values() for x in v])
    assert scores["r2"] >= 0.45 and scores["mae"] < 2.5, scores
    assert np.median(values["7"]) - np.median(values["0"]) >= 3.5, values
    assert abs(np.median(values["7"]) - 7) < 1.5, values["7"]


def test_cli_trains_an_image_folder_and_names_bad_input(tmp_path, digit_images):
    cli = str(REPO / ".venv" / "bin" / "finetune-serve")
    done = subprocess.run([cli, "train", "--task", "image-classification", "--train", str(digit_images / "train"),
                           "--validation", str(digit_images / "val"), "--image-size", "32", "--no-flip", "--epochs", "1",
                           "--output", str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["validation"]["n"] == 24
    bad = subprocess.run([cli, "train", "--task", "image-classification", "--train", str(tmp_path / "missing"),
                          "--output", str(tmp_path / "run2")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "folder" in bad.stderr and "does not exist" in bad.stderr, bad.stderr
