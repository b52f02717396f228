"""export_generation(): build, prove, measure and register a fine-tuned causal LM (the generation counterpart
of artifacts.export_version).

The version holds the merged PyTorch model (`pytorch`, the reference) and its ONNX form with a KV cache in
onnxruntime-genai's layout (`onnx-genai`, run by gen_export.OnnxGenerator). The ONNX model is registered only when its greedy tokens are identical
to the PyTorch model's on held-out prompts, alone and in batches; both are timed in tokens/s on the same
prompts, and the manifest records the figures.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from . import gen_data, gen_export, registry
from .errors import DataError, ModelError
from .gen_config import GENERATION_TASK
from .artifacts import run_metrics
from .metadata import Manifest, VariantRecord, read_meta
from .predict import measuring_machine

MODEL_FOLDER = "model"
ONNX_FOLDER = "onnx-genai"
PROOF_PROMPTS = 16
PROOF_NEW_TOKENS = 32


def export_generation(model_dir: str | Path, name: str, run_dir: str | Path | None = None,
                      prompts: int = PROOF_PROMPTS, max_new_tokens: int = PROOF_NEW_TOKENS) -> registry.VersionInfo:
    """Register RUN_DIR/model with its proven ONNX form; the proof prompts are the run's held-out split."""
    from . import gen_model

    registry.validate_name(name)
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    if meta.task != GENERATION_TASK:
        raise ModelError(f"'{model_dir}' is a {meta.task} model; export it with export_version")
    run_dir = Path(run_dir) if run_dir is not None else model_dir.parent
    conversations = held_out_conversations(run_dir)[:prompts]
    model, tokenizer = gen_model.load_saved(model_dir)
    prompt_ids = [gen_data.prompt_ids(tokenizer, turns[:-1]) for turns in conversations]
    with tempfile.TemporaryDirectory(prefix="finetune-export-") as scratch:
        staging = Path(scratch) / "version"
        shutil.copytree(model_dir, staging / MODEL_FOLDER)
        onnx_dir = gen_export.build_onnx(model_dir, staging / ONNX_FOLDER, "fp32")
        generator = gen_export.OnnxGenerator(onnx_dir, tokenizer.eos_token_id)
        reference = gen_export.eager_greedy(model, tokenizer, prompt_ids, max_new_tokens)
        proof = gen_export.prove_greedy(reference, generator, prompt_ids, max_new_tokens, tokenizer)
        speed = tokens_per_second(model, tokenizer, generator, prompt_ids, max_new_tokens)
        records = {
            "pytorch": VariantRecord(True, "the merged fine-tuned model (reference)", file=MODEL_FOLDER,
                                     figures=speed["pytorch"]),
            "onnx-genai": VariantRecord(True, f"identical greedy tokens on {proof['prompts']} held-out prompts, alone "
                                        f"and in batches of {proof['batch']}", file=ONNX_FOLDER, proof=proof,
                                        figures=speed["onnx-genai"]),
        }
        metrics = run_metrics(run_dir)
        manifest = Manifest(model=meta, variants=records,
                            proof={"prompts": len(prompt_ids), "max_new_tokens": max_new_tokens, "machine": measuring_machine()},
                            source_run=str(run_dir.resolve()), training_metrics=metrics.get("train"),
                            validation_metrics=metrics.get("test") or metrics.get("validation"))
        return registry.register(name, staging, manifest)


def tokens_per_second(model, tokenizer, generator: gen_export.OnnxGenerator, prompts: list[list[int]],
                      max_new_tokens: int, batches: tuple[int, ...] = (1, 8)) -> dict:
    """Generated tokens per second, greedy, for transformers' generate on the merged model (left-padded
    batches) and for the ONNX model (right-padded batches), at each batch size, on the same prompts."""
    def eager(group):
        return gen_export.eager_generate(model, tokenizer, group, max_new_tokens)

    def onnx(group):
        return generator.generate(group, max_new_tokens)

    return {variant: {f"tokens_per_second_b{size}": round(generation_rate(generate, prompts, size), 1)
                      for size in batches}
            for variant, generate in (("pytorch", eager), ("onnx-genai", onnx))}


def generation_rate(generate, prompts: list[list[int]], size: int) -> float:
    """Tokens per second of generate(group) -> list[Generated] over the prompts in groups of `size`."""
    started, produced = time.perf_counter(), 0
    for i in range(0, len(prompts), size):
        produced += sum(len(g.tokens) for g in generate(prompts[i:i + size]))
    return produced / (time.perf_counter() - started)


def held_out_conversations(run_dir: Path) -> list[list[dict]]:
    for role in ("test", "validation"):
        path = run_dir / "splits" / f"{role}.jsonl"
        if path.is_file():
            return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]
    raise DataError(f"'{run_dir}' has no splits/test.jsonl or splits/validation.jsonl to prove the export on; "
                    "pass the training run's folder")
