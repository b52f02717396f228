"""Inference speed (and validation accuracy) of every variant of one model, in one bounded run.

    python bench/inference.py --run RUN_DIR          # a fine-tuned run: speed and accuracy
    python bench/inference.py                        # the bundled MiniLM, untrained head: speed only
    python bench/inference.py --run RUN_DIR --quick  # batch 1 and 32 at length 128, 200 dev rows
    python bench/inference.py --image-run RUN_DIR    # an image run: eager fp32, ONNX fp32, ONNX int8

Text: each cell runs one variant on batches of real SST-2 text cut or repeated to exactly the given
length, for at least MIN_CALLS calls and about --seconds seconds. `ceiling` is the share of this
machine's compute ceiling for MiniLM at length 128: the bf16 matrix-multiply rate measured here on
the model's own feed-forward shapes, divided by ~2.87 GFLOP per sequence.

Images: eager PyTorch fp32 against ONNX Runtime fp32 and static int8 (calibrated on 64 training
images, as `finetune-serve export` does), at batch 1 and 32 on the run's own preprocessed
validation images (decoding is timed apart: it is the same for every variant); accuracy on the
whole validation split. A run to bench, EfficientNet-Lite0 at 224 px (about 20 s on 2 quiet cores):

    finetune-serve train --task image-classification --train /work/shared/data/hymenoptera \
        --freeze all-but-head --learning-rate 3e-3 --batch-size 16 --epochs 2 --output /tmp/hy --quiet
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
from finetune_core.metadata import ModelMeta  # noqa: E402
from finetune_core.model import build_model, load_trained  # noqa: E402
from finetune_core.predict import (ImagePredictor, TextPredictor, eager_backend, onnx_backend,  # noqa: E402
                                   torchscript_backend)

SST2_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "validation.jsonl"
GFLOP_PER_SEQUENCE = 2.87  # MiniLM-L6 forward pass at length 128
CEILING_LENGTH = 128
MIN_CALLS = 3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a fine-tuned run folder (RUN_DIR with model/); default: the bundled MiniLM")
    parser.add_argument("--image-run", help="a trained image run folder (RUN_DIR with model/ and splits/); "
                        "benches only images unless --run is given too")
    parser.add_argument("--data", default=str(SST2_DEV), help="JSONL with text and label_name (SST-2 dev)")
    parser.add_argument("--quick", action="store_true", help="fewer cells, shorter timing, 200 accuracy rows")
    parser.add_argument("--seconds", type=float, default=None, help="time per cell (default 2, quick 0.7)")
    parser.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime intra-op threads (default: "
                        "their own, all cores); 1 on a machine shared with other work, where idle OpenMP threads "
                        "spin-waiting for a busy core made eager EfficientNet-Lite0 24x slower at batch 1")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    seconds = args.seconds or (0.7 if args.quick else 2.0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.image_run:
        image_bench(Path(args.image_run), seconds, args.threads)
    if args.run or not args.image_run:
        text_bench(args, seconds)


def text_bench(args: argparse.Namespace, seconds: float) -> None:
    batches = (1, 32) if args.quick else (1, 8, 32)
    lengths = (128,) if args.quick else (32, 128)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    if args.quick:
        rows = rows[:200]

    if args.run:
        model, tokenizer, meta = load_trained(Path(args.run) / "model")
    else:
        model, tokenizer = build_model("default", ["negative", "positive"])
        meta = ModelMeta(task="text-classification", labels=["negative", "positive"], max_length=128)
    model.eval()
    start_load = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        inputs = export.text_inputs(tokenizer)
        onnx_path = export.to_onnx(model, inputs, Path(scratch) / "model.onnx")
        backends = {
            "eager fp32": eager_backend(model),
            "torchscript": torchscript_backend(export.to_torchscript(model, inputs, Path(scratch) / "m.pt"), inputs.names),
            "onnx fp32": onnx_backend(onnx_path, args.threads),
            "onnx int8": onnx_backend(export.quantize_int8(onnx_path, Path(scratch) / "q.onnx", export.DEFAULT_PER_CHANNEL),
                                      args.threads),
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
        f"\n{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, ORT threads {args.threads or 'default'}; "
        f"load average {start_load:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
        f"{time.perf_counter() - started:.0f}s; accuracy on {len(rows) if args.run else 0} rows of {args.data}"
    )


def image_bench(run_dir: Path, seconds: float, threads: int = 0) -> None:
    """Eager fp32 vs ONNX Runtime fp32 vs static int8 on an image run: images/s at batch 1 and 32."""
    from finetune_core.artifacts import calibration_batches
    from finetune_core.image_model import load_image_model

    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # errors only: quantization tools warn per removed initializer
    model, meta = load_image_model(run_dir / "model")
    reference = ImagePredictor(meta, eager_backend(model), "eager fp32")
    rows = [json.loads(line) for line in (run_dir / "splits" / "validation.jsonl").read_text().splitlines()]
    gold = np.array([meta.labels.index(r["label"]) for r in rows])
    start_load = os.getloadavg()[0]
    started = time.perf_counter()
    decode_start = time.perf_counter()
    pixels = reference.pixels([r["image"] for r in rows])
    decode_per_s = len(rows) / (time.perf_counter() - decode_start)
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = export.to_onnx(model, export.image_inputs(meta.image_size), Path(scratch) / "model.onnx")
        calibration, _ = calibration_batches(run_dir / "splits" / "train.jsonl", reference)
        int8_path, quantization = export.quantize_static_int8(onnx_path, Path(scratch) / "int8.onnx", calibration)
        backends = {"eager fp32": reference.backend, "onnx fp32": onnx_backend(onnx_path, threads),
                    "onnx int8": onnx_backend(int8_path, threads)}
        table = []
        for name, backend in backends.items():
            logits = ImagePredictor(meta, backend, name).logits_from_pixels(pixels)
            accuracy = float((logits.argmax(-1) == gold).mean())
            for batch in (1, 32):
                inputs = {"pixel_values": np.resize(pixels, (batch, *pixels.shape[1:]))}  # real images, repeated to fill
                cell = _timings(lambda: backend(inputs), seconds)
                table.append(dict(cell, variant=name, batch=batch, per_s=batch / cell["median_s"], accuracy=accuracy))
    size = meta.image_size
    print(f"| variant | batch | median ms | p90 ms | images/s | vs eager fp32 | val acc ({len(rows)} images) |")
    print("|---|---|---|---|---|---|---|")
    eager = {r["batch"]: r["per_s"] for r in table if r["variant"] == "eager fp32"}
    for r in table:
        print(f"| {r['variant']} | {r['batch']} | {1000 * r['median_s']:.1f} | {1000 * r['p90_s']:.1f} | {r['per_s']:.1f} | "
              f"{r['per_s'] / eager[r['batch']]:.2f}x | {100 * r['accuracy']:.2f} |")
    print(
        f"\n{meta.arch} at {size}x{size}; int8: static QDQ, {quantization['method']} calibration on "
        f"{quantization['rows']} training images, per-channel {quantization['per_channel']}. Decoding and "
        f"preprocessing (not in the table): {decode_per_s:.0f} images/s in this process.\n"
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, ORT threads {threads or 'default'}; load average "
        f"{start_load:.1f} at start, {os.getloadavg()[0]:.1f} at end; {time.perf_counter() - started:.0f}s; "
        f"run {run_dir}\n"
    )


def _timings(call, seconds: float) -> dict:
    """Median and p90 seconds of `call` over at least MIN_CALLS calls and about `seconds`, after one warm-up."""
    call()  # warm-up: allocations, lazy initialisation
    timings = []
    deadline = time.perf_counter() + seconds
    while len(timings) < MIN_CALLS or time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        timings.append(time.perf_counter() - start)
    return {"median_s": statistics.median(timings), "p90_s": float(np.percentile(timings, 90)), "calls": len(timings)}


def _time_cell(predictor: TextPredictor, rows: list[dict], batch: int, length: int, seconds: float) -> dict:
    # Join dev sentences so every row has real tokens up to exactly `length` (no padding).
    text = " ".join(r["text"] for r in rows[:40])
    inputs = predictor.encode([text] * batch, max_length=length)
    assert inputs["input_ids"].shape == (batch, length)
    cell = _timings(lambda: predictor.backend(inputs), seconds)
    median = cell["median_s"]
    return {"batch": batch, "length": length, "median_ms": 1000 * median, "p90_ms": 1000 * cell["p90_s"],
            "seq_per_s": batch / median, "calls": cell["calls"]}


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


def _accuracy(predictor: TextPredictor, rows: list[dict], meta: ModelMeta) -> float:
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["text"]))
    logits = predictor.logits([rows[i]["text"] for i in order])
    gold = np.array([meta.labels.index(rows[i]["label_name"]) for i in order])
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
