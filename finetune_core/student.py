"""Students for distillation: smaller models that start from the fine-tuned teacher's own weights.

Text: the teacher with some encoder layers dropped (every other one by default, the last kept), its
embeddings, kept layers, pooler and fine-tuned head copied ("layer-copy" initialisation); or a local
model folder that tokenizes exactly as the teacher does. Images: the teacher at a smaller input size
and/or with fewer blocks in its stages (the blocks kept are the teacher's).
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from .errors import ConfigError, ModelError
from .image_model import ImageModel, keep_blocks, stage_depths
from .images import ImageSpec

# Texts a student's tokenizer must turn into the teacher's ids: case, accents, digits, punctuation, a rare word.
TOKENIZER_PROBES = ("Hello World! It's a FINE film.", "Café Ünïcode naïve 123,456.7", "unbelievably-overwrought #2")


def every_other_layer(count: int) -> list[int]:
    """Half the layers, the last one included: 6 -> [1, 3, 5], 12 -> [1, 3, ..., 11], 2 -> [1].

    The last layer stays because the fine-tuned head was trained on its output.
    """
    return list(range(count - 1, -1, -2))[::-1]


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"distill: the teacher ({type(model).__name__}) has no encoder.layer list to drop layers "
                         "from; give a student folder (distill.student) instead")
    return layers


def layer_drop_student(teacher: nn.Module, layers: list[int] | None = None) -> tuple[nn.Module, list[int]]:
    """The teacher's class and config with only `layers` of its encoder, every weight copied from the teacher.

    Returns the student (train mode off) and the layers kept.
    """
    count = len(encoder_layers(teacher))
    layers = every_other_layer(count) if layers is None else list(layers)
    outside = [i for i in layers if i >= count]
    if outside:
        raise ConfigError(f"distill.student_layers: the teacher has layers 0-{count - 1}; {outside} do not exist")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    student = type(teacher)(config)
    prefix = f"{teacher.base_model_prefix}.encoder.layer."
    state = {}
    for name, tensor in teacher.state_dict().items():
        if not name.startswith(prefix):
            state[name] = tensor.clone()
            continue
        index, rest = name[len(prefix):].split(".", 1)
        if int(index) in layers:
            state[f"{prefix}{layers.index(int(index))}.{rest}"] = tensor.clone()
    student.load_state_dict(state, strict=True)  # every student tensor comes from the teacher
    return student.eval(), layers


def folder_student(path: str, labels: list[str] | None, teacher_tokenizer) -> nn.Module:
    """A local transformers model folder with a new head, refused unless it tokenizes exactly as the teacher."""
    from .model import build_model

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"distill.student: '{path}' is not a local model folder (no config.json)")
    check_same_tokenizer(teacher_tokenizer, folder)
    student, _ = build_model(str(folder), labels)
    return student.eval()


def check_same_tokenizer(teacher_tokenizer, folder: Path) -> None:
    """ConfigError naming the difference when the folder's tokenizer or vocabulary is not the teacher's.

    The teacher's logits are per row, but the student's inputs are tokenized once with the teacher's
    tokenizer and served with the student's own: both must give the same ids.
    """
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ConfigError(f"distill.student: '{folder}' has no usable tokenizer ({err}); a student must carry the "
                          "teacher's tokenizer: save the teacher's tokenizer into the folder") from None
    ours_vocab, their_vocab = teacher_tokenizer.get_vocab(), theirs.get_vocab()
    if ours_vocab != their_vocab:
        differ = sorted(set(ours_vocab.items()) ^ set(their_vocab.items()), key=lambda item: item[1])
        raise ConfigError(
            f"distill.student: '{folder}' has a different vocabulary from the teacher's ({len(their_vocab)} tokens "
            f"against {len(ours_vocab)}; {len(differ)} token/id pairs differ, e.g. {differ[0]!r}); a student must use "
            "the teacher's tokenizer. Use a model built on the same base, or leave distill.student unset to drop "
            "layers from the teacher")
    for text in TOKENIZER_PROBES:
        ours, their = teacher_tokenizer(text)["input_ids"], theirs(text)["input_ids"]
        if ours != their:
            raise ConfigError(
                f"distill.student: '{folder}' tokenizes differently from the teacher with the same vocabulary "
                f"({text!r} -> {their} against {ours}: lower-casing, accents or special tokens differ); a student "
                "must use the teacher's tokenizer")


def image_student(teacher: ImageModel, spec: ImageSpec, image_size: int = 0,
                  block_depths: list[int] | None = None) -> tuple[ImageModel, ImageSpec, list[int]]:
    """A copy of the teacher keeping the first `block_depths[i]` blocks of stage i, fed `image_size` pixels.

    Blocks after a stage's first keep their input's shape (stride 1, residual), so dropping them
    leaves a working network. Returns the student, its input spec and the depths kept.
    """
    depths = stage_depths(teacher.net)
    kept = depths if block_depths is None else list(block_depths)
    if len(kept) != len(depths) or any(k > d for k, d in zip(kept, depths)):
        raise ConfigError(f"distill.block_depths: {teacher.arch} has {len(depths)} stages of {depths} blocks; give one "
                          f"count per stage, each at most the stage's, got {kept}")
    student = copy.deepcopy(teacher)
    keep_blocks(student.net, kept)
    return student.eval(), spec.at_size(image_size) if image_size else spec, kept
