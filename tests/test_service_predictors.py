"""The predictor cache: load once, follow `production`, serve the old version until the new one is ready."""

from __future__ import annotations

import threading
import time

import pytest

from finetune_core import registry
from finetune_core.errors import ConfigError
from finetune_core.metadata import Manifest, ModelMeta, VariantRecord
from service.predictors import Predictors, only_model


class FakePredictor:
    def __init__(self, version: str):
        self.variant = "onnx"
        self.version = version


def _register(tmp_path, name: str) -> str:
    staging = tmp_path / f"staging-{time.monotonic_ns()}"
    (staging / "model").mkdir(parents=True)
    (staging / "model" / "weights.bin").write_bytes(b"w")
    manifest = Manifest(ModelMeta("text-classification", ["a", "b"]), {"pytorch": VariantRecord(True, "", file="model")})
    return registry.register(name, staging, manifest).version


def test_loads_once_and_follows_production_without_a_gap(tmp_path):
    release = threading.Event()
    loads = []

    def load(info, variant):
        loads.append(info.version)
        if info.version == "v2":
            assert release.wait(10)
        return FakePredictor(info.version)

    predictors = Predictors(load=load)
    _register(tmp_path, "m")
    registry.promote("m", "v1")
    for _ in range(3):
        info, predictor = predictors.get("m", "production", None)
        assert (info.version, predictor.version) == ("v1", "v1")
    assert loads == ["v1"]

    _register(tmp_path, "m")
    registry.promote("m", "v2")
    info, predictor = predictors.get("m", "production", None)  # v2 loads in the background meanwhile
    assert (info.version, predictor.version) == ("v1", "v1")
    release.set()
    deadline = time.monotonic() + 10
    while predictors.get("m", "production", None)[1].version != "v2":
        assert time.monotonic() < deadline, "v2 never took over"
        time.sleep(0.05)
    assert loads == ["v1", "v2"]
    assert predictors.get("m", "v1", None)[1].version == "v1"  # a pinned version is still there
    assert len(loads) == 2


def test_concurrent_first_requests_load_once(tmp_path):
    loads = []

    def slow_load(info, variant):
        loads.append(info.version)
        time.sleep(0.3)
        return FakePredictor(info.version)

    _register(tmp_path, "m")
    predictors = Predictors(load=slow_load)
    threads = [threading.Thread(target=predictors.get, args=("m", None, None)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert loads == ["v1"]


def test_unknown_and_ambiguous_models(tmp_path):
    predictors = Predictors(load=lambda info, variant: FakePredictor(info.version))
    with pytest.raises(registry.NotFoundError, match="no model is registered"):
        only_model()
    _register(tmp_path, "a")
    assert only_model() == "a"
    _register(tmp_path, "b")
    with pytest.raises(ConfigError, match="required when several models"):
        only_model()
    with pytest.raises(registry.NotFoundError):
        predictors.get("ghost", None, None)
    with pytest.raises(ConfigError):
        predictors.get("a", "3", None)


def test_a_new_production_that_fails_to_load_leaves_the_old_one_serving(tmp_path):
    now = [0.0]
    failures = []

    def load(info, variant):
        if info.version == "v2":
            raise registry.IntegrityError(f"{info.ref}: 'model.onnx' does not match its manifest")
        return FakePredictor(info.version)

    predictors = Predictors(load=load, on_failure=lambda info, err: failures.append(info.version), clock=lambda: now[0])
    _register(tmp_path, "m")
    registry.promote("m", "v1")
    assert predictors.get("m", "production", None)[1].version == "v1"
    _register(tmp_path, "m")
    registry.promote("m", "v2")
    now[0] += 2  # past RESOLVE_SECONDS: the promotion is seen
    deadline = time.monotonic() + 10
    while not failures:  # the background load of v2 fails
        assert predictors.get("m", "production", None)[1].version == "v1"
        assert time.monotonic() < deadline, "v2's load never failed"
        time.sleep(0.05)
    for _ in range(5):  # production stays on v1, and the load is not retried per request
        assert predictors.get("m", "production", None)[1].version == "v1"
    time.sleep(0.2)
    assert failures == ["v2"]
    with pytest.raises(registry.IntegrityError, match="does not match its manifest"):
        predictors.get("m", "v2", None)
    assert failures == ["v2", "v2"]


def test_a_fresh_worker_serves_the_previous_production_when_production_is_damaged(tmp_path):
    def load(info, variant):
        if info.version == "v2":
            raise registry.IntegrityError(f"{info.ref}: 'model.onnx' does not match its manifest")
        return FakePredictor(info.version)

    _register(tmp_path, "m")
    _register(tmp_path, "m")
    registry.promote("m", "v1")
    registry.promote("m", "v2")
    predictors = Predictors(load=load)
    for ref in ("production", None):
        info, predictor = predictors.get("m", ref, None)
        assert (info.version, predictor.version) == ("v1", "v1")
    with pytest.raises(registry.IntegrityError):
        predictors.get("m", "v2", None)
    with pytest.raises(registry.IntegrityError):  # latest is no production: nothing to fall back to
        predictors.get("m", "latest", None)
