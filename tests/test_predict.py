"""Predictors: output shape and values, batch equals single, variant choice and fallback, threads."""

from __future__ import annotations

import argparse
import json
import logging
import threading

import numpy as np
import pytest
import torch
from artifact_helpers import LABELS, make_run

from finetune_core import predict, registry
from finetune_core.artifacts import export_version
from finetune_core.artifacts_cli import add_commands
from finetune_core.errors import ConfigError
from finetune_core.metadata import ModelMeta
from finetune_core.model import build_model

TEXTS = [
    "the movie was really excellent",
    "a dull plot",
    "quite a very lovely film, the acting was superb and the plot was great",
    "terrible",
    "the film was awful and the acting poor, a really horrible movie",
]
# The variants built from the trained model itself (tests/test_distill.py covers the distilled ones).
TEACHER_VARIANTS = [v for v in predict.VARIANTS if v not in predict.DISTILLED_VARIANTS]


@pytest.fixture(scope="session")
def version(tiny_base, tmp_path_factory):
    """One registered version with every variant, in a registry of its own."""
    run = make_run(tiny_base, tmp_path_factory.mktemp("run"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(registry.ROOT_ENV, str(tmp_path_factory.mktemp("home")))
        return export_version(run, "toy")


@pytest.fixture(scope="session")
def predictors(version):
    return {variant: predict.load_predictor(version, variant) for variant in TEACHER_VARIANTS}


def test_predictions_are_softmax_scores_over_the_labels(predictors):
    results = predictors["onnx"].predict(TEXTS)
    assert len(results) == len(TEXTS)
    for result in results:
        assert set(result["scores"]) == set(LABELS)
        assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-6)
        assert result["label"] == max(result["scores"], key=result["scores"].get)
        assert result["score"] == result["scores"][result["label"]]
    assert [r["label"] for r in results] == ["positive", "negative", "positive", "negative", "negative"]
    top1 = predictors["onnx"].predict(TEXTS[:1], top_k=1)[0]
    assert list(top1["scores"]) == [top1["label"]]


@pytest.mark.parametrize("variant", TEACHER_VARIANTS)
def test_variants_agree_with_pytorch(variant, predictors):
    reference = predictors["pytorch"].logits(TEXTS)
    logits = predictors[variant].logits(TEXTS)
    # fp32 artifacts are exact to float noise; int8 and bf16 are lossy but must keep the decisions.
    atol = 1e-4 if variant in ("pytorch", "onnx", "torchscript") else 0.1
    np.testing.assert_allclose(logits, reference, atol=atol)
    assert (logits.argmax(-1) == reference.argmax(-1)).all()


@pytest.mark.parametrize("variant", TEACHER_VARIANTS)
def test_batched_output_equals_single_output(variant, predictors):
    predictor = predictors[variant]
    batched = predictor.predict(TEXTS)
    single = [predictor.predict([text])[0] for text in TEXTS]
    assert [b["label"] for b in batched] == [s["label"] for s in single]
    # int8 quantizes activations with one scale per batch and bf16 rounds differently with padding:
    # close, not bit-equal. fp32 variants only differ by float summation order.
    tolerance = 1e-5 if variant in ("pytorch", "onnx", "torchscript") else 2e-2
    for b, s in zip(batched, single):
        assert b["score"] == pytest.approx(s["score"], abs=tolerance)


def test_default_variant_is_the_fastest_measured_and_bf16_falls_back_where_unsupported(version, monkeypatch, caplog):
    monkeypatch.setattr(predict, "bf16_supported", lambda: False)
    speeds = {v: r.figures["throughput_per_s"] for v, r in version.manifest.variants.items() if r.accepted and v != "bf16"}
    fastest = predict.load_predictor(version).variant
    assert speeds[fastest] >= (1 - predict.SPEED_TIE) * max(speeds.values())  # the fastest, or tied with it
    with caplog.at_level(logging.WARNING, logger="finetune_core.predict"):
        predictor = predict.load_predictor(version, "bf16")
    assert predictor.variant == fastest
    assert "no native bf16" in caplog.text and f"using {fastest}" in caplog.text


def test_refused_missing_and_unknown_variants(tiny_base, tmp_path):
    run = make_run(tiny_base, tmp_path / "run", steps=0)
    info = export_version(run, "toy", variants=["int8"], gate_points=-50.0)
    with pytest.raises(registry.RegistryError, match="'int8' variant was refused at export \\(accuracy drop"):
        predict.load_predictor(info, "int8")
    with pytest.raises(registry.NotFoundError, match="no 'torchscript' variant; it has pytorch"):
        predict.load_predictor(info, "torchscript")
    with pytest.raises(ConfigError, match="'fp8' is unknown"):
        predict.load_predictor(info, "fp8")
    assert predict.load_predictor(info).variant == "pytorch"


def test_tampered_onnx_is_refused_on_load(version, tmp_path):
    import shutil

    copy = registry.VersionInfo(version.name, version.version, version.manifest, tmp_path / "v1")
    shutil.copytree(version.path, copy.path)
    with (copy.path / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(registry.IntegrityError, match="model.onnx' does not match its manifest"):
        predict.load_predictor(copy, "onnx")


def test_regression_values_undo_standardisation(tiny_base):
    model, tokenizer = build_model(str(tiny_base), None)
    meta = ModelMeta(task="text-regression", labels=None, max_length=32, target_mean=10.0, target_std=2.0)
    predictor = predict.TextPredictor(tokenizer, meta, predict.eager_backend(model.eval()), "pytorch")
    values = [r["value"] for r in predictor.predict(TEXTS[:2])]
    with torch.no_grad():
        raw = model(**tokenizer(TEXTS[:2], padding=True, return_tensors="pt")).logits[:, 0].numpy()
    np.testing.assert_allclose(values, raw * 2.0 + 10.0, rtol=1e-5)


def test_truncation_at_max_length(predictors):
    encoded = predictors["onnx"].encode(["word " * 500, "short"])
    assert encoded["input_ids"].shape == (2, 64)  # the toy model's max_length


@pytest.mark.parametrize("variant", ["onnx", "pytorch", "torchscript"])
def test_concurrent_callers_get_the_sequential_answers(variant, predictors):
    predictor = predictors[variant]
    expected = predictor.predict(TEXTS)
    results, errors = [], []

    def call(offset: int):
        try:
            for i in range(10):
                texts = TEXTS[(offset + i) % len(TEXTS) :] or TEXTS
                results.append((texts, predictor.predict(texts)))
        except Exception as err:  # collected, so a failure in a thread fails the test
            errors.append(err)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    by_text = dict(zip(TEXTS, expected))
    for texts, got in results:
        for text, result in zip(texts, got):
            assert result["label"] == by_text[text]["label"]
            assert result["score"] == pytest.approx(by_text[text]["score"], abs=1e-5)


def test_concurrent_encodes_keep_their_own_max_length(predictors):
    predictor = predictors["onnx"]
    wrong = []

    def call(offset: int):
        for i in range(100):
            length = 8 + (offset * 5 + i) % 50
            if predictor.encode(["word " * 80] * 2, max_length=length)["input_ids"].shape[1] != length:
                wrong.append(length)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not wrong


def test_predict_command(version, monkeypatch, capsys):
    monkeypatch.setenv(registry.ROOT_ENV, str(version.path.parents[2]))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["predict", "--model", "toy:latest", "--variant", "torchscript", *TEXTS[:2]])
    args.handler(args)
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "toy:v1" and printed["variant"] == "torchscript"
    assert [p["label"] for p in printed["predictions"]] == ["positive", "negative"]
