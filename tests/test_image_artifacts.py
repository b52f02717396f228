"""Image artifacts: ONNX/TorchScript parity on real images, static int8 under the gate, predictors, the CLI.

One tiny real run for the module: the bundled EfficientNet-Lite0 with its head trained on three
MNIST digits at 64 px (about 15 s on one thread), exported once with every variant.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ASSETS

from finetune_core import export, predict, registry
from finetune_core.artifacts import export_version
from finetune_core.artifacts_cli import add_commands
from finetune_core.errors import ConfigError, DataError

DIGITS = ["0", "1", "7"]
SIZE = 64
# 60 validation images: one image is 1.67 points. int8 of this tiny model measured 86.67 against fp32
# 90.00, bf16 88.33; a 10-point gate accepts both, so every variant is exercised below.
GATE = 10.0
MNIST = ASSETS / "mnist_png_small"
pytestmark = pytest.mark.slow  # the real EfficientNet-Lite0 trained and exported on real digits


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """RUN_DIR/model of a real image run: 40 train and 20 validation images per digit, head-only training."""
    from finetune_core.config import config_from_dict
    from finetune_core.pipeline import run_training

    root = tmp_path_factory.mktemp("digits")
    for role, count in (("train", 40), ("validation", 20)):
        for digit in DIGITS:
            folder = root / "data" / role / digit
            folder.mkdir(parents=True)
            for file in sorted((MNIST / role / digit).iterdir())[:count]:
                shutil.copy(file, folder / file.name)
    cfg = config_from_dict({
        "data": {"task": "image-classification", "train": str(root / "data"), "image_size": SIZE, "horizontal_flip": False},
        "model": {"freeze": "all-but-head"},
        "train": {"epochs": 2, "batch_size": 16, "learning_rate": 1e-2, "num_threads": 1, "eval_batch_size": 64},
    })
    run_training(cfg, root / "run")
    return root / "run" / "model"


@pytest.fixture(scope="module")
def version(image_run, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(registry.ROOT_ENV, str(tmp_path_factory.mktemp("home")))
            return export_version(image_run, "digits", gate_points=GATE)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def predictors(version):
    accepted = [v for v, entry in version.manifest.to_dict()["variants"].items() if entry["accepted"]]
    return {v: predict.load_predictor(version, v, intra_op_threads=1) for v in accepted}


@pytest.fixture(scope="module")
def test_images() -> tuple[list[str], list[str]]:
    """Images no step of training or export has seen: 4 per digit from the test split."""
    paths = [str(p) for digit in DIGITS for p in sorted((MNIST / "test" / digit).iterdir())[:4]]
    return paths, [Path(p).parent.name for p in paths]


def test_fp32_artifacts_are_proved_on_real_images_and_recorded(version):
    import onnx

    manifest = version.manifest.to_dict()
    assert manifest["task"] == "image-classification" and manifest["labels"] == DIGITS
    assert manifest["image_size"] == SIZE and manifest["mean"] == [0.5] * 3 and manifest["arch"] == "tf_efficientnet_lite0"
    assert manifest["max_length"] is None  # an image model has no text limit
    for name in ("onnx", "torchscript"):
        entry = manifest["variants"][name]
        assert entry["accepted"] and len(entry["sha256"]) == 64, entry["reason"]
        proof = entry["proof"]
        assert proof["atol"] == export.PARITY_ATOL and proof["max_abs_diff"] <= export.PARITY_ATOL
        assert proof["argmax_agreement"] == 1.0
        assert proof["batch_shapes"] == [[1, 3, SIZE, SIZE], [4, 3, SIZE, SIZE], [16, 3, SIZE, SIZE]]
    graph = onnx.load(str(registry.variant_file(version, "onnx"))).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert graph.input[0].name == "pixel_values" and dims == ["batch", 3, SIZE, SIZE]


def test_int8_is_static_qdq_calibrated_on_training_images_and_gated(version):
    import onnx

    int8 = version.manifest.to_dict()["variants"]["int8"]
    quantization = int8["proof"]["quantization"]
    assert quantization["kind"] == "static" and quantization["format"] == "QDQ" and quantization["method"] == "minmax"
    assert quantization["rows"] == 64 and quantization["source"].endswith("splits/train.jsonl")
    assert quantization["shape_nodes_kept_fp32"] > 0  # timm's "same" padding arithmetic stays exact
    pytorch = version.manifest.to_dict()["variants"]["pytorch"]
    drop = 100 * (pytorch["accuracy"] - int8["accuracy"])
    assert int8["accepted"] is (drop <= GATE) and f"accuracy drop {drop:.2f} points" in int8["reason"]
    assert int8["accepted"], int8["reason"]
    ops = {node.op_type for node in onnx.load(str(registry.variant_file(version, "int8"))).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_int8_refused_by_the_gate_is_recorded_not_stored(image_run):
    info = export_version(image_run, "digits", variants=["int8"], gate_points=-50.0)
    int8 = info.manifest.to_dict()["variants"]["int8"]
    assert int8["accepted"] is False and int8["file"] is None
    drop = 100 * (info.manifest.to_dict()["variants"]["pytorch"]["accuracy"] - int8["accuracy"])
    assert f"accuracy drop {drop:.2f} points" in int8["reason"] and "exceeds the gate of -50" in int8["reason"]
    assert drop <= GATE  # measured as usual: only the impossible gate refused it
    assert int8["proof"]["quantization"]["rows"] == 64
    assert not (info.path / "model.int8.onnx").exists()


def test_a_wrong_onnx_is_refused(version, predictors, test_images, tmp_path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(registry.variant_file(version, "onnx")))
    head = next(t for t in model.graph.initializer if numpy_helper.to_array(t).shape == (len(DIGITS), 1280))
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) + np.float32(1e-3), head.name))
    onnx.save(model, str(tmp_path / "wrong.onnx"))
    reference = predictors["pytorch"]
    batches = export.image_parity_batches(reference.pixels(test_images[0]))
    with pytest.raises(export.ParityError, match=r"differs from PyTorch by .*\(tolerance 0\.0001\).*shape \[\d+, 3, 64, 64\]"):
        export.check_parity(reference.backend, predict.onnx_backend(tmp_path / "wrong.onnx"), batches)


def test_every_accepted_variant_agrees_with_eager_on_real_images(predictors, test_images):
    paths, digits = test_images
    assert set(predictors) == {"pytorch", "onnx", "torchscript", "int8", "bf16"}
    expected = [r["label"] for r in predictors["pytorch"].predict(paths)]
    assert np.mean([e == d for e, d in zip(expected, digits)]) >= 0.75, "the tiny model must have learned the digits"
    for variant, predictor in predictors.items():
        labels = [r["label"] for r in predictor.predict(paths)]
        if variant in ("pytorch", "onnx", "torchscript"):
            assert labels == expected, variant
        else:  # lossy: int8 (and bf16, or int8 where bf16 falls back) may move a borderline image; 11 of 12 measured on AVX2
            assert np.mean([a == b for a, b in zip(labels, expected)]) >= 0.9, (variant, labels, expected)


@pytest.mark.parametrize("variant", ["pytorch", "onnx", "torchscript", "int8", "bf16"])
def test_batched_output_equals_single_output(variant, predictors, test_images):
    predictor = predictors[variant]
    paths = test_images[0]
    batched = predictor.logits(paths)
    single = np.concatenate([predictor.logits([p]) for p in paths])
    # Static int8 has fixed scales, so a row's result does not depend on its batch; bf16 rounds
    # differently with the batch's kernel choice.
    np.testing.assert_allclose(batched, single, atol=5e-2 if variant == "bf16" else 1e-4)


def test_undecodable_inputs_name_their_index(predictors, test_images):
    predictor = predictors["onnx"]
    good = Path(test_images[0][0]).read_bytes()
    with pytest.raises(DataError, match="image 1: not a decodable image"):
        predictor.predict([good, b"not an image at all"])
    with pytest.raises(DataError, match="image 2: not a decodable image"):
        predictor.predict([good, good, good[: len(good) // 2]])  # truncated PNG
    with pytest.raises(DataError, match="image 0: file '/nope.png' does not exist"):
        predictor.predict(["/nope.png"])
    with pytest.raises(ConfigError, match="a list of images"):
        predictor.predict(test_images[0][0])
    assert predictor.predict([good])[0]["label"] == predictor.predict(test_images[0][:1])[0]["label"]


def test_predict_command_takes_image_files(version, predictors, test_images, monkeypatch, capsys):
    monkeypatch.setenv(registry.ROOT_ENV, str(version.path.parents[2]))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    paths = test_images[0][:3]
    args = parser.parse_args(["predict", "--model", "digits:latest", "--variant", "onnx", "--top-k", "2", *paths])
    args.handler(args)
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "digits:v1" and printed["variant"] == "onnx"
    assert [p["label"] for p in printed["predictions"]] == [r["label"] for r in predictors["pytorch"].predict(paths)]
    assert all(len(p["scores"]) == 2 for p in printed["predictions"])
    args = parser.parse_args(["predict", "--model", "digits:latest", "a sentence, not a file"])
    with pytest.raises(DataError, match="digits:v1 is an image model and takes image files; not files: a sentence"):
        args.handler(args)
