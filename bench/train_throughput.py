"""Training throughput: our loop against the Hugging Face Trainer, on the real MiniLM and SST-2.

Contenders, all on the first --rows rows of SST-2 train, batch 32, one epoch:
  ours             run_training() with its defaults (dynamic padding, length grouping, bf16 where the CPU has it)
  ours-fp32        the same with precision fp32: checks that bf16 autocast costs no accuracy
  trainer-default  the tutorial recipe: padding="max_length" (64), TrainingArguments defaults (lr 5e-5, fp32)
  trainer-tuned    Trainer with the speed options we use (dynamic padding, length grouping, bf16) and our
                   learning rate, warm-up and weight decay, so its accuracy is comparable

Each run is its own subprocess, so peak RSS is per contender and no run warms another. Samples/s is
rows * epochs / training wall time. Both timers start after tokenization, model load and optimizer
creation and stop at the end of the last step: the Trainer's train_runtime because evaluation and
saving are off, ours because fit() stops its clock around evaluation and checkpoint writes. Every
trained model is then scored by the same fp32 evaluation on the 872 dev rows.

    python bench/train_throughput.py [--rows 2000] [--repeats 1] [--only ours,trainer-default,trainer-tuned]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this tree's core, whatever is installed

SST2 = Path("/work/shared/data/sst2")
CONTENDERS = ("ours", "ours-fp32", "trainer-default", "trainer-tuned")
BATCH_SIZE = 32
EPOCHS = 1
TRAINER_MAX_LENGTH = 64  # the tutorial value; no SST-2 train or dev row is longer than 62 tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="first N rows of SST-2 train (default 2000)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per contender; the table shows medians")
    parser.add_argument("--only", default=",".join(CONTENDERS), help=f"comma-separated subset of {','.join(CONTENDERS)}")
    parser.add_argument("--one", choices=CONTENDERS, help=argparse.SUPPRESS)  # child mode: one run
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = run_one(args.one, Path(args.train), Path(args.workdir))
        (Path(args.workdir) / "result.json").write_text(json.dumps(result))
        return
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown or not names:
        parser.error(f"--only: unknown contender(s) {unknown}; choose from {', '.join(CONTENDERS)}")
    if args.rows < BATCH_SIZE or args.repeats < 1:
        parser.error(f"--rows must be >= {BATCH_SIZE} and --repeats >= 1")
    compare(names, args.rows, args.repeats)


# ---------------------------------------------------------------- parent: run, collect, print


def compare(names: list[str], rows: int, repeats: int) -> None:
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    results: dict[str, list[dict]] = {n: [] for n in names}
    warnings: dict[str, set[str]] = {n: set() for n in names}
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        train = Path(tmp) / "train.jsonl"
        with (SST2 / "train.jsonl").open() as f:
            lines = [line for _, line in zip(range(rows), f)]
        if len(lines) < rows:
            sys.exit(f"--rows {rows}: {SST2 / 'train.jsonl'} has only {len(lines)} rows")
        train.write_text("".join(lines))
        # Round-robin, so slow drift on a shared machine does not land on one contender.
        for repeat in range(repeats):
            for name in names:
                workdir = Path(tmp) / f"{name}-{repeat}"
                workdir.mkdir()
                started = time.perf_counter()
                cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--train", str(train), "--workdir", str(workdir)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
                result = json.loads((workdir / "result.json").read_text())
                results[name].append(result)
                warnings[name].update(_warning_lines(done.stdout + done.stderr))
                print(f"run {repeat + 1}/{repeats} {name}: {result['samples_per_second']:.1f} samples/s, "
                      f"accuracy {100 * result['accuracy']:.2f}%, train {result['train_seconds']:.1f} s, "
                      f"whole run {time.perf_counter() - started:.0f} s", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")
    print_report(results, rows, repeats)
    for name, lines in warnings.items():
        for line in sorted(lines):
            print(f"warning ({name}): {line}")


def print_report(results: dict[str, list[dict]], rows: int, repeats: int) -> None:
    med = {name: {key: statistics.median(r[key] for r in runs) for key in ("samples_per_second", "accuracy", "peak_rss_mb")}
           for name, runs in results.items()}
    first = {name: runs[0] for name, runs in results.items()}
    threads = sorted({r["torch_threads"] for runs in results.values() for r in runs})
    print(f"\nrows {rows}, batch {BATCH_SIZE}, epochs {EPOCHS}, dev rows {first[next(iter(first))]['dev_rows']}, "
          f"torch threads {','.join(map(str, threads))}, repeats {repeats}" + (" (medians)" if repeats > 1 else ""))
    print("\n| contender | precision | samples/s | dev accuracy | peak RSS MB | vs default Trainer | vs tuned Trainer | accuracy vs tuned (points) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, m in med.items():
        speed = m["samples_per_second"]
        vs_default = f"{speed / med['trainer-default']['samples_per_second']:.2f}x" if "trainer-default" in med else "n/a"
        vs_tuned = f"{speed / med['trainer-tuned']['samples_per_second']:.2f}x" if "trainer-tuned" in med else "n/a"
        delta = f"{100 * (m['accuracy'] - med['trainer-tuned']['accuracy']):+.2f}" if "trainer-tuned" in med else "n/a"
        print(f"| {name} | {first[name]['precision']} | {speed:.1f} | {100 * m['accuracy']:.2f}% | {m['peak_rss_mb']:.0f} "
              f"| {vs_default} | {vs_tuned} | {delta} |")
    if repeats > 1:
        print()
        for name, runs in results.items():
            print(f"{name} samples/s per run: {', '.join(format(r['samples_per_second'], '.1f') for r in runs)}")
    if "ours" in results:
        own = statistics.median(r["own_accuracy"] for r in results["ours"])
        print(f"\nours, as run_training reports it (its own eval, {first['ours']['precision']} autocast): accuracy {100 * own:.2f}%")


def _warning_lines(output: str) -> set[str]:
    """Distinct warning lines a child printed; progress bars and tracebacks' noise left out."""
    found = set()
    for line in re.split(r"[\r\n]", output):
        line = line.strip()
        if re.search(r"warn", line, re.IGNORECASE) and "it/s]" not in line:
            found.add(line[:300])
    return found


