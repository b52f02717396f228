"""The `finetune-serve` command line: train and evaluate here; export, predict and models in artifacts_cli."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from .artifacts_cli import add_commands, column_flags
from .config import PRECISIONS, TASKS, TRUNCATIONS
from .errors import FinetuneError
from .gen_config import GENERATION_TASK, METHODS
from .search_space import PRUNERS, SAMPLERS

DEFAULT_CONFIG_HELP = "defaults live in finetune_core/config.py"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        return args.handler(args)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-serve", description="Fine-tune, evaluate, export and serve models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a model on a labelled dataset", description=DEFAULT_CONFIG_HELP)
    job_flags(train)
    train.add_argument("--output", help="run folder to write")
    train.add_argument("--resume", metavar="DIR", help="continue an interrupted run in DIR from its last checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=cmd_train)

    search = commands.add_parser("search", help="hyperparameter search: an Optuna study of isolated training runs",
                                 description=DEFAULT_CONFIG_HELP + "; the search block's defaults in finetune_core/search_space.py")
    job_flags(search)
    search.add_argument("--output", required=True, help="search folder to write (run the same command again to resume)")
    search.add_argument("--trials", type=int, help="trials to complete or prune (default 10)")
    search.add_argument("--sampler", choices=list(SAMPLERS))
    search.add_argument("--pruner", choices=list(PRUNERS))
    search.add_argument("--metric", help="validation.<metric> to optimise (default: the early-stopping metric)")
    search.add_argument("--timeout", type=float, dest="timeout_s", help="start no trial after this many seconds")
    search.add_argument("--storage", help="SQLAlchemy URL of the study's database (default: sqlite:///OUTPUT/search.db)")
    search.set_defaults(handler=cmd_search)

    ev = commands.add_parser("evaluate", help="evaluate a trained model folder on a labelled file")
    ev.add_argument("--model", required=True, help="RUN_DIR/model")
    ev.add_argument("--data", required=True, help="a labelled file; for image models a class folder or an image list")
    column_flags(ev)
    ev.add_argument("--batch-size", type=int, default=128)
    ev.set_defaults(handler=cmd_evaluate)

    distill = commands.add_parser("distill", help="distil a registered version into a smaller, faster student, "
                                  "registered as a new version with the distilled and distilled-int8 variants",
                                  description="defaults: DistillConfig in finetune_core/config.py")
    distill.add_argument("--model", required=True, help="the teacher: NAME:vN (NAME alone: production, else latest)")
    distill.add_argument("--config", help="YAML or JSON file with a distill: block; flags override it")
    distill.add_argument("--alpha", type=float, help="weight of the distillation term; the labels get 1 - alpha")
    distill.add_argument("--temperature", type=float)
    distill.add_argument("--layers", dest="student_layers", type=_int_list,
                         help="text: the teacher's encoder layers to keep, e.g. 1,3,5 (default: every other, the last kept)")
    distill.add_argument("--hidden-weight", type=float,
                         help="text: weight of matching the kept layers' hidden states to the teacher's (0: off)")
    distill.add_argument("--student", help="text: a local model folder using the teacher's tokenizer, instead of --layers")
    distill.add_argument("--image-size", type=int, help="images: the student's input in pixels; 0: the teacher's")
    distill.add_argument("--block-depths", type=_int_list, help="images: blocks kept per stage, e.g. 1,2,2,3,2,2,1")
    distill.add_argument("--distill-data", help="extra unlabelled rows (a table with the text column, or images)")
    distill.add_argument("--max-rows", type=int, help="rows distilled on, a seeded sample; 0: all")
    distill.add_argument("--epochs", type=int)
    distill.add_argument("--learning-rate", type=float, help="default: the teacher's")
    distill.add_argument("--gate", dest="distill_gate", type=float,
                         help="accuracy points the student may lose against the teacher before it is refused")
    distill.add_argument("--seed", type=int)
    distill.add_argument("--train", help="labelled rows to distil on when the version's training run is gone (with --validation)")
    distill.add_argument("--validation", help="labelled rows for early stopping and the gate (with --train)")
    distill.add_argument("--output", help="the student's run folder (default: runs/distill-NAME-VERSION under the registry)")
    distill.add_argument("--quiet", action="store_true", help="no progress bar")
    distill.set_defaults(handler=cmd_distill)

    add_commands(commands)  # export, predict, models
    return parser


def job_flags(parser: argparse.ArgumentParser) -> None:
    """The data, model and train flags `train` and `search` share, and --config."""
    parser.add_argument("--train", help="training file (JSONL, CSV, Parquet); images: a class folder, a dataset root or an image list")
    parser.add_argument("--validation", help="validation file; default: 10%% of train")
    parser.add_argument("--test", help="test file; default: 10%% of train when no validation file is given")
    parser.add_argument("--task", choices=[*TASKS, GENERATION_TASK])
    column_flags(parser, remembered=False)
    parser.add_argument("--model", help='base model: "default" (bundled all-MiniLM-L6-v2), a folder or a hub id')
    parser.add_argument("--epochs", type=_or_auto(int), help="default auto: from the training rows (data report)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=_or_auto(float), help="default: the task's (images: auto)")
    parser.add_argument("--max-length", type=_or_auto(int), help="text: tokens; default auto, from the rows' lengths")
    parser.add_argument("--truncation", choices=[*TRUNCATIONS, "auto"],
                        help="text longer than max-length keeps its head, or head and tail; default auto")
    parser.add_argument("--image-size", type=_or_auto(int),
                        help="image tasks: input pixels; 0: the model's own (224); default auto, from the images")
    parser.add_argument("--no-augment", dest="augment", action="store_const", const=False, help="image tasks: no training augmentation")
    parser.add_argument("--no-flip", dest="horizontal_flip", action="store_const", const=False,
                        help="image tasks: no horizontal flips (where mirroring changes the label)")
    parser.add_argument("--freeze", help="none | embeddings | bottom:N | all-but-head")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--precision", choices=list(PRECISIONS))
    parser.add_argument("--config", help="YAML or JSON file with data/model/train sections; flags override it")
    gen = parser.add_argument_group("text generation (--task text-generation; defaults in finetune_core/gen_config.py)")
    gen.add_argument("--prompt-column", help="column holding the prompt (default prompt)")
    gen.add_argument("--completion-column", help="column holding the answer to learn (default completion)")
    gen.add_argument("--messages-column", help="column holding chat turns [{role, content}] (default messages)")
    gen.add_argument("--system-prompt", help="a system turn put before every prompt")
    gen.add_argument("--adapter", choices=list(METHODS), help="lora (default) or full fine-tuning")
    gen.add_argument("--lora-rank", type=int)
    gen.add_argument("--packing", action="store_const", const=True,
                     help="pack short training conversations into max-length rows (each attends only to itself)")
    gen.add_argument("--max-new-tokens", type=int, help="the longest generated answer in evaluation")


def _or_auto(kind):
    """An argparse type taking a number or "auto"."""
    def parse(text: str):
        return text if text == "auto" else kind(text)

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def raw_config(args) -> dict:
    """The config file's sections with the flags laid over them (not yet checked)."""
    from .config import load_config, merge

    raw = load_config(args.config) if args.config else {}
    flags = {
        "data": {"train": args.train, "validation": args.validation, "test": args.test, "task": args.task,
                 "text_column": args.text_column, "label_column": args.label_column,
                 "image_column": args.image_column, "max_length": args.max_length, "truncation": args.truncation,
                 "image_size": args.image_size, "augment": args.augment, "horizontal_flip": args.horizontal_flip},
        "model": {"base_model": args.model, "freeze": args.freeze},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                  "seed": args.seed, "precision": args.precision},
    }
    return merge(raw, flags)


