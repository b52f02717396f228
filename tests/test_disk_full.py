"""A full disk: an upload or a registration that does not fit leaves nothing half-written and says why.

A real full disk is a small tmpfs (the test skips, saying why, where mounting is not allowed); a
file-size limit (RLIMIT_FSIZE) in a child process makes writes fail the same way anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from conftest import toy_rows
from service_helpers import REPO, serve_toy_model

from finetune_core import registry
from finetune_core.metadata import Manifest, ModelMeta, VariantRecord


@pytest.fixture
def mount_small_disk():
    """mount(folder, mib, inodes=None): a tmpfs of that size (and file count) at folder, unmounted after the
    test; skips if mounting fails."""
    mounted = []

    def mount(folder, mib: int, inodes: int | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        options = f"size={mib}m" + (f",nr_inodes={inodes}" if inodes else "")
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                  capture_output=True, text=True, timeout=30)
        except FileNotFoundError as err:
            pytest.skip(f"cannot mount a small tmpfs to fill: {err}")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill: {done.stderr.strip() or done.returncode}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True, timeout=30)


def staged_version(folder, mib: int):
    """A staging folder holding MiB of weights, and its manifest."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.bin").write_bytes(os.urandom(mib << 20))
    return folder, Manifest(ModelMeta("text-classification", ["a", "b"]),
                            {"pytorch": VariantRecord(True, "", file="model")})


def test_registering_into_a_full_disk_leaves_no_version(tmp_path, mount_small_disk):
    home = mount_small_disk(tmp_path / "home", 1)  # FINETUNE_SERVE_HOME of every test (conftest)
    staging, manifest = staged_version(tmp_path / "staging", 2)
    with pytest.raises(registry.RegistryError, match="is full .*nothing was registered"):
        registry.register("m", staging, manifest)
    assert sorted(p.name for p in home.rglob("*")) == ["m", "models"]  # no scratch folder, no version


def test_a_write_past_the_file_size_limit_leaves_no_version(tmp_path):
    staging, _ = staged_version(tmp_path / "staging", 2)
    child = """
import resource, sys
from finetune_core import registry
from finetune_core.metadata import Manifest, ModelMeta, VariantRecord
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # writes past 1 MiB fail with EFBIG
try:
    registry.register("m", sys.argv[1], Manifest(ModelMeta("text-classification", ["a", "b"]),
                                                 {"pytorch": VariantRecord(True, "", file="model")}))
except registry.RegistryError as err:
    print(err)
"""
    done = subprocess.run([sys.executable, "-c", child, str(staging)], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "is full (File too large); nothing was registered" in done.stdout
    home = tmp_path / "home"
    assert sorted(p.name for p in home.rglob("*")) == ["m", "models"]


@pytest.mark.process
def test_an_upload_that_does_not_fit_is_refused_and_the_server_serves_on(tmp_path, tiny_base, mount_small_disk):
    datasets = mount_small_disk(tmp_path / "home" / "datasets", 8)
    server = serve_toy_model(tmp_path, tiny_base, env={"FINETUNE_SERVE_MAX_UPLOAD_MB": "64"})
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            rows = toy_rows(120_000)  # ~12 MiB of JSONL: over the 8 MiB disk
            big = "".join(json.dumps(r) + "\n" for r in rows).encode()
            refused = client.post("/datasets", files={"file": ("big.jsonl", big)})
            assert refused.status_code == 507, refused.text
            assert refused.json()["error"].startswith("file: the server's disk is full")
            assert list(datasets.iterdir()) == []  # nothing half-written
            small = client.post("/datasets", files={"file": ("small.jsonl", big[:100_000].rsplit(b"\n", 1)[0])})
            assert small.status_code == 200, small.text
            assert client.post("/predict", json={"inputs": ["a wonderful film"]}).status_code == 200
            metrics = httpx.get(server.url + "/metrics").text
            assert 'finetune_dataset_uploads_total{outcome="rejected",reason="no_space"} 1.0' in metrics
    finally:
        server.kill()


def test_a_zip_whose_files_find_no_room_is_out_of_space_not_invalid(tmp_path, mount_small_disk):
    """Creating an entry's file on a full disk (here: no inodes left) is the server's fault (507), not the zip's."""
    import io
    import zipfile

    from service import datasets

    folder = mount_small_disk(tmp_path / "home" / "datasets", 4, inodes=8)  # FINETUNE_SERVE_HOME: conftest
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(20):
            zf.writestr(f"train/{'ab'[i % 2]}/{i}.png", b"not read before it is written")
    with pytest.raises(datasets.OutOfSpace, match="disk is full"):
        datasets.save_upload("photos.zip", [archive.getvalue()])
    assert list(folder.iterdir()) == []  # neither the archive nor a half-extracted folder is kept
