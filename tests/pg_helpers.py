"""A real, throwaway PostgreSQL server for the tests: Debian's postgresql binaries, a new cluster in a temp folder.

`server()` starts one per test process on a free loopback port (password auth, no Unix socket) and
stops it when the process exits; the server dies with the process even on SIGKILL (PR_SET_PDEATHSIG).
PostgreSQL refuses to run as root, so under root it runs as the `postgres` user the package creates.
When it cannot start, the tests that need it fail with the reason: `.ci/run` installs the package.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from service_helpers import free_port

START_DEADLINE_SECONDS = 30
STOP_GRACE_SECONDS = 10
# Speed over durability: the cluster is thrown away at the end of the run.
SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "200",
            "listen_addresses": "127.0.0.1", "unix_socket_directories": ""}


def server_binaries() -> Path:
    """The folder holding initdb and postgres: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("initdb")
    if on_path and Path(on_path).resolve().with_name("postgres").is_file():
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0]))
    if not found:
        raise RuntimeError("PostgreSQL's server (initdb, postgres) is not installed; install Debian's package: "
                           "`apt-get install postgresql` (.ci/run does)")
    return Path(found[-1]).parent


class PostgresServer:
    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.password = secrets.token_hex(12)
        self.process: subprocess.Popen | None = None
        # initdb and postgres refuse root: run them as the package's `postgres` user.
        self.user = "postgres" if os.geteuid() == 0 else None
        self.ids = {"user": self.user, "group": self.user, "extra_groups": []} if self.user else {}

    def start(self) -> "PostgresServer":
        bin_dir = server_binaries()
        (self.folder / "pwfile").write_text(self.password + "\n")
        if self.user:
            account = pwd.getpwnam(self.user)
            os.chown(self.folder, account.pw_uid, account.pw_gid)
            os.chown(self.folder / "pwfile", account.pw_uid, account.pw_gid)
        done = subprocess.run([str(bin_dir / "initdb"), "-D", str(self.folder / "data"), "-U", "postgres", "-E", "UTF8",
                               "--auth=scram-sha-256", f"--pwfile={self.folder / 'pwfile'}", "--no-sync"],
                              **self.ids, cwd=self.folder, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr[-2000:]}")
        options = [arg for name, value in SETTINGS.items() for arg in ("-c", f"{name}={value}")]
        self.log = (self.folder / "postgres.log").open("wb")
        self.process = subprocess.Popen([str(bin_dir / "postgres"), "-D", str(self.folder / "data"), "-p", str(self.port),
                                         *options], **self.ids, cwd=self.folder, stdout=self.log,
                                        stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}:\n{self.tail()}")
            if self._accepts():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"postgres did not accept connections within {START_DEADLINE_SECONDS}s:\n{self.tail()}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: ends the sessions, no checkpoint wait
            try:
                self.process.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_GRACE_SECONDS)
        shutil.rmtree(self.folder, ignore_errors=True)

    def tail(self, chars: int = 3000) -> str:
        return (self.folder / "postgres.log").read_bytes()[-chars:].decode(errors="replace")

    def _accepts(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url(), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False


@functools.cache
def server() -> PostgresServer:
    """This test process's PostgreSQL server, started on first use."""
    started = PostgresServer(Path(tempfile.mkdtemp(prefix="finetune-pg-"))).start()
    atexit.register(started.stop)
    return started


def _die_with_parent() -> None:
    # Runs in the child after it took the postgres user's ids, so the kernel keeps the setting through exec.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
