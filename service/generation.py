"""Text generation behind /predict: the prompts checked against the limits, then generated off the event loop.

A generation model takes prompts as `inputs` and the generation fields (max_new_tokens, temperature,
top_p, stop, seed); a classification model refuses those fields, a generation model refuses top_k and
images, each with a 422 naming the field. Requests for one model generate one batch at a time
(GenerationPredictor); the tokens generated are counted per model and variant.
"""

from __future__ import annotations

from fastapi.concurrency import run_in_threadpool

from finetune_core.gen_predict import GenerationPredictor, Sampling

from .errors import HTTPError
from .schemas import DEFAULT_NEW_TOKENS, GENERATION_FIELDS, MAX_GENERATION_INPUTS, MAX_PROMPT_TOKENS


class PromptTooLong(Exception):
    def __init__(self, index: int, tokens: int):
        self.index, self.tokens = index, tokens


async def generate(served, inputs, sampling: Sampling | None, top_k: int | None, metrics, model_label: str) -> list[dict]:
    predictor: GenerationPredictor = served.predictor
    ref = served.info.ref
    field = inputs.field
    if not hasattr(inputs, "texts"):
        raise HTTPError(422, f"{field}: {ref} is a text-generation model and takes prompts as inputs", field)
    if top_k is not None:
        raise HTTPError(422, f"top_k: is for classification models; {ref} generates text (use max_new_tokens, "
                             "temperature, top_p, stop)", "top_k")
    if len(inputs.texts) > MAX_GENERATION_INPUTS:
        raise HTTPError(413, f"{field}: {len(inputs.texts)} prompts; a text-generation model takes at most "
                             f"{MAX_GENERATION_INPUTS} per request", field)
    sampling = sampling or Sampling(max_new_tokens=DEFAULT_NEW_TOKENS)
    try:
        results = await run_in_threadpool(_generate, predictor, inputs.texts, sampling)
    except PromptTooLong as err:
        where = f"{field}[{err.index}]"
        raise HTTPError(422, f"{where}: the prompt is {err.tokens} tokens with the chat template; at most "
                             f"{MAX_PROMPT_TOKENS}", where) from None
    metrics.generated_tokens.labels(model=model_label, variant=predictor.variant).inc(sum(r["tokens"] for r in results))
    return results


def refuse_generation_fields(body, ref: str) -> None:
    """A classification model asked for generation settings: name the first one sent."""
    sent = next(name for name in GENERATION_FIELDS if getattr(body, name) is not None)
    raise HTTPError(422, f"{sent}: is for text-generation models; {ref} is a classification or regression model", sent)


def _generate(predictor: GenerationPredictor, prompts: list[str], sampling: Sampling) -> list[dict]:
    ids = predictor.prompt_ids(prompts)
    for index, prompt in enumerate(ids):
        if len(prompt) > MAX_PROMPT_TOKENS:
            raise PromptTooLong(index, len(prompt))
    return predictor.generate_ids(ids, sampling)
