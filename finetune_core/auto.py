"""Choose a job's "auto" values from its data, each with the reason the data report shows.

Text: max_length from the training rows' token lengths; epochs from the number of optimizer steps.
Images: the input size from the images' own size; then the freeze policy, learning rate and
augmentation that suit that size; epochs as for text. A value the user gave is never auto.

A leaf over config.py (no torch): the pipeline measures the data and calls these plain functions.
"""

from __future__ import annotations

import math

from .config import AUTO, JobConfig

# Epochs: enough passes for a minimum number of optimizer steps on small sets, fewer on large ones,
# capped by a number of passes and of rows seen, with early stopping on the validation split.
# Text, SST-2 with MiniLM: 1 epoch of 2,000 rows (63 steps) reached 0.79-0.80; more steps help up to
# a few hundred, after which early stopping ends the run.
TEXT_MIN_STEPS = 250
TEXT_MAX_EPOCHS = 10
TEXT_MAX_ROWS_SEEN = 12_000  # about 3 minutes of MiniLM on 2 CPU cores in fp32
# Images: a frozen network's head (or a small network at a small size) needs more steps, and each is cheaper.
# Digits regression (8 px scans at 32 px, whole network): 200 steps reached R2 0.81 with the best figure at
# the last evaluation; 300 give the curves room to level off.
IMAGE_MIN_STEPS = 300
IMAGE_MAX_EPOCHS = 30
# Images seen at the model's own size (hymenoptera's head at 224 px: about 2 minutes on 2 CPU cores); a
# smaller input costs (size / 224)^2 as much per image, so proportionally more fit the same budget.
IMAGE_MAX_ROWS_SEEN = 8_000

# max_length: the 95th percentile of the training rows' token lengths, rounded up to a multiple of 16,
# at least 32 and at most 256 (attention and the rest grow with length: 256 costs over twice 128).
MAX_LENGTH_PERCENTILE = 95
MAX_LENGTH_CAP = 256
# truncation: head+tail once this share of the training rows is longer than max_length (with max_length
# auto, only when the cap binds: texts of several hundred tokens, reviews and articles).
HEAD_TAIL_SHARE = 0.10

# Images at least this share of the model's own size are photos for it: train the head of the frozen
# ImageNet network (hymenoptera at 224: 96% validation accuracy in 2 epochs, 17 s). Smaller images
# (digits, icons, thumbnails) are upscaled 2.25x to a multiple of 32 and the whole network learns them:
# 28-pixel digits at 64 px, whole network: 0.915 test accuracy, against 0.78 for the frozen network at 224
# in about the same time.
PHOTO_SHARE = 0.7
SMALL_UPSCALE = 2.25
HEAD_ONLY_LEARNING_RATE = 3e-3
WHOLE_NETWORK_LEARNING_RATE = 1e-3


