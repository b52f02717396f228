"""The console script as a user meets it: one-line errors, no tracebacks, train/evaluate/resume."""

import pytest
import json
import subprocess
import sys

from conftest import REPO, toy_rows, write_jsonl

pytestmark = pytest.mark.process  # runs the console script

CLI = [sys.executable, "-m", "finetune_core.cli"]


def cli(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_one_line_error(done, *fragments):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_inputs_exit_non_zero_with_one_line(tmp_path, capsys):
    # Once through the console script's process; the other cases call the same main() in this process,
    # which saves an interpreter start and a torch import (about 4 s) each.
    assert_one_line_error(cli("train", "--train", tmp_path / "missing.jsonl", "--output", tmp_path / "o"), "does not exist")
    from finetune_core.cli import main

    def run(*args) -> subprocess.CompletedProcess:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    data = write_jsonl(tmp_path / "d.jsonl", toy_rows(40))
    assert_one_line_error(run("train", "--train", data, "--label-column", "y", "--output", tmp_path / "o"), "label column 'y' not found")
    assert_one_line_error(run("train", "--train", data, "--freeze", "most", "--output", tmp_path / "o"), "freeze: unknown policy 'most'")
    assert_one_line_error(run("train", "--train", data, "--epochs", "0", "--output", tmp_path / "o"), "train.epochs")
    assert_one_line_error(run("train", "--train", data, "--model", tmp_path / "nomodel", "--output", tmp_path / "o"), "is not an existing folder")
    assert_one_line_error(run("evaluate", "--model", tmp_path, "--data", data), "not a finetune-serve model folder")
    assert_one_line_error(run("train", "--resume", tmp_path / "nothing"), "not a run folder")


def test_train_with_config_file_then_evaluate_then_resume(tmp_path, tiny_base):
    data = write_jsonl(tmp_path / "d.jsonl", toy_rows(200))
    config = tmp_path / "job.yaml"
    config.write_text(f"model:\n  base_model: {tiny_base}\ntrain:\n  learning_rate: 0.002\n  epochs: 6\n  num_threads: 1\n"
                      "  early_stopping_patience: 0\ndata:\n  min_rows_per_class: 2\n")
    run = tmp_path / "run"
    done = cli("train", "--train", data, "--config", config, "--epochs", "5", "--output", run, "--quiet")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["train"]["epochs_run"] == 5  # the flag overrides the file
    assert json.loads((run / "config.json").read_text())["train"]["learning_rate"] == 0.002

    evaluated = cli("evaluate", "--model", run / "model", "--data", run / "splits" / "validation.jsonl")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] == summary["validation"]["accuracy"]

    resumed = cli("train", "--resume", run, "--quiet")  # a finished run resumes to the same result
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["train"]["steps"] == summary["train"]["steps"]


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_base):
    import signal
    import time

    data = write_jsonl(tmp_path / "d.jsonl", toy_rows(400))
    run = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text(f"model: {{base_model: {tiny_base}}}\ntrain: {{epochs: 6, num_threads: 1, batch_size: 8, "
                      "early_stopping_patience: 0, log_every_steps: 1, checkpoint_every_steps: 0}\n")
    proc = subprocess.Popen([*CLI, "train", "--train", str(data), "--config", str(config), "--output", str(run), "--quiet"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and '"type": "step"' not in ((run / "events.jsonl").read_text() if (run / "events.jsonl").exists() else ""):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert f"finetune-serve train --resume {run}" in err and "Traceback" not in err
    assert (run / "checkpoints" / "last.pt").is_file() and not (run / "model").exists()

    resumed = cli("train", "--resume", run, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["train"]["epochs_run"] == 6
