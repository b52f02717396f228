"""Hyperparameter search on the tiny BERT: the grid finds the better rate, the pruner stops a bad trial,
a SIGKILLed search resumes its study, and a bad spec names its field. Each trial is a child process
(about 10 s of start-up and a second or two of training), so the tests keep to few trials; the grid
search that finds the better rate runs through the service (test_service_search.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from conftest import toy_rows, write_jsonl
from service_helpers import alive, descendants
from test_cli import CLI, REPO

from finetune_core.config import config_from_dict
from finetune_core.errors import ConfigError
from finetune_core.search_space import search_spec_from_dict

GOOD_LR, BAD_LR = 3e-3, 1e-6  # the tiny BERT learns the cue-word task at the first and not at all at the second


@pytest.fixture
def job(tmp_path, tiny_base) -> dict:
    """Data and a config whose trials each train in a second or two."""
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(120))
    validation = write_jsonl(tmp_path / "validation.jsonl", toy_rows(40, seed=7))
    raw = {"data": {"train": str(train), "validation": str(validation), "max_length": 32, "min_rows_per_class": 2},
           "model": {"base_model": str(tiny_base)},
           "train": {"epochs": 6, "batch_size": 8, "num_threads": 1, "precision": "fp32", "early_stopping_patience": 0}}
    return raw


def write_config(path, raw: dict):
    path.write_text(json.dumps(raw))
    return path


def events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.process
def test_a_killed_search_resumes_its_study_and_the_median_pruner_stops_a_bad_trial(tmp_path, job, capsys):
    import optuna

    config = write_config(tmp_path / "search.json", {**job, "search": {
        "trials": 3, "sampler": "random", "pruner": "median",
        "space": {"learning_rate": {"low": BAD_LR, "high": GOOD_LR, "log": True}}}})
    out = tmp_path / "search"
    out.mkdir()
    # Two good trials, then a clearly bad one the median of the first two can judge.
    study = optuna.create_study(storage=f"sqlite:///{out / 'search.db'}", study_name="search", direction="maximize")
    for lr in (GOOD_LR, 2e-3, BAD_LR):
        study.enqueue_trial({"learning_rate": lr})
    command = [*CLI, "search", "--config", str(config), "--output", str(out)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and [e["type"] for e in events(out / "events.jsonl")].count("trial_start") < 3:
        time.sleep(0.2)
    time.sleep(1.0)  # the third trial's process is starting
    trainers = descendants(proc.pid)
    assert trainers, "no trial process under the search"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while any(alive(p) for p in trainers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in trainers if alive(p)], "a trial outlived the killed search"

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["best"]["params"]["learning_rate"] in (GOOD_LR, 2e-3)
    report = json.loads((out / "search.json").read_text())
    trials = report["trials"]
    assert [t["state"] for t in trials] == ["complete", "complete", "failed", "pruned"]
    assert report["trials_done"] == 3 and report["status"] == "completed"
    assert "interrupted" in trials[2]["error"] and trials[3]["params"] == trials[2]["params"] == {"learning_rate": BAD_LR}
    pruned_events = events(out / trials[3]["run_dir"] / "events.jsonl")
    assert sum(e["type"] == "eval" for e in pruned_events) < job["train"]["epochs"]  # stopped before its last epoch
    assert pruned_events[-1]["status"] == "cancelled" and not (out / trials[3]["run_dir"] / "model").exists()
    assert min(t["value"] for t in trials[:2]) >= 0.9

    assert report["best"]["run_dir"] == "best" and report["best"]["number"] in (0, 1)
    assert json.loads((out / "best" / "metrics.json").read_text())["validation"]["accuracy"] == report["best"]["value"]
    assert not (out / "trials" / "000" / "checkpoints").exists()  # a trial never resumes: no checkpoints kept
    assert (report["importances"] is None) == (report["importances_note"] is not None)
    plots = ["optimization_history.png"] + (["param_importances.png"] if report["importances"] else [])
    for name in plots:
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    kinds = [e["type"] for e in events(out / "events.jsonl")]
    # The resumed search first ends the interrupted trial 2 as failed, then runs its values again as trial 3.
    assert kinds == ["trial_start", "trial_end"] * 2 + ["trial_start"] + ["trial_end", "trial_start", "trial_end", "search_end"]
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("trial ")]
    assert len(lines) == 2 and lines[0].startswith("trial 2 failed") and "error: interrupted" in lines[0]
    assert lines[1].startswith("trial 3 pruned: validation.accuracy=")

    from finetune_core.cli import main

    # best/ is a normal run folder: export takes its model.
    assert main(["export", "--model", str(out / "best" / "model"), "--name", "searched", "--variants", "onnx"]) == 0
    # The study remembers its settings: the same folder with another search is refused, by name.
    capsys.readouterr()
    assert main(["search", "--config", str(config), "--output", str(out), "--epochs", "3"]) == 2
    assert "(config.train.epochs: 6 then, 3 now)" in capsys.readouterr().err


@pytest.mark.parametrize("search, message", [
    ({"space": {"learning_rate": {"low": 0, "high": 1e-3, "log": True}}}, "search.space.learning_rate.low: "),
    ({"space": {"learning_rate": {"low": 1e-3, "high": 1e-4}}}, "search.space.learning_rate: low (0.001) must be below"),
    ({"space": {"learning_rate": {"low": 1e-4, "high": 5.0}}}, "search.space.learning_rate.high: must be a number in"),
    ({"space": {"dropout": [0.1]}}, "search.space.dropout: unknown field; searchable: "),
    ({"space": {"freeze": ["none", "most"]}}, "search.space.freeze[1]: unknown policy 'most'"),
    ({"space": {"batch_size": {"low": 8, "high": 64.5}}}, "search.space.batch_size.high: expected a whole number"),
    ({"space": {"optimizer": {"low": 1, "high": 2}}}, "search.space.optimizer: optimizer is not a number"),
    ({"space": {"learning_rate": []}}, "search.space.learning_rate: the list of values is empty"),
    ({"sampler": "grid"}, "search.space.learning_rate: the grid sampler takes lists of values only"),
    ({"metric": "validation.r2"}, "search.metric: 'r2' is a regression metric"),
    ({"metric": "test.accuracy"}, "search.metric: must be validation.<metric>"),
    ({"trials": 0}, "search.trials: must be a whole number >= 1"),
    ({"pruner": "asha"}, "search.pruner: 'asha' is not allowed"),
    ({"trails": 3}, "search.trails: unknown field"),
])
def test_a_bad_search_spec_names_the_field(job, search, message):
    with pytest.raises(ConfigError) as caught:
        search_spec_from_dict(search, config_from_dict(job))
    assert str(caught.value).startswith(message), str(caught.value)


def test_default_space_per_modality_and_direction_from_the_metric():
    from finetune_core.search import direction

    text = search_spec_from_dict(None, config_from_dict({"data": {"train": "t.jsonl"}}))
    image = search_spec_from_dict({}, config_from_dict({"data": {"train": "d", "task": "image-regression"}}))
    assert [p.name for p in text.space] == ["learning_rate", "warmup_ratio", "freeze"]
    assert [p.name for p in image.space] == ["learning_rate", "freeze"]
    assert text.metric == "validation.accuracy" and image.metric == "validation.loss"
    assert direction("loss") == direction("mae") == "minimize" and direction("accuracy") == direction("r2") == "maximize"
    assert search_spec_from_dict(text.to_dict(), config_from_dict({"data": {"train": "t.jsonl"}})) == text
