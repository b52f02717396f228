"""Distillation: the KD loss, students built from the teacher, and a tiny teacher distilled, proved,
registered and served end to end; the gate refuses a weak student; the default is the fastest measured."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from artifact_helpers import LABELS, make_run
from conftest import toy_rows, write_jsonl

from finetune_core import data as D
from finetune_core import predict, registry
from finetune_core.artifacts import export_version
from finetune_core.config import DistillConfig, distill_config_from_dict
from finetune_core.distill import TeacherRows, cached_teacher, distill_run, layer_outputs, live_teacher
from finetune_core.errors import ConfigError
from finetune_core.losses import distillation_loss, hidden_matching, make_loss
from finetune_core.metadata import Manifest, ModelMeta, VariantRecord
from finetune_core.model import build_model, load_trained, save_trained
from finetune_core.student import check_same_tokenizer, encoder_layers, every_other_layer, layer_drop_student

TEXTS = ["the movie was really excellent", "a dull plot", "quite a lovely film, the acting was superb",
         "terrible", "the film was awful and the acting poor"]


# ---------------------------------------------------------------- the loss


def test_kd_term_is_zero_for_the_teacher_itself_and_has_the_batchmean_scale():
    torch.manual_seed(0)
    teacher, student = torch.randn(8, 5) * 3, torch.randn(8, 5) * 3
    labels = torch.randint(0, 5, (8,))
    hard = make_loss(False)
    soft_only = distillation_loss(hard, alpha=1.0, temperature=2.0)
    assert soft_only(teacher.clone(), {"labels": labels, "teacher_logits": teacher}).item() == pytest.approx(0.0, abs=1e-6)

    # T^2 * sum over classes of p log(p / q), averaged over rows: not over rows x classes, 5x smaller.
    p, q = F.softmax(teacher / 2.0, -1), F.softmax(student / 2.0, -1)
    by_hand = 4.0 * (p * (p.log() - q.log())).sum(-1).mean()
    found = soft_only(student, {"labels": labels, "teacher_logits": teacher})
    assert found.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert found.item() == pytest.approx(5 * 4.0 * (p * (p.log() - q.log())).mean().item(), rel=1e-5)

    mixed = distillation_loss(hard, alpha=0.3, temperature=2.0)(student, {"labels": labels, "teacher_logits": teacher})
    expected = 0.7 * F.cross_entropy(student, labels) + 0.3 * by_hand
    assert mixed.item() == pytest.approx(expected.item(), rel=1e-5)


def test_regression_distils_by_mse_to_the_teacher_output():
    teacher, student = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]])
    batch = {"labels": torch.tensor([1.0, 1.0]), "teacher_logits": teacher}
    loss = distillation_loss(make_loss(True), alpha=0.5, temperature=3.0, regression=True)(student, batch)
    assert loss.item() == pytest.approx(0.5 * (1 + 9) / 2 + 0.5 * (1 + 4) / 2)


def test_distill_config_names_the_bad_field():
    assert distill_config_from_dict({"student_layers": [1, 3, 5]}).student_layers == [1, 3, 5]
    for raw, message in (({"alpha": 1.5}, "distill.alpha"), ({"student_layers": [3, 1]}, "increasing order"),
                         ({"temperature": 0}, "distill.temperature"), ({"layers": [1]}, "distill.layers: unknown"),
                         ({"student": "x", "student_layers": [0]}, "not both")):
        with pytest.raises(ConfigError, match=message):
            distill_config_from_dict(raw)


# ---------------------------------------------------------------- students


def test_every_other_layer_keeps_the_last():
    assert every_other_layer(6) == [1, 3, 5]
    assert every_other_layer(12) == [1, 3, 5, 7, 9, 11]
    assert every_other_layer(2) == [1]


def test_layer_drop_student_is_the_teacher_with_fewer_layers(tiny_base):
    torch.manual_seed(0)
    teacher, tokenizer = build_model(str(tiny_base), LABELS)
    teacher.eval()
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    same, kept = layer_drop_student(teacher, [0, 1])
    with torch.no_grad():
        np.testing.assert_array_equal(same(**inputs).logits.numpy(), teacher(**inputs).logits.numpy())
    half, kept = layer_drop_student(teacher)
    assert kept == [1] and half.config.num_hidden_layers == 1
    ours, theirs = half.state_dict(), teacher.state_dict()
    assert torch.equal(ours["bert.encoder.layer.0.attention.self.query.weight"],
                       theirs["bert.encoder.layer.1.attention.self.query.weight"])
    for name in ("bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"):
        assert torch.equal(ours[name], theirs[name])
    with pytest.raises(ConfigError, match=r"layers 0-1; \[2\] do not exist"):
        layer_drop_student(teacher, [0, 2])


def test_a_student_that_tokenizes_differently_is_refused(tiny_base, tmp_path):
    from transformers import AutoTokenizer, BertTokenizerFast

    teacher_tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    check_same_tokenizer(teacher_tokenizer, tiny_base)  # the same tokenizer passes

    small = tmp_path / "small-vocab"
    small.mkdir()
    (small / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) + "\n")
    BertTokenizerFast(vocab_file=str(small / "vocab.txt")).save_pretrained(small)
    with pytest.raises(ConfigError, match="different vocabulary from the teacher's .5 tokens against 30522"):
        check_same_tokenizer(teacher_tokenizer, small)

    cased = tmp_path / "cased"  # the same vocabulary, without lower-casing
    AutoTokenizer.from_pretrained(tiny_base, do_lower_case=False).save_pretrained(cased)
    with pytest.raises(ConfigError, match="tokenizes differently .* lower-casing"):
        check_same_tokenizer(teacher_tokenizer, cased)
    with pytest.raises(ConfigError, match="no usable tokenizer"):
        check_same_tokenizer(teacher_tokenizer, tmp_path)


def test_teacher_logits_reach_the_loss_with_their_rows(tiny_base):
    teacher, tokenizer = build_model(str(tiny_base), LABELS)
    rows = D.encode(tokenizer, TEXTS, [0, 1, 0, 1, 1], 32)
    cached = cached_teacher(teacher, rows, batch_size=2, precision="fp32")
    live = live_teacher(teacher, "fp32")
    batches = [[4, 0], [2], [1, 3]]
    for indices, cached_batch, live_batch in zip(batches, TeacherRows(rows, cached=cached).loader(batches),
                                                 TeacherRows(rows, teacher=live).loader(batches)):
        assert torch.equal(cached_batch["teacher_logits"], cached[indices])
        np.testing.assert_allclose(live_batch["teacher_logits"].numpy(), cached[indices].numpy(), atol=1e-5)
        assert cached_batch["labels"].tolist() == [rows.targets[i] for i in indices]


# ---------------------------------------------------------------- end to end


def test_hidden_matching_is_zero_for_the_teacher_layers_and_counts_real_tokens_only(tiny_base):
    teacher, tokenizer = build_model(str(tiny_base), LABELS)
    rows = D.encode(tokenizer, TEXTS, [0, 1, 0, 1, 1], 32)
    batch = next(iter(rows.loader([[0, 1, 3]])))  # padded to the longest of three lengths
    inputs = batch["inputs"]
    assert (inputs["attention_mask"] == 0).any()
    everything = list(range(len(encoder_layers(teacher))))
    twin, _ = layer_drop_student(teacher, everything)  # every layer: the teacher's exact copy
    student_hidden, unhook = layer_outputs(list(encoder_layers(twin)))
    extra = live_teacher(teacher, "fp32", hidden_layers=everything)(inputs)
    assert extra["teacher_hidden"].shape[:2] == (len(everything), 3)
    hard = make_loss(False)
    matched = hidden_matching(hard, student_hidden, weight=10.0)
    logits = twin(**inputs).logits
    assert matched(logits, {**batch, **extra}).item() == pytest.approx(hard(logits, batch).item(), abs=1e-5)

    # The term is the mean squared difference over real tokens and widths, weighted: padding left out.
    shifted = {**batch, **extra, "teacher_hidden": extra["teacher_hidden"] + 0.5}
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    padded_too = ((extra["teacher_hidden"] - shifted["teacher_hidden"]) ** 2).mean()
    assert padded_too.item() == pytest.approx(0.25)
    garbage = shifted["teacher_hidden"].clone()
    garbage[:, mask[..., 0] == 0] = 1e6  # what the teacher puts at padding must not count
    found = matched(logits, {**shifted, "teacher_hidden": garbage}) - hard(logits, batch)
    assert found.item() == pytest.approx(10.0 * 0.25, rel=1e-4)
    twin.zero_grad()
    matched(twin(**inputs).logits, shifted).backward()
    assert encoder_layers(twin)[0].output.dense.weight.grad.abs().sum() > 0  # it reaches the layers, not just the head
    unhook()
    twin(**inputs)
    assert student_hidden[0] is not None  # the hooks are gone: the last value stays, no new one is kept


def test_hidden_matching_is_refused_where_layers_need_not_match():
    with pytest.raises(ConfigError, match="distill.hidden_weight: hidden-state matching needs a student made of"):
        DistillConfig(student="/some/folder", hidden_weight=1.0)
    with pytest.raises(ConfigError, match="distill.hidden_weight: must be a number"):
        DistillConfig(hidden_weight=-1.0)


def test_without_hidden_state_matching_the_teacher_runs_once_per_row(teacher_run, tmp_path):
    metrics = distill_run(teacher_run, tmp_path / "logits", DistillConfig(epochs=2, max_rows=120, learning_rate=3e-3,
                                                                         hidden_weight=0.0))
    assert metrics["distillation"]["teacher_outputs"] == "cached: computed once per row"
    assert metrics["distillation"]["hidden_weight"] == 0.0
    assert metrics["validation"]["accuracy"] >= 0.9


@pytest.fixture(scope="module")
def teacher_run(tiny_base, tmp_path_factory) -> Path:
    """A trained tiny teacher's run folder: model/, splits/train.jsonl and validation.jsonl."""
    run = tmp_path_factory.mktemp("teacher")
    make_run(tiny_base, run)
    write_jsonl(run / "splits" / "train.jsonl", toy_rows(240, seed=0))
    return run


