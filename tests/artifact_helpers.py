"""A tiny trained run folder (model, splits, metrics) shaped like the training core's output."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import toy_rows, write_jsonl

from finetune_core.metadata import ModelMeta
from finetune_core.model import build_model, save_trained

LABELS = ["negative", "positive"]


def make_run(tiny_base: Path, run_dir: Path, steps: int = 60) -> Path:
    """Train the tiny BERT on the toy cue-word task for a few seconds; return RUN_DIR/model."""
    torch.manual_seed(0)
    model, tokenizer = build_model(str(tiny_base), LABELS)
    train = toy_rows(240, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        rows = [train[(step * 16 + i) % len(train)] for i in range(16)]
        batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
        labels = torch.tensor([LABELS.index(r["label"]) for r in rows])
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    meta = ModelMeta(task="text-classification", labels=LABELS, base_model=str(tiny_base), max_length=64)
    save_trained(model, tokenizer, meta, run_dir / "model")
    write_jsonl(run_dir / "splits" / "validation.jsonl", toy_rows(64, seed=1))
    (run_dir / "metrics.json").write_text(json.dumps({"validation": {"accuracy": None}, "test": None, "train": {"loss": None}}))
    return run_dir / "model"
