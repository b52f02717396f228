"""Text-generation data: rows -> conversations -> tokens with the loss on the completion only -> batches.

A row is {prompt, completion} or {messages: [{role, content}, ...]} ending in an assistant turn. With a
chat template (SmolLM2 has ChatML) the conversation is rendered by the tokenizer's own template; without
one the prompt and completion are joined and an end-of-sequence token closes the completion. Labels are
-100 (ignored by the loss) everywhere but the last assistant turn, so the model learns to answer, not to
repeat prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from .data import SPLIT_FRACTIONS, clean_text, stratified_split
from .errors import DataError
from .tables import read_table

IGNORE = -100  # the label cross-entropy skips
ROLES = ("system", "user", "assistant")
MIN_PROMPT_TOKENS = 4  # a completion never takes the whole window: the prompt keeps at least this much


@dataclass
class Conversations:
    """Cleaned rows as chat turns; `dropped` counts the rows left out, by reason."""

    turns: list[list[dict]]
    dropped: dict[str, int] = field(default_factory=dict)


def read_conversations(path: str, cfg, role: str = "train") -> Conversations:
    """Rows of a table as conversations, cleaned; rows that cannot be used are counted, not fatal."""
    rows, columns = read_table(path, role)
    use_messages = cfg.messages_column in columns
    if not use_messages and not {cfg.prompt_column, cfg.completion_column} <= columns:
        raise DataError(
            f"{role} file '{path}': needs a '{cfg.messages_column}' column or '{cfg.prompt_column}' and "
            f"'{cfg.completion_column}' columns; columns are {', '.join(sorted(columns)) or 'none'} "
            "(set data.prompt_column / data.completion_column / data.messages_column)")
    turns, dropped = [], {}
    for row in rows:
        if use_messages:
            conversation, problem = _messages(row.get(cfg.messages_column))
        else:
            conversation, problem = _pair(row.get(cfg.prompt_column), row.get(cfg.completion_column), cfg.system_prompt)
        if problem:
            dropped[problem] = dropped.get(problem, 0) + 1
        else:
            turns.append(conversation)
    if not turns:
        reasons = ", ".join(f"{n} {why}" for why, n in dropped.items())
        raise DataError(f"{role} file '{path}': no usable rows ({reasons})")
    return Conversations(turns, dropped)


def _pair(prompt, completion, system: str | None) -> tuple[list[dict], str | None]:
    if not isinstance(prompt, str) or not clean_text(prompt):
        return [], "empty or missing prompt"
    if not isinstance(completion, str) or not clean_text(completion):
        return [], "empty or missing completion"
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": completion.strip()}], None


def _messages(value) -> tuple[list[dict], str | None]:
    if not isinstance(value, list) or not value:
        return [], "messages not a non-empty list"
    turns = []
    for message in value:
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            return [], "a message without a system/user/assistant role and text content"
        turns.append({"role": message["role"], "content": message["content"]})
    if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
        return [], "messages not ending in a non-empty assistant turn"
    if not any(t["role"] == "user" for t in turns):
        return [], "messages without a user turn"
    return turns, None


def last_prompt(turns: list[dict]) -> str:
    """The text of a conversation's last user turn: what its last answer answers."""
    return next(t["content"] for t in reversed(turns) if t["role"] == "user")


