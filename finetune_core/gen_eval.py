"""Generation metrics: token loss and perplexity, and exact match and ROUGE-L of greedy answers."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from .gen_data import IGNORE, GenRows, prompt_ids


def causal_lm_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of each next token where batch["labels"] is not IGNORE (the answers)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE)


@torch.inference_mode()
def token_loss(model, rows: GenRows, batch_size: int) -> dict:
    """Loss over every answer token of the rows (not a mean of batch means) and its perplexity."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(rows.input_ids)), key=lambda i: -len(rows.input_ids[i]))
    for start in range(0, len(order), batch_size):
        batch = rows.batch(order[start:start + batch_size])
        inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
        logits = model(**inputs).logits.float()
        labels = batch["labels"][:, 1:].to(device)
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE, reduction="sum").item()
        count += int((labels != IGNORE).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def greedy_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 16,
                   max_prompt_tokens: int | None = None) -> list[str]:
    """The model's greedy answer to each conversation's last user turn (its recorded answer left out)."""
    tokens = greedy_tokens(model, tokenizer, conversations, max_new_tokens, batch_size, max_prompt_tokens)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


@torch.inference_mode()
def greedy_tokens(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 16,
                  max_prompt_tokens: int | None = None) -> list[list[int]]:
    """The greedy answers' token ids, up to and including the end of turn (padding after it removed)."""
    model.eval()
    device = next(model.parameters()).device
    prompts = [prompt_ids(tokenizer, turns[:-1]) for turns in conversations]
    if max_prompt_tokens:
        prompts = [p[-max_prompt_tokens:] for p in prompts]
    pad = tokenizer.pad_token_id
    answers: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths: little padding
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):  # left padding: every row's next token comes at the same position
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for r, i in enumerate(rows):
            answer = out[r, width:].tolist()
            if tokenizer.eos_token_id in answer:
                answer = answer[: answer.index(tokenizer.eos_token_id) + 1]
            answers[i] = answer
    return answers


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace tokens (lower-cased): the longest common subsequence's precision and recall."""
    a, b = normalise(prediction).split(), normalise(reference).split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def answer_scores(predictions: list[str], references: list[str]) -> dict:
    """Exact match (after normalising case and spaces) and mean ROUGE-L F1."""
    n = max(len(references), 1)
    return {"exact_match": sum(normalise(p) == normalise(r) for p, r in zip(predictions, references)) / n,
            "rouge_l": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n}
