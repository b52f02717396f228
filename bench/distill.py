"""Distillation against its goals: the student's accuracy beside the teacher's, its speed, the loss against
labels alone, and the time it takes. Prints markdown tables (medians, ratios) and a goals table.

    python bench/distill.py text                          # the full measurement: teacher = MiniLM fine-tuned
                                                          # by the defaults on all of SST-2 (67,349 rows)
    python bench/distill.py text --teacher-run DIR        # reuse a teacher run folder (RUN_DIR with model/, splits/)
    python bench/distill.py text --teacher-run DIR/teacher --work DIR --speed-only --seeds 0
                                                          # time again what a run left in DIR (its work folder)
    python bench/distill.py text --train-rows 2000 --compare-rows 2000 --compare-epochs 1 --seeds 1 --seconds 0.5
                                                          # a reduced run (minutes): bounded teacher and comparison
    python bench/distill.py text --teacher-run DIR --sweep-only --sweep 0.5:2,0.9:2,0.5:4:3e-4,0.5:4:0:1
                                                          # alpha:temperature[:learning rate[:hidden weight]],
                                                          # each distilled
                                                          # the same way (--compare-rows, --compare-epochs)
    python bench/distill.py images                        # hymenoptera: teacher = EfficientNet-Lite0 by the defaults;
                                                          # students: --students 160:all,224:1-2-2-3-2-2-1,...

Text. Teacher and student are scored on the 872 SST-2 dev rows (the teacher's validation split). Speed:
batches of real dev text joined to exactly --length tokens (no padding), at batch 1 and 32, each cell
timed for about --seconds after a warm-up in each of --rounds rounds over all cells (so a slow moment of
the machine falls on every variant, not on one), its median over all rounds; the teacher's variants are the registered ones (eager fp32,
ONNX int8) and the student's `distilled` (ONNX fp32), `distilled-int8` and its eager fp32 form. The
comparison trains the same student (same rows, epochs and steps, early stopping off, best dev
checkpoint kept) with the distillation loss and with alpha 0 and no hidden-state term (labels alone), over
--seeds seeds.

Images. Each student (input size : blocks kept per stage, "all" for the teacher's) is distilled from the
teacher with the defaults otherwise; images/s is the model alone (eager fp32 and ONNX fp32) on the
validation images, preprocessed once, at batch 1 and 32; accuracy on the whole validation split.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from finetune_core import export, registry  # noqa: E402
from finetune_core.artifacts import export_version  # noqa: E402
from finetune_core.config import DistillConfig, config_from_dict  # noqa: E402
from finetune_core.distill import distill_run, run_config, run_distillation  # noqa: E402
from finetune_core.model import load_trained  # noqa: E402
from finetune_core.pipeline import run_training  # noqa: E402
from finetune_core.predict import ImagePredictor, TextPredictor, eager_backend, load_predictor, onnx_backend  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GOALS = {"text_points": 1.5, "text_speedup_b32": 1.8, "int8_vs_eager_b32": 6.0, "int8_latency_share": 0.5,
         "image_points": 2.0, "image_speedup": 1.8, "text_minutes": 20.0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["text", "images"])
    parser.add_argument("--teacher-run", help="a trained teacher run folder to reuse (default: train one with the defaults)")
    parser.add_argument("--data", default=str(DATA), help="the folder holding sst2/ and hymenoptera/")
    parser.add_argument("--work", help="folder for the runs and the registry (default: a temporary folder)")
    parser.add_argument("--train-rows", type=int, default=0, help="text: train the teacher on the first N SST-2 rows (0: all)")
    parser.add_argument("--distill-rows", type=int, default=None, help="rows the student distils on (default: the "
                        "DistillConfig default)")
    parser.add_argument("--unlabelled-rows", type=int, default=0, help="text: add the N SST-2 train rows after the "
                        "teacher's (--train-rows) as distill_data, their labels dropped")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: the DistillConfig default)")
    parser.add_argument("--compare-rows", type=int, default=8000, help="text: rows of the loss comparison's runs")
    parser.add_argument("--compare-epochs", type=int, default=2, help="text: epochs of the loss comparison's runs")
    parser.add_argument("--seeds", type=int, default=3, help="text: seeds of the loss comparison (0: skip it)")
    parser.add_argument("--sweep", default="", help="text: alpha:temperature[:learning rate[:hidden weight]] to compare "
                        "(rate 0: the default), e.g. 0.5:2,0.9:4:3e-4,0.5:4:0:1")
    parser.add_argument("--sweep-only", action="store_true", help="text: only the sweep (with --teacher-run)")
    parser.add_argument("--students", default="160:all,224:1-2-2-3-2-2-1,192:1-2-2-3-2-2-1",
                        help="images: size:blocks per stage, comma-separated")
    parser.add_argument("--length", type=int, default=128, help="text: tokens per row in the speed cells")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per speed cell and round")
    parser.add_argument("--rounds", type=int, default=3, help="text: rounds over all speed cells, interleaved")
    parser.add_argument("--speed-only", action="store_true", help="text: only the speed cells (and --seeds), of the "
                        "student and version a run left in --work")
    parser.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads (0: their defaults)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-distill-"))
    os.environ[registry.ROOT_ENV] = str(work / "registry")
    started, load = time.perf_counter(), os.getloadavg()[0]
    (text_bench if args.task == "text" else image_bench)(args, work)
    print(f"\n{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, ORT threads {args.threads or 'default'}; "
          f"load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end; {time.perf_counter() - started:.0f}s "
          f"in all; work folder {work}")


# ---------------------------------------------------------------- text


def text_bench(args: argparse.Namespace, work: Path) -> None:
    sst2 = Path(args.data) / "sst2"
    teacher_run = Path(args.teacher_run) if args.teacher_run else train_text_teacher(sst2, args.train_rows, work)
    defaults = DistillConfig()
    dcfg = dataclasses.replace(defaults, max_rows=defaults.max_rows if args.distill_rows is None else args.distill_rows,
                               epochs=args.epochs or defaults.epochs)
    if args.unlabelled_rows:
        dcfg = dataclasses.replace(dcfg, distill_data=str(unlabelled_text(sst2, args.train_rows, args.unlabelled_rows, work)))
    if args.sweep_only:
        sweep(teacher_run, work, dcfg, args.sweep, args.compare_rows, args.compare_epochs, max(1, args.seeds))
        return
    if args.speed_only:
        info, distill_s = registry.resolve("sst2", None), None
    else:
        started = time.perf_counter()
        metrics = distill_run(teacher_run, work / "student", dcfg)
        distill_s = time.perf_counter() - started
        started = time.perf_counter()
        # Stored whatever its accuracy, so a student the gate would refuse is still timed; the verdict is printed.
        info = export_version(teacher_run / "model", "sst2", ["int8", "distilled", "distilled-int8"],
                              student=work / "student" / "model", distill_gate=100.0)
        export_s = time.perf_counter() - started
        report_distillation(metrics, dcfg, distill_s, export_s)
    records = info.manifest.variants
    for name in ("distilled", "distilled-int8"):
        accepted, reason = export.accuracy_gate(records["pytorch"].figures, records[name].figures, dcfg.distill_gate,
                                                "the teacher")
        print(f"{name}: at the default gate it would be {'accepted' if accepted else 'REFUSED'}: {reason}")

    rows = [json.loads(line) for line in (sst2 / "validation.jsonl").read_text().splitlines()]
    teacher_model, tokenizer, meta = load_trained(teacher_run / "model")
    student_model, _, student_meta = load_trained(work / "student" / "model")
    predictors = {"teacher eager fp32": TextPredictor(tokenizer, meta, eager_backend(teacher_model), "teacher eager")}
    if records["int8"].accepted:
        predictors["teacher int8"] = load_predictor(info, "int8", args.threads)
    predictors["student eager fp32"] = TextPredictor(tokenizer, student_meta, eager_backend(student_model), "student eager")
    for name in ("distilled", "distilled-int8"):
        if records[name].accepted:
            predictors[name] = load_predictor(info, name, args.threads)
    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for name, predictor in predictors.items():
            for batch in (1, 32):
                samples.setdefault((name, batch), []).extend(time_text(predictor, rows, batch, args.length, args.seconds))
    table = [{"variant": name, "batch": batch, "median_ms": 1000 * statistics.median(found),
              "p90_ms": 1000 * float(np.percentile(found, 90)), "per_s": batch / statistics.median(found)}
             for (name, batch), found in samples.items()]
    cell = {(r["variant"], r["batch"]): r for r in table}
    print(f"\n| variant | batch | median ms | p90 ms | seq/s | vs teacher eager fp32 | length {args.length}, "
          f"{args.rounds} rounds |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in table:
        ratio = r["per_s"] / cell[("teacher eager fp32", r["batch"])]["per_s"]
        print(f"| {r['variant']} | {r['batch']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['per_s']:.1f} | {ratio:.2f}x | |")
    goals = text_goals(records, cell, args.length)
    if distill_s is not None:
        minutes = (distill_s + export_s) / 60
        goals.append(("the whole distillation (distil + export) on this machine in < 20 minutes",
                      f"{minutes:.1f} min ({metrics['distillation']['rows']['used']} rows, <= {dcfg.epochs} epochs)",
                      minutes < GOALS["text_minutes"]))
    if args.seeds:
        kd, labels_only = compare_losses(teacher_run, work, dcfg, args.compare_rows, args.compare_epochs, args.seeds)
        goals.append((f"distillation loss beats labels alone, same student and steps (mean of {args.seeds} seeds, "
                      f"{args.compare_rows} rows x {args.compare_epochs} epochs)",
                      f"{100 * statistics.mean(kd):.2f} vs {100 * statistics.mean(labels_only):.2f} "
                      f"(seeds: {fmt(kd)} vs {fmt(labels_only)})", statistics.mean(kd) > statistics.mean(labels_only)))
    if args.sweep:
        sweep(teacher_run, work, dcfg, args.sweep, args.compare_rows, args.compare_epochs, max(1, args.seeds))
    print_goals(goals)


def report_distillation(metrics: dict, dcfg: DistillConfig, distill_s: float, export_s: float) -> None:
    about = metrics["distillation"]
    print(f"\n## Text distillation ({about['rows']['used']} rows x {dcfg.epochs} epochs at most, alpha {dcfg.alpha}, "
          f"T {dcfg.temperature}, hidden weight {about['hidden_weight']}, layers {about['student']['layers']} of "
          f"{about['student']['of']})\n")
    print(f"student: {metrics['train']['steps']} steps, {metrics['train']['status']}, {metrics['train']['samples_per_second']} "
          f"rows/s; teacher outputs {about['teacher_outputs']}; distillation {distill_s:.0f} s, export {export_s:.0f} s")


def text_goals(records: dict, cell: dict, length: int) -> list[tuple]:
    """The speed and accuracy goals from the version's records and the timed cells."""
    teacher_acc, student_acc = records["pytorch"].figures["accuracy"], records["distilled"].figures["accuracy"]
    goals = [("student within 1.5 points of the teacher (dev accuracy)",
              f"{100 * student_acc:.2f} vs {100 * teacher_acc:.2f} ({100 * (student_acc - teacher_acc):+.2f})",
              100 * (teacher_acc - student_acc) <= GOALS["text_points"])]
    speed = cell[("student eager fp32", 32)]["per_s"] / cell[("teacher eager fp32", 32)]["per_s"]
    goals.append((f"student >= 1.8x the teacher's throughput, batch 32, length {length} (eager fp32 both)",
                  f"{speed:.2f}x", speed >= GOALS["text_speedup_b32"]))
    if ("distilled", 32) in cell:
        onnx = cell[("distilled", 32)]["per_s"] / cell[("teacher eager fp32", 32)]["per_s"]
        goals.append(("(distilled, ONNX fp32, vs the eager teacher, batch 32)", f"{onnx:.2f}x", None))
    if ("distilled-int8", 32) in cell:
        int8 = cell[("distilled-int8", 32)]["per_s"] / cell[("teacher eager fp32", 32)]["per_s"]
        goals.append(("distilled-int8 >= 6x the eager fp32 teacher, batch 32", f"{int8:.2f}x", int8 >= GOALS["int8_vs_eager_b32"]))
    if ("distilled-int8", 1) in cell and ("teacher int8", 1) in cell:
        share = cell[("distilled-int8", 1)]["median_ms"] / cell[("teacher int8", 1)]["median_ms"]
        goals.append(("distilled-int8 batch-1 latency < half the teacher's int8",
                      f"{cell[('distilled-int8', 1)]['median_ms']:.1f} vs {cell[('teacher int8', 1)]['median_ms']:.1f} ms "
                      f"({share:.2f})", share < GOALS["int8_latency_share"]))
    return goals


