"""Evaluate a loaded predictor on a labelled table or image dataset: the figures of POST /evaluate.

An answer says which rows it scored: `split` is the image dataset's `test`, `validation` or `train`
folder (the first present), or `uploaded` for a table or an image list, whole. It also says how many
of them the version was trained on (`training_overlap`: texts, or image files, found in the rows its
run trained on, `splits/train.jsonl` of the manifest's source run). Scores on training rows measure
memory, not generalisation: when most scored rows are training rows (an image zip without val/ or
test/, the table the version was fine-tuned on) the evaluation is refused (422, field `data`); when
a few are (duplicates across uploads), the figures come with a `warning`, as they do when the run's
training rows are gone and the overlap cannot be checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from finetune_core import images
from finetune_core.data import clean
from finetune_core.errors import DataError
from finetune_core.evaluate import classification_metrics, regression_metrics
from finetune_core.metadata import ModelMeta
from finetune_core.predict import regression_values
from finetune_core.tables import encode_labels, read_examples, regression_targets

# Rows (texts or images) one /evaluate call scores at most: it runs inside a request.
MAX_ROWS = 20_000
# Above this share of training rows among the scored ones, an evaluation is refused rather than warned about.
MAX_TRAINING_SHARE = 0.5
UPLOADED = "uploaded"


def evaluate_dataset(info, predictor, stored, text_column: str | None, image_column: str | None,
                     label_column: str | None) -> dict:
    """POST /evaluate's figures for a registered version (`info`) on an uploaded dataset (service.datasets.Stored),
    with the split scored and its overlap with the version's training rows. Raises FieldError("data") when
    the scored rows are mostly ones the version was trained on."""
    from .datasets import IMAGE_FOLDER

    if predictor.meta.is_image:
        path = stored.held_out("test")
        split = next((role for role, folder in stored.splits.items() if folder == path), UPLOADED) \
            if stored.kind == IMAGE_FOLDER else UPLOADED
        rows, labels, report = _image_rows(path, stored.column("image_column", image_column),
                                           stored.column("label_column", label_column), stored.folder, stored.id)
        keys = [os.path.realpath(p) for p in rows]
    else:
        split = UPLOADED
        rows, labels, report = _text_rows(predictor, stored.path, text_column or "text", label_column or "label", stored.id)
        keys = rows
    trained = training_rows(info, "image" if predictor.meta.is_image else "text")
    overlap = None if trained is None else sum(key in trained for key in keys)
    where = f"'{stored.id}'" + (f" (its {split}/ split)" if split != UPLOADED else "")
    if overlap is not None and overlap > MAX_TRAINING_SHARE * len(keys):
        from .errors import FieldError

        raise FieldError("data", f"data: {overlap} of the {len(keys)} rows of {where} are rows {info.ref} was trained "
                                 "on; scores on them measure memory, not generalisation. Evaluate on held-out rows: "
                                 "the table given as validation or test, or a zip with a val/ or test/ folder")
    figures = _figures(predictor.meta, predictor.logits(rows), labels, report, stored.id)
    answer = {"dataset": stored.id, "split": split, "training_overlap": overlap, **figures}
    if overlap is None:
        answer["warning"] = (f"could not check whether {info.ref} was trained on these rows: its run's training rows "
                             "(splits/train.jsonl) are gone")
    elif overlap:
        answer["warning"] = (f"{overlap} of the {len(keys)} rows of {where} are rows {info.ref} was trained on; "
                             "the figures flatter it")
    return answer


def training_rows(info, column: str) -> set[str] | None:
    """The texts (or real image paths) the version's run trained on, or None when that run's splits are gone."""
    source = info.manifest.source_run
    path = Path(source) / "splits" / "train.jsonl" if source else None
    if path is None or not path.is_file():
        return None
    with path.open() as f:
        values = [json.loads(line)[column] for line in f if line.strip()]
    return {os.path.realpath(v) for v in values} if column == "image" else set(values)


def _text_rows(predictor, path: Path, text_column: str, label_column: str, name: str) -> tuple[list, list, dict]:
    try:
        texts, labels = read_examples(path, text_column, label_column, role="data")
    except DataError as err:
        raise DataError(str(err).replace(str(path), name)) from None
    texts, labels, report = clean(texts, labels, predictor.meta.lowercase)
    _check_rows(len(texts), report, name)
    return texts, labels, report


def _image_rows(path: Path, image_column: str, label_column: str, folder: Path, name: str) -> tuple[list, list, dict]:
    try:
        paths, labels, report = images.read_images(path, "data", image_column, label_column, str(folder))
    except DataError as err:  # name paths inside the upload, not the server's folders
        raise DataError(str(err).replace(f"{folder}/", f"{name}:").replace(str(folder), name)) from None
    _check_rows(len(paths), report, name)
    return paths, labels, report


def _check_rows(rows: int, report: dict, name: str) -> None:
    if not rows:
        raise DataError(f"data: '{name}' has no usable rows after cleaning: {report['dropped']}")
    if rows > MAX_ROWS:
        raise DataError(f"data: '{name}' has {rows} rows; /evaluate scores at most {MAX_ROWS}")


def _figures(meta: ModelMeta, logits: np.ndarray, labels: list, report: dict, name: str) -> dict:
    try:
        if meta.is_regression:
            targets = np.array(regression_targets(labels, "data"))
            return {**regression_metrics(targets, regression_values(logits, meta)), "dropped": report["dropped"]}
        targets = np.array(encode_labels(labels, meta.labels, "data"))
    except DataError as err:
        raise DataError(f"data: '{name}': {err}") from None
    return {**classification_metrics(targets, logits.argmax(-1), meta.labels), "dropped": report["dropped"]}
