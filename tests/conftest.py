"""Shared test assets: a tiny random BERT (fast) and small real data slices checked in under tests/assets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Small real data slices in the repo (sources, licenses and how they were made: tests/assets/README.md).
ASSETS = REPO / "tests" / "assets"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Keep every test's registry and job store out of the user's home."""
    monkeypatch.setenv("FINETUNE_SERVE_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with the real MiniLM tokenizer: trains in seconds."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from finetune_core.model import resolve_base_model

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("default"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


POSITIVE = ["good", "great", "excellent", "wonderful", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "terrible", "horrible", "dull", "poor"]
FILLER = ["the", "movie", "was", "really", "quite", "plot", "acting", "film", "a", "very"]


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable two-class sentiment set: the class is carried by one cue word among fillers."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        cue = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        words = rng.choices(FILLER, k=rng.randint(2, 12)) + [cue]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def toy_train(tmp_path) -> Path:
    return write_jsonl(tmp_path / "toy_train.jsonl", toy_rows(240))


@pytest.fixture(scope="session")
def real_run(tmp_path_factory) -> Path:
    """The README's demo (`make demo`): real MiniLM, 2,000 SST-2 rows, one epoch, our defaults.

    Session-scoped: the end-to-end tests of training, export and prediction share this one run.
    """
    import subprocess

    run_dir = tmp_path_factory.mktemp("real") / "demo"
    done = subprocess.run(["make", "-s", "demo", f"RUN_DIR={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir / "demo_stdout.txt").write_text(done.stdout)
    return run_dir


def copy_images(source: Path, target: Path, classes: list[str], per_class: int) -> Path:
    """A slice of a real class-folder image set: the first `per_class` files of each class."""
    import shutil

    for name in classes:
        (target / name).mkdir(parents=True, exist_ok=True)
        for file in sorted((source / name).iterdir())[:per_class]:
            shutil.copy(file, target / name / file.name)
    return target


@pytest.fixture
def digit_images(tmp_path) -> Path:
    """A dataset root of real MNIST PNGs: train/ (3 classes x 20) and val/ (3 x 8)."""
    root = tmp_path / "digits"
    copy_images(ASSETS / "mnist_png_small" / "train", root / "train", ["0", "1", "7"], 20)
    copy_images(ASSETS / "mnist_png_small" / "validation", root / "val", ["0", "1", "7"], 8)
    return root


def pytest_sessionfinish(session, exitstatus):
    """A skipped test fails the run: a clone carries everything every test needs (tests/assets), so a
    skip could only hide a test that did not run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter.ensure_newline()
        reporter.write_line(f"error: {len(skipped)} test(s) skipped, which fails the run: "
                            + ", ".join(r.nodeid for r in skipped), red=True)


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random Llama with SmolLM2's real tokenizer and chat template: trains in seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune_core.gen_model import resolve_causal_base

    folder = tmp_path_factory.mktemp("tiny-llama")
    where, gguf = resolve_causal_base("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         initializer_range=0.3)  # wide: 32-wide tied embeddings can then give sharp logits
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


COLOURS = {"apple": "red", "banana": "yellow", "grape": "purple", "lime": "green", "plum": "purple",
           "lemon": "yellow", "cherry": "red", "kiwi": "green", "orange": "orange", "peach": "orange"}


def colour_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    fruits = sorted(COLOURS)
    rows = []
    for _ in range(n):
        fruit = rng.choice(fruits)
        rows.append({"prompt": f"What colour is a {fruit}?", "completion": f"A {fruit} is {COLOURS[fruit]}."})
    return rows


@pytest.fixture(scope="session")
def tiny_generation_run(tmp_path_factory, tiny_causal_lm):
    """A LoRA run of the tiny Llama on 120 colour rows: (run folder, metrics, events)."""
    from finetune_core.gen_config import generation_job_from_dict
    from finetune_core.gen_pipeline import run_generation

    folder = tmp_path_factory.mktemp("gen-run")
    train = write_jsonl(folder / "train.jsonl", colour_rows(120))
    job = generation_job_from_dict({"data": {"train": str(train), "max_new_tokens": 12, "max_length": 96},
                                    "base_model": str(tiny_causal_lm),
                                    "adapter": {"rank": 8, "alpha": 16, "dropout": 0.0},
                                    "train": {"epochs": 3, "batch_size": 8, "learning_rate": 1e-2, "log_every_steps": 4,
                                              "early_stopping_patience": 0}})
    events = []
    metrics = run_generation(job, folder / "run", on_event=events.append)
    return folder / "run", metrics, events