def unlabelled_text(sst2: Path, skip: int, rows: int, work: Path) -> Path:
    """SST-2 train rows skip..skip+rows as {"text"} alone: a transfer set the teacher labels."""
    path = work / f"sst2-unlabelled-{skip}-{rows}.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    with (sst2 / "train.jsonl").open() as source, path.open("w") as target:
        for index, line in enumerate(source):
            if skip <= index < skip + rows:
                target.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
    return path


def train_text_teacher(sst2: Path, rows: int, work: Path) -> Path:
    """MiniLM fine-tuned by the defaults on SST-2 train (the first `rows`, 0: all), dev as validation."""
    train = sst2 / "train.jsonl"
    if rows:
        train = work / f"sst2-train-{rows}.jsonl"
        work.mkdir(parents=True, exist_ok=True)
        with (sst2 / "train.jsonl").open() as source, train.open("w") as target:
            target.writelines(line for _, line in zip(range(rows), source))
    started = time.perf_counter()
    metrics = run_training(config_from_dict({"data": {"train": str(train), "validation": str(sst2 / "validation.jsonl")}}),
                           work / "teacher")
    print(f"teacher: {metrics['train']['steps']} steps in {time.perf_counter() - started:.0f} s, dev accuracy "
          f"{100 * metrics['validation']['accuracy']:.2f} ({train.name})")
    return work / "teacher"


