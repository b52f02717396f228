"""Text generation behind /predict: the prompts checked against the limits, then generated off the event loop.

A generation model takes prompts as `inputs` and the generation fields (max_new_tokens, temperature,
top_p, stop, seed); a classification model refuses those fields, a generation model refuses top_k and
images, each with a 422 naming the field. Requests for one model generate one batch at a time
(GenerationPredictor); the tokens generated are counted per model and variant.
"""

from __future__ import annotations

import json
import queue
import threading
from typing import AsyncIterator

from fastapi.concurrency import run_in_threadpool

from finetune_core.errors import DataError
from finetune_core.gen_predict import GenerationPredictor, Sampling

from .errors import HTTPError
from .schemas import DEFAULT_NEW_TOKENS, MAX_GENERATION_INPUTS, MAX_PROMPT_TOKENS


async def generate(served, inputs, sampling: Sampling | None, top_k: int | None, metrics, model_label: str) -> list[dict]:
    predictor: GenerationPredictor = served.predictor
    ids = await _checked_prompts(served, inputs, top_k)
    results = await run_in_threadpool(predictor.generate_ids, ids, sampling or Sampling(max_new_tokens=DEFAULT_NEW_TOKENS))
    metrics.generated_tokens.labels(model=model_label, variant=predictor.variant).inc(sum(r["tokens"] for r in results))
    return results


# A stream's generation runs ahead of its reader by at most STREAM_BUFFER steps; a reader that takes nothing for
# STREAM_STALL_SECONDS is gone (a client that left is not always seen: starlette does not close the body
# iterator when a send fails), and the model is freed for the next request.
STREAM_BUFFER = 64
STREAM_STALL_SECONDS = 10.0


async def stream(served, inputs, sampling: Sampling | None, top_k: int | None, metrics, model_label: str) -> AsyncIterator[str]:
    """The answers as server-sent events: `data: [{"index", "text"}, ...]` per decoding step with new text (a
    prompt's last piece adds "finish_reason" and "tokens"), then `data: [DONE]`. The request is checked
    before the first event, so a bad one is still an ordinary 4xx."""
    predictor = served.predictor
    if not isinstance(predictor, GenerationPredictor):
        raise HTTPError(422, f"stream: is for text-generation models; {served.info.ref} is a classification or "
                             "regression model", "stream")
    ids = await _checked_prompts(served, inputs, top_k)
    counter = metrics.generated_tokens.labels(model=model_label, variant=predictor.variant)
    handed: queue.Queue = queue.Queue(maxsize=STREAM_BUFFER)
    stop = threading.Event()

    def work() -> None:
        """Generates in its own thread, so the model is let go here, deterministically, however the reader ends."""
        steps = predictor.stream_ids(ids, sampling or Sampling(max_new_tokens=DEFAULT_NEW_TOKENS))
        try:
            for pieces in steps:
                handed.put(pieces, timeout=STREAM_STALL_SECONDS)  # queue.Full: the reader is gone
                if stop.is_set():
                    break
            handed.put(None, timeout=STREAM_STALL_SECONDS)
        except queue.Full:
            pass
        except Exception as err:  # raised again on the reader's side, which ends the response
            handed.put(err, timeout=STREAM_STALL_SECONDS)
        finally:
            steps.close()

    async def events() -> AsyncIterator[str]:
        threading.Thread(target=work, name="generation-stream", daemon=True).start()
        try:
            while (item := await run_in_threadpool(handed.get)) is not None:
                if isinstance(item, Exception):
                    raise item
                counter.inc(sum(p.get("tokens", 0) for p in item))
                yield f"data: {json.dumps(item)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            stop.set()

    return events()


