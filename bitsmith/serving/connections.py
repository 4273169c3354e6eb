"""The server's HTTP layer under the app: uvicorn's protocol with header timeouts and a header
size limit, and the server that drains on SIGTERM without dropping a request.

uvicorn times out only idle keep-alive connections, and httptools keeps every header line it
is sent: `HeaderTimeoutHttp` answers 408 to request headers that do not all arrive within
`--header-timeout-s` (closing a silent connection) and 431 to headers over MAX_HEADER_BYTES.
A connection answered before its request's body was read (which uvicorn would keep alive with
no timer left to close it) is ended after the answer.

`DrainingServer`, on SIGTERM/SIGINT: the app drains at once (readiness false, infer answered
503, every answer closing its connection); for `--drain-grace-ms` the listener stays open;
then the connections waiting in the accept queue are answered 503 (a plain close of a
listening socket resets them, requests and all), those already accepted may finish on their
own, and uvicorn shuts down gracefully (every request in progress is answered).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

if TYPE_CHECKING:
    from .server import ServerState

log = logging.getLogger("uvicorn.error")  # printed with, and like, uvicorn's own lines
MAX_HEADER_BYTES = 64 * 2**10
"""Request headers larger than this are answered 431 (browsers send a few KiB; httptools
itself sets no limit)."""

REFUSED_LINGER_SECONDS = 1.0
"""How long a connection refused by the protocol (408, 431), or answered before its request's
body was read, stays open after its answer."""

BACKLOG_READ_SECONDS = 1.0
"""While draining, how long a connection from the accept queue may take to send its request
(read before its 503, so that the close does not reset the answer away)."""

DRAIN_LINGER_SECONDS = 1.0
"""After the listener closes, how long connections already accepted may take to send their
request and get its answer (every answer closes its connection while draining)."""


class HeaderTimeoutHttp(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, which also closes a connection whose request headers have
    not all arrived `header_timeout` seconds after it opened or after the request's first byte
    (uvicorn times out only idle keep-alive connections: a silent new connection or half-sent
    headers would hold a socket forever). A half-sent request is answered 408 first; headers
    over MAX_HEADER_BYTES, 431."""

    header_timeout = 10.0  # make_server sets it on a subclass per server
    _header_timer: asyncio.TimerHandle | None = None
    _partial = False  # some of a request arrived, not yet all its headers
    _header_bytes = 0  # bytes received while the headers were incomplete
    _discarding = False  # refused: what still arrives is dropped until the close

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def data_received(self, data: bytes) -> None:  # noqa: D102 - asyncio's hook
        if self._discarding:
            return
        super().data_received(data)
        if self._partial:  # headers still coming: httptools would hold them all, unbounded
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self._cancel_header_timer()
                self._refuse(b"431 Request Header Fields Too Large", f"request headers over "
                             f"{MAX_HEADER_BYTES} bytes")
                return
        # a later request on a keep-alive connection, its headers cut (whole ones, the usual
        # case, set no timer)
        if self._partial and self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def on_message_begin(self) -> None:  # noqa: D102 - httptools' callback
        super().on_message_begin()
        self._partial, self._header_bytes = True, 0

    def on_headers_complete(self) -> None:  # noqa: D102 - httptools' callback
        self._partial = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102 - asyncio's hook
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:  # a request is served
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)
            return
        if self._partial:
            self._refuse(b"408 Request Timeout", f"request headers not received within "
                         f"{self.header_timeout:g} s (--header-timeout-s)")
        else:
            self.transport.close()

    def _refuse(self, status: bytes, message: str) -> None:
        """Answer `status` with a JSON reason (the request was never handed on) and `_end`."""
        self.transport.write(raw_answer(status, message))
        self._end()

    def on_response_complete(self) -> None:
        """uvicorn's hook once a response is sent. One sent before the request's body was all
        read (a GET with a body, an unknown model, an infer refused before reading) ends the
        connection: uvicorn would keep it alive, and its keep-alive timer, cancelled by the
        next byte of that body, is never armed again (nor the header timer, cancelled when the
        headers were complete), so a client that stalls would hold the socket forever."""
        cycle = self.cycle
        if cycle.more_body and cycle.response_complete and not self.transport.is_closing():
            self.server_state.total_requests += 1
            self._unset_keepalive_if_required()
            self.flow.resume_reading()  # drain what arrives (a large body paused reading)
            self._end()
            return
        super().on_response_complete()

    def _end(self) -> None:
        """End our side now and close REFUSED_LINGER_SECONDS later, reading and dropping what
        the client still sends meanwhile: closing with its bytes unread would reset the
        connection, answer and all."""
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(REFUSED_LINGER_SECONDS, self.transport.close)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM/SIGINT first marks the app as draining (readiness
    false, new infer requests refused, every response closing its connection) for the grace,
    and then shuts down gracefully: uvicorn closes the listening socket and idle connections and
    waits for every request in progress."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._graced_signal: int | None = None  # the signal whose exit waits for the grace
        self._grace_ends = 0.0

    def handle_exit(self, sig: int, frame: Any) -> None:  # noqa: D102 - uvicorn's hook
        if sig in (signal.SIGTERM, signal.SIGINT) and not self.state.draining:
            self.state.draining = True
            for connection in list(self.server_state.connections):  # answers not yet started
                cycle = getattr(connection, "cycle", None)
                if cycle is not None and not cycle.response_started:
                    cycle.keep_alive = False  # uvicorn then says `Connection: close`
            grace = self.state.options.drain_grace_ms / 1e3
            queued = sum(b.depth for b in self.state.batchers.values())
            log.info("draining: %d queued request(s) to finish; listening %g s more", queued,
                     grace)
            if grace > 0:
                self._graced_signal, self._grace_ends = sig, time.monotonic() + grace
                return
        self._graced_signal = None  # a second signal ends the grace
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        """Close the listener, then let the connections already accepted finish on their own
        (while draining every answer closes its connection) for up to DRAIN_LINGER_SECONDS:
        one accepted just before the close may hold a request not yet read, which uvicorn's
        shutdown would drop with the idle connections. Then uvicorn's graceful shutdown."""
        backlog = [socket.socket(fileno=os.dup(sock.fileno()))
                   for server in self.servers for sock in server.sockets]
        for server in self.servers:
            server.close()
        await _refuse_backlog(backlog)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_LINGER_SECONDS
        while self.server_state.connections and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await super().shutdown(sockets)

    async def on_tick(self, counter: int) -> bool:  # noqa: D102 - uvicorn's hook, every 0.1 s
        sig = self._graced_signal
        if sig is not None and time.monotonic() >= self._grace_ends:
            self._graced_signal = None
            super().handle_exit(sig, None)
        return await super().on_tick(counter)