@pytest.fixture(scope="module")
def student_run(teacher_run, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("student") / "distill"
    metrics = distill_run(teacher_run, output, DistillConfig(epochs=3, max_rows=200, learning_rate=3e-3))
    return output, metrics


@pytest.fixture(scope="module")
def version(teacher_run, student_run, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(registry.ROOT_ENV, str(tmp_path_factory.mktemp("home")))
        return export_version(teacher_run / "model", "toy", ["onnx", "int8", "distilled", "distilled-int8"],
                              student=student_run[0] / "model")


def test_the_student_learns_from_the_teacher_and_keeps_half_its_layers(student_run, teacher_run):
    output, metrics = student_run
    student, _, _ = load_trained(output / "model")
    assert not any(layer._forward_hooks for layer in encoder_layers(student))
    assert metrics["validation"]["accuracy"] >= 0.95
    assert metrics["teacher"]["validation"]["accuracy"] >= 0.95
    about = metrics["distillation"]
    assert about["student"]["layers"] == [1] and about["student"]["of"] == 2
    assert about["student"]["parameters"] < about["student"]["teacher_parameters"]
    rows = toy_rows(240, seed=0)
    kept = len(D.clean([r["text"] for r in rows], [r["label"] for r in rows])[0])  # a repeated toy row is dropped
    assert about["rows"] == {"train_split": kept, "distill_data": 0, "used": 200, "unlabelled_used": 0, "max_rows": 200}
    assert about["teacher_outputs"] == "live: the teacher runs on each batch, for its hidden states"
    assert about["hidden_weight"] == 1.0  # the default for a student made of the teacher's layers
    student, _, meta = load_trained(output / "model")
    assert student.config.num_hidden_layers == 1 and meta.labels == LABELS and meta.max_length == 64
    phases = {line.split('"phase": ')[1][:9] for line in (output / "events.jsonl").read_text().splitlines()}
    assert phases == {'"distill"'}


def test_distilled_variants_are_proved_gated_stored_and_measured(version):
    records = version.manifest.variants
    distilled, int8 = records["distilled"], records["distilled-int8"]
    assert distilled.accepted and int8.accepted, (distilled.reason, int8.reason)
    assert "vs the teacher" in distilled.reason and "within the gate of 1.5" in distilled.reason
    assert "vs the student's fp32" in int8.reason and "vs the teacher" in int8.reason
    for proof in (distilled.proof["onnx"], distilled.proof["torchscript"]):
        assert proof["max_abs_diff"] < 1e-4 and proof["argmax_agreement"] == 1.0
    assert distilled.proof["distillation"]["student"]["layers"] == [1]
    assert int8.proof["quantization"]["kind"] == "dynamic"
    for record in (distilled, int8):
        assert record.figures["teacher_accuracy"] == records["pytorch"].figures["accuracy"]
        assert set(record.figures["speedup"]) == {"pytorch", "onnx", "int8"}
        assert all(s["batch1"] > 0 and s["batch32"] > 0 for s in record.figures["speedup"].values())
    assert (distilled.file, int8.file) == ("distilled", "distilled.int8.onnx")
    assert (version.path / "distilled" / "model.onnx").is_file() and (version.path / "distilled" / "config.json").is_file()
    assert not (version.path / "distilled" / "model.int8.onnx").exists()
    assert version.manifest.proof["distill_gate"] == 1.5


@pytest.mark.parametrize("variant", ["distilled", "distilled-int8"])
def test_distilled_variants_predict_like_the_teacher(version, variant):
    student = predict.load_predictor(version, variant)
    teacher = predict.load_predictor(version, "pytorch")
    assert student.variant == variant
    batched = student.predict(TEXTS)
    assert [r["label"] for r in batched] == [r["label"] for r in teacher.predict(TEXTS)]
    single = [student.predict([text])[0] for text in TEXTS]
    assert [b["score"] for b in batched] == pytest.approx([s["score"] for s in single], abs=2e-2)


def test_a_tampered_student_is_refused_on_load(version, tmp_path):
    copy = registry.VersionInfo(version.name, version.version, version.manifest, tmp_path / "v1")
    shutil.copytree(version.path, copy.path)
    with (copy.path / "distilled" / "model.onnx").open("ab") as f:
        f.write(b"\0")
    for variant in ("distilled", "distilled-int8"):  # the int8 file is served with the student's folder
        with pytest.raises(registry.IntegrityError, match="'distilled' does not match its manifest"):
            predict.load_predictor(copy, variant)


def test_the_gate_refuses_a_student_too_weak(teacher_run, tiny_base, tmp_path):
    torch.manual_seed(1)
    untrained, tokenizer = build_model(str(tiny_base), LABELS)  # a new random head: about chance
    save_trained(untrained, tokenizer, ModelMeta("text-classification", LABELS, max_length=64), tmp_path / "weak")
    info = export_version(teacher_run / "model", "toy", ["distilled-int8", "distilled"], student=tmp_path / "weak")
    distilled, int8 = info.manifest.variants["distilled"], info.manifest.variants["distilled-int8"]
    assert not distilled.accepted and distilled.file is None
    assert "exceeds the gate of 1.5" in distilled.reason and distilled.figures["accuracy"] < 0.8
    assert not int8.accepted and int8.reason.startswith("not built: the distilled student was refused")
    assert not (info.path / "distilled").exists() and not (info.path / "distilled.int8.onnx").exists()
    with pytest.raises(registry.RegistryError, match="'distilled' variant was refused at export"):
        predict.load_predictor(info, "distilled")
    assert predict.load_predictor(info).variant == "pytorch"


def test_distilled_variants_need_a_student(teacher_run):
    with pytest.raises(ConfigError, match=r"\['distilled'\] need a distilled student"):
        export_version(teacher_run / "model", "toy", ["onnx", "distilled"])


def test_unlabelled_rows_are_labelled_by_the_teacher(teacher_run, tmp_path):
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"text": r["text"]} for r in toy_rows(60, seed=7)])
    metrics = distill_run(teacher_run, tmp_path / "out", DistillConfig(epochs=1, max_rows=0, distill_data=str(extra)))
    assert metrics["distillation"]["rows"]["distill_data"] == 60
    rows = metrics["distillation"]["rows"]
    assert rows["used"] == rows["train_split"] + 60 and rows["unlabelled_used"] == 60