def compare_losses(teacher_run: Path, work: Path, dcfg: DistillConfig, rows: int, epochs: int,
                   seeds: int) -> tuple[list[float], list[float]]:
    """Dev accuracy of the same student trained with the distillation loss and with labels alone, per seed:
    on labelled rows only (distill_data's rows would carry the teacher's answers into the labels-alone arm)."""
    kd, labels_only = [], []
    for seed in range(seeds):
        for alpha, hidden, found in ((dcfg.alpha, dcfg.hidden_weight, kd), (0.0, 0.0, labels_only)):
            found.append(fixed_steps(teacher_run, work / f"compare-{alpha}-{seed}",
                                     dataclasses.replace(dcfg, alpha=alpha, hidden_weight=hidden, seed=seed, max_rows=rows,
                                                         epochs=epochs, distill_data=None)))
            print(f"  seed {seed} alpha {alpha}: dev {100 * found[-1]:.2f}", flush=True)
    return kd, labels_only


def sweep(teacher_run: Path, work: Path, dcfg: DistillConfig, specs: str, rows: int, epochs: int, seeds: int) -> None:
    """Dev accuracy of the student per alpha:temperature[:learning rate[:hidden weight]] (rate 0: the default),
    the mean over seeds 0..seeds-1, and the distillation's minutes."""
    print(f"\n| alpha | temperature | learning rate | hidden weight | student dev accuracy, mean ({rows} rows x {epochs} "
          "epochs) | per seed | minutes per run |")
    print("|---:|---:|---:|---:|---:|---|---:|")
    for spec in specs.split(","):
        alpha, temperature, rate, hidden = ([float(v) for v in spec.split(":")] + [0.0, 0.0])[:4]
        found, started = [], time.perf_counter()
        for seed in range(seeds):
            chosen = dataclasses.replace(dcfg, alpha=alpha, temperature=temperature, max_rows=rows, epochs=epochs, seed=seed,
                                         learning_rate=rate or dcfg.learning_rate, hidden_weight=hidden, distill_data=None)
            found.append(fixed_steps(teacher_run, work / f"sweep-{spec.replace(':', '-')}-{seed}", chosen))
        shown = f"{rate:g}" if rate else "the default"
        minutes = (time.perf_counter() - started) / 60 / seeds
        print(f"| {alpha:g} | {temperature:g} | {shown} | {hidden:g} | {100 * statistics.mean(found):.2f} | {fmt(found)} "
              f"| {minutes:.1f} |", flush=True)