def cmd_train(args) -> int:
    from .config import config_from_dict
    from .errors import ConfigError
    from .gen_config import generation_job_from_dict
    from .gen_pipeline import run_generation
    from .pipeline import run_training

    if args.resume:
        output, resume, cfg = args.resume, True, None
        generation = _saved_task(Path(output)) == GENERATION_TASK
    else:
        if not args.output:
            raise ConfigError("--output: a run folder is required (or --resume DIR)")
        raw = raw_config(args)
        generation = (raw.get("task") or raw.get("data", {}).get("task")) == GENERATION_TASK
        cfg = generation_job_from_dict(generation_config(raw, args)) if generation else config_from_dict(raw)
        output, resume = args.output, False
    bar = None if args.quiet else _ProgressBar()
    run = run_generation if generation else run_training
    try:
        with _stop_on_signals() as stop:
            metrics = run(cfg, output, resume=resume, on_event=bar, should_stop=stop.is_set)
    finally:
        if bar:
            bar.close()
    if metrics["train"]["status"] == "cancelled":
        print(f"cancelled; continue with: finetune-serve train --resume {output}", file=sys.stderr)
        return 3
    print(json.dumps(_generation_summary(metrics) if generation else _summary(metrics), indent=2))
    return 0


def _saved_task(output: Path) -> str | None:
    from .pipeline import saved_config

    try:
        saved = saved_config(output)
    except (FinetuneError, OSError, ValueError):
        return None  # run_training says what is wrong with the folder
    return saved.get("task") or saved.get("data", {}).get("task")


