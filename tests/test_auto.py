"""Auto values chosen from the data: epochs by optimizer steps, max_length by token lengths, images by size."""

from __future__ import annotations

import pytest

from finetune_core import auto
from finetune_core.config import config_from_dict


def test_epochs_reach_the_minimum_steps_on_small_sets_and_one_pass_on_large_ones():
    assert auto.epochs_for(2000, 32, 1, 250, 10, 12_000)[0] == 4  # 63 steps per epoch
    assert auto.epochs_for(100, 32, 1, 250, 10, 12_000)[0] == 10  # capped by passes
    assert auto.epochs_for(5000, 32, 1, 250, 10, 12_000)[0] == 2  # 157 steps: 2 epochs, 10,000 rows seen
    epochs, why = auto.epochs_for(67_000, 32, 1, 250, 10, 12_000)
    assert epochs == 1 and "2094 optimizer steps per epoch" in why
    epochs, why = auto.epochs_for(7000, 32, 1, 250, 10, 12_000)  # 219 steps: 2 epochs wanted, 14,000 rows seen
    assert epochs == 1 and "2 epochs reach 250 steps, capped at 12000 rows seen" in why
    assert auto.epochs_for(2000, 16, 2, 250, 10, 100_000)[0] == 4  # accumulation: 63 optimizer steps per epoch


def test_a_user_value_is_never_replaced():
    cfg = config_from_dict({"data": {"train": "t", "max_length": 64, "truncation": "head"}, "train": {"epochs": 2}})
    resolved, chosen = auto.resolve_text(cfg, [100] * 100, 512)
    assert (resolved.train.epochs, resolved.data.max_length, resolved.data.truncation) == (2, 64, "head") and chosen == {}
    assert resolved.sources["train.epochs"] == "user"


def test_max_length_covers_most_rows_within_the_model_and_a_compute_cap():
    cfg = config_from_dict({"data": {"train": "t"}})
    lengths = [20] * 90 + [70] * 5 + [900] * 5  # p95 = 70 -> 80
    resolved, chosen = auto.resolve_text(cfg, lengths, 512)
    assert resolved.data.max_length == 80 and resolved.sources["data.max_length"] == "auto"
    assert "5.0% of rows are longer" in chosen["data.max_length"]["why"]
    assert auto.resolve_text(cfg, [600] * 10, 512)[0].data.max_length == auto.MAX_LENGTH_CAP
    assert auto.resolve_text(cfg, [600] * 10, 128)[0].data.max_length == 128  # the model's own limit
    assert auto.resolve_text(cfg, [5] * 10, 512)[0].data.max_length == 32


@pytest.mark.parametrize("side, size, freeze, lr, augment", [
    (500, 0, "all-but-head", 3e-3, True),  # photos: the model's own 224 px, a frozen network's head
    (160, 0, "all-but-head", 3e-3, True),
    (28, 64, "none", 1e-3, False),  # digits: a small input, the whole network
    (8, 32, "none", 1e-3, False),
    (100, 224, "all-but-head", 3e-3, True),  # upscaled to the model's size: treated as a photo
])
def test_images_choose_size_freeze_rate_and_augmentation_from_their_size(side, size, freeze, lr, augment):
    cfg = config_from_dict({"data": {"train": "t", "task": "image-classification"}})
    resolved, chosen = auto.resolve_images(cfg, 400, side, 224)
    assert resolved.data.image_size == size and resolved.model.freeze == freeze
    assert resolved.train.learning_rate == lr and resolved.data.augment is augment
    assert all(resolved.sources[k] == "auto" for k in chosen) and set(chosen) >= {"model.freeze", "train.epochs"}


def test_a_given_freeze_policy_sets_the_rate_that_suits_it():
    cfg = config_from_dict({"data": {"train": "t", "task": "image-classification"}, "model": {"freeze": "none"}})
    resolved, chosen = auto.resolve_images(cfg, 400, 500, 224)
    assert resolved.model.freeze == "none" and resolved.train.learning_rate == 1e-3 and "model.freeze" not in chosen


def test_truncation_keeps_head_and_tail_once_a_tenth_of_the_rows_are_cut():
    cfg = config_from_dict({"data": {"train": "t"}})
    few_long = [20] * 95 + [900] * 5  # max_length auto covers 95%: 5% cut
    resolved, chosen = auto.resolve_text(cfg, few_long, 512)
    assert resolved.data.truncation == "head" and "5.0% of training rows are longer" in chosen["data.truncation"]["why"]
    reviews = [150] * 50 + [400] * 50  # the 256 cap binds: half the rows are cut
    resolved, chosen = auto.resolve_text(cfg, reviews, 512)
    assert (resolved.data.max_length, resolved.data.truncation) == (256, "head+tail")
    assert resolved.sources["data.truncation"] == "auto" and "50.0%" in chosen["data.truncation"]["why"]
    given = config_from_dict({"data": {"train": "t", "max_length": 64}})  # a user's short cut counts too
    assert auto.resolve_text(given, [100] * 10, 512)[0].data.truncation == "head+tail"
