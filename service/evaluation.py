"""Evaluate a loaded predictor on a labelled file: the figures of POST /evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finetune_core.data import clean, encode_labels, read_examples, regression_targets
from finetune_core.errors import DataError
from finetune_core.evaluate import classification_metrics, regression_metrics
from finetune_core.predict import regression_values

# Rows one /evaluate call scores at most: it runs inside a request.
MAX_ROWS = 20_000


def evaluate_file(predictor, path: Path, text_column: str, label_column: str, name: str) -> dict:
    """Metrics of `predictor` on the rows of `path`; `name` replaces the path in error messages."""
    try:
        texts, labels = read_examples(path, text_column, label_column, role="data")
    except DataError as err:
        raise DataError(str(err).replace(str(path), name)) from None
    texts, labels, report = clean(texts, labels, predictor.meta.get("lowercase", False))
    if not texts:
        raise DataError(f"data: '{name}' has no usable rows after cleaning: {report['dropped']}")
    if len(texts) > MAX_ROWS:
        raise DataError(f"data: '{name}' has {len(texts)} rows; /evaluate scores at most {MAX_ROWS}")
    logits = predictor.logits(texts)
    meta = predictor.meta
    try:
        if meta["task"] == "text-regression":
            targets = np.array(regression_targets(labels, "data"))
            return {**regression_metrics(targets, regression_values(logits, meta)), "dropped": report["dropped"]}
        targets = np.array(encode_labels(labels, meta["labels"], "data"))
    except DataError as err:
        raise DataError(f"data: '{name}': {err}") from None
    return {**classification_metrics(targets, logits.argmax(-1), meta["labels"]), "dropped": report["dropped"]}
