"""What a server's process tree uses: CPU seconds, resident memory, open files, threads (psutil).

A BentoML server is a tree (the arbiter, each API worker, the trainer and its training child), so
every figure is summed over the server process and all its descendants alive at that moment. RSS is
the sum of each process's resident set: pages shared between processes count once per process, so it
over-states the total but moves with it, which is what a leak check needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Snapshot:
    processes: int
    cpu_seconds: float  # user + system, of the processes alive now, since each started
    rss_bytes: int
    open_fds: int
    sockets: int  # of open_fds: the count moves with the clients' connections, so a leak check leaves them out
    threads: int

    @property
    def files(self) -> int:
        """Open descriptors that are not sockets: files, pipes, eventfds, memory maps' files."""
        return self.open_fds - self.sockets


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root] + root.children(recursive=True)


def snapshot(pid: int) -> Snapshot:
    """The tree's figures now; a process that exits while being read is left out."""
    cpu, rss, fds, sockets, threads, count = 0.0, 0, 0, 0, 0, 0
    for process in tree(pid):
        try:
            with process.oneshot():
                times = process.cpu_times()
                cpu += times.user + times.system
                rss += process.memory_info().rss
                fds += process.num_fds()
                sockets += _sockets(process.pid)
                threads += process.num_threads()
                count += 1
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return Snapshot(count, cpu, rss, fds, sockets, threads)


def _sockets(pid: int) -> int:
    """Open socket descriptors of one process (Linux: /proc/PID/fd links read socket:[inode])."""
    count = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for name in names:
        try:
            count += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
        except OSError:
            continue
    return count


def host_steal(since: tuple[float, float] | None = None):
    """The machine's CPU time stolen by its hypervisor (other guests on the host) and all CPU time, in seconds.

    With `since` (an earlier reading): (the stolen share of the time in between, this reading). On a
    virtual machine a soak's slow windows often line up with steal rather than with the server.
    """
    times = psutil.cpu_times()
    now = (getattr(times, "steal", 0.0), sum(times))
    if since is None:
        return now
    total = now[1] - since[1]
    return ((now[0] - since[0]) / total if total > 0 else 0.0), now

