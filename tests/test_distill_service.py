"""Distillation through the service and the CLI: POST /finetune with distilled variants trains the student
after the teacher in one job; POST /models/{name}/versions/{v}/distill and `finetune-serve distill` distil an
existing version into a new one. Jobs run in this process (service.train_job.run), as the trainer's child would."""

from __future__ import annotations

import json
import shutil

import pytest
from artifact_helpers import make_run
from conftest import toy_rows, write_jsonl

from finetune_core import predict, registry
from finetune_core.artifacts import export_version
from finetune_core.cli import main
from finetune_core.config import DistillConfig
from service import train_job
from service.errors import FieldError
from service.jobs import SUCCEEDED, SqliteJobStore
from service.schemas import DistillVersionRequest, FinetuneRequest, distill_spec, job_spec


@pytest.fixture(scope="module")
def teacher_home(tiny_base, tmp_path_factory):
    """A registry holding toy:v1, a tiny teacher exported with ONNX; its run folder keeps the splits distillation reads."""
    run = tmp_path_factory.mktemp("teacher-run")
    make_run(tiny_base, run)
    write_jsonl(run / "splits" / "train.jsonl", toy_rows(240, seed=0))
    home = tmp_path_factory.mktemp("teacher-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(registry.ROOT_ENV, str(home))
        export_version(run / "model", "toy", ["onnx"])
    return home


@pytest.fixture
def teacher(teacher_home, tmp_path):
    """toy:v1 in this test's own registry (a copy: each test adds its own v2)."""
    shutil.copytree(teacher_home, tmp_path / "home")
    return registry.resolve("toy", "v1")


@pytest.fixture
def store(tmp_path) -> SqliteJobStore:
    return SqliteJobStore(tmp_path / "home" / "jobs.sqlite3")


def run_job(store: SqliteJobStore, spec: dict):
    job = store.create(spec)
    claimed = store.claim_next()
    assert claimed.id == job.id
    status = train_job.run(store, job.id, claimed.attempt)
    done = store.get(job.id)
    assert status == SUCCEEDED, done.error
    return done, [event for _, event in store.events(job.id)]


def test_finetune_with_distilled_variants_trains_the_student_after_the_teacher(store, tiny_base, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(240))
    request = FinetuneRequest(base_model=str(tiny_base), train="ds-unused", model_name="toy",
                              variants=["onnx", "distilled-int8"],
                              hyperparameters={"epochs": 6, "batch_size": 16, "max_length": 32, "learning_rate": 2e-3,
                                               "precision": "fp32", "seed": 1, "num_threads": 1},
                              distillation={"epochs": 2, "learning_rate": 3e-3, "alpha": 0.7})
    spec = job_spec(request, {"train": str(train)})
    assert spec["variants"] == ["onnx", "distilled", "distilled-int8"]  # the int8 student is served with its folder
    assert spec["distill"]["alpha"] == 0.7 and spec["distill"]["temperature"] == DistillConfig.temperature
    done, events = run_job(store, spec)

    phases = [e["phase"] for e in events if e["type"] == "phase"]
    assert phases == ["teacher", "distill"]
    starts = [e["phase"] for e in events if e["type"] == "start"]
    assert starts == ["teacher", "distill"]
    exporting = [e for e in events if e["type"] == "exporting"]
    assert exporting[0]["variants"] == ["onnx", "distilled", "distilled-int8"]
    assert done.metrics["validation"]["accuracy"] >= 0.9
    assert done.metrics["distillation"]["validation"]["accuracy"] >= 0.9
    assert done.metrics["distillation"]["teacher_validation"]["accuracy"] == done.metrics["validation"]["accuracy"]
    assert done.metrics["variants"]["distilled"]["accepted"], done.metrics["variants"]["distilled"]["reason"]
    info = registry.resolve("toy", "v1")
    assert (run_dir := train_job.run_dir_of(done.id) / "distill" / "model").is_dir()
    assert info.manifest.variants["distilled"].proof["distillation"]["alpha"] == 0.7, run_dir
    assert predict.load_predictor(info, "distilled").predict(["a superb film"])[0]["label"] == "positive"


def test_bad_distillation_requests_name_their_field(tiny_base):
    base = {"base_model": str(tiny_base), "train": "ds", "model_name": "toy"}
    with pytest.raises(FieldError) as err:
        job_spec(FinetuneRequest(**base, variants=["onnx", "distilled"], distillation={"alpha": 2.0}), {"train": "t.jsonl"})
    assert err.value.field == "distillation.alpha" and "must be a number in [0.0, 1.0]" in str(err.value)
    with pytest.raises(FieldError) as err:
        job_spec(FinetuneRequest(**base, variants=["onnx"], distillation={"alpha": 0.5}), {"train": "t.jsonl"})
    assert err.value.field == "distillation" and "no distilled variant" in str(err.value)
    with pytest.raises(FieldError) as err:
        distill_spec("toy", "v1", DistillVersionRequest(train="ds"), {"train": "t.jsonl"})
    assert err.value.field == "validation"


def test_distilling_an_existing_version_is_a_job_that_registers_a_new_version(teacher, store):
    from fastapi.testclient import TestClient

    from service.app import app
    from service.context import Context
    from service.metrics import make_metrics

    async def trainer_runs_in_this_test() -> None:
        return None

    app.state.context = Context(store=store, predictors=None, metrics=make_metrics(), batcher=None,
                                wake_trainer=trainer_runs_in_this_test)
    try:
        client = TestClient(app)
        missing = client.post("/models/toy/versions/v9/distill", json={})
        assert missing.status_code == 404 and "no version 'v9'" in missing.json()["error"]
        bad = client.post("/models/toy/versions/v1/distill", json={"distillation": {"temperature": -1}})
        assert bad.status_code == 422 and bad.json()["field"] == "distillation.temperature"
        queued = client.post("/models/toy/versions/v1/distill", json={"distillation": {"epochs": 2, "learning_rate": 3e-3}})
        assert queued.status_code == 202, queued.text
    finally:
        del app.state.context
    job = store.claim_next()
    assert job.id == queued.json()["id"] and job.spec["distill_from"] == {"name": "toy", "version": "v1"}
    assert train_job.run(store, job.id, job.attempt) == SUCCEEDED, store.get(job.id).error
    done = store.get(job.id)
    assert done.model == {"name": "toy", "version": "v2"}
    assert {e.get("phase") for _, e in store.events(job.id) if e["type"] in ("start", "step", "eval")} == {"distill"}
    v2 = registry.resolve("toy", "v2")
    assert set(v2.manifest.accepted()) == {"pytorch", "onnx", "distilled", "distilled-int8"}
    assert done.metrics["teacher"] == {"name": "toy", "version": "v1"}


def test_cli_distill_registers_a_new_version(teacher, capsys):
    assert main(["distill", "--model", "toy:v1", "--epochs", "2", "--learning-rate", "3e-3", "--layers", "1",
                 "--max-rows", "120", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "toy:v2" and printed["teacher"] == "toy:v1"
    assert printed["variants"]["distilled"]["accepted"] and printed["variants"]["onnx"]["accepted"]
    assert printed["distilled"]["teacher_accuracy"] > 0.9 and "speedup" in printed["distilled"]
    assert registry.resolve("toy").version == "v2"
    assert main(["distill", "--model", "toy:v1", "--layers", "5", "--quiet"]) == 2
    assert "the teacher has layers 0-1; [5] do not exist" in capsys.readouterr().err
