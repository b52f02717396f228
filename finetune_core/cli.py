"""The `finetune-serve` command line: train and evaluate here; export, predict and models in artifacts_cli."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from .artifacts_cli import add_commands
from .config import TASKS
from .errors import FinetuneError

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
    train.add_argument("--train", help="training file (JSONL, CSV, Parquet); images: a class folder, a dataset root or an image list")
    train.add_argument("--validation", help="validation file; default: 10%% of train")
    train.add_argument("--test", help="test file; default: 10%% of train when no validation file is given")
    train.add_argument("--task", choices=list(TASKS))
    train.add_argument("--text-column")
    train.add_argument("--label-column")
    train.add_argument("--model", help='base model: "default" (bundled all-MiniLM-L6-v2), a folder or a hub id')
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--learning-rate", type=float)
    train.add_argument("--max-length", type=int)
    train.add_argument("--image-size", type=int, help="image tasks: input pixels (default: the model's own, 224)")
    train.add_argument("--no-augment", dest="augment", action="store_const", const=False, help="image tasks: no training augmentation")
    train.add_argument("--no-flip", dest="horizontal_flip", action="store_const", const=False,
                       help="image tasks: no horizontal flips (where mirroring changes the label)")
    train.add_argument("--freeze", help="none | embeddings | bottom:N | all-but-head")
    train.add_argument("--seed", type=int)
    train.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    train.add_argument("--config", help="YAML or JSON file with data/model/train sections; flags override it")
    train.add_argument("--output", help="run folder to write")
    train.add_argument("--resume", metavar="DIR", help="continue an interrupted run in DIR from its last checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=cmd_train)

    ev = commands.add_parser("evaluate", help="evaluate a trained model folder on a labelled file")
    ev.add_argument("--model", required=True, help="RUN_DIR/model")
    ev.add_argument("--data", required=True, help="a labelled file; for image models a class folder or an image list")
    ev.add_argument("--text-column", default="text")
    ev.add_argument("--label-column", default="label")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.set_defaults(handler=cmd_evaluate)

    add_commands(commands)  # export, predict, models
    return parser


def cmd_train(args) -> int:
    from .config import config_from_dict, load_config, merge
    from .errors import ConfigError
    from .pipeline import run_training

    if args.resume:
        output, resume, cfg = args.resume, True, None
    else:
        if not args.output:
            raise ConfigError("--output: a run folder is required (or --resume DIR)")
        raw = load_config(args.config) if args.config else {}
        flags = {
            "data": {"train": args.train, "validation": args.validation, "test": args.test, "task": args.task,
                     "text_column": args.text_column, "label_column": args.label_column, "max_length": args.max_length,
                     "image_size": args.image_size, "augment": args.augment, "horizontal_flip": args.horizontal_flip},
            "model": {"base_model": args.model, "freeze": args.freeze},
            "train": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                      "seed": args.seed, "precision": args.precision},
        }
        cfg = config_from_dict(merge(raw, flags))
        output, resume = args.output, False
    stop = threading.Event()

    def request_stop(*_):
        """First SIGTERM/Ctrl-C: stop at the next step and save a checkpoint. A second: stop now."""
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    bar = None if args.quiet else _ProgressBar()
    try:
        metrics = run_training(cfg, output, resume=resume, on_event=bar, should_stop=stop.is_set)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if bar:
            bar.close()
    if metrics["train"]["status"] == "cancelled":
        print(f"cancelled; continue with: finetune-serve train --resume {output}", file=sys.stderr)
        return 3
    print(json.dumps(_summary(metrics), indent=2))
    return 0


def _summary(metrics: dict) -> dict:
    keep = ("accuracy", "macro_f1", "weighted_f1", "loss", "mse", "mae", "r2", "pearson", "n")
    return {role: ({k: v for k, v in m.items() if k in keep} if role != "train" else m) for role, m in metrics.items() if m}


def cmd_evaluate(args) -> int:
    from .pipeline import evaluate_saved

    metrics = evaluate_saved(args.model, args.data, args.text_column, args.label_column, args.batch_size)
    print(json.dumps(metrics, indent=2))
    return 0


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
