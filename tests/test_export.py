"""Export: parity of fp32 artifacts, the int8/bf16 accuracy gate, and the export command end to end."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from artifact_helpers import LABELS, make_run

from finetune_core import export, registry
from finetune_core.artifacts import export_version
from finetune_core.artifacts_cli import add_commands
from finetune_core.metadata import ModelMeta
from finetune_core.model import build_model, load_trained
from finetune_core.predict import TextPredictor, eager_backend, onnx_backend, torchscript_backend


@pytest.fixture(scope="session")
def tiny_run(tiny_base, tmp_path_factory):
    return make_run(tiny_base, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def reference(tiny_run):
    model, tokenizer, meta = load_trained(tiny_run)
    return TextPredictor(tokenizer, meta, eager_backend(model), "pytorch"), model


@pytest.fixture(scope="session")
def batches(reference, tiny_run):
    predictor, _ = reference
    texts = [json.loads(line)["text"] for line in (tiny_run.parent / "splits" / "validation.jsonl").read_text().splitlines()]
    # Long texts too, so the short cut truncates and padded rows sit next to full ones.
    texts += [" ".join(texts[:12]), " ".join(texts[12:20])]
    return export.parity_batches(predictor.encode, texts, max_length=64)


def test_parity_batches_cover_sizes_lengths_and_padding(batches):
    shapes = [tuple(b["input_ids"].shape) for b in batches]
    assert {s[0] for s in shapes} == {1, 4, 16}
    assert {s[1] for s in shapes} >= {16, 64}
    assert any((b["attention_mask"] == 0).any() for b in batches), "some batch must carry padding"


@pytest.mark.parametrize("variant", ["onnx", "torchscript"])
def test_fp32_artifacts_match_pytorch(variant, reference, batches, tmp_path):
    predictor, model = reference
    if variant == "onnx":
        candidate = onnx_backend(export.to_onnx(model, export.text_inputs(predictor.tokenizer), tmp_path / "m.onnx"))
    else:
        candidate = torchscript_backend(export.to_torchscript(model, export.text_inputs(predictor.tokenizer), tmp_path / "m.pt"), predictor.input_names)
    figures = export.check_parity(predictor.backend, candidate, batches)
    assert figures["max_abs_diff"] < 1e-5
    assert figures["argmax_agreement"] == 1.0
    assert not model.training, "export must leave the model in eval mode"


def test_onnx_graph_declares_dynamic_axes_and_only_tokenizer_inputs(reference, tmp_path):
    import onnx

    predictor, model = reference
    graph = onnx.load(str(export.to_onnx(model, export.text_inputs(predictor.tokenizer), tmp_path / "m.onnx"))).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    assert [o.name for o in graph.output] == ["logits"]


def test_model_input_names_follow_the_tokenizer():
    class NoSegments:
        model_input_names = ["attention_mask", "input_ids"]

    assert export.model_input_names(NoSegments()) == ["input_ids", "attention_mask"]


def test_check_parity_names_the_size_and_place_of_a_mismatch(reference, batches):
    predictor, _ = reference

    def off_by_a_bit(batch):
        logits = predictor.backend(batch)
        if batch["input_ids"].shape[0] == 4:
            logits[2, 1] += 0.01
        return logits

    with pytest.raises(export.ParityError, match=r"differs from PyTorch by 0\.01 .*batch \d \(shape \[4, \d+\]\), row 2"):
        export.check_parity(predictor.backend, off_by_a_bit, batches)
    figures = export.parity_figures(predictor.backend, off_by_a_bit, batches)
    assert figures["worst_input"]["row"] == 2 and figures["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_quantization_runs_close_to_fp32(per_channel, reference, batches, tmp_path):
    predictor, model = reference
    fp32 = export.to_onnx(model, export.text_inputs(predictor.tokenizer), tmp_path / "m.onnx")
    int8 = export.quantize_int8(fp32, tmp_path / "m.int8.onnx", per_channel=per_channel)
    quantized = onnx_backend(int8)
    figures = export.parity_figures(predictor.backend, quantized, batches)
    # Quantized: not identical, not wild. The logits span +-3.2 and the int8 ones differ by up to 0.67
    # (per channel) and 0.54 (per tensor), but only where the margin is wide, so the scores a caller sees
    # move by at most 0.0044 (measured) and no decision changes.
    assert 0 < figures["max_abs_diff"] < 1.0
    assert figures["argmax_agreement"] == 1.0
    for batch in batches:
        expected, got = (torch.softmax(torch.from_numpy(f(batch)), -1) for f in (predictor.backend, quantized))
        assert (got - expected).abs().max().item() < 0.02


def test_accuracy_gate():
    fp32 = {"accuracy": 0.90, "macro_f1": 0.9}
    assert export.accuracy_gate(fp32, {"accuracy": 0.895}, 1.0)[0]
    accepted, reason = export.accuracy_gate(fp32, {"accuracy": 0.52}, 1.0)
    assert not accepted and "accuracy drop 38.00 points" in reason and "exceeds the gate of 1" in reason
    assert not export.accuracy_gate({"r2": 0.8}, {"r2": 0.7}, 5.0)[0]
    assert export.accuracy_gate({"r2": 0.8}, {"r2": 0.79}, 5.0)[0]


def test_export_version_registers_proved_variants(tiny_run):
    info = export_version(tiny_run, "toy")
    manifest = info.manifest.to_dict()
    assert info.version == "v1" and manifest["task"] == "text-classification" and manifest["labels"] == LABELS
    assert manifest["source_run"] == str(tiny_run.parent.resolve())
    variants = manifest["variants"]
    assert set(variants) == {"pytorch", "onnx", "torchscript", "int8", "bf16"}
    for name, entry in variants.items():
        assert entry["accepted"], f"{name}: {entry['reason']}"
        assert entry["accuracy"] >= 0.9, "the toy task is learnable; the tiny model must have learned it"
        assert entry["latency_ms_batch1"] > 0 and entry["throughput_per_s"] > 0
        assert len(entry["sha256"]) == 64
    assert variants["onnx"]["proof"]["max_abs_diff"] < 1e-4
    assert variants["int8"]["proof"]["max_abs_diff"] > 0
    registry.variant_file(info, "int8")  # stored and intact


def test_export_refuses_int8_when_the_gate_is_not_met(tiny_run):
    # A negative gate demands int8 beat fp32 by two points: impossible at 100% fp32 accuracy.
    info = export_version(tiny_run, "toy", variants=["int8"], gate_points=-2.0)
    int8 = info.manifest.to_dict()["variants"]["int8"]
    assert int8["accepted"] is False and int8["file"] is None
    drop = 100 * (info.manifest.to_dict()["variants"]["pytorch"]["accuracy"] - int8["accuracy"])
    assert f"accuracy drop {drop:.2f} points" in int8["reason"] and "exceeds the gate of -2" in int8["reason"]
    assert int8["accuracy"] >= 0.9 and drop <= 1.0  # measured, and only the impossible gate refused it
    assert not (info.path / "model.int8.onnx").exists()


def test_export_command_prints_the_new_version(tiny_run, capsys):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--model", str(tiny_run), "--name", "toy", "--variants", "onnx"])
    args.handler(args)
    printed = json.loads(capsys.readouterr().out)
    assert printed["version"] == "v1" and set(printed["variants"]) == {"pytorch", "onnx"}


def test_export_rejects_unknown_variant_and_missing_validation(tiny_run, tmp_path):
    from finetune_core.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match="unknown \\['fp8'\\]"):
        export_version(tiny_run, "toy", variants=["fp8"])
    with pytest.raises(DataError, match="does not exist; pass --validation"):
        export_version(tiny_run, "toy", validation=tmp_path / "nope.jsonl")


@pytest.mark.slow
def test_real_minilm_exports_with_parity(tmp_path):
    """The bundled MiniLM (un-fine-tuned head) through ONNX and TorchScript on SST-2 dev texts."""
    from conftest import REPO

    model, tokenizer = build_model("default", LABELS)
    rows = [json.loads(line) for line in (REPO / "examples" / "sst2_sample" / "validation.jsonl").read_text().splitlines()[:64]]
    predictor = TextPredictor(tokenizer, ModelMeta(task="text-classification", labels=LABELS, max_length=128),
                              eager_backend(model.eval()), "pytorch")
    batches = export.parity_batches(predictor.encode, [r["text"] for r in rows], 128)
    onnx_figures = export.check_parity(predictor.backend, onnx_backend(export.to_onnx(model, export.text_inputs(tokenizer), tmp_path / "m.onnx")), batches)
    ts = torchscript_backend(export.to_torchscript(model, export.text_inputs(tokenizer), tmp_path / "m.pt"), predictor.input_names)
    ts_figures = export.check_parity(predictor.backend, ts, batches)
    assert onnx_figures["argmax_agreement"] == ts_figures["argmax_agreement"] == 1.0


def test_export_regression_model_is_gated_on_r2(tiny_base, tmp_path):
    from conftest import toy_rows, write_jsonl

    from finetune_core.model import save_trained

    model, tokenizer = build_model(str(tiny_base), None)
    meta = ModelMeta(task="text-regression", labels=None, base_model=str(tiny_base), max_length=32, target_mean=3.0,
                     target_std=1.5)
    save_trained(model, tokenizer, meta, tmp_path / "run" / "model")
    rows = [{"text": r["text"], "label": float(len(r["text"]) % 5)} for r in toy_rows(40, seed=2)]
    write_jsonl(tmp_path / "run" / "splits" / "validation.jsonl", rows)
    info = export_version(tmp_path / "run" / "model", "toy-regression", variants=["onnx", "int8"], gate_points=1000.0)
    variants = info.manifest.to_dict()["variants"]
    assert variants["onnx"]["accepted"] and variants["int8"]["accepted"]  # a 1000-point gate refuses nothing
    for metric in ("mse", "mae", "r2"):  # fp32 ONNX is the same function, so the same figures
        assert variants["onnx"][metric] == pytest.approx(variants["pytorch"][metric], abs=1e-4), metric
    drop = 100 * (variants["pytorch"]["r2"] - variants["int8"]["r2"])
    assert variants["int8"]["reason"].startswith(f"r2 drop {drop:.2f} points")
