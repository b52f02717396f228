"""A run remembers its column mapping: evaluate and export read the user's own CSV without flags again."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import toy_rows
from test_cli import cli


pytestmark = pytest.mark.process  # runs the console script

def write_csv(path, rows, text="review", label="sentiment", delimiter=";"):
    with path.open("w", newline="", encoding="utf-8-sig") as f:  # as Excel saves "CSV UTF-8"
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow([text, label])
        writer.writerows([r["text"], r["label"]] for r in rows)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_base):
    """One run trained on a ';'-separated CSV with a byte-order mark and its own column names."""
    folder = tmp_path_factory.mktemp("columns")
    train = write_csv(folder / "train.csv", toy_rows(200))
    done = cli("train", "--train", train, "--text-column", "review", "--label-column", "sentiment", "--model", tiny_base,
               "--epochs", "4", "--learning-rate", "0.002", "--output", folder / "run", "--quiet")
    assert done.returncode == 0, done.stderr
    return folder / "run"


def test_columns_are_remembered_by_evaluate_and_export(tmp_path, run):
    dev = write_csv(tmp_path / "dev.csv", toy_rows(60, seed=3))
    meta = json.loads((run / "model" / "finetune_serve.json").read_text())
    assert (meta["text_column"], meta["label_column"]) == ("review", "sentiment")

    evaluated = cli("evaluate", "--model", run / "model", "--data", dev)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["n"] == 60

    exported = cli("export", "--model", run / "model", "--name", "toy", "--variants", "onnx", "--validation", dev,
                   cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads(exported.stdout)
    assert manifest["version"] == "v1" and manifest["proof"]["rows"] == 60 and manifest["variants"]["onnx"]["accepted"]


def test_flags_override_the_remembered_columns(tmp_path, run):
    other = write_csv(tmp_path / "other.csv", toy_rows(40, seed=4), text="body", label="y", delimiter=",")
    refused = cli("evaluate", "--model", run / "model", "--data", other)
    assert refused.returncode == 2 and "text column 'review' not found; columns are body, y" in refused.stderr
    evaluated = cli("evaluate", "--model", run / "model", "--data", other, "--text-column", "body", "--label-column", "y")
    assert evaluated.returncode == 0, evaluated.stderr
    exported = cli("export", "--model", run / "model", "--name", "toy", "--variants", "onnx", "--validation", other,
                   "--text-column", "body", "--label-column", "y", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
