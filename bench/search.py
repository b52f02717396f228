"""Hyperparameter search on the real MiniLM and SST-2: what a 10-trial TPE search with median pruning finds.

The search varies the learning rate (1e-5..3e-4, log), the warm-up share (0..0.2) and the freeze policy
(none, embeddings, bottom:2): the default text space of finetune_core/search_space.py. Every run, the
default config's included, trains one epoch on the first --rows rows of examples/sst2_sample/train.jsonl
and is scored on the 872 gold dev rows (examples/sst2_sample/validation.jsonl), evaluating four times
an epoch so the pruner has something to judge a trial by (patience 0: no early stopping within the epoch). Each run is a child process (as in the
service), so the search process's own peak RSS should stay flat from trial 2 to the last.

    python bench/search.py [--trials 10] [--rows 2000] [--model default] [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this tree's core, whatever is installed

SAMPLE = ROOT / "examples" / "sst2_sample"
BATCH_SIZE = 32
EVALUATIONS_PER_EPOCH = 4
MIN_EVAL_STEPS = 4  # each evaluation scores all 872 dev rows: on a small --rows, no more often than this


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--rows", type=int, default=2000, help="first N rows of the SST-2 sample (default 2000)")
    parser.add_argument("--model", default="default", help="base model (default: the bundled MiniLM)")
    parser.add_argument("--output", help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the trial processes inherit it: no load reports
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from finetune_core.config import config_from_dict
    from finetune_core.isolated import run_isolated
    from finetune_core.search import run_search
    from finetune_core.search_space import search_spec_from_dict

    out = Path(args.output or tempfile.mkdtemp(prefix="search-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = (SAMPLE / "train.jsonl").read_text().splitlines()[: args.rows]
    train = out / "train.jsonl"
    train.write_text("\n".join(rows) + "\n")
    steps = math.ceil(len(rows) / BATCH_SIZE)
    cfg = config_from_dict({
        "data": {"train": str(train), "validation": str(SAMPLE / "validation.jsonl")},
        "model": {"base_model": args.model},
        # Patience 0: in one epoch of quarter-epoch evaluations, the default patience (2 evaluations) would
        # stop a run half-way; the best evaluation's weights are kept either way.
        "train": {"epochs": 1, "batch_size": BATCH_SIZE, "early_stopping_patience": 0,
                  "eval_every_steps": max(MIN_EVAL_STEPS, steps // EVALUATIONS_PER_EPOCH)},
    })
    spec = search_spec_from_dict({"trials": args.trials, "sampler": "tpe", "pruner": "median"}, cfg)

    started = time.perf_counter()
    default = run_isolated(cfg, out / "default")
    default_seconds = time.perf_counter() - started
    rss: dict[int, tuple[float, float]] = {}

    def on_event(event: dict) -> None:
        if event["type"] == "trial_end":
            rss[event["trials_done"]] = (_peak_mb(resource.RUSAGE_SELF), _peak_mb(resource.RUSAGE_CHILDREN))
            print(f"trial {event['number']} {event['state']} {event['value']}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    summary = run_search(cfg, spec, out / "search", on_event=on_event)
    search_seconds = time.perf_counter() - started

    names = [p.name for p in spec.space]
    print(f"\n{len(rows)} SST-2 rows, 1 epoch, batch {BATCH_SIZE}, {args.model} model; dev = 872 gold rows; "
          f"{spec.trials} trials, TPE + median pruning; runs in {out}\n")
    print("| trial | " + " | ".join(names) + " | state | dev accuracy | evaluations |")
    print("|---:|" + "---|" * len(names) + "---|---:|---:|")
    for trial in summary.trials:
        evaluations = _evaluations(out / "search" / trial.run_dir) if trial.run_dir else 0
        values = [_shown(trial.params.get(n)) for n in names]
        accuracy = "" if trial.value is None else f"{100 * trial.value:.2f}%"
        print(f"| {trial.number} | " + " | ".join(values) + f" | {trial.state} | {accuracy} | {evaluations} |")
    pruned = sum(t.state == "pruned" for t in summary.trials)
    best = summary.best
    print(f"\ndefault config (learning_rate {_shown(cfg.train.learning_rate)}, warm-up {cfg.train.warmup_ratio}, freeze "
          f"{cfg.model.freeze}): dev accuracy {100 * default['validation']['accuracy']:.2f}% in {default_seconds:.0f} s")
    if best:
        print(f"best trial {best.number} ({', '.join(f'{k}={_shown(v)}' for k, v in best.params.items())}): dev accuracy "
              f"{100 * best.value:.2f}%")
    print(f"pruned: {pruned} of {len(summary.trials)} trials ({100 * pruned / max(1, len(summary.trials)):.0f}%); "
          f"search wall time {search_seconds:.0f} s")
    for done in sorted({2, summary.trials_done} & set(rss)):
        own, children = rss[done]
        print(f"peak RSS after trial {done}: search process {own:.0f} MB, largest trial process {children:.0f} MB")
    (out / "bench.json").write_text(json.dumps({"default_accuracy": default["validation"]["accuracy"],
                                                "search": summary.to_dict(), "rss_mb": rss}, indent=2))


def _peak_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kilobytes on Linux


def _evaluations(run_dir: Path) -> int:
    events = run_dir / "events.jsonl"
    return sum('"type": "eval"' in line for line in events.open()) if events.exists() else 0


def _shown(value) -> str:
    return f"{value:.2e}" if isinstance(value, float) and value < 0.01 else f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
