"""run_generation(): the text-generation recipe, the counterpart of pipeline.run_training().

Outputs in the run folder:
  model/             the merged fine-tuned model + tokenizer (transformers format); model/adapter/ the LoRA
                     adapters alone (peft format)
  splits/            the conversations each split used ({"messages": [...]} JSONL)
  metrics.json       {"base": {...}, "validation": {...}, "test": {...}, "train": {...}}: loss, perplexity,
                     exact match and ROUGE-L of greedy answers, for the base model and the fine-tuned one
  samples.jsonl      held-out prompts with the reference, the base model's and the fine-tuned model's answers
  data_report.json   rows kept and dropped (and why), token lengths, prompts and answers cut
  plots/curves.png   training and validation loss; events.jsonl and tensorboard/ as for every run
  checkpoints/       best.pt and last.pt (resume with resume=True)
  config.json        the full configuration used
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from . import gen_data, gen_model
from .errors import ConfigError
from .gen_config import GENERATION_TASK, GenerationJob, generation_job_from_dict
from .gen_eval import answer_scores, causal_lm_loss, greedy_answers, token_loss
from .metadata import ModelMeta, write_meta
from .pipeline import EventLog, prepare_run_folder, saved_config, torch_threads
from .plots import plot_curves
from .train import EventFn, fit

SAMPLES = 20  # held-out answers written to samples.jsonl


def run_generation(job: GenerationJob | None, output: str | Path, *, resume: bool = False,
                   on_event: EventFn | None = None, should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Fine-tune a causal language model on prompt/answer rows; returns the metrics (also in metrics.json)."""
    output = Path(output)
    if resume:
        job = generation_job_from_dict(saved_config(output))
    prepare_run_folder(output, resume, {"task": "text-generation", **job.to_dict()},
                       extra_outputs=("samples.jsonl", "base_metrics.json"))
    with torch_threads(job.train.num_threads):
        return _run(job, output, resume, on_event, should_stop, time.perf_counter())


def _splits(job: GenerationJob) -> tuple[dict[str, list], dict]:
    """Conversations per split (the given files, else a seeded 80/10/10 of train) and what was dropped."""
    d = job.data
    train = gen_data.read_conversations(d.train, d, "train")
    dropped = {"train": train.dropped}
    if d.validation:
        validation = gen_data.read_conversations(d.validation, d, "validation")
        dropped["validation"] = validation.dropped
        splits = {"train": train.turns, "validation": validation.turns}
        if d.test:
            test = gen_data.read_conversations(d.test, d, "test")
            splits["test"], dropped["test"] = test.turns, test.dropped
        return splits, dropped
    if len(train.turns) < 10:
        raise ConfigError(f"data.train: {len(train.turns)} usable rows; at least 10 are needed to hold out "
                          "validation and test rows (or give data.validation)")
    parts = gen_data.split_conversations(train.turns, d.split_seed)
    return {role: [train.turns[i] for i in idx] for role, idx in zip(("train", "validation", "test"), parts)}, dropped


