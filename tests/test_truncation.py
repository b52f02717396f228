"""Long texts: head+tail truncation keeps a text's start and end, training and serving cut alike.

The toy task puts its cue word at the very end of 60 filler words: cut at 16 tokens, the head sees
fillers only and learns nothing; head+tail keeps the cue, learns it, and the exported model (proven
against PyTorch on the same cut) answers long texts right.
"""

from __future__ import annotations

import random

import pytest
from conftest import FILLER, NEGATIVE, POSITIVE, write_jsonl

from finetune_core import data as D
from finetune_core import predict, registry
from finetune_core.artifacts import export_version
from finetune_core.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from finetune_core.metadata import read_meta
from finetune_core.pipeline import run_training

MAX_LENGTH = 16


def cue_at_the_end(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.choices(FILLER, k=60) + [rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rows.append({"text": " ".join(words), "label": label})
    return rows


def test_head_tail_keeps_the_first_quarter_and_the_last_three_quarters(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    words = [f"w{i}" for i in range(40)]
    text, short = " ".join(words), "w1 w2"
    full = tok(text)["input_ids"]
    cut = D.tokenize(tok, [text, short], 12, "head+tail")
    assert [len(ids) for ids in cut["input_ids"]] == [12, len(tok(short)["input_ids"])]
    assert cut["input_ids"][0] == full[:3] + full[-9:]  # [CLS] and 2 tokens, then the last 8 and [SEP]
    assert cut["input_ids"][0][0] == tok.cls_token_id and cut["input_ids"][0][-1] == tok.sep_token_id
    assert cut["input_ids"][1] == tok(short)["input_ids"]  # a short text is untouched
    assert all(len(m) == len(i) for m, i in zip(cut["attention_mask"], cut["input_ids"], strict=True))
    assert D.tokenize(tok, [text], 12, "head")["input_ids"][0] == full[:11] + [tok.sep_token_id]


def job(train, tiny_base, truncation: str) -> JobConfig:
    return JobConfig(DataConfig(train=str(train), max_length=MAX_LENGTH, truncation=truncation),
                     ModelConfig(base_model=str(tiny_base)),
                     TrainConfig(epochs=8, batch_size=16, learning_rate=3e-3, precision="fp32", seed=1, num_threads=1,
                                 early_stopping_patience=0))


@pytest.mark.parametrize("truncation, learns", [("head+tail", True), ("head", False)])
def test_a_cue_at_the_end_of_long_texts_is_learnt_and_served_only_with_head_tail(
        truncation, learns, tmp_path, tiny_base, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", cue_at_the_end(240, seed=0))
    metrics = run_training(job(train, tiny_base, truncation), tmp_path / "run")
    accuracy = metrics["validation"]["accuracy"]
    assert accuracy >= 0.9 if learns else accuracy <= 0.7, accuracy
    assert read_meta(tmp_path / "run" / "model").truncation == truncation
    if not learns:
        return
    monkeypatch.setenv(registry.ROOT_ENV, str(tmp_path / "home"))
    version = export_version(tmp_path / "run" / "model", "long")  # ONNX parity is proven on the same cut
    served = predict.load_predictor(version, "onnx")
    rows = cue_at_the_end(40, seed=5)
    right = sum(p["label"] == r["label"] for p, r in zip(served.predict([r["text"] for r in rows]), rows, strict=True))
    assert right >= 36, right
