"""Registry: immutable atomic versions, aliases, checksums, names. No models needed: small fake files."""

from __future__ import annotations

import argparse
import json
import shutil
import threading
from pathlib import Path

import pytest

from finetune_core import registry
from finetune_core.artifacts_cli import add_commands
from finetune_core.errors import ConfigError, FinetuneError, ModelError
from finetune_core.metadata import Manifest, ModelMeta, VariantRecord


def _staging(folder: Path, payload: str = "weights") -> tuple[Path, Manifest]:
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_text(payload)
    (folder / "model" / "tokenizer.json").write_text("{}")
    (folder / "model.onnx").write_text("onnx-" + payload)
    manifest = Manifest(
        model=ModelMeta(task="text-classification", labels=["negative", "positive"], max_length=64),
        variants={
            "pytorch": VariantRecord(True, "reference", file="model", figures={"accuracy": 0.9}),
            "onnx": VariantRecord(True, "parity", file="model.onnx", figures={"accuracy": 0.9}),
            "int8": VariantRecord(False, "accuracy drop too large", figures={"accuracy": 0.7}),
        },
    )
    return folder, manifest


def _register(tmp_path: Path, name: str = "sst2", payload: str = "weights") -> registry.VersionInfo:
    folder = tmp_path / f"staging-{payload}-{len(list(tmp_path.iterdir()))}"
    return registry.register(name, *_staging(folder, payload))


def test_register_writes_manifest_with_checksums_and_latest(tmp_path):
    first = _register(tmp_path)
    second = _register(tmp_path, payload="better")
    assert (first.version, second.version) == ("v1", "v2")
    assert registry.resolve("sst2").version == "v2"  # no production yet: latest
    assert registry.resolve("sst2", "latest").version == "v2"
    onnx = second.manifest.variants["onnx"]
    assert onnx.size == len("onnx-better") and len(onnx.sha256) == 64
    assert second.manifest.variants["int8"].accepted is False
    assert second.manifest.name == "sst2" and second.manifest.created and second.manifest.version == "v2"
    assert registry.variant_file(second, "onnx").read_text() == "onnx-better"
    assert (registry.model_dir(second) / "model.safetensors").read_text() == "better"
    assert registry.list_models() == [{"name": "sst2", "versions": ["v1", "v2"], "latest": "v2", "production": None}]


def test_versions_live_under_the_home_folder(tmp_path):
    info = _register(tmp_path)
    assert info.path == tmp_path / "home" / "models" / "sst2" / "v1"
    assert json.loads((info.path / "manifest.json").read_text())["version"] == "v1"


def test_manifest_is_flat_json_and_reads_back_equal(tmp_path):
    """On disk (and in GET /models/{name}) the model's metadata and each variant's figures sit flat."""
    info = _register(tmp_path)
    raw = json.loads((info.path / "manifest.json").read_text())
    assert raw["task"] == "text-classification" and raw["max_length"] == 64 and raw["labels"] == ["negative", "positive"]
    assert raw["variants"]["int8"] == {"accuracy": 0.7, "accepted": False, "reason": "accuracy drop too large",
                                       "file": None, "size": None, "sha256": None, "proof": None}
    assert Manifest.from_dict(raw) == info.manifest
    assert info.manifest.accepted() == ["pytorch", "onnx"]


def test_a_manifest_missing_a_required_field_is_named(tmp_path):
    info = _register(tmp_path)
    raw = json.loads((info.path / "manifest.json").read_text())
    del raw["variants"]["onnx"]["accepted"], raw["task"]
    with pytest.raises(ModelError, match="missing field.*task"):
        Manifest.from_dict(raw)
    del raw["labels"]
    raw["task"] = "text-classification"
    with pytest.raises(ModelError, match="missing field.*labels"):
        Manifest.from_dict(raw)


def test_promote_and_rollback(tmp_path):
    for payload in ("a", "b", "c"):
        _register(tmp_path, payload=payload)
    with pytest.raises(registry.NotFoundError, match="no production version"):
        registry.resolve("sst2", "production")
    registry.promote("sst2", "v1")
    registry.promote("sst2", "v3")
    assert registry.resolve("sst2").version == "v3"  # production wins over latest when set
    registry.promote("sst2", "v2")
    assert registry.rollback("sst2").version == "v3"
    assert registry.rollback("sst2").version == "v1"
    with pytest.raises(registry.RegistryError, match="no earlier production version"):
        registry.rollback("sst2")
    assert registry.show("sst2")["production"] == "v1"


def test_delete_refuses_production_without_force_and_never_reuses_numbers(tmp_path):
    _register(tmp_path, payload="a")
    _register(tmp_path, payload="b")
    registry.promote("sst2", "v2")
    with pytest.raises(registry.RegistryError, match="production version.*--force"):
        registry.delete("sst2", "v2")
    registry.delete("sst2", "v2", force=True)
    assert registry.list_models()[0]["versions"] == ["v1"]
    assert registry.list_models()[0]["production"] is None
    assert _register(tmp_path, payload="c").version == "v3"
    registry.delete("sst2", "v1")
    with pytest.raises(registry.NotFoundError, match="no version 'v1'"):
        registry.resolve("sst2", "v1")


