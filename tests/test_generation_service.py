"""Text generation through a real `bentoml serve`: /predict with prompts, its limits, and its metrics.

The registry holds the tiny Llama's LoRA run ("colours", exported with its proven ONNX model) and a tiny
text classifier ("toy"), so each can be asked for what only the other takes.
"""

from __future__ import annotations

import json

import httpx
import pytest
from artifact_helpers import make_run
from service_helpers import Server

from finetune_core import gen_data, gen_model
from finetune_core.artifacts import export_version
from finetune_core.gen_artifacts import export_generation
from finetune_core.gen_export import eager_greedy
from service.schemas import MAX_GENERATION_INPUTS, MAX_NEW_TOKENS, MAX_PROMPT_TOKENS

pytestmark = pytest.mark.process  # starts a real server


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_generation_run, tiny_base):
    folder = tmp_path_factory.mktemp("gen-serve")
    run, _, _ = tiny_generation_run
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_SERVE_HOME", str(folder / "home"))
        export_generation(run / "model", "colours", prompts=8, max_new_tokens=12)
        export_version(make_run(tiny_base, folder / "toy-run"), "toy", variants=["onnx"])
    server = Server(folder / "home", folder / "server.log").start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            yield c
    finally:
        server.kill()


def test_prompts_get_the_greedy_answers_of_the_fine_tuned_model(client, tiny_generation_run):
    run, _, _ = tiny_generation_run
    chats = [json.loads(line)["messages"] for line in (run / "splits" / "test.jsonl").open()][:5]
    prompts = [next(t["content"] for t in chat if t["role"] == "user") for chat in chats]
    answer = client.post("/predict", json={"model": "colours", "inputs": prompts, "max_new_tokens": 12})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["variant"] == "onnx-genai" and len(body["predictions"]) == 5
    model, tokenizer = gen_model.load_saved(run / "model")
    expected = eager_greedy(model, tokenizer, [gen_data.prompt_ids(tokenizer, [{"role": "user", "content": p}])
                                               for p in prompts], 12)
    assert [p["text"] for p in body["predictions"]] == [tokenizer.decode(e.tokens, skip_special_tokens=True)
                                                        for e in expected]
    assert [(p["tokens"], p["finish_reason"]) for p in body["predictions"]] == [(len(e.tokens), e.finish_reason)
                                                                                for e in expected]
    eager = client.post("/predict", json={"model": "colours", "variant": "pytorch", "inputs": prompts,
                                          "max_new_tokens": 12}).json()
    assert eager["variant"] == "pytorch" and eager["predictions"] == body["predictions"]


def test_length_stop_strings_and_sampling(client):
    short = client.post("/predict", json={"model": "colours", "inputs": ["What colour is a lime?"], "max_new_tokens": 2})
    assert short.json()["predictions"][0]["tokens"] == 2 and short.json()["predictions"][0]["finish_reason"] == "length"
    full = client.post("/predict", json={"model": "colours", "inputs": ["What colour is a lime?"]}).json()["predictions"][0]
    cut_at = full["text"].split()[1]
    stopped = client.post("/predict", json={"model": "colours", "inputs": ["What colour is a lime?"], "stop": [cut_at]})
    first = stopped.json()["predictions"][0]
    assert first["finish_reason"] == "stop" and first["text"] == full["text"][: full["text"].index(cut_at)]
    sampled = [client.post("/predict", json={"model": "colours", "inputs": ["What colour is a plum?"] * 2,
                                             "temperature": 1.5, "top_p": 0.95, "seed": 7, "max_new_tokens": 8}).json()
               for _ in range(2)]
    assert sampled[0]["predictions"] == sampled[1]["predictions"]  # a seed makes sampling repeatable


@pytest.mark.parametrize("extra, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": MAX_NEW_TOKENS + 1}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0}, "top_p"), ({"stop": ["a"] * 5}, "stop"),
    ({"top_k": 2}, "top_k"), ({"images": ["aGVsbG8="], "inputs": None}, "images"),
])
def test_generation_limits_are_refused_naming_the_field(client, extra, field):
    answer = client.post("/predict", json={"model": "colours", "inputs": ["Hi"], **extra})
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field


def test_too_many_or_too_long_prompts_name_the_field(client):
    many = client.post("/predict", json={"model": "colours", "inputs": ["Hi"] * (MAX_GENERATION_INPUTS + 1)})
    assert many.status_code == 413 and many.json()["field"] == "inputs"
    long = client.post("/predict", json={"model": "colours", "inputs": ["Hi", "word " * (MAX_PROMPT_TOKENS + 10)]})
    assert long.status_code == 422 and long.json()["field"] == "inputs[1]", long.text


def test_a_classifier_refuses_generation_fields_and_still_classifies(client):
    refused = client.post("/predict", json={"model": "toy", "inputs": ["great film"], "temperature": 0.5})
    assert refused.status_code == 422 and refused.json()["field"] == "temperature"
    assert client.post("/predict", json={"model": "toy", "inputs": ["great film"]}).json()["predictions"][0]["label"]


def test_generated_tokens_are_counted(client):
    def counted() -> float:
        text = client.get("/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("finetune_generated_tokens_total{") and 'model="colours"' in line)

    before = counted()
    answer = client.post("/predict", json={"model": "colours", "inputs": ["Hi", "Plum?"], "max_new_tokens": 3}).json()
    assert counted() - before == sum(p["tokens"] for p in answer["predictions"]) > 0
