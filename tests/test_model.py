import pytest

from finetune_core.errors import ConfigError, ModelError
from finetune_core.model import build_model, freeze, resolve_base_model


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_freeze_policies_count_parameters(tiny_base):
    model, _ = build_model(str(tiny_base), ["a", "b", "c"])
    total = _count(model)
    emb = _count(model.bert.embeddings)
    layer = _count(model.bert.encoder.layer[0])
    head = _count(model.classifier) + _count(model.bert.pooler)
    assert freeze(model, "none") == {"policy": "none", "trainable_parameters": total, "total_parameters": total}
    assert freeze(model, "embeddings")["trainable_parameters"] == total - emb
    assert freeze(model, "bottom:1")["trainable_parameters"] == total - emb - layer
    assert freeze(model, "all-but-head")["trainable_parameters"] == head
    assert not model.bert.encoder.layer[1].output.dense.weight.requires_grad
    assert freeze(model, "none")["trainable_parameters"] == total  # unfreezes again
    with pytest.raises(ConfigError, match="asks for 5 layers but the model has 2"):
        freeze(model, "bottom:5")


def test_new_head_has_one_logit_per_label_or_one_for_regression(tiny_base):
    model, _ = build_model(str(tiny_base), ["x", "y", "z"])
    assert model.config.num_labels == 3 and model.config.id2label == {0: "x", 1: "y", 2: "z"}
    model, _ = build_model(str(tiny_base), None)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


def test_default_base_model_is_the_bundled_minilm():
    path = resolve_base_model("default")
    import json, pathlib

    config = json.loads((pathlib.Path(path) / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["hidden_size"] == 384


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_base_model(str(tmp_path))
    with pytest.raises(ModelError, match="not an existing folder"):
        resolve_base_model("./no/such/model")