# ---------------------------------------------------------------- child: one training run


def run_one(name: str, train_path: Path, workdir: Path) -> dict:
    import torch

    threads = torch.get_num_threads()
    texts, labels = _read(train_path)
    if name.startswith("ours"):
        out = _train_ours(train_path, workdir, "fp32" if name == "ours-fp32" else "auto")
    else:
        out = _train_trainer(name, texts, labels, workdir)
    dev_texts, dev_labels = _read(SST2 / "validation.jsonl")
    accuracy = evaluate(out.pop("model"), dev_texts, dev_labels)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {**out, "accuracy": accuracy, "peak_rss_mb": peak_mb, "torch_threads": threads, "dev_rows": len(dev_texts)}


def _train_ours(train_path: Path, workdir: Path, precision: str) -> dict:
    from transformers import AutoModelForSequenceClassification

    from finetune_core.config import DataConfig, JobConfig, TrainConfig
    from finetune_core.pipeline import run_training

    cfg = JobConfig(DataConfig(train=str(train_path), validation=str(SST2 / "validation.jsonl")),
                    train=TrainConfig(epochs=EPOCHS, batch_size=BATCH_SIZE, precision=precision))
    metrics = run_training(cfg, workdir / "run")
    train = metrics["train"]
    model = AutoModelForSequenceClassification.from_pretrained(workdir / "run" / "model")
    return {"samples_per_second": train["samples_per_second"], "train_seconds": train["train_seconds"],
            "precision": train["precision"], "own_accuracy": metrics["validation"]["accuracy"], "model": model}


def _train_trainer(name: str, texts: list[str], labels: list[int], workdir: Path) -> dict:
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from finetune_core.config import TrainConfig
    from finetune_core.model import resolve_base_model

    base = resolve_base_model("default")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tuned = name == "trainer-tuned"
    encoded = tokenizer(texts, padding=False if tuned else "max_length", max_length=TRAINER_MAX_LENGTH, truncation=True)
    dataset = [{**{k: v[i] for k, v in encoded.items()}, "labels": label} for i, label in enumerate(labels)]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    common = {"output_dir": str(workdir / "trainer"), "per_device_train_batch_size": BATCH_SIZE, "num_train_epochs": EPOCHS,
              "report_to": [], "eval_strategy": "no", "save_strategy": "no"}
    if tuned:
        ours = TrainConfig()
        # transformers 5 spells group_by_length=True as train_sampling_strategy and the warm-up ratio as a float
        # warmup_steps; bf16 without a GPU is refused unless use_cpu=True says so.
        args = TrainingArguments(**common, bf16=True, use_cpu=True, train_sampling_strategy="group_by_length",
                                 learning_rate=ours.learning_rate, warmup_steps=ours.warmup_ratio,
                                 weight_decay=ours.weight_decay, max_grad_norm=ours.max_grad_norm)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorWithPadding(tokenizer),
                          processing_class=tokenizer)
    else:
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset)
    runtime = trainer.train().metrics["train_runtime"]
    precision = "bf16" if trainer.args.bf16 else "fp32"
    return {"samples_per_second": len(dataset) * EPOCHS / runtime, "train_seconds": runtime, "precision": precision,
            "model": trainer.model}


def evaluate(model, texts: list[str], labels: list[int], batch_size: int = 128) -> float:
    """Dev accuracy, fp32, the same for every contender; length-sorted batches pad little."""
    import torch
    from transformers import AutoTokenizer

    from finetune_core.model import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("default"))
    model = model.float().eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    correct = 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
            predicted = model(**batch).logits.argmax(-1)
            correct += int((predicted == torch.tensor([labels[i] for i in idx])).sum())
    return correct / len(texts)


def _read(path: Path) -> tuple[list[str], list[int]]:
    rows = [json.loads(line) for line in path.open() if line.strip()]
    return [r["text"] for r in rows], [int(r["label"]) for r in rows]


if __name__ == "__main__":
    main()
