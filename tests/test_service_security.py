"""Issue 13's three gaps, closed: base models over HTTP come from an allow-list; a server without an API key
does not listen beyond loopback unless told to; /docs needs nothing outside the server; a trainer's own
endpoints want the key too.

The unit tests check the deciding functions; one `bentoml serve service.bento:Api` (no trainer: queued jobs
stay queued) answers the HTTP ones; `bentoml serve --host 0.0.0.0` without a key must exit at once.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import click
import httpx
import pytest
from conftest import toy_rows
from service_helpers import BENTOML, REPO, Server, finetune_body, free_port, upload, wait_for_job

from service import settings as service_settings
from service.base_models import allowed_base_model, allowed_student
from service.errors import FieldError
from service.exposure import bound_host, check_exposure, exposure

LISTED_HUB_ID = "example-org/listed-model"
REFUSAL_SECONDS = 60


@pytest.fixture
def fresh(monkeypatch):
    """settings() read anew from this test's environment, and forgotten after it."""
    for name in ("FINETUNE_SERVE_API_KEY", "FINETUNE_SERVE_ALLOW_NO_AUTH", "FINETUNE_SERVE_BASE_MODELS"):
        monkeypatch.delenv(name, raising=False)
    service_settings.settings.cache_clear()
    yield monkeypatch
    service_settings.settings.cache_clear()


def refused_names(tiny_base) -> list[str]:
    """Names a caller must not get loaded: server paths (existing or not, absolute, relative, with ..) and hub ids
    nobody listed."""
    return ["/etc", str(REPO / "tests"), "tests", "./tests", "../main/tests", "tests/../tests", "/no/such/folder",
            "~/models", f"{tiny_base}/", f"{tiny_base}/../{tiny_base.name}", "bert-base-uncased", "someone/model",
            "example-org/listed-model-2", ""]


# --- 1. base models ---------------------------------------------------------------------------------------

def test_listed_and_bundled_base_models_pass_and_bundled_names_become_default(fresh, tiny_base):
    fresh.setenv("FINETUNE_SERVE_BASE_MODELS", f" {tiny_base} ,{LISTED_HUB_ID},,")
    assert allowed_base_model("default", "text-classification") == "default"
    assert allowed_base_model("default", "image-classification") == "default"
    assert allowed_base_model("all-MiniLM-L6-v2", "text-regression") == "default"
    assert allowed_base_model("sentence-transformers/all-MiniLM-L6-v2", "text-classification") == "default"
    assert allowed_base_model("tf_efficientnet_lite0", "image-regression") == "default"
    assert allowed_base_model(str(tiny_base), "text-classification") == str(tiny_base)
    assert allowed_base_model(LISTED_HUB_ID, "text-classification") == LISTED_HUB_ID


def test_any_other_base_model_is_one_message_that_names_no_path(fresh, tiny_base):
    fresh.setenv("FINETUNE_SERVE_BASE_MODELS", f"{tiny_base},{LISTED_HUB_ID}")
    messages = set()
    for name in refused_names(tiny_base) + ["tf_efficientnet_lite0"]:  # the image model is not a text base
        with pytest.raises(FieldError) as err:
            allowed_base_model(name, "text-classification")
        assert err.value.field == "base_model"
        messages.add(str(err.value))
    (message,) = messages  # the same words whatever was asked, so nothing tells whether a path exists
    assert message.startswith("base_model: ") and "FINETUNE_SERVE_BASE_MODELS" in message
    assert "'default'" in message and "'all-MiniLM-L6-v2'" in message and LISTED_HUB_ID in message


def test_with_nothing_listed_only_default_and_the_bundled_names_pass(fresh, tiny_base):
    with pytest.raises(FieldError):
        allowed_base_model(str(tiny_base), "text-classification")
    with pytest.raises(FieldError):
        allowed_base_model("all-MiniLM-L6-v2", "image-classification")


def test_a_student_folder_must_be_listed_too(fresh, tiny_base):
    assert allowed_student(None) is None  # the default: the teacher's own layers
    fresh.setenv("FINETUNE_SERVE_BASE_MODELS", str(tiny_base))
    assert allowed_student(str(tiny_base)) == str(tiny_base)
    messages = set()
    for name in refused_names(tiny_base):
        with pytest.raises(FieldError) as err:
            allowed_student(name)
        assert err.value.field == "distillation.student"
        messages.add(str(err.value))
    assert len(messages) == 1


# --- 2. no key beyond loopback ------------------------------------------------------------------------------

@pytest.mark.parametrize("host, has_key, allow, verdict", [
    ("0.0.0.0", False, False, "refused"),
    ("::", False, False, "refused"),
    ("10.1.2.3", False, False, "refused"),
    ("0.0.0.0", False, True, "open-allowed"),
    ("0.0.0.0", True, False, "keyed"),
    ("127.0.0.1", False, False, "open-loopback"),
    ("127.0.0.2", False, False, "open-loopback"),
    ("::1", False, False, "open-loopback"),
    ("localhost", False, False, "open-loopback"),
    ("127.0.0.1", True, False, "keyed"),
])
def test_exposure_verdicts(host, has_key, allow, verdict):
    assert exposure(host, has_key, allow) == verdict


