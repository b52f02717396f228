"""Inference speed (and SST-2 dev accuracy) of every variant of one model, in one bounded run.

    python bench/inference.py --run RUN_DIR          # a fine-tuned run: speed and accuracy
    python bench/inference.py                        # the bundled MiniLM, untrained head: speed only
    python bench/inference.py --run RUN_DIR --quick  # batch 1 and 32 at length 128, 200 dev rows

Each cell runs one variant on batches of real SST-2 text cut or repeated to exactly the given
length, for at least MIN_CALLS calls and about --seconds seconds. `ceiling` is the share of this
machine's compute ceiling for MiniLM at length 128: the bf16 matrix-multiply rate measured here on
the model's own feed-forward shapes, divided by ~2.87 GFLOP per sequence.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune_core import export  # noqa: E402
from finetune_core.model import build_model, load_trained  # noqa: E402
from finetune_core.predict import TextPredictor, eager_backend, onnx_backend, torchscript_backend  # noqa: E402

SST2_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "validation.jsonl"
GFLOP_PER_SEQUENCE = 2.87  # MiniLM-L6 forward pass at length 128
CEILING_LENGTH = 128
MIN_CALLS = 3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a fine-tuned run folder (RUN_DIR with model/); default: the bundled MiniLM")
    parser.add_argument("--data", default=str(SST2_DEV), help="JSONL with text and label_name (SST-2 dev)")
    parser.add_argument("--quick", action="store_true", help="fewer cells, shorter timing, 200 accuracy rows")
    parser.add_argument("--seconds", type=float, default=None, help="time per cell (default 2, quick 0.7)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    seconds = args.seconds or (0.7 if args.quick else 2.0)
    batches = (1, 32) if args.quick else (1, 8, 32)
    lengths = (128,) if args.quick else (32, 128)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    if args.quick:
        rows = rows[:200]

    if args.run:
        model, tokenizer, meta = load_trained(Path(args.run) / "model")
    else:
        model, tokenizer = build_model("default", ["negative", "positive"])
        meta = {"task": "text-classification", "labels": ["negative", "positive"], "max_length": 128}
    model.eval()
    start_load = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = export.to_onnx(model, tokenizer, Path(scratch) / "model.onnx")
        names = export.model_input_names(tokenizer)
        backends = {
            "eager fp32": eager_backend(model),
            "torchscript": torchscript_backend(export.to_torchscript(model, tokenizer, Path(scratch) / "m.pt"), names),
            "onnx fp32": onnx_backend(onnx_path),
            "onnx int8": onnx_backend(export.quantize_int8(onnx_path, Path(scratch) / "q.onnx", export.DEFAULT_PER_CHANNEL)),
            "eager bf16": eager_backend(copy.deepcopy(model), torch.bfloat16),
        }
        table = []
        for name, backend in backends.items():
            predictor = TextPredictor(tokenizer, meta, backend, name)
            accuracy = _accuracy(predictor, rows, meta) if args.run else None
            for length in lengths:
                for batch in batches:
                    table.append(dict(_time_cell(predictor, rows, batch, length, seconds), variant=name, accuracy=accuracy))
    gflops = _matmul_gflops(torch.bfloat16)
    ceiling = gflops / GFLOP_PER_SEQUENCE
    _print_table(table, ceiling)
    print(
        f"\nceiling: bf16 matmul at the model's shapes runs {gflops:.0f} GFLOP/s here "
        f"(fp32 {_matmul_gflops(torch.float32):.0f}), so at most {ceiling:.0f} seq/s at length {CEILING_LENGTH}"
    )
    print(
        f"\n{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, ORT threads default; "
        f"load average {start_load:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
        f"{time.perf_counter() - started:.0f}s; accuracy on {len(rows) if args.run else 0} rows of {args.data}"
    )


def _time_cell(predictor: TextPredictor, rows: list[dict], batch: int, length: int, seconds: float) -> dict:
    # Join dev sentences so every row has real tokens up to exactly `length` (no padding).
    text = " ".join(r["text"] for r in rows[:40])
    inputs = predictor.encode([text] * batch, max_length=length)
    assert inputs["input_ids"].shape == (batch, length)
    predictor.backend(inputs)  # warm-up: allocations, lazy initialisation
    timings = []
    deadline = time.perf_counter() + seconds
    while len(timings) < MIN_CALLS or time.perf_counter() < deadline:
        start = time.perf_counter()
        predictor.backend(inputs)
        timings.append(time.perf_counter() - start)
    median = statistics.median(timings)
    p90 = float(np.percentile(timings, 90))
    return {"batch": batch, "length": length, "median_ms": 1000 * median, "p90_ms": 1000 * p90, "seq_per_s": batch / median, "calls": len(timings)}


def _matmul_gflops(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Matrix-multiply rate on MiniLM's feed-forward shapes (32 x 128 tokens, 384 -> 1536 -> 384)."""
    x = torch.randn(32 * CEILING_LENGTH, 384, dtype=dtype)
    up, down = torch.randn(384, 1536, dtype=dtype), torch.randn(1536, 384, dtype=dtype)
    flop = 2 * 2 * x.shape[0] * 384 * 1536
    with torch.inference_mode():
        torch.mm(torch.mm(x, up), down)
        calls, deadline, start = 0, time.perf_counter() + seconds, time.perf_counter()
        while time.perf_counter() < deadline:
            torch.mm(torch.mm(x, up), down)
            calls += 1
    return flop * calls / (time.perf_counter() - start) / 1e9


def _accuracy(predictor: TextPredictor, rows: list[dict], meta: dict) -> float:
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["text"]))
    logits = predictor.logits([rows[i]["text"] for i in order])
    gold = np.array([meta["labels"].index(rows[i]["label_name"]) for i in order])
    return float((logits.argmax(-1) == gold).mean())


def _print_table(table: list[dict], ceiling_seq_per_s: float) -> None:
    eager = {(r["batch"], r["length"]): r["seq_per_s"] for r in table if r["variant"] == "eager fp32"}
    header = "| variant | batch | length | median ms | p90 ms | seq/s | vs eager fp32 | ceiling | SST-2 dev acc |"
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for r in table:
        ceiling = f"{r['seq_per_s'] / ceiling_seq_per_s:.1%}" if r["length"] == CEILING_LENGTH else "-"
        accuracy = f"{100 * r['accuracy']:.2f}" if r["accuracy"] is not None else "-"
        print(
            f"| {r['variant']} | {r['batch']} | {r['length']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
            f"{r['seq_per_s']:.1f} | {r['seq_per_s'] / eager[(r['batch'], r['length'])]:.2f}x | {ceiling} | {accuracy} |"
        )


if __name__ == "__main__":
    main()
