"""The served form of a fine-tuned causal LM: ONNX with a KV cache, run by onnxruntime, proven against the
eager model by identical greedy tokens on real prompts.

onnxruntime-genai's model builder writes the decoder (fused GroupQueryAttention, KV cache inputs and
outputs) and genai_config.json; OnnxGenerator runs prefill and decoding over it with onnxruntime. One
volatile backend behind these functions (STYLE rule 8).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import FinetuneError

PROOF_BATCH = 8  # the proof runs every prompt alone and in batches of this size: both paths are served


class GenerationExportError(FinetuneError):
    """The exported model could not be built, or it does not generate what the eager model does."""


def build_onnx(model_dir: str | Path, out_dir: str | Path, precision: str = "fp32") -> Path:
    """Run onnxruntime-genai's builder on a saved (merged) model folder."""
    out_dir = Path(out_dir)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out_dir),
               "-p", precision, "-e", "cpu", "-c", str(out_dir / ".cache")]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise GenerationExportError(f"the ONNX builder failed on '{model_dir}' ({precision}): {' | '.join(tail)}")
    shutil.rmtree(out_dir / ".cache", ignore_errors=True)
    return out_dir


@dataclass
class Generated:
    tokens: list[int]  # the answer's ids, the end of turn left out
    finish_reason: str | None  # "stop" (end of turn) | "length" (max_new_tokens reached) | None: still going


def _take(answers: list[Generated], row: int, token: int, eos_id: int) -> None:
    """One new token for a row: its end of turn ends it; tokens after the end (padding) are ignored."""
    if answers[row].finish_reason is None:
        if token == eos_id:
            answers[row].finish_reason = "stop"
        else:
            answers[row].tokens.append(token)


def _last(steps: Iterator[list[Generated]]) -> list[Generated]:
    answers: list[Generated] = []
    for answers in steps:
        pass
    return answers


class OnnxGenerator:
    """Batched generation over the exported decoder with onnxruntime: greedy, or sampled with temperature and
    top_p. The decoding loop is ours, so prompts of any lengths share a batch:

    prompts are right-padded and each row's attention mask counts its real tokens. The decoder's
    GroupQueryAttention reads only that count (per row), so a row's rotary positions, attention and KV cache
    ignore the padding, and each new token lands right after its row's last real one. Rows that end leave the
    batch. (onnxruntime-genai's own loop left-pads; its 0.18 greedy answers then differed from the PyTorch
    model's on 3 of 8 held-out prompts, so it could batch only prompts of one length.)
    """

    def __init__(self, folder: str | Path, eos_token_id: int):
        import onnxruntime as ort

        config = json.loads((Path(folder) / "genai_config.json").read_text())["model"]
        decoder = config["decoder"]
        names, layers = decoder["inputs"], range(decoder["num_hidden_layers"])
        self.session = ort.InferenceSession(str(Path(folder) / decoder["filename"]), providers=["CPUExecutionProvider"])
        self.ids_name, self.mask_name = names["input_ids"], names["attention_mask"]
        self.past_names = [names[f"past_{kind}_names"] % i for i in layers for kind in ("key", "value")]
        outputs = decoder["outputs"]
        self.output_names = [outputs["logits"]] + [outputs[f"present_{kind}_names"] % i for i in layers
                                                   for kind in ("key", "value")]
        self.cache_shape = (decoder["num_key_value_heads"], 0, decoder["head_size"])
        self.context = config["context_length"]
        self.eos_id = eos_token_id

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> list[Generated]:
        return _last(self.steps(prompts, max_new_tokens, temperature, top_p, seed))

    def steps(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
              seed: int | None = None) -> Iterator[list[Generated]]:
        """The answers after each decoding step (one list, grown in place); the last has every finish_reason.
        The caller may end an answer by setting its finish_reason: its row leaves the batch at the next step."""
        if not prompts:
            yield []
            return
        rng = np.random.default_rng(seed)
        lengths = np.array([len(p) for p in prompts])  # tokens in each row's cache
        max_new_tokens = min(max_new_tokens, self.context - int(lengths.max()))
        ids = np.zeros((len(prompts), lengths.max()), np.int64)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = p
        cache = [np.zeros((len(prompts), *self.cache_shape), np.float32)] * len(self.past_names)
        logits, cache = self._step(ids, lengths, cache)
        logits = logits[np.arange(len(prompts)), lengths - 1]
        rows = np.arange(len(prompts))  # the prompt each batch row answers
        answers = [Generated([], None) for _ in prompts]
        for step in range(max_new_tokens):
            tokens = pick(logits, temperature, top_p, rng)
            for row, token in zip(rows.tolist(), tokens.tolist()):
                _take(answers, row, token, self.eos_id)
            if step == max_new_tokens - 1 or all(a.finish_reason for a in answers):
                break
            yield answers
            going = np.array([answers[row].finish_reason is None for row in rows.tolist()])
            if not going.all():
                rows, tokens, lengths, cache = rows[going], tokens[going], lengths[going], [c[going] for c in cache]
            logits, cache = self._step(tokens[:, None], lengths + 1, cache)
            logits, lengths = logits[:, -1], lengths + 1
        for answer in answers:
            answer.finish_reason = answer.finish_reason or "length"
        yield answers

    def _step(self, ids: np.ndarray, lengths: np.ndarray, cache: list[np.ndarray]) -> tuple[np.ndarray, list]:
        """One decoder call: `ids` appended to each row's cache; `lengths` are the rows' totals afterwards."""
        width = cache[0].shape[2] + ids.shape[1]
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        feed = {self.ids_name: ids, self.mask_name: mask, **dict(zip(self.past_names, cache))}
        logits, *cache = self.session.run(self.output_names, feed)
        return logits, cache


def pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """The next token of each row: the most likely (temperature 0), or drawn from the softmax at `temperature`
    restricted to the smallest set of tokens whose probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    order = np.argsort(-p, axis=-1)
    ranked = np.take_along_axis(p / p.sum(-1, keepdims=True), order, -1)
    ranked[np.cumsum(ranked, -1) - ranked >= top_p] = 0.0  # tokens after the nucleus is full
    ranked /= ranked.sum(-1, keepdims=True)
    drawn = (np.cumsum(ranked, -1) < rng.random((len(p), 1))).sum(-1)
    return order[np.arange(len(p)), np.minimum(drawn, p.shape[-1] - 1)]


def eager_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int | None = None, **generate_options) -> list[Generated]:
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
                             **search, **generate_options)[:, width:].tolist()
    eos = tokenizer.eos_token_id
    return [Generated(row[: row.index(eos)], "stop") if eos in row else Generated(row, "length") for row in out]


def eager_steps(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0, seed: int | None = None) -> Iterator[list[Generated]]:
    """eager_generate's answers as they grow: generate runs in a thread and hands over each step's tokens.
    Closing the iterator early stops generate at its next step; an answer the caller ends (finish_reason set)
    takes no more tokens."""
    import queue
    import threading

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    handed: queue.Queue = queue.Queue()
    closed = threading.Event()

    class Hand(BaseStreamer):
        prompts_seen = False

        def put(self, value):
            if self.prompts_seen:  # (rows,) or (rows, steps) new tokens
                handed.put(value.reshape(len(prompts), -1).tolist())
            self.prompts_seen = True  # the first call hands over the prompts

        def end(self):
            pass

    class Closed(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), closed.is_set(), dtype=torch.bool)

    def run():
        try:
            eager_generate(model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed, streamer=Hand(),
                           stopping_criteria=StoppingCriteriaList([Closed()]))
            handed.put(None)
        except BaseException as err:  # raised again in the caller's thread
            handed.put(err)

    threading.Thread(target=run, name="eager-generate", daemon=True).start()
    answers = [Generated([], None) for _ in prompts]
    try:
        while (chunk := handed.get()) is not None:
            if isinstance(chunk, BaseException):
                raise chunk
            for row, tokens in enumerate(chunk):
                for token in tokens:
                    _take(answers, row, token, tokenizer.eos_token_id)
            yield answers
    finally:
        closed.set()
    for answer in answers:
        answer.finish_reason = answer.finish_reason or "length"
    yield answers


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

