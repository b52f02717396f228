"""Processes as a cluster runs them, on one machine: `bentoml serve service.bento:Api` and `...:Trainer`.

Each is a real `bentoml serve` on a free loopback port in its own process group, like a pod: `kill()`
with SIGKILL is the pod's death (server, worker and training child at once).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
from service_helpers import BENTOML, REPO, alive, descendants, free_port

START_DEADLINE_SECONDS = 180


class Pod:
    def __init__(self, target: str, name: str, logs: Path, env: dict):
        self.target, self.name = target, name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logs / f"{name}.log"
        self.env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", **env)
        self.process: subprocess.Popen | None = None

    def launch(self) -> "Pod":
        """Start it without waiting; `ready()` waits."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(BENTOML), "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def ready(self, deadline_seconds: float = START_DEADLINE_SECONDS) -> "Pod":
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
        """Signal the server and every process under it at once; returns their pids, all gone when it returns."""
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
        deadline = time.monotonic() + 20
        while any(alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.process = None
        return tree

    def tail(self, chars: int = 4000) -> str:
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")