def generation_config(raw: dict, args) -> dict:
    """The text-generation job's sections from the shared flags and config file, with its own flags over them."""
    from .config import merge

    data = {k: v for k, v in raw.get("data", {}).items()
            if k in ("train", "validation", "test", "max_length", "prompt_column", "completion_column",
                     "messages_column", "system_prompt", "max_new_tokens", "eval_rows", "split_seed", "packing")}
    train = {k: v for k, v in raw.get("train", {}).items() if v is not None}
    gen = {"data": {**data, "prompt_column": args.prompt_column, "completion_column": args.completion_column,
                    "messages_column": args.messages_column, "system_prompt": args.system_prompt,
                    "max_new_tokens": args.max_new_tokens, "packing": args.packing},
           "adapter": {"method": args.adapter, "rank": args.lora_rank}}
    merged = merge({"data": {}, "adapter": raw.get("adapter") or {}, "train": train}, gen)
    base = raw.get("base_model") or raw.get("model", {}).get("base_model")
    return {**merged, **({"base_model": base} if base and base != "default" else {})}


def _generation_summary(metrics: dict) -> dict:
    keep = ("loss", "perplexity", "exact_match", "rouge_l")
    scored = metrics["test"] or metrics["validation"]
    return {"base": {k: metrics["base"][k] for k in keep}, "fine_tuned": {k: scored[k] for k in keep if k in scored},
            "scored_split": metrics.get("scored_split"), "train": metrics["train"]}


def cmd_search(args) -> int:
    from .config import config_from_dict, merge
    from .search import run_search
    from .search_space import search_spec_from_dict

    raw = raw_config(args)
    # The config file's `search:` block is the REST request's `search`; the flags override it.
    flags = {"trials": args.trials, "sampler": args.sampler, "pruner": args.pruner, "metric": args.metric,
             "timeout_s": args.timeout_s}
    search = merge({"search": raw.pop("search", None) or {}}, {"search": flags})["search"]
    cfg = config_from_dict(raw)
    spec = search_spec_from_dict(search, cfg)
    with _stop_on_signals() as stop:
        summary = run_search(cfg, spec, args.output, storage=args.storage, on_event=_TrialLines(), should_stop=stop.is_set)
    if summary.status == "cancelled":
        print("cancelled; run the same command again to resume the search", file=sys.stderr)
        return 3
    print(json.dumps({"status": summary.status, "trials_done": summary.trials_done, "metric": summary.metric,
                      "best": {"number": summary.best.number, "params": summary.best.params, "value": summary.best.value,
                               "run_dir": str(Path(args.output) / "best")}}, indent=2))
    return 0


@contextlib.contextmanager
def _stop_on_signals():
    """First SIGTERM/Ctrl-C: stop at the next step and save a checkpoint (the yielded event is set). A second: stop now."""
    stop = threading.Event()

    def request_stop(*_):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _summary(metrics: dict) -> dict:
    keep = ("accuracy", "macro_f1", "weighted_f1", "loss", "mse", "mae", "r2", "pearson", "n")
    out = {role: {k: v for k, v in metrics[role].items() if k in keep} for role in ("validation", "test") if metrics[role]}
    return {**out, "train": metrics["train"], "diagnosis": metrics["diagnosis"]["summary"]}


