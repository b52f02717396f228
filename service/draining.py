"""An API worker's graceful stop on SIGTERM: refuse new connections at once, finish what is in flight.

BentoML (1.4) and uvicorn (0.55) alone do not: `bentoml serve` owns the listening socket and passes it
to each worker, so when a worker's uvicorn stops accepting it closes only its own copy. The kernel
keeps queueing new connections that nobody accepts, and resets them when `bentoml serve` exits; and
uvicorn closes idle keep-alive connections the moment it stops, under a request a client may be
sending on one (tests/test_service_faults.py: 14 of 587 requests failed so, 8 clients, SIGTERM mid-load).

So on SIGTERM a worker first
1. shuts the listening socket down (shutdown(2) acts on the socket every process shares, where close
   drops one copy): new connections are refused at once;
2. answers requests arriving on connections already open with `Connection: close`, so each ends after a
   complete response, until none has been in flight for QUIET_SECONDS (at most DRAIN_SECONDS);
3. hands the signal on to uvicorn, which waits for the rest, closes idle connections and runs the
   shutdown hooks.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import threading
import time

log = logging.getLogger("service.draining")

# Requests on open connections are still answered this long at most; well inside the grace period
# (Kubernetes: terminationGracePeriodSeconds, 30 s by default).
DRAIN_SECONDS = 5.0
# The drain ends once no request has been in flight this long: clients told `Connection: close` reconnect
# within milliseconds, and are refused.
QUIET_SECONDS = 0.5


class Drain:
    """This worker's state: requests in flight, whether it is draining, when a request last finished."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self.last_finished = time.monotonic()

    def quiet(self) -> bool:
        return self.in_flight == 0 and time.monotonic() - self.last_finished >= QUIET_SECONDS


DRAIN = Drain()  # one per worker process: the middleware and the signal handler share it


class Draining:
    """ASGI middleware: counts HTTP requests in flight; while draining, every response says `Connection: close`."""

    def __init__(self, app, drain: Drain = DRAIN):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def closing_send(message):
            if message["type"] == "http.response.start" and self.drain.draining:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = dict(message, headers=headers + [(b"connection", b"close")])
            await send(message)

        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, closing_send)
        finally:
            self.drain.in_flight -= 1
            self.drain.last_finished = time.monotonic()


def drain_on_sigterm(drain: Drain = DRAIN) -> None:
    """In a worker, inside its event loop and main thread (a BentoML service's __init__): put the drain in
    front of the SIGTERM handler uvicorn installed."""
    handed_on = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(handed_on):
        log.warning("not in a worker's main thread under uvicorn: SIGTERM stops this worker without draining")
        return
    loop = asyncio.get_running_loop()

    def on_sigterm(sig, frame) -> None:
        if drain.draining:  # a second SIGTERM: stop now
            handed_on(sig, frame)
            return
        drain.draining = True
        loop.call_soon_threadsafe(stop_listening, loop, listening_sockets())
        threading.Thread(target=wait_then_hand_on, args=(sig, frame), name="drain", daemon=True).start()

    def wait_then_hand_on(sig, frame) -> None:
        deadline = time.monotonic() + DRAIN_SECONDS
        while not drain.quiet() and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("drained (%d request(s) still in flight); stopping", drain.in_flight)
        handed_on(sig, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def stop_listening(loop: asyncio.AbstractEventLoop, listeners: list[tuple[int, socket.socket]]) -> None:
    """Stop accepting on listening sockets (listening_sockets()) and shut them down for every process holding them."""
    for fd, sock in listeners:
        loop.remove_reader(fd)  # a shut-down listener reads as ready: the accept loop would spin on its errors
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError as err:
            if err.errno == errno.ENOTCONN:  # another descriptor of the same socket shut it down already
                sock.close()
                continue
            log.warning("could not shut the listening socket %d down (%s); new connections wait until exit", fd, err)
        sock.close()
    log.info("SIGTERM: refusing new connections, answering open ones with Connection: close")


def listening_sockets() -> list[tuple[int, socket.socket]]:
    """(fd, a socket on a duplicate of it) for each listening TCP socket of this process (Linux: /proc)."""
    found, copies = [], set()
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd in copies:  # a copy made here took the number of listdir's own descriptor, closed since
            continue
        try:
            copy = os.dup(fd)
        except OSError:  # listdir's own descriptor
            continue
        copies.add(copy)
        try:
            sock = socket.socket(fileno=copy)
        except OSError:  # not a socket
            os.close(copy)
            continue
        if (sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            found.append((fd, sock))
        else:
            sock.close()
    return found
