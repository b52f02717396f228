"""Schemathesis against a real `bentoml serve`, driven by the published schema (GET /openapi.json).

Every operation, all phases (examples, coverage, fuzzing, stateful) and every check, with one setting:
`positive_data_acceptance` also accepts 400, 413 and 422 for a request the schema allows, because the
service checks more than JSON Schema can say (a model name's characters, a dataset id that exists,
hyperparameter ranges in the core's config, a file's and an image's content, a V2 tensor's shape
against its data) and answers those with the 4xx that names the field, by design.

The server is the API alone (service.bento:Api, as in Kubernetes) with an API key: a job the fuzzer
queues waits for a trainer that never comes, so fuzzing costs no training. Before the run a tiny text
model is registered and a dataset uploaded, and half the generated names, versions, ids and
datasets are those real ones, so the deep paths (a loaded model, a real job) are reached. After it
the server must be healthy and still predict, and no model, version or job that existed may have
changed. `make test` runs a short form (FUZZ_EXAMPLES, default 6 per operation and phase); `make fuzz`
the long one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import toy_rows
from service_helpers import Server, upload

KEY = "fuzz-key-0123"
ST = Path(sys.executable).with_name("st")
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "6"))
# A fixed seed keeps `make test` repeatable; `make fuzz` sets FUZZ_SEED=random and prints the one it drew.
SEED = os.environ.get("FUZZ_SEED", "20261202")
PHASES = "examples,coverage,fuzzing,stateful"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tiny_base) -> dict:
    """The API with "toy" v1 registered and promoted, a dataset and a cancelled job: {"server", "ids"}."""
    from artifact_helpers import make_run

    from finetune_core.artifacts import export_version

    folder = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_SERVE_HOME", str(folder / "home"))
        export_version(make_run(tiny_base, folder / "run"), "toy", variants=["onnx"])
    server = Server(folder / "home", folder / "server.log", target="service.bento:Api",
                    env={"FINETUNE_SERVE_API_KEY": KEY, "FINETUNE_SERVE_MAX_UPLOAD_MB": "1"}).start()
    try:
        with client_of(server) as client:
            dataset = upload(client, toy_rows(40))
            job = client.post("/finetune", json={"train": dataset["id"], "model_name": "queued"}).json()
            assert client.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
            # Production set already: a generated promotion (to `latest`, say) is then no change of state.
            assert client.post("/models/toy/promote", json={"version": "v1"}).status_code == 200
        yield {"server": server, "ids": {"model": "toy", "dataset": dataset["id"], "job": job["id"]}}
    finally:
        server.kill()


def client_of(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def config(ids: dict) -> str:
    """schemathesis.toml: the checks' settings and the real names each parameter draws from half the time."""
    bindings = {"path.name": "models", "body.model": "models", "path.job_id": "jobs", "body.data": "datasets",
                "body.train": "datasets", "body.validation": "datasets", "path.version": "versions"}
    lines = ["[checks.positive_data_acceptance]", 'expected-statuses = ["2XX", 400, 401, 404, 409, 413, 422, 429]', "",
             "[dictionaries]",
             f'models = {{ values = ["{ids["model"]}"] }}', f'jobs = {{ values = ["{ids["job"]}"] }}',
             f'datasets = {{ values = ["{ids["dataset"]}"] }}', 'versions = { values = ["v1", "1", "latest"] }', "",
             "[parameters]"]
    lines += [f'"{key}" = {{ dictionary = "{name}", probability = 0.5 }}' for key, name in bindings.items()]
    return "\n".join(lines) + "\n"


def snapshot(client: httpx.Client, job_ids: list[str]) -> dict:
    """Every model with its versions and production, and each job of `job_ids` as GET /jobs/{id} shows it."""
    return {"models": client.get("/models").json()["models"], "toy": client.get("/models/toy").json(),
            "jobs": {job_id: client.get(f"/jobs/{job_id}").json() for job_id in job_ids}}


