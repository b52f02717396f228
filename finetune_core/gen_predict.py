"""GenerationPredictor: prompts in, generated texts out, for a registered text-generation version.

Each prompt is a user turn, rendered with the model's chat template as in training. `onnx-genai`
(the exported decoder run by onnxruntime, proven token-identical at export) or `pytorch` (transformers' generate on the merged
model) serves it; by default the one measured faster at export. Load once, generate many; safe to share across threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import gen_data, registry
from .errors import ConfigError
from .gen_export import Generated, OnnxGenerator, eager_steps
from .metadata import ModelMeta, read_meta

GENERATION_VARIANTS = ("onnx-genai", "pytorch")  # the default first


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # the answer is cut before the first of these
    seed: int | None = None


class GenerationPredictor:
    def __init__(self, tokenizer, meta: ModelMeta, variant: str, steps):
        self.tokenizer = tokenizer
        self.meta = meta
        self.variant = variant
        self._steps = steps  # (prompt ids, Sampling) -> Iterator[list[Generated]], the answers after each step
        self._lock = threading.Lock()

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return [gen_data.prompt_ids(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts]

    def generate(self, prompts: list[str], sampling: Sampling = Sampling()) -> list[dict]:
        """One {"text", "tokens", "finish_reason"} per prompt; finish_reason is stop (end of turn or a stop
        string) or length (max_new_tokens reached)."""
        if isinstance(prompts, str):
            raise ConfigError("generate: pass a list of prompts, not a single string")
        return self.generate_ids(self.prompt_ids(list(prompts)), sampling)

    def generate_ids(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[dict]:
        """generate() for prompts already rendered and tokenized by prompt_ids(): stream_ids()'s pieces joined.
        One batch at a time: the backends use every core for one batch; two at once would share the cores and
        end no sooner."""
        texts, ends = [""] * len(prompt_ids), [{} for _ in prompt_ids]
        for pieces in self.stream_ids(prompt_ids, sampling):
            for piece in pieces:
                texts[piece["index"]] += piece["text"]
                ends[piece["index"]] = piece
        return [{"text": text, "tokens": end["tokens"], "finish_reason": end["finish_reason"]}
                for text, end in zip(texts, ends)]

    def stream_ids(self, prompt_ids: list[list[int]], sampling: Sampling) -> Iterator[list[dict]]:
        """generate_ids() as it happens: after each decoding step, the new text of the prompts that have some,
        [{"index", "text"}, ...]; a prompt's last piece also holds its "finish_reason" and "tokens". Text that
        could be the start of a stop string, or of a character not yet whole, waits for the next step; a stop
        string ends its answer there (its tokens are those generated so far). The model is held (one batch at
        a time) until the iterator ends or is closed."""
        sent = [0] * len(prompt_ids)  # characters already handed out, per prompt
        ended = [False] * len(prompt_ids)
        hold = max((len(s) for s in sampling.stop), default=1) - 1
        with self._lock:
            steps = self._steps(prompt_ids, sampling)
            try:
                for answers in steps:
                    pieces = []
                    for i, answer in enumerate(answers):
                        if ended[i]:
                            continue
                        text, reason = self._text(answer, sampling.stop)
                        ready = len(text) if reason else max(sent[i], len(text.rstrip("\ufffd")) - hold)
                        piece = {"index": i, "text": text[sent[i]:ready]}
                        sent[i] = ready
                        if reason:
                            piece.update(finish_reason=reason, tokens=len(answer.tokens))
                            ended[i] = True
                            answer.finish_reason = reason  # a stop string: the backend drops the row
                        if piece["text"] or reason:
                            pieces.append(piece)
                    if pieces:
                        yield pieces
                    if all(ended):
                        return
            finally:
                steps.close()

    def _text(self, answer: Generated, stop: tuple[str, ...]) -> tuple[str, str | None]:
        """The answer's text, cut before the first stop string (which ends it), and its finish reason."""
        text = self.tokenizer.decode(answer.tokens, skip_special_tokens=True)
        cut = [text.index(s) for s in stop if s and s in text]
        if cut:
            return text[: min(cut)], "stop"
        return text, answer.finish_reason


def default_generation_variant(info: registry.VersionInfo) -> str:
    """The accepted variant with the most tokens/s measured at export at batch 1 (one caller waiting, the
    common case), else the first of GENERATION_VARIANTS."""
    variants = info.manifest.variants
    usable = _usable(info)
    measured = [v for v in usable if variants[v].figures.get("tokens_per_second_b1")]
    if not measured:
        return usable[0]
    return max(measured, key=lambda v: variants[v].figures["tokens_per_second_b1"])


def _usable(info: registry.VersionInfo) -> list[str]:
    variants = info.manifest.variants
    return [v for v in GENERATION_VARIANTS if v in variants and variants[v].accepted]


def load_generation_predictor(info: registry.VersionInfo, variant: str | None = None) -> GenerationPredictor:
    variant = variant or default_generation_variant(info)
    if variant not in info.manifest.variants:
        raise registry.NotFoundError(f"{info.ref} is a text-generation model; its variants are "
                                     f"{', '.join(_usable(info))}")
    model_dir = registry.model_dir(info)
    meta = read_meta(model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if variant == "onnx-genai":
        generator = OnnxGenerator(registry.variant_file(info, variant), tokenizer.eos_token_id)

        def steps(prompts: list[list[int]], s: Sampling) -> Iterator[list[Generated]]:
            return generator.steps(prompts, s.max_new_tokens, s.temperature, s.top_p, s.seed)
    else:
        steps = _eager(model_dir, tokenizer)
    return GenerationPredictor(tokenizer, meta, variant, steps)


def _eager(model_dir: Path, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def steps(prompts: list[list[int]], s: Sampling) -> Iterator[list[Generated]]:
        return eager_steps(model, tokenizer, prompts, s.max_new_tokens, s.temperature, s.top_p, s.seed)

    return steps
