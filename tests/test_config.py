import json

import pytest

from finetune_core.config import TrainConfig, config_from_dict, load_config, merge
from finetune_core.errors import ConfigError


def test_defaults_and_yaml_round_trip(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("data:\n  train: t.jsonl\ntrain:\n  epochs: 3\n  schedule: cosine\nmodel:\n  freeze: bottom:2\n")
    cfg = config_from_dict(load_config(path))
    assert cfg.train.epochs == 3 and cfg.train.schedule == "cosine" and cfg.model.freeze == "bottom:2"
    assert cfg.train.optimizer == "adamw" and cfg.model.base_model == "default"
    again = tmp_path / "job.json"
    again.write_text(json.dumps(cfg.to_dict()))
    assert config_from_dict(load_config(again)) == cfg


def test_flags_override_file_values():
    raw = {"data": {"train": "a.jsonl"}, "train": {"epochs": 3}}
    cfg = config_from_dict(merge(raw, {"train": {"epochs": 5, "batch_size": None}}))
    assert cfg.train.epochs == 5 and cfg.train.batch_size == TrainConfig().batch_size


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"data": {}}, "data.train: a training file is required"),
        ({"data": {"train": "t"}, "train": {"optimizer": "lamb"}}, "train.optimizer: 'lamb' is not allowed; choose one of adamw, adam, sgd"),
        ({"data": {"train": "t"}, "train": {"epochs": 0}}, "train.epochs: must be a whole number >= 1"),
        ({"data": {"train": "t"}, "train": {"epochs": "2"}}, "train.epochs: expected int or 'auto', got str"),
        ({"data": {"train": "t"}, "train": {"log_every_steps": 0}}, "train.log_every_steps: must be a whole number >= 1"),
        ({"data": {"train": "t"}, "train": {"learning_rate": 0}}, "train.learning_rate: must be a number in (0.0, 1.0]"),
        ({"data": {"train": "t"}, "train": {"warmup": 0.1}}, "train.warmup: unknown field"),
        ({"data": {"train": "t"}, "model": {"freeze": "top:2"}}, "freeze: unknown policy 'top:2'"),
        ({"data": {"train": "t"}, "model": {"freeze": "bottom:x"}}, "bottom:N with N a whole number"),
        ({"data": {"train": "t", "task": "ner"}}, "data.task: 'ner' is not allowed"),
        ({"data": {"train": "t"}, "trainer": {}}, "unknown section(s) ['trainer']"),
        ({"data": {"train": "t", "task": "text-regression"}, "train": {"early_stopping_metric": "accuracy"}},
         "accuracy' is a classification metric"),
        ({"data": {"train": "t"}, "data_": {}}, "unknown section(s) ['data_']"),
        ({"data": {"train": "t", "max_length": "long"}}, "data.max_length: expected int or 'auto', got str 'long'"),
    ],
)
def test_errors_name_the_field_and_allowed_values(raw, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert message in str(err.value)


def test_unparseable_config_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_config(path)


def test_task_defaults_fill_what_the_user_did_not_give_and_record_where_each_value_came_from():
    cfg = config_from_dict({"data": {"train": "t", "task": "image-classification"}, "train": {"batch_size": 8}})
    assert (cfg.train.batch_size, cfg.train.early_stopping_patience, cfg.model.freeze) == (8, 3, "auto")
    assert cfg.sources["train.batch_size"] == "user" and cfg.sources["data.task"] == "user"
    assert cfg.sources["train.early_stopping_patience"] == "task default" and cfg.sources["model.freeze"] == "task default"
    assert cfg.sources["train.optimizer"] == "default"
    regression = config_from_dict({"data": {"train": "t", "task": "text-regression"}})
    assert regression.train.early_stopping_metric == "loss"  # a classification metric would be refused
    text = config_from_dict({"data": {"train": "t"}})
    assert (text.train.epochs, text.data.max_length, text.model.freeze) == ("auto", "auto", "none")


def test_a_saved_config_keeps_its_sources_and_resolved_values(tmp_path):
    cfg = config_from_dict({"data": {"train": "t"}, "train": {"seed": 3}}).resolved({"train.epochs": 4})
    assert cfg.train.epochs == 4 and cfg.sources["train.epochs"] == "auto"
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.sources["train.seed"] == "user" and again.sources["train.epochs"] == "auto"
    assert again.data.max_length == "auto"  # resolved when the data is read