def raw_answer(status: bytes, message: str, headers: bytes = b"") -> bytes:
    """An HTTP/1.1 answer written below the app: `status` (b"408 Request Timeout"), a JSON
    `{"error": message}`, `Connection: close`."""
    body = orjson.dumps({"error": message})
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n" + headers
            + b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
            + body)


_DRAINING = raw_answer(b"503 Service Unavailable", "the server is shutting down; send to "
                       "another replica", b"retry-after: 1\r\n")


async def _refuse_backlog(listeners: Sequence[socket.socket]) -> None:
    """Answer 503 to the connections still waiting in the listeners' accept queues (which a
    plain close of a listening socket resets, with the request they carry), then close them."""
    tasks = []
    for sock in listeners:
        sock.setblocking(False)
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # BlockingIOError: the queue is empty
                break
            tasks.append(asyncio.create_task(_refuse_one(conn)))
        sock.close()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _refuse_one(conn: socket.socket) -> None:
    """Answer 503 and close, having read the request first (its headers and Content-Length
    body, for up to BACKLOG_READ_SECONDS) so that the close does not reset the answer away.
    Whatever the request: one that does not come in time, headers saying `Expect:
    100-continue` (its client waits for our answer before sending the body), a Content-Length
    that is no number, headers over the reader's limit. After the answer, what still arrives
    is dropped for up to REFUSED_LINGER_SECONDS, until the client closes."""
    conn.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=conn)
    try:
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError,
                                 asyncio.LimitOverrunError):
            async with asyncio.timeout(BACKLOG_READ_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
                length, expect = 0, False
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    name, value = name.strip().lower(), value.strip()
                    if name == b"content-length" and value.isdigit() and len(value) <= 18:
                        length = int(value)
                    elif name == b"expect" and value.lower() == b"100-continue":
                        expect = True
                while length > 0 and not expect:  # read and dropped, a chunk at a time
                    chunk = await reader.read(min(length, 2**16))
                    if not chunk:
                        break
                    length -= len(chunk)
        writer.write(_DRAINING)
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REFUSED_LINGER_SECONDS):
                while await reader.read(2**16):
                    pass
    except OSError:
        pass
    finally:
        writer.close()