def test_both_schemas_list_every_routes_error_answers_with_their_body():
    """/openapi.json (published) and BentoML's /docs.json: the same answers per operation, our error bodies only."""
    from service.app import app
    from service.bento import FinetuneServe
    from service.guard import OPEN_PATHS
    from service.openapi import ERRORS

    published = app.openapi()
    bentoml = FinetuneServe.openapi_spec.asdict()["paths"]
    assert set(published["paths"]) == set(ERRORS), "service/openapi.py ERRORS must list exactly the app's paths"
    assert "HTTPValidationError" not in published["components"]["schemas"]  # FastAPI's {"detail"}: not what we send
    for path, operations in published["paths"].items():
        errors = set(ERRORS[path]) | (set() if path in OPEN_PATHS else {401})
        for method, operation in operations.items():
            answers = operation["responses"]
            assert {int(code) for code in answers if int(code) >= 400} == errors | (
                {503} if path == "/v2/health/ready" else set()), (method, path)
            assert bentoml[path][method]["responses"].keys() == answers.keys(), (method, path)
            for code in errors:
                schema = answers[str(code)]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/" + ("V2Error" if path.startswith("/v2") else "Error")}
    assert published["components"]["schemas"]["Error"]["required"] == ["error", "field"]


@pytest.mark.process  # starts a real server
def test_schemathesis_finds_no_failure_and_changes_nothing_that_existed(deployed, tmp_path):
    server = deployed["server"]
    with client_of(server) as client:
        existing = [job["id"] for job in client.get("/jobs", params={"limit": 1000}).json()["jobs"]]
        before = snapshot(client, existing)
    (tmp_path / "schemathesis.toml").write_text(config(deployed["ids"]))
    command = [str(ST), "--config-file", str(tmp_path / "schemathesis.toml"), "run", f"{server.url}/openapi.json",
               "--checks", "all", "--phases", PHASES, "--max-examples", str(EXAMPLES), "--workers", "1",
               "--header", f"Authorization: Bearer {KEY}", "--request-timeout", "60",
               "--report", "ndjson", "--report-dir", str(tmp_path / "report"), "--no-color"]
    if SEED != "random":
        command += ["--seed", SEED]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-3000:]
    figures = run_figures(next((tmp_path / "report").glob("*.ndjson")))
    print(f"schemathesis: {figures}")
    with client_of(server) as client:
        operations = sum(len(item) for item in client.get("/openapi.json").json()["paths"].values())
    assert figures["operations"] == operations and figures["requests"] >= 20 * EXAMPLES, figures
    assert figures["failed checks"] == 0 and not any(status >= 500 for status in figures["statuses"]), figures

    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
    with client_of(server) as client:
        predicted = client.post("/predict", json={"model": "toy", "inputs": ["a great film", "an awful plot"]})
        assert predicted.status_code == 200, predicted.text
        assert [p["label"] for p in predicted.json()["predictions"]] == ["positive", "negative"]
        after = snapshot(client, existing)  # the fuzzer queues jobs of its own; GET /jobs pages them
    assert after == before


def run_figures(report: Path) -> dict:
    """From the run's NDJSON events: operations tested, cases generated, requests sent, statuses, failed checks."""
    operations, cases, requests, failed, statuses = set(), 0, 0, 0, {}
    for line in report.read_text().splitlines():
        event = json.loads(line)
        recorder = event.get("ScenarioFinished", {}).get("recorder")
        if not recorder:
            continue
        if recorder["label"] != "Stateful tests":  # its steps are the operations' own requests
            operations.add(recorder["label"])
        cases += len(recorder.get("cases", {}))
        for interaction in recorder.get("interactions", {}).values():
            requests += 1
            status = (interaction.get("response") or {}).get("status_code", 0)
            statuses[status] = statuses.get(status, 0) + 1
        failed += sum(check["status"] == "failure"
                      for checks in recorder.get("checks", {}).values() for check in checks)
    return {"operations": len(operations), "cases": cases, "requests": requests, "failed checks": failed,
            "statuses": dict(sorted(statuses.items()))}
