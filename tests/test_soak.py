"""The soak (bench/load/soak.py): its bounds on recorded windows, and a one-minute soak of a real server.

The one-minute form is what CI runs (`make soak-short`; `make soak` is the 10-minute one): a tiny
model on a real `bentoml serve`, the script's own probe, warm-up and bounds, judged by its exit code.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO
from service_helpers import serve_toy_model

sys.path.insert(0, str(REPO / "bench" / "load"))
from procstats import Snapshot, host_steal, snapshot  # noqa: E402
from soak import Window, check  # noqa: E402

MB = 2**20


def windows(rss_mb: list[float], files: list[int] | None = None, threads: list[int] | None = None,
            errors: int = 0) -> list[Window]:
    """One warm-up window (at < 0, ignored by the bounds) and then a window per value."""
    n = len(rss_mb)
    files, threads = files or [40] * n, threads or [30] * n
    out = [Window(-10, 10, errors=99, stats=Snapshot(3, 0.0, 10 * MB, 1, 0, 1))]
    for i in range(n):
        out.append(Window(10 * i, 10, [0.01] * 10, errors=errors if i == n - 1 else 0,
                          stats=Snapshot(3, 0.0, int(rss_mb[i] * MB), files[i] + 7, 7, threads[i])))
    return out


def broken(verdicts) -> list[str]:
    return [v.bound.split(" (")[0] for v in verdicts if not v.ok]


def test_a_steady_server_passes_and_the_warm_up_is_not_judged():
    assert broken(check(windows([1000, 1010, 990, 1005, 1000, 1020, 1010, 1015]))) == []


def test_each_bound_can_break():
    assert broken(check(windows([1000] * 8, errors=1))) == ["errors"]
    assert broken(check(windows([1000, 1000, 1020, 1030, 1040, 1050, 1060, 1070]))) == ["RSS growth"]
    assert broken(check(windows([1000] * 8, files=[40, 41, 41, 42, 42, 43, 44, 44]))) == ["open fds but sockets"]
    assert broken(check(windows([1000] * 8, threads=[30, 30, 31, 30, 31, 31, 32, 32]))) == ["threads"]
    assert broken(check(windows([1000] * 3))) == ["samples"]


def test_errors_are_told_apart_by_the_hosts_steal_in_their_windows():
    recorded = windows([1000] * 8, errors=5)
    for w in recorded:
        w.steal = 0.30 if w.errors else 0.02
    errors = check(recorded)[0]
    assert not errors.ok  # a host that took the CPU away does not excuse errors, it explains them
    assert errors.measured.endswith("host steal in the windows with errors 30% (median), in the others 2%")


def test_host_steal_is_a_share_of_the_cpu_time_between_two_readings():
    before = host_steal()
    sum(i * i for i in range(200_000))  # some CPU time passes
    share, after = host_steal(since=before)
    assert 0.0 <= share <= 1.0 and after[1] > before[1] and after[0] >= before[0]


def test_a_pool_that_grows_and_shrinks_with_the_load_is_not_growth():
    moving = windows([1000] * 8, files=[40, 44, 41, 40, 43, 40, 44, 41], threads=[30, 33, 31, 30, 32, 30, 33, 30])
    assert broken(check(moving)) == []
    # 40 threads at the warm-up's peak, idle ones stopped, then some of them started again: no leak
    steady = windows([1000] * 8, threads=[10, 10, 15, 15, 17, 17, 17, 17])
    steady[0].stats = Snapshot(3, 0.0, 10 * 2**20, 1, 0, 40)
    assert broken(check(steady)) == []


def test_snapshot_sums_a_process_tree(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; f = open(__file__); time.sleep(30)"], cwd=tmp_path)
    try:
        mine = snapshot(os.getpid())
        assert mine.processes >= 2 and mine.rss_bytes > 0 and mine.threads >= 2 and mine.files >= 3
    finally:
        child.kill()
        child.wait()


@pytest.mark.process
@pytest.mark.soak
def test_a_one_minute_soak_of_a_real_server_keeps_its_bounds(tmp_path, tiny_base):
    # No shedding here: a soak judges errors and growth, tests/test_service_shedding.py the 429s, and on a shared
    # CI machine a neighbour's stall of a second would otherwise shed the open-loop requests that piled up.
    server = serve_toy_model(tmp_path, tiny_base, env={"FINETUNE_SERVE_MAX_INFLIGHT": "10000"})
    try:
        done = subprocess.run([sys.executable, str(REPO / "bench" / "load" / "soak.py"), "--url", server.url,
                               "--server-pid", str(server.process.pid), "--model", "toy", "--seconds", "60",
                               "--warmup", "10", "--every", "5", "--probe-seconds", "5"],
                              cwd=REPO, capture_output=True, text=True, timeout=240)
    finally:
        server.kill()
    print(done.stdout[-6000:])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "| errors | 0 | 0 | yes |" in done.stdout