def fixed_steps(teacher_run: Path, output: Path, dcfg: DistillConfig) -> float:
    """One distillation with early stopping off (every run takes the same steps); the best dev accuracy."""
    job = run_config(teacher_run)
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, early_stopping_patience=0))
    metrics = run_distillation(teacher_run / "model", output, dcfg, train=teacher_run / "splits" / "train.jsonl",
                               validation=teacher_run / "splits" / "validation.jsonl", job=job)
    return metrics["validation"]["accuracy"]


def time_text(predictor: TextPredictor, rows: list[dict], batch: int, length: int, seconds: float) -> list[float]:
    """Seconds per call on real dev sentences joined to exactly `length` tokens, `batch` rows: no padding."""
    text = " ".join(r["text"] for r in rows[:40])
    inputs = predictor.encode([text] * batch, max_length=length)
    assert inputs["input_ids"].shape == (batch, length)
    return samples_of(lambda: predictor.backend(inputs), seconds)


# ---------------------------------------------------------------- images


def image_bench(args: argparse.Namespace, work: Path) -> None:
    from finetune_core.image_model import load_image_model

    teacher_run = Path(args.teacher_run) if args.teacher_run else train_image_teacher(Path(args.data) / "hymenoptera", work)
    rows = [json.loads(line) for line in (teacher_run / "splits" / "validation.jsonl").read_text().splitlines()]
    teacher, meta = load_image_model(teacher_run / "model")
    contenders = {"teacher": (teacher, meta, None)}
    for spec in args.students.split(","):
        size, depths = spec.split(":")
        defaults = DistillConfig()
        dcfg = dataclasses.replace(defaults, image_size=int(size), epochs=args.epochs or defaults.epochs,
                                   block_depths=None if depths == "all" else [int(d) for d in depths.split("-")])
        started = time.perf_counter()
        metrics = distill_run(teacher_run, work / f"student-{spec.replace(':', '-')}", dcfg)
        student, student_meta = load_image_model(work / f"student-{spec.replace(':', '-')}" / "model")
        contenders[f"student {spec}"] = (student, student_meta, {"seconds": time.perf_counter() - started, **metrics})
    table = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, (model, model_meta, metrics) in contenders.items():
            eager = ImagePredictor(model_meta, eager_backend(model), "eager")
            pixels = eager.pixels([r["image"] for r in rows])
            gold = np.array([model_meta.labels.index(r["label"]) for r in rows])
            onnx_file = export.to_onnx(model, export.image_inputs(model_meta.image_size), Path(scratch) / f"{len(table)}.onnx")
            backends = {"eager fp32": eager.backend, "onnx fp32": onnx_backend(onnx_file, args.threads)}
            accuracy = float((eager.logits_from_pixels(pixels).argmax(-1) == gold).mean())
            for backend_name, backend in backends.items():
                for batch in (1, 32):
                    inputs = {"pixel_values": np.resize(pixels, (batch, *pixels.shape[1:]))}
                    found = timings(lambda: backend(inputs), args.seconds)
                    table.append({"model": name, "backend": backend_name, "batch": batch, "per_s": batch / found["median_s"],
                                  "median_ms": 1000 * found["median_s"], "accuracy": accuracy, "metrics": metrics,
                                  "size": model_meta.image_size, "params": sum(p.numel() for p in model.parameters())})
    cell = {(r["model"], r["backend"], r["batch"]): r for r in table}
    print(f"\n## Image distillation (hymenoptera val, {len(rows)} images)\n")
    print("| model | input | params | backend | batch | median ms | images/s | vs teacher | val accuracy |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in table:
        ratio = r["per_s"] / cell[("teacher", r["backend"], r["batch"])]["per_s"]
        print(f"| {r['model']} | {r['size']} | {r['params'] / 1e6:.2f}M | {r['backend']} | {r['batch']} | {r['median_ms']:.1f} | "
              f"{r['per_s']:.1f} | {ratio:.2f}x | {100 * r['accuracy']:.2f} |")
    goals = []
    teacher_acc = cell[("teacher", "eager fp32", 32)]["accuracy"]
    for name in contenders:
        if name == "teacher":
            continue
        acc = cell[(name, "eager fp32", 32)]["accuracy"]
        speed = {b: cell[(name, b, 32)]["per_s"] / cell[("teacher", b, 32)]["per_s"] for b in ("eager fp32", "onnx fp32")}
        took = contenders[name][2]["seconds"]
        goals.append((f"{name}: within 2 points of the teacher", f"{100 * acc:.2f} vs {100 * teacher_acc:.2f} "
                      f"({100 * (acc - teacher_acc):+.2f}); distilled in {took:.0f} s", 100 * (teacher_acc - acc) <= GOALS["image_points"]))
        goals.append((f"{name}: >= 1.8x the teacher's images/s (batch 32)", f"eager {speed['eager fp32']:.2f}x, "
                      f"ONNX {speed['onnx fp32']:.2f}x", min(speed.values()) >= GOALS["image_speedup"]))
    print_goals(goals)


def train_image_teacher(root: Path, work: Path) -> Path:
    started = time.perf_counter()
    metrics = run_training(config_from_dict({"data": {"task": "image-classification", "train": str(root)}}), work / "teacher")
    print(f"teacher: {metrics['train']['steps']} steps in {time.perf_counter() - started:.0f} s, val accuracy "
          f"{100 * metrics['validation']['accuracy']:.2f}")
    return work / "teacher"


# ---------------------------------------------------------------- shared


def samples_of(call, seconds: float) -> list[float]:
    """Seconds of each of at least 3 calls of `call` over about `seconds`, after one warm-up call."""
    call()
    found = []
    deadline = time.perf_counter() + seconds
    while len(found) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        found.append(time.perf_counter() - start)
    return found


def timings(call, seconds: float) -> dict:
    """Median and p90 seconds of `call` over at least 3 calls and about `seconds`, after one warm-up call."""
    found = samples_of(call, seconds)
    return {"median_s": statistics.median(found), "p90_s": float(np.percentile(found, 90))}


def fmt(values: list[float]) -> str:
    return "/".join(f"{100 * v:.2f}" for v in values)


def print_goals(goals: list[tuple[str, str, bool | None]]) -> None:
    print("\n| goal | measured | met |\n|---|---|---|")
    for goal, measured, met in goals:
        print(f"| {goal} | {measured} | {'-' if met is None else 'yes' if met else 'NO'} |")


if __name__ == "__main__":
    main()