def epochs_for(rows: int, batch_size: int, accumulation: int, min_steps: int, max_epochs: int,
               max_rows_seen: int) -> tuple[int, str]:
    """(epochs, why): ceil(min_steps / steps per epoch), capped by max_epochs and max_rows_seen, at least 1."""
    steps = math.ceil(math.ceil(rows / batch_size) / accumulation)
    wanted = math.ceil(min_steps / steps)
    budget = max(1, max_rows_seen // max(rows, 1))
    epochs = max(1, min(wanted, max_epochs, budget))
    why = f"{rows} training rows make {steps} optimizer steps per epoch; {wanted} epochs reach {min_steps} steps"
    if epochs < wanted:
        limit = f"{max_epochs} epochs" if max_epochs <= budget else f"{max_rows_seen} rows seen"
        why += f", capped at {limit}"
    return epochs, why + "; early stopping on the validation split may end sooner"


def resolve_text(cfg: JobConfig, train_token_lengths: list[int], model_max_length: int) -> tuple[JobConfig, dict]:
    """Resolve max_length, truncation and epochs of a text job; returns the new config and {field: {value, why}}."""
    chosen: dict[str, dict] = {}
    if cfg.data.max_length == AUTO:
        ordered = sorted(train_token_lengths)
        p = ordered[min(len(ordered) - 1, math.ceil(MAX_LENGTH_PERCENTILE / 100 * len(ordered)) - 1)]
        cap = min(MAX_LENGTH_CAP, model_max_length)
        value = max(32, min(cap, 16 * math.ceil(p / 16)))
        cut = sum(length > value for length in ordered) / len(ordered)
        chosen["data.max_length"] = {"value": value, "why": (
            f"{MAX_LENGTH_PERCENTILE}% of training rows have at most {p} tokens; rounded up to {value} "
            f"(at least 32, at most {cap}); {cut:.1%} of rows are longer and truncated")}
    if cfg.data.truncation == AUTO:
        max_length = chosen["data.max_length"]["value"] if "data.max_length" in chosen else cfg.data.max_length
        cut = sum(length > max_length for length in train_token_lengths) / len(train_token_lengths)
        long = cut >= HEAD_TAIL_SHARE
        chosen["data.truncation"] = {"value": "head+tail" if long else "head", "why": (
            f"{cut:.1%} of training rows are longer than {max_length} tokens; " + (
                "keep the first quarter and the last three quarters of each (a review's verdict, an article's "
                "conclusion are at the end)" if long else f"under {HEAD_TAIL_SHARE:.0%}: keep the start of each"))}
    chosen.update(_epochs(cfg, len(train_token_lengths), TEXT_MIN_STEPS, TEXT_MAX_EPOCHS, TEXT_MAX_ROWS_SEEN))
    return _apply(cfg, chosen)


def resolve_images(cfg: JobConfig, train_rows: int, median_side: int, native_size: int) -> tuple[JobConfig, dict]:
    """Resolve image size, freeze, learning rate, augmentation and epochs from the images' median shorter side."""
    chosen: dict[str, dict] = {}
    size = cfg.data.image_size
    if size == AUTO:
        if median_side >= PHOTO_SHARE * native_size:
            size, why = 0, (f"the median image's shorter side is {median_side} px, at least {PHOTO_SHARE:.0%} of "
                            f"the model's own {native_size} px: the model's own size")
        else:
            size = max(32, min(native_size, 32 * math.ceil(SMALL_UPSCALE * median_side / 32)))
            why = (f"the median image's shorter side is {median_side} px: {SMALL_UPSCALE}x upscaled to a multiple of "
                   f"32, {size} px (the model's own {native_size} px would cost {(native_size / size) ** 2:.0f}x the compute)")
        chosen["data.image_size"] = {"value": size, "why": why}
    photo = (size or native_size) >= PHOTO_SHARE * native_size
    kind = "photos at the model's size" if photo else "small images"
    freeze = cfg.model.freeze
    if freeze == AUTO:
        freeze = "all-but-head" if photo else "none"
        chosen["model.freeze"] = {"value": freeze, "why": (
            f"{kind}: " + ("train the head of the frozen ImageNet network" if photo else "train the whole network"))}
    if cfg.train.learning_rate == AUTO:
        head_only = freeze == "all-but-head"
        value = HEAD_ONLY_LEARNING_RATE if head_only else WHOLE_NETWORK_LEARNING_RATE
        chosen["train.learning_rate"] = {"value": value, "why": (
            f"freeze '{freeze}': " + ("a new head alone takes a high rate" if head_only else "the pretrained layers train too"))}
    if cfg.data.augment == AUTO:
        chosen["data.augment"] = {"value": photo, "why": (
            f"{kind}: " + ("random crops, flips, rotation and colour jitter" if photo else
                           "no augmentation: crops of a few dozen pixels cut away what the label is about"))}
    budget = int(IMAGE_MAX_ROWS_SEEN * (native_size / (size or native_size)) ** 2)
    chosen.update(_epochs(cfg, train_rows, IMAGE_MIN_STEPS, IMAGE_MAX_EPOCHS, budget))
    return _apply(cfg, chosen)


def _epochs(cfg: JobConfig, rows: int, min_steps: int, max_epochs: int, max_rows_seen: int) -> dict:
    if cfg.train.epochs != AUTO:
        return {}
    value, why = epochs_for(rows, cfg.train.batch_size, cfg.train.gradient_accumulation, min_steps, max_epochs,
                            max_rows_seen)
    return {"train.epochs": {"value": value, "why": why}}


def _apply(cfg: JobConfig, chosen: dict[str, dict]) -> tuple[JobConfig, dict]:
    return cfg.resolved({key: c["value"] for key, c in chosen.items()}), chosen