def _run(job: GenerationJob, output: Path, resume: bool, on_event, should_stop, started: float) -> dict:
    tc, d = job.train, job.data
    splits, dropped = _splits(job)
    folder = output / "splits"
    folder.mkdir(exist_ok=True)
    for role, turns in splits.items():
        (folder / f"{role}.jsonl").write_text("".join(json.dumps({"messages": t}) + "\n" for t in turns))

    torch.manual_seed(tc.seed)  # the adapters' initial weights
    model, tokenizer = gen_model.load_causal_lm(job.base_model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    rows, report = {}, {"rows": {role: len(t) for role, t in splits.items()}, "dropped": dropped, "tokens": {}}
    for role, turns in splits.items():
        rows[role], report["tokens"][role] = gen_data.encode(tokenizer, turns, d.max_length)
    if d.packing:
        rows["train"], report["packing"] = gen_data.pack(rows["train"], d.max_length)
    held_out = splits.get("test") or splits["validation"]
    scored = held_out[: d.eval_rows]
    references = [turns[-1]["content"] for turns in scored]

    def answers_and_scores(m) -> tuple[list[str], dict]:
        answers = greedy_answers(m, tokenizer, scored, d.max_new_tokens, tc.eval_batch_size, d.max_length)
        return answers, answer_scores(answers, references)

    sink = EventLog(output, on_event)
    try:
        base_answers, base_file = None, output / "base_metrics.json"
        if resume and base_file.is_file():  # measured before the interruption
            base_scores = json.loads(base_file.read_text())
        else:  # the base model's figures, before any adapter exists
            base_answers, base_scores = answers_and_scores(model)
            base_scores = {**token_loss(model, rows["validation"], tc.eval_batch_size), **base_scores}
            base_file.write_text(json.dumps(base_scores, indent=2))
        model, adapters = gen_model.add_adapters(model, job.adapter)
        report["parameters"] = adapters
        (output / "data_report.json").write_text(json.dumps(report, indent=2))
        sink({"type": "data", "report": {"rows": report["rows"], "dropped": dropped}, "parameters": adapters})

        result = fit(model, rows["train"], tc, loss_fn=causal_lm_loss,
                     evaluate_fn=lambda m: token_loss(m, rows["validation"], tc.eval_batch_size),
                     checkpoint_dir=output / "checkpoints", resume=resume, on_event=sink, should_stop=should_stop)
        train_info = {"status": result.status, "samples_per_second": round(result.samples_per_second, 2),
                      "wall_seconds": round(time.perf_counter() - started, 2), "train_seconds": round(result.wall_seconds, 2),
                      "epochs_run": result.epochs_run, "steps": result.global_step, "precision": result.precision,
                      "best_step": result.best_step, "best_loss": result.best_metric, "device": device.type}
        if result.status == "cancelled":
            return {"base": base_scores, "validation": None, "test": None, "train": train_info}

        # Saved first (merging the adapters into the weights), then scored as saved: the merged model is the one
        # exported and served, and it generates faster than base + adapters.
        model = gen_model.save(model, tokenizer, output / "model")
        write_meta(ModelMeta(task=GENERATION_TASK, labels=None, base_model=job.base_model, max_length=d.max_length,
                             text_column=d.prompt_column, label_column=d.completion_column), output / "model")
        tuned_answers, tuned_scores = answers_and_scores(model)
        metrics = {"base": base_scores,
                   "validation": token_loss(model, rows["validation"], tc.eval_batch_size),
                   "test": {**token_loss(model, rows["test"], tc.eval_batch_size), **tuned_scores} if "test" in rows
                   else None,
                   "scored_split": "test" if "test" in splits else "validation", "scored_rows": len(scored),
                   "train": train_info}
        if metrics["test"] is None:
            metrics["validation"].update(tuned_scores)
        with (output / "samples.jsonl").open("w") as f:
            for i in range(min(SAMPLES, len(scored))):
                f.write(json.dumps({"prompt": gen_data.last_prompt(scored[i]), "reference": references[i],
                                    "base": base_answers[i] if base_answers else None, "fine_tuned": tuned_answers[i]}) + "\n")
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plots = output / "plots"
        plots.mkdir(exist_ok=True)
        plot_curves(sink.steps, result.history, "perplexity", plots / "curves.png")
        scored_metrics = metrics["test"] or metrics["validation"]
        sink({"type": "done", "metrics": {"base": {k: base_scores[k] for k in ("perplexity", "exact_match", "rouge_l")},
                                          "fine_tuned": {k: scored_metrics[k] for k in ("perplexity", "exact_match", "rouge_l")}}})
        return metrics
    finally:
        sink.close()


def evaluate_saved_generation(model_dir: str | Path, data: str, prompt_column: str | None = None,
                              completion_column: str | None = None, max_new_tokens: int = 64,
                              batch_size: int = 16) -> dict:
    """A saved (merged) model on a table of prompts and completions: answer loss and perplexity, and exact
    match and ROUGE-L of its greedy answers. Columns default to the ones it was trained with."""
    from .gen_config import GenDataConfig
    from .metadata import read_meta

    meta = read_meta(model_dir)
    columns = GenDataConfig(train=str(data), prompt_column=prompt_column or meta.text_column,
                            completion_column=completion_column or meta.label_column)
    read = gen_data.read_conversations(data, columns, "evaluation")
    model, tokenizer = gen_model.load_saved(model_dir)
    rows, report = gen_data.encode(tokenizer, read.turns, meta.max_length or 256)
    answers = greedy_answers(model, tokenizer, read.turns, max_new_tokens, batch_size, meta.max_length)
    references = [turns[-1]["content"] for turns in read.turns]
    return {**token_loss(model, rows, batch_size), **answer_scores(answers, references), "rows": len(read.turns),
            "dropped": read.dropped, "tokens_report": report, "max_new_tokens": max_new_tokens}