# ---------------------------------------------------------------- the served default


def _info(figures: dict[str, tuple[bool, float | None]], machine: dict | None = None) -> registry.VersionInfo:
    variants = {v: VariantRecord(ok, "", figures={"throughput_per_s": t} if t else {}) for v, (ok, t) in figures.items()}
    manifest = Manifest(ModelMeta("text-classification", LABELS), variants, proof={"machine": machine or predict.measuring_machine()})
    return registry.VersionInfo("m", "v1", manifest, Path("/nonexistent"))


def test_the_default_variant_is_the_fastest_accepted_as_measured(monkeypatch, caplog):
    info = _info({"pytorch": (True, 100.0), "onnx": (True, 300.0), "int8": (True, 900.0), "distilled": (True, 700.0),
                  "distilled-int8": (False, 5000.0), "bf16": (True, 2000.0)})
    monkeypatch.setattr(predict, "bf16_supported", lambda: True)
    assert predict.default_variant(info) == "bf16"
    monkeypatch.setattr(predict, "bf16_supported", lambda: False)  # not here: the next fastest, never a refused one
    assert predict.default_variant(info) == "int8"
    assert predict.default_variant(_info({"pytorch": (True, None), "onnx": (True, None)})) == "onnx"  # no figures: the order
    assert predict.default_variant(_info({"pytorch": (True, 1050.0), "onnx": (True, 1000.0)})) == "onnx"  # a tie: the order
    assert predict.default_variant(_info({"pytorch": (True, 1200.0), "onnx": (True, 1000.0)})) == "pytorch"
    elsewhere = _info({"pytorch": (True, 1.0), "int8": (True, 2.0)}, machine={"cpu": "another", "cpus": 96, "cuda": None})
    with caplog.at_level("WARNING", logger="finetune_core.predict"):
        assert predict.default_variant(elsewhere) == "int8"
    assert "measured on another machine" in caplog.text