def test_crash_while_copying_leaves_no_version_and_no_alias(tmp_path, monkeypatch):
    copied = []
    real_copyfile = shutil.copyfile

    def copy_then_crash(src, dst, **kwargs):
        if copied:
            raise RuntimeError("process killed mid-copy (simulated)")
        copied.append(src)
        return real_copyfile(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copy_then_crash)
    with pytest.raises(RuntimeError, match="simulated"):
        _register(tmp_path)
    assert copied, "the crash must happen after a file was copied"
    assert registry.list_models() == []
    with pytest.raises(registry.NotFoundError):
        registry.resolve("sst2", "latest")
    home = tmp_path / "home"
    assert not [p for p in home.iterdir() if p.name.startswith(".incoming-")]
    monkeypatch.setattr(shutil, "copyfile", real_copyfile)
    assert _register(tmp_path).version == "v1"


def test_concurrent_registers_get_distinct_versions(tmp_path):
    stagings = [_staging(tmp_path / f"s{i}", f"p{i}") for i in range(4)]
    versions = []
    threads = [threading.Thread(target=lambda s=s: versions.append(registry.register("sst2", *s).version)) for s in stagings]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(versions) == ["v1", "v2", "v3", "v4"]


def test_tampered_file_is_refused(tmp_path):
    info = _register(tmp_path)
    (info.path / "model.onnx").write_text("onnx-evil")
    with pytest.raises(registry.IntegrityError, match="model.onnx' does not match its manifest"):
        registry.variant_file(info, "onnx")
    (info.path / "model" / "tokenizer.json").write_text('{"changed": 1}')
    with pytest.raises(registry.IntegrityError, match="'model' does not match"):
        registry.model_dir(info)


def test_missing_things_raise_not_found(tmp_path):
    with pytest.raises(registry.NotFoundError, match="no model named 'nope'"):
        registry.resolve("nope")
    info = _register(tmp_path)
    with pytest.raises(registry.NotFoundError, match="no version 'v9'.*v1"):
        registry.resolve("sst2", "v9")
    with pytest.raises(registry.NotFoundError, match="no stored file for variant 'int8'"):
        registry.variant_file(info, "int8")
    assert issubclass(registry.NotFoundError, FinetuneError)
    assert not issubclass(registry.NotFoundError, (registry.RegistryError, registry.IntegrityError))


@pytest.mark.parametrize("name", ["", "..", "../etc", "a/b", "a\\b", ".hidden", "-flag", "a b", "x" * 65, "caf\u00e9", "a..b"])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="model name"):
        registry.register(name, *_staging(tmp_path / "s"))
    assert not (tmp_path / "home" / "models").exists() or not any((tmp_path / "home" / "models").iterdir())


@pytest.mark.parametrize("name", ["sst2", "SST-2_minilm.v1", "x" * 64])
def test_good_names_are_accepted(name):
    assert registry.validate_name(name) == name


def test_parse_ref():
    assert registry.parse_ref("sst2") == ("sst2", None)
    assert registry.parse_ref("sst2:v12") == ("sst2", "v12")
    assert registry.parse_ref("sst2:production") == ("sst2", "production")
    with pytest.raises(ConfigError, match="version like v3"):
        registry.parse_ref("sst2:3")
    with pytest.raises(ConfigError, match="model name"):
        registry.parse_ref("../x:v1")


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_models_cli(tmp_path, capsys):
    _register(tmp_path, payload="a")
    _register(tmp_path, payload="b")
    for argv in (["models", "promote", "sst2", "v1"], ["models", "delete", "sst2", "v2"]):
        args = _cli(*argv)
        args.handler(args)
    args = _cli("models")
    capsys.readouterr()
    args.handler(args)
    assert json.loads(capsys.readouterr().out) == [{"name": "sst2", "versions": ["v1"], "latest": "v1", "production": "v1"}]
    args = _cli("models", "show", "sst2:v1")
    args.handler(args)
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "v1" and shown["aliases"] == ["latest", "production"]
    args = _cli("models", "delete", "sst2", "v1")
    with pytest.raises(registry.RegistryError, match="production"):
        args.handler(args)


def test_cli_main_reports_registry_errors_in_one_line_with_exit_2(tmp_path, capsys):
    from finetune_core.cli import main

    assert main(["models", "show", "nope"]) == 2
    assert capsys.readouterr().err.strip() == f"error: no model named 'nope' in the registry at {tmp_path / 'home'}; see `finetune-serve models list`"


def test_scratch_left_by_a_killed_process_is_removed_once_stale(tmp_path):
    import os
    import time

    registry.root().mkdir(parents=True, exist_ok=True)
    stale, fresh = registry.root() / ".incoming-old", registry.root() / ".deleting-new"
    for folder in (stale, fresh):
        (folder / "v1").mkdir(parents=True)
    old = time.time() - registry.STALE_SCRATCH_SECONDS - 60
    os.utime(stale, (old, old))
    _register(tmp_path)
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to a register in progress
