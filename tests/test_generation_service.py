"""Text generation through a real `bentoml serve`: /predict with prompts, its limits, and its metrics.

The registry holds the tiny Llama's LoRA run ("colours", exported with its proven ONNX model) and a tiny
text classifier ("toy"), so each can be asked for what only the other takes.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from artifact_helpers import make_run
from conftest import colour_rows
from service_helpers import Server, upload, wait_for_job

from finetune_core import gen_data, gen_model
from finetune_core.artifacts import export_version
from finetune_core.gen_artifacts import export_generation
from finetune_core.gen_export import eager_greedy
from service.schemas import MAX_GENERATION_INPUTS, MAX_NEW_TOKENS, MAX_PROMPT_TOKENS

pytestmark = pytest.mark.process  # starts a real server


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_generation_run, tiny_base):
    """A registry with "colours" v1 and "toy" v1: (its folder, colours' manifest)."""
    folder = tmp_path_factory.mktemp("gen-serve")
    run, _, _ = tiny_generation_run
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_SERVE_HOME", str(folder / "home"))
        info = export_generation(run / "model", "colours", prompts=8, max_new_tokens=12)
        export_version(make_run(tiny_base, folder / "toy-run"), "toy", variants=["onnx"])
    return folder, info.manifest


@pytest.fixture(scope="module")
def client(registered, tiny_causal_lm):
    folder, _ = registered
    server = Server(folder / "home", folder / "server.log", env={"FINETUNE_SERVE_BASE_MODELS": str(tiny_causal_lm)}).start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            yield c
    finally:
        server.kill()


def test_prompts_get_the_greedy_answers_of_the_fine_tuned_model(client, registered, tiny_generation_run):
    run, _, _ = tiny_generation_run
    chats = [json.loads(line)["messages"] for line in (run / "splits" / "test.jsonl").open()][:5]
    prompts = [next(t["content"] for t in chat if t["role"] == "user") for chat in chats]
    answer = client.post("/predict", json={"model": "colours", "variant": "onnx-genai", "inputs": prompts,
                                           "max_new_tokens": 12})
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
    # Unasked, the variant with the most tokens/s at batch 1 (measured at export) serves
    figures = {v: record.figures["tokens_per_second_b1"] for v, record in registered[1].variants.items()}
    default = client.post("/predict", json={"model": "colours", "inputs": prompts[:1], "max_new_tokens": 2}).json()
    assert default["variant"] == max(figures, key=figures.get), figures


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


@pytest.mark.parametrize("variant", ["onnx-genai", "pytorch"])
def test_a_streamed_answer_arrives_in_pieces_that_add_up_to_the_answer(client, variant):
    prompts = ["What colour is a lime?", "Plum?", "What colour is a peach? Tell me, please."]
    ask = {"model": "colours", "variant": variant, "inputs": prompts, "max_new_tokens": 10}
    whole = client.post("/predict", json=ask).json()["predictions"]
    cut_at = next(w for w in whole[0]["text"].split()[1:] if w)  # a stop string the first answer holds
    for extra in ({}, {"stop": [cut_at]}):
        expected = client.post("/predict", json={**ask, **extra}).json()["predictions"]
        with client.stream("POST", "/predict", json={**ask, **extra, "stream": True}) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
        events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
        assert len(events) > 2  # pieces as they are generated, not the answers at the end
        texts, ends = [""] * len(prompts), {}
        for pieces in events:
            for piece in pieces:
                assert piece["index"] not in ends  # nothing after a prompt's last piece
                texts[piece["index"]] += piece["text"]
                if "finish_reason" in piece:
                    ends[piece["index"]] = (piece["finish_reason"], piece["tokens"])
        assert texts == [e["text"] for e in expected]
        assert [ends[i] for i in range(len(prompts))] == [(e["finish_reason"], e["tokens"]) for e in expected]
    assert expected[0]["finish_reason"] == "stop" and cut_at not in texts[0]


@pytest.mark.parametrize("variant", ["onnx-genai", "pytorch"])
def test_a_client_leaving_a_stream_frees_the_model_for_the_next_request(client, variant):
    """Generation holds the model one batch at a time; a stream whose reader goes away must let it go."""
    long = {"model": "colours", "variant": variant, "inputs": ["Tell me about colours."] * 16, "max_new_tokens": 512,
            "temperature": 1.0, "seed": 1, "stream": True}
    with httpx.Client(base_url=client.base_url, headers=client.headers, timeout=60) as leaving:
        with leaving.stream("POST", "/predict", json=long) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the first event, then the connection closes mid-answer
    started = time.monotonic()
    after = client.post("/predict", json={"model": "colours", "variant": variant, "inputs": ["Plum?"],
                                          "max_new_tokens": 3}, timeout=60)
    assert after.status_code == 200 and after.json()["predictions"][0]["tokens"] <= 3
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("extra, field", [
    ({"stream": True, "top_k": 2}, "top_k"), ({"stream": True, "max_new_tokens": 0}, "max_new_tokens"),
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
    refused = client.post("/predict", json={"model": "toy", "inputs": ["great film"], "stream": True})
    assert refused.status_code == 422 and refused.json()["field"] == "stream"
    wrong = client.post("/predict", json={"model": "toy", "inputs": ["great film"], "variant": "onnx-genai"})
    assert wrong.status_code == 422 and wrong.json()["field"] == "variant" and "text-generation variant" in wrong.text
    wrong = client.post("/predict", json={"model": "colours", "inputs": ["Hi"], "variant": "int8"})
    assert wrong.status_code == 422 and wrong.json()["field"] == "variant" and "onnx-genai" in wrong.text
    assert client.post("/predict", json={"model": "toy", "inputs": ["great film"]}).json()["predictions"][0]["label"]
    # "pytorch" is both kinds' variant: a classifier still serves it
    assert client.post("/predict", json={"model": "toy", "inputs": ["great film"], "variant": "pytorch"}).status_code == 200


def test_generated_tokens_are_counted(client):
    def counted() -> float:
        text = client.get("/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("finetune_generated_tokens_total{") and 'model="colours"' in line)

    before = counted()
    answer = client.post("/predict", json={"model": "colours", "inputs": ["Hi", "Plum?"], "max_new_tokens": 3}).json()
    assert counted() - before == sum(p["tokens"] for p in answer["predictions"]) > 0


def test_evaluate_scores_generations_and_refuses_the_training_prompts(client):
    from conftest import COLOURS
    from service_helpers import upload

    held_out = [{"prompt": f"Tell me, what colour is a {fruit}?", "completion": f"A {fruit} is {colour}."}
                for fruit, colour in COLOURS.items()] + [{"prompt": "", "completion": "nothing asked"}]
    answer = client.post("/evaluate", json={"model": "colours", "data": upload(client, held_out)["id"]})
    assert answer.status_code == 200, answer.text
    figures = answer.json()
    assert figures["rows"] == 10 and figures["dropped"] == {"empty or missing prompt": 1}
    assert figures["training_overlap"] == 0 and 0 <= figures["exact_match"] <= figures["rouge_l"] <= 1
    assert figures["rouge_l"] > 0 and len(figures["samples"]) == 5  # the run learnt the answers' shape

    trained = upload(client, [{"q": r["prompt"], "a": r["completion"]} for r in colour_rows(20)])
    refused = client.post("/evaluate", json={"model": "colours", "data": trained["id"], "text_column": "q",
                                             "label_column": "a"})
    assert refused.status_code == 422 and refused.json()["field"] == "data" and "trained on" in refused.text
    missing = client.post("/evaluate", json={"model": "colours", "data": trained["id"]})
    assert missing.status_code == 422 and missing.json()["field"] == "data" and "'prompt' and 'completion'" in missing.text


def test_finetune_trains_exports_and_serves_a_generation_model(client, tiny_causal_lm):
    rows = [{"question": r["prompt"], "answer": r["completion"]} for r in colour_rows(60, seed=3)]
    train = upload(client, rows)["id"]
    job = client.post("/finetune", json={"task": "text-generation", "base_model": str(tiny_causal_lm), "train": train,
                                         "text_column": "question", "label_column": "answer", "model_name": "colours-job",
                                         "adapter": {"rank": 4}, "packing": True,
                                         "hyperparameters": {"epochs": 1, "batch_size": 4, "learning_rate": 0.01,
                                                             "max_length": 160}})
    assert job.status_code == 202, job.text
    done = wait_for_job(client, job.json()["id"], timeout=300)
    assert done["status"] == "succeeded", done
    assert done["model"] == {"name": "colours-job", "version": "v1"}
    assert set(done["metrics"]) >= {"base", "test", "train", "variants"} and "rouge_l" in done["metrics"]["test"]
    assert done["metrics"]["variants"]["onnx-genai"]["accepted"]
    samples = client.get(f"/jobs/{done['id']}/artifacts/samples.jsonl")
    assert samples.status_code == 200 and {"prompt", "reference", "base", "fine_tuned"} <= set(
        json.loads(samples.text.splitlines()[0]))
    assert client.get(f"/jobs/{done['id']}/artifacts/curves.png").headers["content-type"] == "image/png"
    packing = client.get(f"/jobs/{done['id']}/artifacts/data_report.json").json()["packing"]
    assert packing["conversations"] == 48 and packing["rows"] <= 48 / 3  # 40-token conversations, 160-token rows
    assert done["metrics"]["train"]["steps"] == -(-packing["rows"] // 4)
    answer = client.post("/predict", json={"model": "colours-job", "inputs": ["What colour is a kiwi?"], "max_new_tokens": 6})
    assert answer.status_code == 200 and answer.json()["variant"] == "onnx-genai", answer.text


@pytest.mark.parametrize("extra, field", [
    ({"variants": ["onnx"]}, "variants"), ({"hyperparameters": {"truncation": "head"}}, "hyperparameters.truncation"),
    ({"adapter": {"rank": 0}}, "adapter.rank"), ({"hyperparameters": {"epochs": "auto"}}, "hyperparameters.epochs"),
    ({"hyperparameters": {"max_length": 4}}, "hyperparameters.max_length"), ({"base_model": "/etc"}, "base_model"),
])
def test_a_generation_job_with_a_bad_field_is_refused_naming_it(client, extra, field):
    train = upload(client, colour_rows(20))["id"]
    answer = client.post("/finetune", json={"task": "text-generation", "train": train, "model_name": "bad", **extra})
    assert answer.status_code == 422 and answer.json()["field"] == field, answer.text


def test_generation_fields_are_refused_for_a_classification_job(client):
    train = upload(client, [{"text": "good", "label": "pos"}] * 10)["id"]
    answer = client.post("/finetune", json={"train": train, "model_name": "x", "system_prompt": "Be brief."})
    assert answer.status_code == 422 and answer.json()["field"] == "system_prompt"
    answer = client.post("/finetune", json={"train": train, "model_name": "x", "packing": True})
    assert answer.status_code == 422 and answer.json()["field"] == "packing"


def test_v2_infer_generates_from_bytes_and_names_a_bad_parameter(client):
    import numpy as np
    import tritonclient.http as triton

    meta = client.get("/v2/models/colours").json()
    assert [o["name"] for o in meta["outputs"]] == ["text", "finish_reason"]
    assert meta["parameters"]["task"] == "text-generation" and meta["parameters"]["variants"] == ["pytorch", "onnx-genai"]
    rest = client.post("/predict", json={"model": "colours", "inputs": ["What colour is a lime?", "Plum?"],
                                         "max_new_tokens": 5}).json()["predictions"]
    with triton.InferenceServerClient(client.base_url.host + f":{client.base_url.port}", network_timeout=60) as v2:
        tensor = triton.InferInput("text", [2], "BYTES")
        tensor.set_data_from_numpy(np.array(["What colour is a lime?", "Plum?"], dtype=np.object_), binary_data=True)
        result = v2.infer("colours", [tensor], parameters={"max_new_tokens": 5})
    assert [t.decode() for t in result.as_numpy("text")] == [p["text"] for p in rest]
    assert [t.decode() for t in result.as_numpy("finish_reason")] == [p["finish_reason"] for p in rest]
    bad = client.post("/v2/models/colours/infer", json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                                                    "data": ["Hi"]}], "parameters": {"temperature": 9}})
    assert bad.status_code == 400 and "parameters.temperature" in bad.json()["error"]
    toy = client.post("/v2/models/toy/infer", json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                                                "data": ["great"]}], "parameters": {"max_new_tokens": 3}})
    assert toy.status_code == 400 and "parameters.max_new_tokens" in toy.json()["error"]
