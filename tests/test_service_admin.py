"""DELETE /datasets/{id} and DELETE /jobs/{id}/files over real HTTP: refused while a job needs the files,
done once it has ended, and never outside the home folder whatever the id."""

from __future__ import annotations

import pytest
from conftest import toy_rows
from service_helpers import finetune_body, tiny_base_client, upload, wait_for_job, wait_until

pytestmark = pytest.mark.process  # starts a real server

# Encoded: an HTTP client resolves a plain ".." itself, so only the encoded forms reach the server as an id.
HOSTILE_IDS = ["..%2F..%2Fjobs.sqlite3", "%2E%2E", "%2E%2E%2Fcanary", "ds-0000000000000000", "ds-..%2F..%2Fcanary",
               "ds-0123456789abcdef.json", "job-0000000000000000", "job-..%2Fcanary", "*", "ds-*"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("admin") / "home"


@pytest.fixture(scope="module")
def client(home, tiny_base):
    with tiny_base_client(home, tiny_base, timeout=60) as c:
        yield c


def test_a_dataset_and_a_run_are_kept_while_their_job_runs_and_deleted_after(client, home, tiny_base):
    train = upload(client, toy_rows(240))
    job = client.post("/finetune", json=finetune_body(tiny_base, train["id"], epochs=300)).json()
    wait_until("training steps", 120, lambda: (client.get(f"/jobs/{job['id']}").json()["step"] or 0) > 0)

    busy = client.delete(f"/datasets/{train['id']}")
    assert busy.status_code == 409 and busy.json()["field"] == "dataset_id" and job["id"] in busy.json()["error"]
    running = client.delete(f"/jobs/{job['id']}/files")
    assert running.status_code == 409 and "running" in running.json()["error"]
    assert (home / "runs" / job["id"] / "checkpoints").is_dir() or (home / "runs" / job["id"] / "config.json").is_file()

    client.post(f"/jobs/{job['id']}/cancel")
    assert wait_for_job(client, job["id"])["status"] == "cancelled"
    deleted = client.delete(f"/jobs/{job['id']}/files")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["deleted"] is True and deleted.json()["bytes"] > 0
    assert not (home / "runs" / job["id"]).exists()
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"  # the record stays
    again = client.delete(f"/jobs/{job['id']}/files").json()
    assert (again["deleted"], again["bytes"]) == (False, 0)

    gone = client.delete(f"/datasets/{train['id']}")
    assert gone.status_code == 200 and gone.json()["bytes"] > 0, gone.text
    assert not list((home / "datasets").glob(f"{train['id']}*"))
    assert client.delete(f"/datasets/{train['id']}").status_code == 404
    refused = client.post("/finetune", json=finetune_body(tiny_base, train["id"]))
    assert refused.status_code == 404 and refused.json()["field"] == "train"


def test_ids_that_are_not_an_uploads_or_a_jobs_touch_nothing(client, home):
    kept = upload(client, toy_rows(20))
    canary = home / "canary"
    canary.write_text("still here")
    before = sorted(p.relative_to(home) for p in home.rglob("*") if "runs" not in p.parts)
    for hostile in HOSTILE_IDS:
        for path in (f"/datasets/{hostile}", f"/jobs/{hostile}/files"):
            answer = client.delete(path)
            assert answer.status_code in (404, 422), (path, answer.status_code, answer.text)
    after = sorted(p.relative_to(home) for p in home.rglob("*") if "runs" not in p.parts)
    assert after == before and canary.read_text() == "still here" and (home / "jobs.sqlite3").is_file()
    assert client.delete(f"/datasets/{kept['id']}").status_code == 200
