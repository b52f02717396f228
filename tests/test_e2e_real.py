"""End to end on the real all-MiniLM-L6-v2 and real SST-2 rows, through the README's demo target."""

import json

import pytest

from conftest import REPO


def json_documents(text: str) -> list:
    decoder, docs, i = json.JSONDecoder(), [], 0
    while (start := text.find("{", i)) != -1:
        doc, i = decoder.raw_decode(text, start)
        docs.append(doc)
    return docs


@pytest.mark.slow
def test_one_epoch_with_defaults_reaches_078_on_the_gold_dev_set(real_run):
    metrics = json.loads((real_run / "metrics.json").read_text())
    assert metrics["validation"]["n"] == 872
    assert metrics["validation"]["accuracy"] >= 0.78, metrics["validation"]
    assert metrics["train"]["epochs_run"] == 1 and metrics["train"]["samples_per_second"] > 0
    report = json.loads((real_run / "data_report.json").read_text())
    assert report["rows"]["train"] == 2000 - sum(report["cleaning"]["train"]["dropped"].values())
    assert report["parameters"]["total_parameters"] > 22_000_000  # the real 6-layer MiniLM, not a stand-in


@pytest.mark.slow
def test_the_evaluate_command_agrees_with_the_training_run(real_run):
    train_summary, evaluated = json_documents((real_run / "demo_stdout.txt").read_text())
    metrics = json.loads((real_run / "metrics.json").read_text())
    assert evaluated["n"] == 872
    # evaluate runs fp32; training evaluated under bf16 autocast where the CPU has it
    assert abs(evaluated["accuracy"] - metrics["validation"]["accuracy"]) <= 0.01
    assert train_summary["validation"]["accuracy"] == metrics["validation"]["accuracy"]


def test_the_demo_uses_the_data_shipped_in_the_repo():
    rows = (REPO / "examples" / "sst2_sample" / "train.jsonl").read_text().splitlines()
    assert len(rows) == 2000 and set(json.loads(rows[0])) == {"text", "label"}


@pytest.mark.slow
def test_export_registry_predict_on_the_real_fine_tuned_model(real_run, tmp_path):
    """The demo run exported with every variant, each proved, registered, promoted and served by the CLI."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "FINETUNE_SERVE_HOME": str(tmp_path / "home")}

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "finetune_core.cli", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    exported = cli("export", "--model", real_run / "model", "--name", "sst2-minilm")
    variants = exported["variants"]
    assert exported["version"] == "v1" and exported["proof"]["rows"] == 872
    for name in ("onnx", "torchscript"):
        assert variants[name]["accepted"] and variants[name]["proof"]["max_abs_diff"] <= 1e-4
        assert variants[name]["proof"]["argmax_agreement"] == 1.0
    reference = variants["pytorch"]["accuracy"]
    for name in ("int8", "bf16"):
        figures = variants[name]
        drop = 100 * (reference - figures["accuracy"])
        # Measured: int8 0.23 points below fp32, bf16 level with it (README, "Inference"); the gate is 1 point.
        assert figures["accepted"] is True and drop <= 1.0, figures["reason"]
        assert f"accuracy drop {drop:.2f} points" in figures["reason"]

    cli("models", "promote", "sst2-minilm", "v1")
    served = cli("predict", "--model", "sst2-minilm:production", "a moving , funny and beautifully acted film",
                 "a dull , lifeless mess")
    assert [p["label"] for p in served["predictions"]] == ["positive", "negative"]
    assert served["variant"] in ("int8", "onnx") and sum(served["predictions"][0]["scores"].values()) == pytest.approx(1.0)