def test_the_check_reads_the_settings_and_says_what_it_decided(fresh, caplog):
    caplog.set_level(logging.INFO, logger="service.exposure")
    with pytest.raises(SystemExit) as stopped:
        check_exposure("0.0.0.0")
    assert stopped.value.code == 2
    assert "refusing to start" in caplog.text and "FINETUNE_SERVE_ALLOW_NO_AUTH=1" in caplog.text
    fresh.setenv("FINETUNE_SERVE_API_KEY", "")  # an empty key leaves the API open (service.guard)
    service_settings.settings.cache_clear()
    with pytest.raises(SystemExit):
        check_exposure("0.0.0.0")

    caplog.clear()
    fresh.setenv("FINETUNE_SERVE_ALLOW_NO_AUTH", "1")
    service_settings.settings.cache_clear()
    check_exposure("0.0.0.0")
    assert "WITHOUT an API key on 0.0.0.0" in caplog.text and "FINETUNE_SERVE_ALLOW_NO_AUTH=1" in caplog.text

    caplog.clear()
    fresh.delenv("FINETUNE_SERVE_ALLOW_NO_AUTH")
    service_settings.settings.cache_clear()
    check_exposure("127.0.0.1")
    assert "without an API key on 127.0.0.1" in caplog.text

    caplog.clear()
    fresh.setenv("FINETUNE_SERVE_API_KEY", "k3y")
    service_settings.settings.cache_clear()
    check_exposure("0.0.0.0")
    assert caplog.text == ""


def test_the_bound_host_is_the_serve_commands_else_bentomls_default():
    assert bound_host() == "0.0.0.0"  # `bentoml serve` without --host binds every interface
    with click.Context(click.Command("serve")) as serve:
        serve.params = {"host": "127.0.0.1"}
        assert bound_host() == "127.0.0.1"