async def _checked_prompts(served, inputs, top_k: int | None) -> list[list[int]]:
    """The prompts rendered and tokenized, or the 4xx naming what is wrong with the request."""
    ref, field = served.info.ref, inputs.field
    if not hasattr(inputs, "texts"):
        raise HTTPError(422, f"{field}: {ref} is a text-generation model and takes prompts as inputs", field)
    if top_k is not None:
        raise HTTPError(422, f"top_k: is for classification models; {ref} generates text (use max_new_tokens, "
                             "temperature, top_p, stop)", "top_k")
    if len(inputs.texts) > MAX_GENERATION_INPUTS:
        raise HTTPError(413, f"{field}: {len(inputs.texts)} prompts; a text-generation model takes at most "
                             f"{MAX_GENERATION_INPUTS} per request", field)
    ids = await run_in_threadpool(served.predictor.prompt_ids, inputs.texts)
    for index, prompt in enumerate(ids):
        if len(prompt) > MAX_PROMPT_TOKENS:
            where = f"{field}[{index}]"
            raise HTTPError(422, f"{where}: the prompt is {len(prompt)} tokens with the chat template; at most "
                                 f"{MAX_PROMPT_TOKENS}", where)
    return ids


def refuse_generation_fields(field: str, ref: str) -> None:
    """A classification model was sent a generation setting: name it."""
    raise HTTPError(422, f"{field}: is for text-generation models; {ref} is a classification or regression model", field)


# Rows one /evaluate call generates for at most: each is a greedy generation inside the request.
MAX_EVALUATE_ROWS = 500
EVALUATE_NEW_TOKENS = 64


def evaluate_generation(info, predictor: GenerationPredictor, stored, prompt_column: str, completion_column: str) -> dict:
    """POST /evaluate for a text-generation version: greedy answers to an uploaded table's prompts, scored
    against its completions (exact match, ROUGE-L), with the rows dropped and the overlap with training."""
    from finetune_core.gen_config import GenDataConfig
    from finetune_core.gen_data import last_prompt, read_conversations
    from finetune_core.gen_eval import answer_scores

    from .evaluation import MAX_TRAINING_SHARE

    columns = GenDataConfig(train=str(stored.path), prompt_column=prompt_column, completion_column=completion_column)
    try:
        read = read_conversations(stored.path, columns, "data")
    except DataError as err:  # named by the dataset's id, not the server's path to it
        raise HTTPError(422, "data: " + str(err).replace(f"data file '{stored.path}'", f"'{stored.id}'"), "data") from None
    if len(read.turns) > MAX_EVALUATE_ROWS:
        raise HTTPError(413, f"data: {len(read.turns)} rows; a text-generation model is evaluated on at most "
                             f"{MAX_EVALUATE_ROWS} per call (each is a generation)", "data")
    prompts = [last_prompt(turns) for turns in read.turns]
    references = [turns[-1]["content"] for turns in read.turns]
    trained = _training_prompts(info)
    overlap = None if trained is None else sum(p in trained for p in prompts)
    if overlap is not None and overlap > MAX_TRAINING_SHARE * len(prompts):
        raise HTTPError(422, f"data: {overlap} of the {len(prompts)} prompts of '{stored.id}' are prompts {info.ref} was "
                             "trained on; scores on them measure memory, not generalisation", "data")
    answers = predictor.generate(prompts, Sampling(max_new_tokens=EVALUATE_NEW_TOKENS))
    texts = [a["text"].strip() for a in answers]
    return {"dataset": stored.id, "rows": len(prompts), "dropped": read.dropped, "training_overlap": overlap,
            **answer_scores(texts, references), "max_new_tokens": EVALUATE_NEW_TOKENS,
            "samples": [{"prompt": p, "reference": r, "generated": t} for p, r, t in list(zip(prompts, references, texts))[:5]]}


def _training_prompts(info) -> set[str] | None:
    import json
    from pathlib import Path

    from finetune_core.gen_data import last_prompt

    source = info.manifest.source_run
    path = Path(source) / "splits" / "train.jsonl" if source else None
    if path is None or not path.is_file():
        return None
    return {last_prompt(json.loads(line)["messages"]) for line in path.read_text().splitlines() if line.strip()}
