"""The served form of a fine-tuned causal LM: ONNX with a KV cache, run by onnxruntime-genai, proven against
the eager model by identical greedy tokens on real prompts.

onnxruntime-genai's model builder writes the decoder (fused GroupQueryAttention, KV cache inputs and
outputs) and genai_config.json; its C++ generation loop runs prefill and decoding without Python in
between. One volatile backend behind these functions (STYLE rule 8).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FinetuneError

PROOF_BATCH = 8  # the proof runs every prompt alone and in batches of this size: both paths are served


class GenerationExportError(FinetuneError):
    """The exported model could not be built, or it does not generate what the eager model does."""


def build_onnx(model_dir: str | Path, out_dir: str | Path, precision: str = "fp32", padding_id: int | None = None) -> Path:
    """Run the builder on a saved (merged) model folder; `padding_id` replaces the config's pad token.

    onnxruntime-genai masks every input token equal to pad_token_id, padding or not. Chat models often pad
    with their end of turn, which sits inside every templated prompt, so the pad id must be a token prompts
    never hold.
    """
    out_dir = Path(out_dir)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out_dir),
               "-p", precision, "-e", "cpu", "-c", str(out_dir / ".cache")]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise GenerationExportError(f"the ONNX builder failed on '{model_dir}' ({precision}): {' | '.join(tail)}")
    config_path = out_dir / "genai_config.json"
    config = json.loads(config_path.read_text())
    if padding_id is not None:
        config["model"]["pad_token_id"] = padding_id
    config_path.write_text(json.dumps(config, indent=4))
    shutil.rmtree(out_dir / ".cache", ignore_errors=True)
    return out_dir


def padding_id(tokenizer, prompts: list[list[int]]) -> int:
    """A special token that none of the prompts holds: onnxruntime-genai masks its pad id wherever it occurs."""
    seen = {t for p in prompts for t in p}
    candidates = [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                  *sorted(tokenizer.all_special_ids), len(tokenizer) - 1]
    for token in candidates:
        if isinstance(token, int) and token >= 0 and token not in seen and token != tokenizer.eos_token_id:
            return token
    raise GenerationExportError("no token free to pad batched prompts with: every special token occurs in prompts")


@dataclass
class Generated:
    tokens: list[int]  # the answer's ids, the end of turn left out
    finish_reason: str  # "stop" (end of turn) | "length" (max_new_tokens reached)


class OnnxGenerator:
    """Batched generation with onnxruntime-genai: greedy, or sampled with temperature and top_p."""

    def __init__(self, folder: str | Path, eos_token_id: int):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))
        config = json.loads((Path(folder) / "genai_config.json").read_text())
        self.context = config["model"]["context_length"]
        self.eos_id = eos_token_id

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> list[Generated]:
        """Prompts of one length run as one batch, so none is padded: with left padding onnxruntime-genai 0.18's
        greedy answers differed from the PyTorch model's on 3 of 8 held-out prompts (logit gaps of 0.2, not
        ties), where unpadded rows matched alone and in batches."""
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        out: list[Generated | None] = [None] * len(prompts)
        for rows in by_length.values():
            for i, answer in zip(rows, self._batch([prompts[i] for i in rows], max_new_tokens, temperature, top_p, seed)):
                out[i] = answer
        return out

    def _batch(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
               seed: int | None) -> list[Generated]:
        width = len(prompts[0])
        params = self.og.GeneratorParams(self.model)
        options = {"max_length": min(width + max_new_tokens, self.context), "do_sample": temperature > 0,
                   "batch_size": len(prompts)}
        if temperature > 0:
            options.update(temperature=temperature, top_p=top_p, top_k=0)
            if seed is not None:
                options["random_seed"] = seed
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.asarray(prompts, dtype=np.int32))
        answers: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        steps = 0
        while not generator.is_done() and steps < max_new_tokens and not all(finished):
            generator.generate_next_token()
            steps += 1
            for r, token in enumerate(generator.get_next_tokens().tolist()):
                if finished[r]:
                    continue
                if token == self.eos_id:
                    finished[r] = True
                else:
                    answers[r].append(int(token))
        return [Generated(a, "stop" if done else "length") for a, done in zip(answers, finished)]


def eager_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int | None = None) -> list[Generated]:
    """transformers' generate on the PyTorch model, the prompts left-padded into one batch."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    if seed is not None:
        torch.manual_seed(seed)
    search = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {
        "do_sample": False}
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             **search)[:, width:].tolist()
    eos = tokenizer.eos_token_id
    return [Generated(row[: row.index(eos)], "stop") if eos in row else Generated(row, "length") for row in out]


def eager_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[Generated]:
    """The reference: greedy answers of the PyTorch model, one prompt at a time (no padding involved)."""
    return [eager_generate(model, tokenizer, [p], max_new_tokens)[0] for p in prompts]


def prove_greedy(reference: list[Generated], generator: OnnxGenerator, prompts: list[list[int]],
                 max_new_tokens: int, tokenizer) -> dict:
    """Identical greedy tokens, each prompt alone and in batches, or GenerationExportError naming the first
    prompt that differs and where."""
    alone = [generator.generate([p], max_new_tokens)[0] for p in prompts]
    batched = [g for i in range(0, len(prompts), PROOF_BATCH)
               for g in generator.generate(prompts[i:i + PROOF_BATCH], max_new_tokens)]
    for path, candidate in (("alone", alone), (f"in batches of {PROOF_BATCH}", batched)):
        for i, (want, got) in enumerate(zip(reference, candidate)):
            if want.tokens != got.tokens:
                at = next((k for k, (a, b) in enumerate(zip(want.tokens, got.tokens)) if a != b),
                          min(len(want.tokens), len(got.tokens)))
                raise GenerationExportError(
                    f"the ONNX model's greedy answer differs from the PyTorch model's ({path}) on prompt {i} "
                    f"({tokenizer.decode(prompts[i][-40:])!r}) at generated token {at}: "
                    f"{tokenizer.decode(got.tokens)!r} vs {tokenizer.decode(want.tokens)!r}")
    return {"prompts": len(prompts), "identical_greedy_tokens": len(prompts), "batch": PROOF_BATCH,
            "generated_tokens": sum(len(g.tokens) for g in reference)}

