"""Image data: find images and labels, drop unreadable ones, transform, batch.

Layouts: a class folder (`DIR/<class>/*.jpg`), a dataset root holding `train/` (and optionally
`val/` or `validation/`, `test/`) class folders, or a JSONL/CSV list of image paths and labels
(paths relative to the list's folder). Every image is decoded once before training: unreadable or
truncated files are counted and named in the data report and skipped, never a crash.

Transforms are one function of the model's metadata (size, resize, mean, std), shared by training
evaluation, export proofs and serving, so all of them see the same pixels. Training augmentation
(random resized crop, flip, small rotation, colour jitter) draws from a generator seeded by
(seed, epoch, row): the same seed gives the same tensors, and a resumed run replays them exactly.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .errors import DataError
from .tables import is_missing_label, read_examples

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VALIDATION_FOLDERS = ("val", "validation", "valid")
# Bad files named in the data report (all are counted).
REPORTED_BAD_FILES = 50
# PIL refuses images over ~89 Mpx as possible decompression bombs; we say so per file instead of crashing.
MAX_PIXELS = 89_478_485


def layout(train: str, validation: str | None, test: str | None) -> dict[str, str]:
    """Role -> folder or list file. A root with a `train/` folder supplies its own val/test folders."""
    root = Path(train)
    roles = {"train": train, "validation": validation, "test": test}
    if root.is_dir() and (root / "train").is_dir():
        roles["train"] = str(root / "train")
        if validation is None:
            found = [root / name for name in VALIDATION_FOLDERS if (root / name).is_dir()]
            roles["validation"] = str(found[0]) if found else None
        if test is None and (root / "test").is_dir():
            roles["test"] = str(root / "test")
    return {role: path for role, path in roles.items() if path}


def read_folder(folder: str | Path, role: str) -> tuple[list[str], list[str]]:
    """(image paths, class names) from FOLDER/<class>/<image>, in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{role} folder '{folder}' does not exist")
    paths, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(class_dir.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file() and not file.name.startswith("."):
                paths.append(str(file))
                labels.append(class_dir.name)
    if not paths:
        raise DataError(
            f"{role} folder '{folder}' has no images in class folders; expected {folder}/<class>/<image>"
            f" with one of {', '.join(IMAGE_SUFFIXES)} (or a dataset root holding train/<class>/...)"
        )
    return paths, labels


def read_list(path: str | Path, image_column: str, label_column: str, role: str, root: str | None) -> tuple[list, list]:
    """(image paths, raw labels) from a JSONL/CSV list; relative paths are taken from the list's folder.

    With `root` set (the service sets the upload's folder), a path that leaves it is an error: a
    list must not read other files on the server.
    """
    paths, labels = read_examples(path, image_column, label_column, role)
    base = Path(path).resolve().parent
    fence = Path(root).resolve() if root else None
    resolved = []
    for row, value in enumerate(paths, 1):
        if not isinstance(value, str) or not value.strip():
            resolved.append(None)
            continue
        full = (base / value.strip()).resolve()
        if fence is not None and not full.is_relative_to(fence):
            raise DataError(f"{role} row {row}: image path '{value}' points outside the dataset folder")
        resolved.append(str(full))
    return resolved, labels


def read_images(source: str | Path, role: str, image_column: str = "image", label_column: str = "label",
                root: str | None = None) -> tuple[list[str], list, dict]:
    """Readable images and their raw labels from a class folder or an image list, and what was dropped."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{role} folder or image list '{source}' does not exist")
    if source.is_dir():
        return clean_images(*read_folder(source, role))
    return clean_images(*read_list(source, image_column, label_column, role, root))


def check_image(path: str) -> str | None:
    """None when the file decodes completely as an image, else why not (for the data report)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                return f"too large ({img.width}x{img.height} pixels)"
            img.draft("RGB", (64, 64))  # JPEG: decode at a reduced scale; a truncated file still fails
            img.load()
    except FileNotFoundError:
        return "file not found"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError, SyntaxError) as err:  # truncated data, bad headers
        return f"unreadable ({err})"
    return None


def clean_images(paths: list, labels: list) -> tuple[list[str], list, dict]:
    """Drop rows without a label or a readable image, and repeated files; say what and why."""
    dropped, bad, seen = Counter(), [], set()
    out_paths, out_labels = [], []
    for path, label in zip(paths, labels):
        if is_missing_label(label):
            dropped["missing_label"] += 1
            continue
        if path is None:
            dropped["missing_image"] += 1
            continue
        if path in seen:
            dropped["duplicate"] += 1
            continue
        problem = check_image(path)
        if problem:
            dropped["bad_image"] += 1
            if len(bad) < REPORTED_BAD_FILES:
                bad.append({"file": path, "reason": problem})
            continue
        seen.add(path)
        out_paths.append(path)
        out_labels.append(label)
    report = {"rows_in": len(paths), "rows_out": len(out_paths), "dropped": dict(sorted(dropped.items()))}
    if bad:
        report["bad_images"] = bad
    return out_paths, out_labels, report


