"""Registry aliases under concurrent writers: threads in several processes promoting and rolling back at once.

API workers, pods and CLI runs share one registry folder. Each promote adds the version it replaces to
production.json's history and each rollback takes the last one back, so with every promote naming a
version never promoted before, the final alias must account for every operation: one lost
read-modify-write drops a version from the history (or keeps one twice).
"""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

from test_registry import _register

from finetune_core import registry

PROCESSES = 3
THREADS = 4
PROMOTES = 6  # per thread; every other one is followed by a rollback


def _promote_and_roll_back(versions: list[str]) -> tuple[int, int]:
    """Promote each version in turn, rolling back after every other one; (promotes, rollbacks that succeeded)."""
    rollbacks = 0
    for i, version in enumerate(versions):
        registry.promote("m", version)
        if i % 2:
            try:
                registry.rollback("m")
                rollbacks += 1
            except registry.RegistryError:  # another writer's rollbacks emptied the history first
                pass
    return len(versions), rollbacks


def _threads(chunks: list[list[str]]) -> tuple[int, int]:
    """One process's writers: a thread per chunk, released together."""
    start = threading.Barrier(len(chunks))
    results: list[tuple[int, int]] = []

    def writer(chunk: list[str]) -> None:
        start.wait()
        results.append(_promote_and_roll_back(chunk))

    threads = [threading.Thread(target=writer, args=(chunk,)) for chunk in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == len(chunks), "a writer thread failed"
    return sum(p for p, _ in results), sum(r for _, r in results)


def test_concurrent_promotes_and_rollbacks_lose_no_history_entry(tmp_path):
    total = PROCESSES * THREADS * PROMOTES
    versions = [_register(tmp_path, name="m", payload=f"w{i}").version for i in range(total)]
    # Each thread promotes its own versions: no version is ever promoted twice.
    chunks = [versions[i::PROCESSES * THREADS] for i in range(PROCESSES * THREADS)]
    per_process = [chunks[p::PROCESSES] for p in range(PROCESSES)]
    with multiprocessing.get_context("spawn").Pool(PROCESSES) as pool:  # spawn: no fork of pytest's threads
        counts = pool.map(_threads, per_process)
    promotes, rollbacks = sum(p for p, _ in counts), sum(r for _, r in counts)
    assert promotes == total and rollbacks > 0

    alias = registry._read_production("m")
    held = alias["history"] + [alias["version"]]
    # The first promote starts the alias; every later one pushes one version, every rollback pops one.
    assert len(held) == promotes - rollbacks, (len(held), promotes, rollbacks)
    assert len(set(held)) == len(held)
    assert registry.resolve("m", "production").version == alias["version"]


def test_the_lock_file_stays_out_of_versions_and_listings(tmp_path):
    first = _register(tmp_path, name="m")
    registry.promote("m", first.version)
    assert (Path(registry.root()) / "models" / "m" / ".lock").exists()
    assert registry.list_models() == [{"name": "m", "versions": ["v1"], "latest": "v1", "production": "v1"}]
    assert _register(tmp_path, name="m", payload="second").version == "v2"
