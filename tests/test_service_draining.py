"""service.draining on its own: the listener shut down for every holder, responses closing their connections."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from service.draining import Drain, Draining, listening_sockets, stop_listening


def test_stop_listening_refuses_new_connections_for_every_descriptor():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    other_copy = os.dup(listener.fileno())  # as `bentoml serve` and its worker each hold one
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        found = listening_sockets()
        ours = [(fd, sock) for fd, sock in found if sock.getsockname()[1] == port]
        for _, sock in set(found) - set(ours):
            sock.close()
        assert sorted(fd for fd, _ in ours) == sorted([listener.fileno(), other_copy])
        loop = asyncio.new_event_loop()
        try:
            stop_listening(loop, ours)
        finally:
            loop.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
    finally:
        os.close(other_copy)
        listener.close()


def test_responses_say_connection_close_only_while_draining():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"connection", b"keep-alive")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def headers_of(middleware):
        sent = []

        async def send(message):
            sent.append(message)

        await middleware({"type": "http", "method": "GET", "path": "/"}, None, send)
        return sent[0]["headers"]

    drain = Drain()
    middleware = Draining(app, drain)
    assert asyncio.run(headers_of(middleware)) == [(b"connection", b"keep-alive")]
    drain.draining = True
    assert asyncio.run(headers_of(middleware)) == [(b"connection", b"close")]
    assert drain.in_flight == 0
