"""run_isolated(): one run_training() in a child process, so its memory is returned when it ends.

The child is started with the spawn method (a fresh interpreter: no copied torch threads or CUDA
state), sends every training event back over a pipe, stops at its next step on SIGTERM (it saves a
checkpoint and returns status "cancelled", like run_training itself) and dies with its parent: a
SIGKILLed search leaves no trial training behind it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from . import errors
from .config import JobConfig

# How long a child may take to stop after it was asked (it checks once per optimizer step, but an
# evaluation or a checkpoint write of a large model runs to its end first).
STOP_GRACE_SECONDS = 120.0
POLL_SECONDS = 0.2


class RunCrashed(RuntimeError):
    """The child ended without a result: killed (out of memory), or a bug; the message says which."""


def run_isolated(cfg: JobConfig, output: str | Path, *, on_event: Callable[[dict], None] = lambda event: None,
                 should_stop: Callable[[], bool] = lambda: False) -> dict:
    """run_training(cfg, output) in a child process; returns its metrics, raises its FinetuneError."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(cfg, str(output), send, os.getpid()), name="finetune-run")
    child.start()
    send.close()  # the child holds the only sending end: its exit ends our reads
    outcome: dict | None = None
    stop_deadline = None
    try:
        while True:
            if stop_deadline is None and should_stop():
                child.terminate()
                stop_deadline = time.monotonic() + STOP_GRACE_SECONDS
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                child.kill()
            if not receive.poll(POLL_SECONDS):
                continue
            try:
                message = receive.recv()
            except EOFError:
                break
            if message["type"] in ("result", "error", "crash"):
                outcome = message
            else:
                on_event(message)
    finally:
        receive.close()
        if child.is_alive():
            child.kill()
        child.join()
    if outcome is None and stop_deadline is not None:  # stopped before it could train (or save) anything
        return {"validation": None, "test": None, "train": {"status": "cancelled"}}
    if outcome is None:
        raise RunCrashed(exit_reason(child.exitcode))
    if outcome["type"] == "error":
        raise getattr(errors, outcome["kind"], errors.FinetuneError)(outcome["message"])
    if outcome["type"] == "crash":
        raise RunCrashed(f"the training process failed: {outcome['message']}")
    return outcome["metrics"]


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so no orphan keeps training."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(f"the parent process {parent_pid} is gone; exiting")


def _child(cfg: JobConfig, output: str, send, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    # SIGTERM from the parent, and Ctrl-C, which reaches the whole process group: both mean "stop at the
    # next step and save", as for `finetune-serve train`; the parent decides what happens next.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from .pipeline import run_training

    try:
        metrics = run_training(cfg, output, on_event=send.send, should_stop=stop.is_set)
        send.send({"type": "result", "metrics": metrics})
    except errors.FinetuneError as err:
        send.send({"type": "error", "kind": type(err).__name__, "message": str(err)})
    except Exception as err:  # a bug or the machine: the parent records it with the last lines of the trace
        trace = traceback.format_exc().strip().splitlines()
        send.send({"type": "crash", "message": f"{type(err).__name__}: {err} ({' | '.join(trace[-3:])})"})
    finally:
        send.close()


def exit_reason(returncode: int) -> str:
    """Why a training process ended without recording a result, in words."""
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(-returncode)
        hint = " (the out-of-memory killer sends SIGKILL: try a smaller batch_size or max_length)" if returncode == -signal.SIGKILL else ""
        return f"the training process was killed by {name}{hint}"
    return f"the training process exited with code {returncode} before recording a result; its log says why"
