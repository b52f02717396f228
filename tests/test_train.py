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
    assert set(saved) == {"validation", "test", "train", "diagnosis"}
    assert saved["diagnosis"]["state"] in ("converged", "over-fitting") and saved["diagnosis"]["summary"]
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



def test_class_weights_scale_the_loss_on_an_imbalanced_batch():
    """9 rows of class 0, 1 of class 1: inverse-frequency weights 10/18 and 10/2 make both classes count equally."""
    from finetune_core.losses import inverse_frequency_weights, make_loss

    labels = torch.tensor([0] * 9 + [1])
    weights = inverse_frequency_weights(labels.tolist(), 2)
    assert weights.tolist() == pytest.approx([10 / 18, 5.0])
    # Every class-0 row is predicted well (loss a), the lone class-1 row badly (loss b).
    logits = torch.tensor([[2.0, 0.0]] * 9 + [[2.0, 0.0]])
    a = torch.nn.functional.cross_entropy(logits[:1], labels[:1]).item()
    b = torch.nn.functional.cross_entropy(logits[-1:], labels[-1:]).item()
    plain = make_loss(False)(logits, {"labels": labels}).item()
    weighted = make_loss(False, weights)(logits, {"labels": labels}).item()
    assert plain == pytest.approx((9 * a + b) / 10)
    assert weighted == pytest.approx((a + b) / 2)  # sum(w * l) / sum(w): each class half of the loss
    assert weighted / plain == pytest.approx(5 * (a + b) / (9 * a + b))  # here about 3.2x


def test_the_loss_receives_the_whole_batch(tmp_path, toy_train, tiny_base):
    """A loss can use more than logits and labels: here it fits the model to per-row targets a Rows adds."""
    from finetune_core import data as D
    from finetune_core.model import build_model
    from finetune_core.train import fit

    rows = toy_rows(128)
    model, tokenizer = build_model(str(tiny_base), ["negative", "positive"])
    encoded = D.encode(tokenizer, [r["text"] for r in rows], [0] * len(rows), 64)
    wanted = torch.tensor([[1.0, -1.0] if r["label"] == "positive" else [-1.0, 1.0] for r in rows])

    class WithTargets:  # the Rows protocol: what distillation does with teacher logits
        targets, lengths = encoded.targets, encoded.lengths

        def loader(self, batches, epoch=0):
            for indices, batch in zip(batches, encoded.loader(batches, epoch)):
                yield {**batch, "wanted": wanted[indices]}

    seen = []

    def match_wanted(logits, batch):
        seen.append(sorted(batch))
        return torch.nn.functional.mse_loss(logits, batch["wanted"])

    def error(model) -> float:
        model.eval()
        with torch.no_grad():
            batch = next(iter(encoded.loader([list(range(128))])))
            return torch.nn.functional.mse_loss(model(**batch["inputs"]).logits, wanted).item()

    cfg = TrainConfig(epochs=10, batch_size=16, learning_rate=5e-3, precision="fp32", num_threads=1, seed=0,
                      early_stopping_patience=0, early_stopping_metric="loss", checkpoint_every_steps=0)
    torch.set_num_threads(1)
    before = error(model)
    result = fit(model, WithTargets(), cfg, loss_fn=match_wanted, evaluate_fn=lambda m: {"loss": error(m)},
                 checkpoint_dir=tmp_path / "ckpt")
    assert seen[0] == ["inputs", "labels", "wanted"] and result.global_step == 80
    assert error(model) < 0.1 * before, f"the model did not learn the targets the loss was given ({before:.2f} -> {error(model):.2f})"


def test_mislabelled_training_rows_are_listed_first(tmp_path, tiny_base):
    rows = toy_rows(240)
    planted = {i for i in range(0, 240, 40)}  # 6 rows whose cue word says the other class
    for i in planted:
        rows[i] = {**rows[i], "label": "negative" if rows[i]["label"] == "positive" else "positive"}
    path = write_jsonl(tmp_path / "noisy.jsonl", rows)
    run_training(job(path, tiny_base, early_stopping_patience=0), tmp_path / "run")
    issues = [json.loads(line) for line in (tmp_path / "run" / "label_issues.jsonl").read_text().splitlines()]
    planted_texts = {rows[i]["text"] for i in planted}
    in_train = {json.loads(line)["text"] for line in (tmp_path / "run" / "splits" / "train.jsonl").read_text().splitlines()}
    expected = planted_texts & in_train
    assert expected and {issue["input"] for issue in issues[:len(expected)]} == expected
    assert all(issue["p_label"] < 0.5 and issue["predicted"] != issue["label"] for issue in issues)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["label_issues"]
    assert report["listed"] == len(issues) and report["top"][0] == issues[0]