def test_served_default_of_a_distilled_version_follows_its_figures(version):
    speeds = {v: r.figures["throughput_per_s"] for v, r in version.manifest.variants.items() if r.accepted}
    assert set(speeds) == {"pytorch", "onnx", "int8", "distilled", "distilled-int8"}
    chosen = predict.load_predictor(version).variant
    assert chosen == predict.default_variant(version)
    assert speeds[chosen] >= (1 - predict.SPEED_TIE) * max(speeds.values())


# ---------------------------------------------------------------- image students


def test_image_student_keeps_the_teachers_first_blocks_and_reloads_from_its_metadata(tmp_path):
    from finetune_core.image_model import build_image_model, load_image_model, save_image_model, stage_depths
    from finetune_core.student import image_student

    torch.manual_seed(0)
    teacher, spec = build_image_model("default", 3)
    teacher.eval()
    depths = [1, 2, 2, 3, 2, 2, 1]
    student, student_spec, kept = image_student(teacher, spec, 160, depths)
    assert kept == depths and stage_depths(student.net) == depths and stage_depths(teacher.net) == [1, 2, 2, 3, 3, 4, 1]
    assert (student_spec.size, student_spec.resize) == (160, 183)
    ours, theirs = student.state_dict(), teacher.state_dict()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)  # every tensor is the teacher's
    assert "net.blocks.5.3.conv_pw.weight" in theirs and "net.blocks.5.2.conv_pw.weight" not in ours
    meta = ModelMeta("image-classification", ["0", "1", "7"], arch=teacher.arch, block_depths=kept, **student_spec.meta())
    save_image_model(student, meta, tmp_path / "student")
    reloaded, reloaded_meta = load_image_model(tmp_path / "student")
    pixels = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(pixels).numpy(), student(pixels).numpy(), atol=1e-5)
    assert reloaded_meta.block_depths == depths and reloaded_meta.image_size == 160
    with pytest.raises(ConfigError, match=r"7 stages of \[1, 2, 2, 3, 3, 4, 1\] blocks"):
        image_student(teacher, spec, 0, [1, 2, 2, 3, 3, 5, 1])