def prompt_ids(tokenizer, turns: list[dict]) -> list[int]:
    """The tokens a model is given to answer the conversation's last user turn (everything but the answer)."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False))
    text = "\n\n".join(t["content"] for t in turns) + "\n\n"
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def conversation_ids(tokenizer, turns: list[dict]) -> tuple[list[int], int]:
    """(tokens of the whole conversation, where the last answer starts). The answer ends with the template's
    end-of-turn (or the tokenizer's end-of-sequence) so the model learns to stop."""
    prompt = prompt_ids(tokenizer, turns[:-1])
    if tokenizer.chat_template:
        full = list(tokenizer.apply_chat_template(turns, tokenize=True, return_dict=False))
        if full[: len(prompt)] != prompt:
            raise DataError("the base model's chat template renders a conversation differently from its prompt; "
                            "use prompt/completion rows with a model without a chat template")
        # Templates close a turn with end-of-turn and a newline; the newline after the end is not the answer's.
        answer = full[len(prompt):]
        if tokenizer.eos_token_id in answer:
            answer = answer[: answer.index(tokenizer.eos_token_id) + 1]
        return prompt + answer, len(prompt)
    answer = tokenizer(turns[-1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, len(prompt)


@dataclass
class GenRows:
    """Tokenized conversations, unpadded; implements train.Rows. Labels are IGNORE over prompts. Packed rows
    (pack()) hold several conversations each, and `positions` restart at 0 where each begins."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    pad_id: int
    positions: list[list[int]] | None = None

    @property
    def targets(self) -> list[list[int]]:
        return self.labels

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def loader(self, batches: list[list[int]], epoch: int = 0) -> Iterable[dict]:
        for rows in batches:
            yield self.batch(rows)

    def batch(self, rows: list[int]) -> dict:
        """Right-padded: padding positions are masked from attention and from the loss. Packed rows give
        position ids instead of a mask: transformers then lets a token attend only within its conversation
        (positions restart at each), and the padding is one more conversation of its own."""
        width = max(len(self.input_ids[i]) for i in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(self.input_ids[i])
            ids[r, :n] = torch.tensor(self.input_ids[i])
            labels[r, :n] = torch.tensor(self.labels[i])
            mask[r, :n] = 1
            if self.positions is not None:
                positions[r, :n] = torch.tensor(self.positions[i])
                positions[r, n:] = torch.arange(width - n)
        if self.positions is not None:
            return {"inputs": {"input_ids": ids, "position_ids": positions}, "labels": labels}
        return {"inputs": {"input_ids": ids, "attention_mask": mask}, "labels": labels}


def pack(rows: GenRows, max_length: int) -> tuple[GenRows, dict]:
    """Conversations packed into rows of at most max_length tokens, best fit, longest first: short rows fill
    a batch with tokens instead of padding, and each optimizer step sees more conversations. Returns the
    packed rows and a report (how many, how full)."""
    import bisect

    order = sorted(range(len(rows.input_ids)), key=lambda i: -len(rows.input_ids[i]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted: the fullest bin a row fits in is found by bisect
    for i in order:
        n = len(rows.input_ids[i])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    packed = GenRows([[t for i in b for t in rows.input_ids[i]] for b in bins],
                     [[t for i in b for t in rows.labels[i]] for b in bins], rows.pad_id,
                     [[p for i in b for p in range(len(rows.input_ids[i]))] for b in bins])
    tokens = sum(packed.lengths)
    return packed, {"conversations": len(order), "rows": len(bins), "fill": round(tokens / (len(bins) * max_length), 3)}


def encode(tokenizer, conversations: list[list[dict]], max_length: int) -> tuple[GenRows, dict]:
    """Token ids and completion-only labels, cut to max_length: a long prompt loses its start (the question
    at its end stays), then a long answer its end. Returns the rows and a report of lengths and cuts."""
    ids_out, labels_out, lengths, cut_prompts, cut_answers = [], [], [], 0, 0
    for turns in conversations:
        ids, start = conversation_ids(tokenizer, turns)
        lengths.append(len(ids))
        prompt, answer = ids[:start], ids[start:]
        if len(ids) > max_length:
            answer_room = max_length - min(len(prompt), MIN_PROMPT_TOKENS)
            if len(answer) > answer_room:
                answer, cut_answers = answer[:answer_room], cut_answers + 1
            keep = max_length - len(answer)
            if len(prompt) > keep:
                prompt, cut_prompts = prompt[len(prompt) - keep:], cut_prompts + 1
        ids_out.append(prompt + answer)
        labels_out.append([IGNORE] * len(prompt) + answer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    values = np.asarray(lengths)
    report = {"rows": len(lengths), "max_length": max_length, "p50": int(np.percentile(values, 50)),
              "p95": int(np.percentile(values, 95)), "max": int(values.max()),
              "prompts_cut": cut_prompts, "completions_cut": cut_answers}
    return GenRows(ids_out, labels_out, pad_id), report


def split_conversations(conversations: list, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Seeded 80/10/10 row indices (one stratum: generation has no classes to balance)."""
    return stratified_split([0] * len(conversations), seed, SPLIT_FRACTIONS)
