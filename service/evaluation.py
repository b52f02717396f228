"""Evaluate a loaded predictor on a labelled table or image dataset: the figures of POST /evaluate."""

from __future__ import annotations

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


def evaluate_file(predictor, path: Path, text_column: str, label_column: str, name: str) -> dict:
    """Metrics of `predictor` on the rows of `path`; `name` replaces the path in error messages."""
    try:
        texts, labels = read_examples(path, text_column, label_column, role="data")
    except DataError as err:
        raise DataError(str(err).replace(str(path), name)) from None
    texts, labels, report = clean(texts, labels, predictor.meta.lowercase)
    _check_rows(len(texts), report, name)
    return _figures(predictor.meta, predictor.logits(texts), labels, report, name)


def evaluate_images(predictor, path: Path, image_column: str, label_column: str, folder: Path, name: str) -> dict:
    """Metrics on an image folder (`<class>/<image>`) or an image list inside the uploaded `folder`.

    Unreadable images are skipped and counted in `dropped`, as in training.
    """
    try:
        paths, labels, report = images.read_images(path, "data", image_column, label_column, str(folder))
    except DataError as err:  # name paths inside the upload, not the server's folders
        raise DataError(str(err).replace(f"{folder}/", f"{name}:").replace(str(folder), name)) from None
    _check_rows(len(paths), report, name)
    return _figures(predictor.meta, predictor.logits(paths), labels, report, name)


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