@pytest.mark.slow  # the real EfficientNet-Lite0 (its head trained on real digits) as the teacher
def test_an_image_student_is_distilled_proved_and_served_at_its_own_size(tmp_path):
    from conftest import ASSETS

    from finetune_core.config import config_from_dict
    from finetune_core.pipeline import run_training

    for role, count in (("train", 30), ("validation", 12)):
        for digit in ("0", "1", "7"):
            folder = tmp_path / "data" / role / digit
            folder.mkdir(parents=True)
            for file in sorted((ASSETS / "mnist_png_small" / role / digit).iterdir())[:count]:
                shutil.copy(file, folder / file.name)
    run_training(config_from_dict({
        "data": {"task": "image-classification", "train": str(tmp_path / "data"), "image_size": 64, "horizontal_flip": False},
        "model": {"freeze": "all-but-head"},
        "train": {"epochs": 2, "batch_size": 16, "learning_rate": 1e-2, "num_threads": 1, "eval_batch_size": 64}}),
        tmp_path / "run")
    depths = [1, 2, 2, 3, 2, 2, 1]
    metrics = distill_run(tmp_path / "run", tmp_path / "student",
                          DistillConfig(image_size=48, block_depths=depths, epochs=3, learning_rate=1e-2))
    about = metrics["distillation"]["student"]
    assert (about["image_size"], about["teacher_image_size"], about["block_depths"]) == (48, 64, depths)
    assert metrics["distillation"]["teacher_outputs"].startswith("cached")  # small images: no augmentation
    # 36 validation images: one is 2.8 points; the student may lose one of them.
    info = export_version(tmp_path / "run" / "model", "digits", ["distilled"], student=tmp_path / "student" / "model",
                          distill_gate=3.0)
    distilled = info.manifest.variants["distilled"]
    assert distilled.accepted, distilled.reason
    assert distilled.proof["onnx"]["max_abs_diff"] < 1e-4 and distilled.proof["torchscript"]["max_abs_diff"] < 1e-4
    assert distilled.proof["input"] == {"image_size": 48, "resize_size": 55}
    predictor = predict.load_predictor(info, "distilled")
    assert predictor.meta.image_size == 48 and predictor.meta.block_depths == depths
    test_images = [str(p) for digit in ("0", "1", "7") for p in sorted((ASSETS / "mnist_png_small" / "test" / digit).iterdir())[:3]]
    labels = [r["label"] for r in predictor.predict(test_images)]
    assert sum(label == Path(path).parent.name for label, path in zip(labels, test_images)) >= 7
