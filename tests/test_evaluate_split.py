"""POST /evaluate says which rows it scored, and will not pass off training rows as a test.

One `bentoml serve` for the module. A text version (the tiny BERT) and an image version (EfficientNet-Lite0,
head only, 48 px, one epoch on real MNIST digits) are fine-tuned through /finetune; each is then
evaluated on the dataset it was trained on (refused), on held-out rows (no warning) and, for text,
on held-out rows mixed with a few of its training rows (a warning that counts them).
"""

from __future__ import annotations

import io
import json
import zipfile

import httpx
import pytest
from conftest import ASSETS, toy_rows
from service_helpers import finetune_body, tiny_base_client, upload, wait_for_job

pytestmark = pytest.mark.slow  # fine-tunes the real EfficientNet-Lite0 (head only) besides the tiny BERT

MNIST = ASSETS / "mnist_png_small"
DIGITS = ("0", "1", "7")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate") / "home"


@pytest.fixture(scope="module")
def client(home, tiny_base):
    with tiny_base_client(home, tiny_base, timeout=300) as c:
        yield c


def _finetune(client, body: dict) -> dict:
    response = client.post("/finetune", json=body)
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    return job


def _training_rows(home, job: dict, column: str) -> list[str]:
    lines = (home / "runs" / job["id"] / "splits" / "train.jsonl").read_text().splitlines()
    return [json.loads(line)[column] for line in lines]


def _digits_zip(layout: dict[str, tuple[str, int, int]]) -> bytes:
    """{zip folder: (MNIST split, first image, count per digit)} as a zip under one top folder."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for folder, (split, first, count) in layout.items():
            for digit in DIGITS:
                for png in sorted((MNIST / split / digit).glob("*.png"))[first:first + count]:
                    zf.writestr(f"digits/{folder}/{digit}/{png.name}", png.read_bytes())
    return buffer.getvalue()


def _evaluate(client, model: str, data: str) -> httpx.Response:
    return client.post("/evaluate", json={"model": model, "variant": "onnx", "data": data})


def test_a_text_version_is_refused_its_training_table_and_warned_about_mixed_rows(client, home, tiny_base):
    train = upload(client, toy_rows(240, seed=0))
    job = _finetune(client, finetune_body(tiny_base, train["id"], epochs=2))

    refused = _evaluate(client, "toy", train["id"])
    assert refused.status_code == 422 and refused.json()["field"] == "data"
    assert f"'{train['id']}' are rows toy:v1 was trained on" in refused.json()["error"]

    held = upload(client, toy_rows(80, seed=7), name="held.jsonl")
    trained_texts = set(_training_rows(home, job, "text"))
    expected = sum(row["text"] in trained_texts for row in toy_rows(80, seed=7))
    figures = _evaluate(client, "toy", held["id"]).json()
    assert (figures["dataset"], figures["split"], figures["n"]) == (held["id"], "uploaded", 80)
    assert figures["training_overlap"] == expected and ("warning" in figures) == (expected > 0)

    lines = (home / "runs" / job["id"] / "splits" / "train.jsonl").read_text().splitlines()[:30]
    mixed = upload(client, toy_rows(80, seed=7) + [json.loads(line) for line in lines], name="mixed.jsonl")
    warned = _evaluate(client, "toy", mixed["id"])
    assert warned.status_code == 200, warned.text
    body = warned.json()
    assert body["training_overlap"] == expected + 30 and body["n"] == 110
    assert f"{expected + 30} of the 110 rows of '{mixed['id']}' are rows toy:v1 was trained on" in body["warning"]


def test_an_image_dataset_without_held_out_folders_is_refused_and_its_test_split_is_named(client, home):
    only_train = client.post("/datasets", files={"file": ("digits.zip", _digits_zip({"train": ("train", 0, 15)}))}).json()
    hyper = {"image_size": 48, "epochs": 1, "batch_size": 16, "freeze": "all-but-head", "learning_rate": 1e-2,
             "num_threads": 1, "seed": 0, "horizontal_flip": False, "early_stopping_patience": 0}
    _finetune(client, {"task": "image-classification", "train": only_train["id"], "model_name": "digits",
                       "variants": ["onnx"], "hyperparameters": hyper})

    refused = _evaluate(client, "digits", only_train["id"])
    assert refused.status_code == 422 and refused.json()["field"] == "data", refused.text
    assert f"of the 45 rows of '{only_train['id']}' (its train/ split) are rows digits:v1 was trained on" \
        in refused.json()["error"]

    held_out = client.post("/datasets", files={"file": ("more.zip", _digits_zip({
        "train": ("train", 15, 5), "test": ("test", 0, 5)}))}).json()
    figures = _evaluate(client, "digits", held_out["id"]).json()
    assert figures["split"] == "test" and figures["dataset"] == held_out["id"], figures
    assert (figures["n"], figures["training_overlap"]) == (15, 0) and "warning" not in figures
