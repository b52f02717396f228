"""Typed model metadata: a model folder's finetune_serve.json and a registry version's manifest.json.

Each file has one reader and one writer here; everything else passes the dataclasses around and reads
attributes. A leaf module (no torch), so the service and the CLI can use it cheaply.

On disk a manifest is flat: the model's metadata (task, labels, input limits) beside the version's own
fields, and each variant's measured figures beside its file, proof and verdict. `GET /models/{name}`
returns that same JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelError

META_FILE = "finetune_serve.json"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class Columns:
    """Which columns of a table hold the text, the label and (image lists) the image path."""

    text: str = "text"
    label: str = "label"
    image: str = "image"


@dataclass(frozen=True)
class ModelMeta:
    """What a trained model is and what it takes: written beside its weights as finetune_serve.json."""

    task: str
    labels: list[str] | None  # class names by output index; None for regression
    base_model: str = "default"
    # Regression targets were standardised with these (training split); predictions undo it.
    target_mean: float | None = None
    target_std: float | None = None
    # Text models.
    max_length: int | None = None
    truncation: str = "head"  # or head+tail: what a text longer than max_length keeps (data.tokenize)
    lowercase: bool = False
    # The columns the training files used: reused when a file is read for this model (export, evaluate).
    text_column: str = "text"
    label_column: str = "label"
    image_column: str = "image"
    # Image models: the timm architecture and the input spec (square size, resize before crop, normalisation).
    arch: str | None = None
    image_size: int | None = None
    resize_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    block_depths: list[int] | None = None  # blocks kept per stage (a distilled student); None: the arch's own

    @property
    def is_image(self) -> bool:
        return self.task.startswith("image")

    @property
    def is_regression(self) -> bool:
        return self.task.endswith("regression")

    def columns(self, text: str | None = None, label: str | None = None, image: str | None = None) -> Columns:
        """The columns the model was trained with, each overridden where given."""
        return Columns(text or self.text_column, label or self.label_column, image or self.image_column)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "metadata") -> ModelMeta:
        return _build(cls, raw, where)


@dataclass(frozen=True)
class VariantRecord:
    """One variant of a version: its file (None when refused or derived at load), proof and verdict."""

    accepted: bool
    reason: str
    file: str | None = None
    size: int | None = None  # bytes, recorded by the registry
    sha256: str | None = None  # of the file, or of a folder's sorted (path, sha256) listing
    proof: dict | None = None  # parity figures, quantization details
    figures: dict = field(default_factory=dict)  # measured on validation: accuracy..., latency, throughput

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "figures"}
        return {**self.figures, **out}

    @classmethod
    def from_dict(cls, raw: dict, where: str = "variant") -> VariantRecord:
        names = {f.name for f in dataclasses.fields(cls)} - {"figures"}
        known = {k: v for k, v in raw.items() if k in names}
        return _build(cls, {**known, "figures": {k: v for k, v in raw.items() if k not in names}}, where)


@dataclass(frozen=True)
class Manifest:
    """A registered version: the model's metadata, where it came from, and every variant's record."""

    model: ModelMeta
    variants: dict[str, VariantRecord]
    proof: dict = field(default_factory=dict)  # validation file, rows, gate, parity tolerance
    source_run: str | None = None
    training_metrics: dict | None = None
    validation_metrics: dict | None = None
    name: str | None = None  # set by the registry
    version: str | None = None  # set by the registry
    created: str | None = None  # set by the registry (UTC, ISO 8601)

    def accepted(self) -> list[str]:
        return [name for name, record in self.variants.items() if record.accepted]

    def to_dict(self) -> dict:
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "variants")}
        return {**self.model.to_dict(), **own, "variants": {k: v.to_dict() for k, v in self.variants.items()}}

    @classmethod
    def from_dict(cls, raw: dict, where: str = "manifest") -> Manifest:
        if not isinstance(raw, dict):
            raise ModelError(f"{where}: expected a JSON object")
        meta_names = {f.name for f in dataclasses.fields(ModelMeta)}
        own_names = {f.name for f in dataclasses.fields(cls)} - {"model", "variants"}
        variants = raw.get("variants") or {}
        return cls(
            model=ModelMeta.from_dict({k: v for k, v in raw.items() if k in meta_names}, where),
            variants={k: VariantRecord.from_dict(v, f"{where} variant '{k}'") for k, v in variants.items()},
            **{k: v for k, v in raw.items() if k in own_names},
        )


def read_meta(model_dir: str | Path) -> ModelMeta:
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise ModelError(f"'{model_dir}' is not a finetune-serve model folder (no {META_FILE}); pass RUN_DIR/model")
    return ModelMeta.from_dict(_read_json(path), str(path))


def write_meta(meta: ModelMeta, model_dir: str | Path) -> None:
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    (Path(model_dir) / META_FILE).write_text(json.dumps(meta.to_dict(), indent=2))


def read_manifest(version_dir: str | Path) -> Manifest:
    path = Path(version_dir) / MANIFEST_FILE
    return Manifest.from_dict(_read_json(path), str(path))


def write_manifest(manifest: Manifest, version_dir: str | Path) -> None:
    """Written before the version folder is renamed into place, so no reader sees it half-written."""
    path = Path(version_dir) / MANIFEST_FILE
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # unique per thread too
    with os.fdopen(handle, "w") as out:
        out.write(json.dumps(manifest.to_dict(), indent=2))
    os.chmod(tmp, 0o644)  # as a plain write would leave it (mkstemp's file starts private)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"'{path}' cannot be read: {err}") from None


def _build(cls, raw: dict, where: str):
    """Construct from a dict, ignoring keys this version does not know; a missing field is named."""
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: expected a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise ModelError(f"{where}: missing field(s) {', '.join(missing)}")
    return cls(**{k: v for k, v in raw.items() if k in names})