# ---------------------------------------------------------------- transforms


@dataclass(frozen=True)
class ImageSpec:
    """What a model expects: square input size, the resize before the centre crop, normalisation."""

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_meta(cls, meta) -> ImageSpec:
        """From a ModelMeta (metadata.py) of an image model."""
        return cls(meta.image_size, meta.resize_size, tuple(meta.mean), tuple(meta.std))

    def at_size(self, size: int) -> ImageSpec:
        """The same preprocessing at another input size: the resize keeps its ratio to the crop."""
        return ImageSpec(size, int(round(size * self.resize / self.size)), self.mean, self.std)

    def meta(self) -> dict:
        """The ModelMeta fields that record this spec."""
        return {"image_size": self.size, "resize_size": self.resize, "mean": list(self.mean), "std": list(self.std)}


def open_rgb(source, spec: ImageSpec):
    """A PIL RGB image from a path, encoded bytes, a PIL image or a HxWx3 uint8 array."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        return Image.fromarray(source.astype(np.uint8), "RGB")
    img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    if img.width * img.height > MAX_PIXELS:
        raise DataError(f"image too large ({img.width}x{img.height} pixels)")
    # JPEG decodes at a reduced scale when the file is much larger than needed: a large win on CPU.
    img.draft("RGB", (spec.resize, spec.resize))
    return img.convert("RGB")


def eval_transform(spec: ImageSpec):
    """Resize the shorter side to spec.resize, centre-crop spec.size, scale to [0, 1], normalise."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.ToImage(),
        v2.Resize(spec.resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.CenterCrop(spec.size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(spec.mean, spec.std),
    ])


def train_transform(spec: ImageSpec, flip: bool = True):
    """Random resized crop (25-100% of the area), horizontal flip, +-10 degree rotation, colour jitter."""
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.RandomResizedCrop(spec.size, scale=(0.25, 1.0), antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        v2.RandomRotation(10),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(spec.mean, spec.std),
    ]
    return v2.Compose(steps)


def pixel_values(sources, spec: ImageSpec) -> np.ndarray:
    """Decode and preprocess images for inference: float32 (rows, 3, size, size)."""
    transform = eval_transform(spec)
    return np.stack([transform(open_rgb(s, spec)).numpy() for s in sources]).astype(np.float32, copy=False)


# ---------------------------------------------------------------- batches


@dataclass
class ImageRows:
    """Image rows for fit() and evaluation: paths and targets; decoded and transformed per batch."""

    paths: list[str]
    targets: list
    spec: ImageSpec
    regression: bool = False
    augment: bool = False  # training rows only
    flip: bool = True
    seed: int = 0

    @property
    def lengths(self) -> list[int]:
        return [1] * len(self.paths)  # one size: length grouping has nothing to group

    def loader(self, batches: list[list[int]], epoch: int = 0) -> DataLoader:
        transform = train_transform(self.spec, self.flip) if self.augment else eval_transform(self.spec)
        dtype = torch.float32 if self.regression else torch.long

        def collate(indices: list[int]) -> dict:
            images = []
            for i in indices:
                img = open_rgb(self.paths[i], self.spec)
                if self.augment:
                    # A generator per (seed, epoch, row): deterministic, independent of batch order and workers.
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(augment_seed(self.seed, epoch, i))
                        images.append(transform(img))
                else:
                    images.append(transform(img))
            # channels_last: the layout oneDNN's convolutions want on CPU (measured 1.5-2x on EfficientNet-Lite0).
            pixels = torch.stack(images).contiguous(memory_format=torch.channels_last)
            return {"inputs": {"pixel_values": pixels}, "labels": torch.tensor([self.targets[i] for i in indices], dtype=dtype)}

        workers = loader_workers()
        return DataLoader(range(len(self.paths)), batch_sampler=batches, collate_fn=collate, num_workers=workers,
                          generator=torch.Generator(), persistent_workers=False)


def augment_seed(seed: int, epoch: int, row: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + row) % (2**63)


def loader_workers() -> int:
    """Decoding workers: FINETUNE_SERVE_IMAGE_WORKERS, default 0 (decode in the training process).

    On 2 cores a worker process competes with the model for the same cores; on larger machines a
    few workers hide JPEG decoding entirely.
    """
    return int(os.environ.get("FINETUNE_SERVE_IMAGE_WORKERS", "0"))


def size_report(paths: list[str]) -> dict:
    """Image width/height percentiles and colour modes (from headers only) for the data report."""
    from PIL import Image

    sizes, modes = [], Counter()
    for p in paths:
        with Image.open(p) as img:
            sizes.append(img.size)
            modes[img.mode] += 1
    w, h = np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes])
    short = np.minimum(w, h)
    return {
        "width": {"min": int(w.min()), "p50": int(np.median(w)), "max": int(w.max())},
        "height": {"min": int(h.min()), "p50": int(np.median(h)), "max": int(h.max())},
        "short_side": {"min": int(short.min()), "p50": int(np.median(short)), "max": int(short.max())},
        "modes": dict(modes),
    }