def _int_list(text: str) -> list[int]:
    """"1,3,5" -> [1, 3, 5] (argparse names the flag when int() fails)."""
    return [int(part) for part in text.split(",") if part.strip()]


def cmd_distill(args) -> int:
    from . import registry
    from .config import distill_config_from_dict, load_config, merge
    from .distill import distill_version

    raw = load_config(args.config).get("distill") or {} if args.config else {}
    flags = {name: getattr(args, name) for name in ("alpha", "temperature", "student_layers", "hidden_weight", "student",
                                                    "image_size",
                                                    "block_depths", "distill_data", "max_rows", "epochs",
                                                    "learning_rate", "distill_gate", "seed")}
    dcfg = distill_config_from_dict(merge({"distill": raw}, {"distill": flags})["distill"])
    name, ref = registry.parse_ref(args.model)
    teacher = registry.resolve(name, ref)
    output = args.output or registry.root() / "runs" / f"distill-{teacher.name}-{teacher.version}"
    bar = None if args.quiet else _ProgressBar()
    try:
        with _stop_on_signals() as stop:
            info = distill_version(teacher.name, teacher.version, dcfg, output, train=args.train,
                                   validation=args.validation, on_event=bar, should_stop=stop.is_set)
    finally:
        if bar:
            bar.close()
    if info is None:
        print(f"cancelled; the student's checkpoints are in {output}", file=sys.stderr)
        return 3
    records = info.manifest.variants
    print(json.dumps({"model": info.ref, "teacher": teacher.ref, "student_run": str(output),
                      "variants": {v: {"accepted": r.accepted, "reason": r.reason} for v, r in records.items()},
                      "distilled": {k: v for k, v in records["distilled"].to_dict().items()
                                    if k not in ("proof", "per_class", "confusion_matrix", "labels")}}, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from .metadata import read_meta
    from .pipeline import evaluate_saved

    if read_meta(args.model).task == GENERATION_TASK:  # text_column / label_column name the prompt and completion
        from .gen_pipeline import evaluate_saved_generation

        metrics = evaluate_saved_generation(args.model, args.data, args.text_column, args.label_column,
                                            batch_size=min(args.batch_size, 16))
    else:
        metrics = evaluate_saved(args.model, args.data, args.text_column, args.label_column, args.image_column,
                                 args.batch_size)
    print(json.dumps(metrics, indent=2))
    return 0


class _TrialLines:
    """One line per finished trial on stderr: its state, metric and values, and the best so far."""

    def __call__(self, event: dict) -> None:
        if event["type"] != "trial_end":
            return
        value = "-" if event["value"] is None else f"{event['value']:.4f}"
        best = event["best"]
        best = f"best {best['value']:.4f} (trial {best['number']})" if best else "no complete trial yet"
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in event["params"].items())
        error = f" error: {event['error']}" if event["state"] == "failed" else ""
        print(f"trial {event['number']} {event['state']}: {event['metric']}={value} ({event['trials_done']}/"
              f"{event['trials']} done, {best}) {params}{error}", file=sys.stderr, flush=True)


class _ProgressBar:
    """A terminal progress bar with ETA, fed by training events."""

    def __init__(self):
        self.bar = None

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        kind = event["type"]
        if kind == "start":
            self.bar = tqdm(total=event["total_steps"], initial=event["step"], unit="step", desc="training", file=sys.stderr)
        elif kind == "step" and self.bar:
            self.bar.update(event["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{event['loss']:.4f}", samples_s=f"{event['samples_per_second']:.0f}")
        elif kind == "eval" and self.bar:
            shown = {k: round(v, 4) for k, v in event["metrics"].items() if k in ("accuracy", "macro_f1", "loss", "r2")}
            self.bar.write(f"epoch {event['epoch']} step {event['step']} validation {shown}", file=sys.stderr)
        elif kind == "end" and self.bar:
            self.bar.update(event["step"] - self.bar.n)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _quiet_libraries() -> None:
    """transformers prints a load report and progress bars for every model load; the CLI shows its own."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if __name__ == "__main__":
    sys.exit(main())