@pytest.mark.process
def test_serving_on_all_interfaces_without_a_key_exits_at_once_saying_why(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FINETUNE_SERVE_API_KEY", "FINETUNE_SERVE_ALLOW_NO_AUTH")}
    env.update(BENTOML_DO_NOT_TRACK="true", FINETUNE_SERVE_HOME=str(tmp_path / "home"))
    process = subprocess.Popen([str(BENTOML), "serve", "service.bento:FinetuneServe", "--host", "0.0.0.0",
                                "--port", str(free_port())], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=REFUSAL_SECONDS)
    finally:
        if process.poll() is None:  # it must not stay up: end its whole group
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 2, output[-3000:]
    assert "refusing to start" in output and "0.0.0.0" in output, output[-3000:]
    assert "FINETUNE_SERVE_API_KEY" in output and "FINETUNE_SERVE_ALLOW_NO_AUTH=1" in output


@pytest.mark.process
def test_every_api_pod_is_keyed_or_open_by_choice():
    """A pod the Secret has not reached yet must still start in dev, and production must never run open."""
    from test_k8s import container, deployments, environment, rendered

    for name in ("base", "overlays/dev", "overlays/production"):
        objects = rendered(name)
        for deployment in deployments(objects):
            c = container(deployment)
            if "Trainer" in c["args"][2]:
                continue  # no key guards the trainer's wake and status; its NetworkPolicy admits the API pods alone
            host = c["args"][c["args"].index("--host") + 1] if "--host" in c["args"] else "0.0.0.0"
            env = environment(objects, c)
            key_always_there = "optional" not in env["FINETUNE_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
            allow = env.get("FINETUNE_SERVE_ALLOW_NO_AUTH", {}).get("value") == "1"
            assert exposure(host, key_always_there, allow) != "refused", (name, deployment["metadata"]["name"])
            if name == "overlays/production":
                assert key_always_there and not allow


# --- over HTTP: one API server ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base):
    folder = tmp_path_factory.mktemp("security")
    running = Server(folder / "home", folder / "server.log", target="service.bento:Api",
                     env={"FINETUNE_SERVE_BASE_MODELS": f"{tiny_base},{LISTED_HUB_ID}"}).start()
    yield running
    running.kill()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.mark.process
def test_finetune_queues_listed_base_models_and_refuses_the_rest_alike(client, tiny_base):
    train = upload(client, toy_rows(40))["id"]
    bodies = set()
    for name in refused_names(tiny_base):
        response = client.post("/finetune", json={"base_model": name, "train": train, "model_name": "m"})
        assert response.status_code == 422, (name, response.text)
        assert response.json()["field"] == "base_model"
        bodies.add(response.content)
    assert len(bodies) == 1, bodies  # one answer for every refused name
    for name in ("default", "all-MiniLM-L6-v2", str(tiny_base), LISTED_HUB_ID):
        response = client.post("/finetune", json={"base_model": name, "train": train, "model_name": "m"})
        assert response.status_code == 202, (name, response.text)
        job = client.get(f"/jobs/{response.json()['id']}").json()
        assert job["status"] == "queued"  # no trainer here: it stays queued
    queued = client.get("/jobs", params={"status": "queued"}).json()["jobs"]
    assert len(queued) == 4


@pytest.mark.process
def test_a_distillation_student_folder_is_refused_on_both_routes(client):
    train = upload(client, toy_rows(40))["id"]
    for path, body in (("/finetune", {"train": train, "model_name": "m", "variants": ["onnx", "distilled"]}),
                       ("/models/m/versions/v1/distill", {})):
        response = client.post(path, json={**body, "distillation": {"student": "/etc"}})
        assert response.status_code == 422, (path, response.text)
        assert response.json()["field"] == "distillation.student"
        assert "/etc" not in response.json()["error"]


@pytest.mark.process
def test_an_open_server_on_loopback_says_so_in_its_log(server):
    assert "serving without an API key on 127.0.0.1" in server.log_path.read_text(errors="replace")


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


@pytest.mark.process
def test_docs_load_everything_from_the_server_itself(client, server):
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    links = _Links()
    links.feed(page.text)
    assert len(links.urls) >= 3, links.urls  # the stylesheet, the icon, the script
    assert "/openapi.json" in page.text
    for url in links.urls + ["/openapi.json"]:
        full = urljoin(server.url + "/docs", url)
        assert urlsplit(full).netloc == urlsplit(server.url).netloc, url  # nothing from a CDN
        response = client.get(full)
        assert response.status_code == 200 and len(response.content) > 0, url
    assert client.get("/openapi.json").json()["info"]["title"] == "finetune-serve"
    assert client.get("/redoc").status_code == 404  # FastAPI's CDN page is off
    root = client.get("/", follow_redirects=False)  # not BentoML's index page, which loads Google Tag Manager
    assert root.status_code == 307 and root.headers["location"] == "/docs"
    assert "googletagmanager" not in client.get("/", follow_redirects=True).text


# --- 4. a trainer's endpoints -----------------------------------------------------------------------------

TRAINER_KEY = "trainer-test-key"
WAKE_FAILED = "could not wake"


def _queue_and_finish(client: httpx.Client, tiny_base) -> dict:
    data = upload(client, toy_rows(80))
    body = {**finetune_body(tiny_base, data["id"], model_name="woken", epochs=1), "variants": []}
    queued = client.post("/finetune", json=body)
    assert queued.status_code == 202, queued.text
    return wait_for_job(client, queued.json()["id"])


@pytest.mark.process
def test_a_keyed_trainer_refuses_callers_without_the_key_and_its_apis_send_it(tmp_path, tiny_base):
    """In Kubernetes a trainer is its own server: /wake and /status want the key, the API sends it when it wakes
    one; FinetuneServe reaches its own trainer over BentoML's Unix socket, where no key is asked."""
    env = {"FINETUNE_SERVE_API_KEY": TRAINER_KEY, "FINETUNE_SERVE_BASE_MODELS": str(tiny_base)}
    auth = {"Authorization": f"Bearer {TRAINER_KEY}"}
    trainer = Server(tmp_path / "home", tmp_path / "trainer.log", env, target="service.bento:Trainer",
                     name="trainer").start()
    api = None
    try:
        for path in ("/wake", "/status"):
            assert httpx.post(trainer.url + path, json={}, timeout=30).status_code == 401, path
            assert httpx.post(trainer.url + path, json={}, headers={"Authorization": "Bearer wrong"},
                              timeout=30).status_code == 401, path
            assert httpx.post(trainer.url + path, json={}, headers=auth, timeout=30).status_code == 200, path
        assert httpx.get(trainer.url + "/livez", timeout=30).status_code == 200
        api = Server(tmp_path / "home", tmp_path / "api.log", {**env, "FINETUNE_SERVE_TRAINER_URL": trainer.url},
                     target="service.bento:Api", name="api").start()
        with httpx.Client(base_url=api.url, headers=auth, timeout=60) as client:
            assert _queue_and_finish(client, tiny_base)["status"] == "succeeded"
        assert WAKE_FAILED not in api.tail(100_000)  # a 401 from the trainer is logged as a failed wake
    finally:
        trainer.kill()
        if api is not None:
            api.kill()
    both = Server(tmp_path / "one", tmp_path / "one.log", env).start()  # FinetuneServe: API and its own trainer
    try:
        with httpx.Client(base_url=both.url, headers=auth, timeout=60) as client:
            assert _queue_and_finish(client, tiny_base)["status"] == "succeeded"
        assert WAKE_FAILED not in both.tail(100_000)
    finally:
        both.kill()
