"""The README's REST session works: its curl block and its Python block, run as written against a real server.

The blocks are taken from README.md (the fenced block after each `<!-- readme-session: ... -->` marker);
only the URL changes, to the test server's free port. The server's base-model cache holds the tiny
random BERT under the bundled MiniLM's name, so the README's `"base_model": "default"` job trains in
seconds instead of a minute; every command is the README's own.
"""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest
from service_helpers import REPO, Server

pytestmark = pytest.mark.process  # starts a real server

README_URL = "http://localhost:3000"
SESSION_TIMEOUT_SECONDS = 240
MODEL = "sst2-minilm"


def readme_block(kind: str) -> str:
    """The fenced block right after the marker `<!-- readme-session: KIND`."""
    readme = (REPO / "README.md").read_text()
    found = re.search(r"<!-- readme-session: " + kind + r"\b[^\n]*-->\n```\w+\n(.*?)\n```", readme, re.S)
    assert found, f"README.md has no ``` block after '<!-- readme-session: {kind}'"
    block = found.group(1)
    assert block.count(README_URL) == 1, f"the {kind} block should name {README_URL} once, in one variable"
    return block


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base):
    folder = tmp_path_factory.mktemp("readme")
    cache = folder / "cache"
    cache.mkdir()
    (cache / "all-MiniLM-L6-v2").symlink_to(tiny_base, target_is_directory=True)  # what "default" resolves to
    running = Server(folder / "home", folder / "server.log", env={"FINETUNE_SERVE_CACHE": str(cache)}).start()
    yield running
    running.kill()


def run_session(argv: list[str], server: Server) -> str:
    env = {k: v for k, v in server.env.items() if k != "FINETUNE_SERVE_API_KEY"}
    try:
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=SESSION_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the session did not finish in {SESSION_TIMEOUT_SECONDS}s:\n{err.stdout}\n{err.stderr}\n{server.tail()}")
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}\n{server.tail()}"
    return done.stdout


def test_make_run_serves_what_the_tests_serve():
    dry = subprocess.run(["make", "-n", "run", "PORT=4321"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert dry.returncode == 0, dry.stderr
    assert "bentoml serve service.bento:FinetuneServe --host 127.0.0.1 --port 4321" in dry.stdout


def test_readme_curl_session(server):
    script = readme_block("curl").replace(README_URL, server.url)
    out = run_session(["bash", "-euo", "pipefail", "-c", script], server)
    assert "\ntrue\n" in out, out  # the job succeeded
    with httpx.Client(base_url=server.url, timeout=30) as client:
        model = client.get(f"/models/{MODEL}").json()
        assert model["production"] == model["latest"], model  # the new version was promoted
        answer = client.post("/predict", json={"model": MODEL, "inputs": ["a moving, funny film"]}).json()
    assert answer["model"] == {"name": MODEL, "version": model["production"]}
    assert f'"version": "{model["production"]}"' in out and out.count('"label"') >= 2, out  # the README's predict


def test_readme_python_session(server):
    code = readme_block("python").replace(README_URL, server.url)
    out = run_session([sys.executable, "-c", code], server)
    assert "dev accuracy" in out and "succeeded 1.0" in out, out
    with httpx.Client(base_url=server.url, timeout=30) as client:
        model = client.get(f"/models/{MODEL}").json()
    assert model["production"] == model["latest"], model
    assert f"'version': '{model['production']}'" in out, out
