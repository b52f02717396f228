"""A real `bentoml serve` on a free loopback port, and small HTTP helpers for the service tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BENTOML = Path(sys.executable).with_name("bentoml")
START_DEADLINE_SECONDS = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`bentoml serve TARGET` on a free loopback port in its own process group; `kill()` ends the whole group.

    TARGET is service.bento:FinetuneServe (what `make run` serves), or :Api / :Trainer for the processes of
    a cluster (tests/test_cluster.py), where a SIGKILLed group is a pod's death.
    """

    def __init__(self, home: Path | None, log: Path, env: dict | None = None,
                 target: str = "service.bento:FinetuneServe", name: str = "bentoml serve"):
        self.home, self.log_path, self.target, self.name = home, log, target, name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home_env = {"FINETUNE_SERVE_HOME": str(home)} if home is not None else {}
        # Its own BentoML home: every `bentoml serve` empties its home's prometheus_multiproc_dir at start, so
        # servers sharing one (tests run side by side) would wipe each other's metrics.
        bentoml_home = {"BENTOML_HOME": str(log.parent / f"bentoml-home-{self.port}")}
        self.env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", **bentoml_home, **home_env, **(env or {}))
        self.process: subprocess.Popen | None = None

    def start(self) -> "Server":
        """Launch it and wait until it is ready (killing it if it never is)."""
        self.launch()
        try:
            return self.ready()
        except RuntimeError:
            self.kill()
            raise

    def launch(self) -> "Server":
        """Start it without waiting; `ready()` waits."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(BENTOML), "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def ready(self, deadline_seconds: float = START_DEADLINE_SECONDS) -> "Server":
        deadline = time.monotonic() + deadline_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} was not ready within {deadline_seconds}s:\n{self.tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> list[int]:
        """Signal the server and every process under it (BentoML puts each worker in its own session).

        With SIGKILL this is a crash of the whole machine's share: server, workers, training child.
        Returns their pids, all gone when it returns.
        """
        if self.process is None:
            return []
        tree = [self.process.pid] + descendants(self.process.pid)
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        _wait_gone(tree, 20)
        self.process = None
        return tree

    def tail(self, chars: int = 4000) -> str:
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")


def serve_toy_model(folder: Path, tiny_base: Path, env: dict | None = None) -> Server:
    """A started server whose registry holds one text model, "toy" v1 (ONNX), trained on the tiny BERT."""
    import pytest
    from artifact_helpers import make_run

    from finetune_core.artifacts import export_version

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_SERVE_HOME", str(folder / "home"))
        export_version(make_run(tiny_base, folder / "run"), "toy", variants=["onnx"])
    return Server(folder / "home", folder / "server.log", env=env).start()


@contextlib.contextmanager
def tiny_base_client(home: Path, tiny_base: Path, timeout: float = 60) -> Iterator[httpx.Client]:
    """`make run`'s server on `home`, the tiny base model on its list of base models, and a client of it."""
    server = Server(home, home.parent / "server.log", env={"FINETUNE_SERVE_BASE_MODELS": str(tiny_base)}).start()
    try:
        with httpx.Client(base_url=server.url, timeout=timeout) as client:
            yield client
    finally:
        server.kill()


def descendants(pid: int) -> list[int]:
    """Every process below pid, read from /proc (children of children too)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_until(what: str, seconds: float, check, poll: float = 0.5):
    """check()'s first truthy value within `seconds`, polled every `poll` s; else an AssertionError naming `what`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


def sigkill_server_alone(server: "Server", seconds: float = 20) -> list[int]:
    """SIGKILL the server process alone, as a crash would; return the processes it left running that did not
    exit by themselves within `seconds` (its workers, each in its own session, and their training children
    must notice and exit, or they would compete with the next server)."""
    left_behind = descendants(server.process.pid)
    os.kill(server.process.pid, signal.SIGKILL)
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in left_behind) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in left_behind if alive(p)]


def _wait_gone(pids: list[int], seconds: float) -> None:
    """Wait until none of pids is alive (zombies of ours are reaped by their own parents)."""
    deadline = time.monotonic() + seconds
    living = list(pids)
    while living and time.monotonic() < deadline:
        living = [p for p in living if alive(p)]
        time.sleep(0.2)
    for pid in living:
        os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def upload(client: httpx.Client, rows: list[dict], name: str = "data.jsonl") -> dict:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    response = client.post("/datasets", files={"file": (name, body)})
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_job(client: httpx.Client, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {job}")


def finetune_body(tiny_base: Path, train_id: str, model_name: str = "toy", **hyper) -> dict:
    # The core's own tests show the tiny BERT learning the cue-word task with these settings.
    hyperparameters = {"epochs": 6, "learning_rate": 2e-3, "num_threads": 1, "batch_size": 16, "max_length": 32,
                       "precision": "fp32", "seed": 1, "early_stopping_patience": 0, **hyper}
    return {"base_model": str(tiny_base), "train": train_id, "model_name": model_name, "variants": ["onnx"],
            "hyperparameters": hyperparameters}
