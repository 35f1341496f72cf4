"""The HTTP transport of ``fleetctl serve`` (SPEC §6): one asyncio event loop holds every connection.

- Requests are framed by h11 (request line, headers, ``Content-Length`` — copies that disagree are
  refused —, body delimiting, pipelining): a new ``h11.Connection`` per request, fed what the previous
  one left over. Responses are written here, each with one ``write`` (always a ``Content-Length``).
- HTTP/1.1 keep-alive, ``TCP_NODELAY``, a listen backlog of ``LISTEN_BACKLOG``.
- Limits checked before a body is read: request line (414), header block and count (431),
  ``Content-Length`` required on bodies (411; chunked is refused), body cap per route (413); an idle or
  slow connection is closed after ``CONNECTION_TIMEOUT_SECS``.
- A complete request is handed to the ``Api`` in a thread of the request pool; a long-poll that finds
  nothing is parked in the ``WaitRoom`` (no thread held) until a write may have made a task claimable.
- Every response, errors included, is JSON (``{"error": {"code", "message"}}``); no traceback ever
  reaches a client.
- Connections are capped below the open-files limit (``connection_cap``): at the cap the longest-idle
  keep-alive connections are closed to make room; with every connection busy a new one gets 503.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import json
import os
import resource
import select
import socket
import time
from http import HTTPStatus
from typing import TYPE_CHECKING

import h11

from fleetctl.errors import FleetError
from fleetctl.log import log

if TYPE_CHECKING:
    from fleetctl.server.api import Api, Pending
    from fleetctl.server.pool import Pool
    from fleetctl.server.waiting import WaitRoom

MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 32768
MAX_HEADERS = 100
CONNECTION_TIMEOUT_SECS = 60.0  # idle keep-alive and slow-client timeout (long-poll waits are ≤ 30 s)
#: File descriptors kept free of connections, beyond those open when serving starts: two per pooled
#: reader connection (the database file and its WAL; ``api.READER_POOL`` is 64), and room for a backup,
#: a migration check or a log reopen. Connections are capped at the open-files limit minus this.
FD_RESERVE = 2 * 64 + 32
#: How long the accept loop pauses when accept() fails for want of file descriptors (instead of spinning).
ACCEPT_BACKOFF_SECS = 0.05
#: The listen queue (the kernel caps it at net.core.somaxconn): thousands of agents reconnect at once
#: after a restart.
LISTEN_BACKLOG = 4096
#: Connections accepted per readiness of the listening socket before other connections get their turn.
ACCEPT_BURST = 64


class Headers:
    """Request headers: case-insensitive ``get``; repeated headers keep the last value."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[str, tuple[str, str]] = {}

    @classmethod
    def of(cls, raw: list[tuple[bytes, bytes]]) -> Headers:
        headers = cls()
        items = headers._items
        for name, value in raw:  # h11 gives lower-cased names
            key = name.decode("ascii")
            items[key] = (key, value.decode("iso-8859-1"))
        return headers

    def add(self, name: str, value: str) -> None:
        self._items[name.lower()] = (name, value)

    def get(self, name: str, default: str | None = None) -> str | None:
        item = self._items.get(name.lower())
        return default if item is None else item[1]

    def __getitem__(self, name: str) -> str | None:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def items(self) -> list[tuple[str, str]]:
        return list(self._items.values())


class Response:
    """A status, extra headers and a body (bytes, already encoded)."""

    __slots__ = ("status", "headers", "body", "content_type")

    def __init__(self, status: int, body: bytes = b"", content_type: str = "application/json",
                 headers: dict[str, str] | None = None):  # fmt: skip
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}


def json_response(status: int, doc: object, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(doc, separators=(",", ":")).encode(), headers=headers)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response(status, {"error": {"code": code, "message": message}}, headers)


def encode(response: Response, *, close: bool, head: bool = False) -> bytes:
    """The whole response as bytes (status line, headers, body), to be written at once."""
    lines = [f"HTTP/1.1 {response.status} {_phrase(response.status)}", f"Content-Type: {response.content_type}",
             f"Content-Length: {len(response.body)}", "Cache-Control: no-store"]  # fmt: skip
    lines += [f"{k}: {v}" for k, v in response.headers.items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else response.body)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def connection_cap() -> int:
    """How many connections to keep open at most: the soft open-files limit minus the descriptors open
    now and ``FD_RESERVE`` — or, under a very low limit, a third of what is free (a connection, plus the
    two descriptors of the reader it may borrow)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 32
    free = soft - in_use
    return max(free - FD_RESERVE, free // 3, 1)


class Connection(asyncio.Protocol):
    """One client connection: frames its requests with h11, one at a time, and writes the answers."""

    __slots__ = ("server", "transport", "parser", "head_bytes", "request", "headers", "body", "busy",
                 "idle_since", "active_since", "closed", "started", "waiting", "method", "keep_alive",
                 "leftover")  # fmt: skip

    def __init__(self, server: HttpServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser: h11.Connection | None = _parser()  # None while a request is answered (or waits)
        self.head_bytes = 0  # bytes received towards the head of the next request
        self.method = "GET"  # of the request being answered
        self.keep_alive = True
        self.leftover = b""  # bytes received after the request being answered (pipelined)
        self.request: h11.Request | None = None
        self.headers: Headers | None = None
        self.body: list[bytes] = []
        self.busy = False  # a request is being answered (its handler runs, or it waits in the room)
        self.idle_since: float | None = time.monotonic()
        self.active_since = self.idle_since  # the last time bytes arrived (for the slow-client timeout)
        self.closed = False
        self.started = 0.0
        self.waiting = None  # the room's handle while this connection's long-poll waits

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        self.server.connections[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.pop(self, None)
        if self.waiting is not None and self.server.room.forget(self.waiting):
            self.server.end()  # its long-poll was parked: nothing will answer it now
        self.waiting = None

    def data_received(self, data: bytes) -> None:
        self.active_since = time.monotonic()
        if self.parser is None:  # a request is being answered: keep what comes next for after it
            self.leftover += data
            if len(self.leftover) > MAX_REQUEST_LINE + MAX_HEADER_BYTES:
                self.transport.pause_reading()  # enough: the kernel holds the rest (resumed after the answer)
            return
        if self.request is None:
            self.head_bytes += len(data)
        self.parser.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        if self.parser is None:  # half-closed after its request: the answer is still written, then we close
            self.keep_alive = False
            return True
        self.parser.receive_data(b"")
        self._process()
        return False  # close our side too

    # ------------------------------------------------------------------ reading

    def _process(self) -> None:
        while not self.busy and not self.closed:
            try:
                event = self.parser.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            if event is h11.NEED_DATA:
                if self.request is None and self.head_bytes > MAX_REQUEST_LINE:
                    self._check_partial_head()
                return
            kind = type(event)
            if kind is h11.Request:
                self._begin(event)
            elif kind is h11.Data:
                self.body.append(event.data)
            elif kind is h11.EndOfMessage:
                self._dispatch()
            elif kind is h11.ConnectionClosed or event is h11.PAUSED:
                self._close()
                return

    def _check_partial_head(self) -> None:
        """A head still incomplete: refuse it as soon as its request line or header block is over the limit."""
        if len(self.parser.trailing_data[0]) > MAX_REQUEST_LINE + 1:
            self._refuse_head(strict=True)

    def _refuse_head(self, *, strict: bool = False) -> None:
        """414 when the request line has no end within its limit, else 431 (``strict``: only once the whole
        buffered head is over the limit)."""
        buffered = self.parser.trailing_data[0]
        if buffered.find(b"\n", 0, MAX_REQUEST_LINE + 2) == -1:
            self._refuse(414, "uri_too_long", "request line too long")
        elif not strict or len(buffered) > MAX_REQUEST_LINE + MAX_HEADER_BYTES:
            self._refuse(431, "headers_too_large", "request headers too large")

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        hint = getattr(exc, "error_status_hint", 400)
        if hint == 431:
            self._refuse_head()
        elif hint == 501:  # a Transfer-Encoding other than chunked
            self._refuse(400, "bad_request", "unsupported Transfer-Encoding; send a Content-Length")
        elif "Content-Length" in str(exc):
            self._refuse(400, "bad_request", "invalid Content-Length")
        else:
            self._refuse(400, "bad_request", f"malformed request: {exc}")

    def _begin(self, request: h11.Request) -> None:
        """The head of a request: check what can be checked before its body is read."""
        self.request = request
        self.idle_since = None
        self.server.connections[self] = None
        if request.http_version not in (b"1.1", b"1.0"):
            return self._refuse(505, "http_version", "HTTP/1.0 or HTTP/1.1 only")
        if len(request.target) > MAX_REQUEST_LINE:
            return self._refuse(414, "uri_too_long", "request line too long")
        raw = list(request.headers)
        if len(raw) > MAX_HEADERS:
            return self._refuse(431, "headers_too_large", "too many request headers")
        if sum(len(n) + len(v) + 4 for n, v in raw) > MAX_HEADER_BYTES:
            return self._refuse(431, "headers_too_large", "request headers too large")
        headers = self.headers = Headers.of(raw)
        length = headers.get("content-length")
        if "transfer-encoding" in headers:
            if length is not None:  # RFC 9112 §6.1: a smuggling attempt or a broken proxy
                return self._refuse(400, "bad_request", "Transfer-Encoding together with Content-Length")
            return self._refuse(411, "length_required", "send a Content-Length, not chunked")
        if length is not None:
            size = int(length)  # h11 checked it: ASCII digits, every copy the same
            cap = self.server.api.body_cap(request.target.decode("iso-8859-1"))
            if size > cap:
                return self._refuse(413, "body_too_large", f"request body over {cap} bytes")
            if size and self.parser.they_are_waiting_for_100_continue:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # only once the size is known to be fine
        elif request.method == b"POST":
            return self._refuse(411, "length_required", "a request with a body needs Content-Length")
        return None

    # ------------------------------------------------------------------ answering

    def _dispatch(self) -> None:
        """Hand the complete request to the Api. While it is answered (or waits in the room) the connection
        keeps only what the answer needs: no parser, request or headers (fewer objects per waiting agent)."""
        request, headers = self.request, self.headers
        self.busy = True  # one request at a time: bytes that come meanwhile wait in ``leftover``
        self.started = time.perf_counter()
        self.method = request.method.decode("ascii")
        self.keep_alive = _keep_alive(request, headers)
        self.leftover = self.parser.trailing_data[0]
        self.parser = self.request = self.headers = None
        body = b"".join(self.body) if self.body else b""
        self.body = []
        server = self.server
        server.begin()
        target = request.target.decode("iso-8859-1")
        api = server.api
        try:
            call = api.dequeue_fast(self.method, target, headers, body)
        except Exception:  # a bug: the ordinary path will meet it too, and answer it (500, logged)
            call = None
        if call is not None:  # its claim goes to the writer from here; the answer comes back to ``_claimed``
            try:
                api.dequeue_fast_claim(call, lambda task, error: server.pool.hand_back(
                    lambda _none: self._claimed(call, error or task), None))  # fmt: skip
                return
            except FleetError:  # the writer is closed (shutting down): the ordinary path answers it
                pass
        server.pool.submit(api.handle, (self.method, target, headers, body), self._handled)

    def _claimed(self, call: Pending, task: dict | BaseException | None) -> None:
        """The writer's answer to a fast dequeue's claim (on the loop): a task → the 200 rendered here; nothing
        (or an error, or a prompt that does not render) → the rest of the dequeue on a request thread."""
        if isinstance(task, dict) and not self.closed:
            try:
                response = self.server.api.dequeue_fast_answer(call, task)
            except Exception:  # a bug: the rest of the ordinary path meets it too, and answers it (500, logged)
                response = None
            if response is not None:
                self.answer(response)
                return
        self.server.pool.submit(self.server.api.dequeue_fast_rest, (call, task), self._handled)

    def _handled(self, result: Response | Pending | BaseException) -> None:
        if isinstance(result, BaseException):  # pragma: no cover - Api.handle never raises
            log("http.internal_error", error=type(result).__name__)
            result = error_response(500, "internal_error", "internal error; see the server log")
        if isinstance(result, Response):
            self.answer(result)
        elif self.closed:
            self.server.end()
        else:
            self.waiting = self.server.room.add(result, self)

    def answer(self, response: Response) -> None:
        """Write the answer to the request in flight and get ready for the next one (called on the loop)."""
        self.waiting = None
        server = self.server
        server.api.metrics.observe(self.method, response.status, time.perf_counter() - self.started)
        server.end()
        if self.closed:
            return
        close = server.closing or not self.keep_alive
        self.transport.write(encode(response, close=close, head=self.method == "HEAD"))
        if close:
            self._close()
            return
        self._next_cycle()

    def _next_cycle(self) -> None:
        leftover, self.leftover = self.leftover, b""
        self.parser = _parser()
        self.busy = False
        self.head_bytes = len(leftover)
        now = time.monotonic()
        self.idle_since = self.active_since = now
        self.server.connections[self] = None
        if not self.transport.is_reading():
            self.transport.resume_reading()
        if leftover:
            self.parser.receive_data(leftover)
            self._process()

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer a request that is refused before its handler (framing, sizes) and close the connection."""
        self.busy = True
        if not self.closed:
            self.transport.write(encode(error_response(status, code, message), close=True))
        self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.connections.pop(self, None)
            self.transport.close()


def _parser() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_LINE + MAX_HEADER_BYTES + 4)


def _keep_alive(request: h11.Request, headers: Headers) -> bool:
    connection = (headers.get("connection") or "").lower()
    if request.http_version == b"1.0":
        return "keep-alive" in connection
    return "close" not in connection


class HttpServer:
    """The listening socket, its accept loop and every open connection (all on the event loop)."""

    def __init__(self, sock: socket.socket, api: Api, room: WaitRoom, pool: Pool,
                 loop: asyncio.AbstractEventLoop, *, max_connections: int | None = None):  # fmt: skip
        self.sock = sock
        self.api = api
        self.room = room
        self.pool = pool
        self.loop = loop
        self.connections: dict[Connection, None] = {}
        self.max_connections = max_connections or connection_cap()
        self.closing = False
        self._accepting = False
        self._active = 0
        self._idle_event = asyncio.Event()
        self._idle_event.set()
        self._limited = 0  # in an episode of the cap or of EMFILE: the connections open when it started
        self._sweeper: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._accept)
        self._accepting = True
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def stop_accepting(self) -> None:
        if self._accepting:
            self.loop.remove_reader(self.sock.fileno())
            self._accepting = False
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.sock.close()

    # ------------------------------------------------------------------ accepting

    def _accept(self) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                sock, _address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    shed = self._shed(self._idle(share=4))
                    self._episode("out_of_files", shed)
                    self.loop.remove_reader(self.sock.fileno())
                    self.loop.call_later(ACCEPT_BACKOFF_SECS, self._resume_accepting)
                return  # ECONNABORTED and the like: that client is gone
            if not self._admit(sock):
                continue
            sock.setblocking(False)
            self.loop.create_task(self._connect(sock))

    def _resume_accepting(self) -> None:
        if not self.closing:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    async def _connect(self, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: Connection(self), sock)
        except OSError:
            sock.close()

    def _admit(self, sock: socket.socket) -> bool:
        """Admit a new connection under the cap, closing the longest-idle ones to make room."""
        over = len(self.connections) + 1 - self.max_connections
        if over > 0:
            shed = self._shed(self._idle(over))
            self._episode("max_connections", shed)
            if shed < over:  # every other connection is busy: refuse this one, quickly and in JSON
                _refuse(sock)
                sock.close()
                return False
        elif self._limited and len(self.connections) < self._limited * 3 // 4:
            self._limited = 0  # the episode is over; the next one is logged again
        return True

    def _idle(self, count: int = 0, *, share: int = 0) -> list[Connection]:
        """The ``count`` (or one in ``share``, at least one) longest-idle connections, oldest first, leaving
        out those with bytes already waiting (a request on its way). Only runs at the cap: O(connections)."""
        idle = [(c.idle_since, id(c), c) for c in self.connections if c.idle_since is not None and not c.busy]
        if share:
            count = max(1, len(idle) // share)
        want = count
        while idle and count > 0:
            candidates = heapq.nsmallest(min(len(idle), want + 8), idle)
            poller = select.poll()
            for _since, _id, conn in candidates:
                fd = _fileno(conn)
                if fd >= 0:
                    poller.register(fd, select.POLLIN)
            ready = {fd for fd, _events in poller.poll(0)}
            found = [c for _since, _id, c in candidates if _fileno(c) not in ready]
            if len(found) >= count or len(candidates) == len(idle):
                return found[:count]
            want *= 2
        return []

    def _shed(self, conns: list[Connection]) -> int:
        for conn in conns:
            conn._close()
        return len(conns)

    def _episode(self, reason: str, shed: int) -> None:
        if not self._limited:
            self._limited = max(1, min(len(self.connections), self.max_connections))
            log("serve.connection_limit", reason=reason, max_connections=self.max_connections,
                open=len(self.connections), closed_idle=shed)  # fmt: skip

    def _sweep(self) -> None:
        """Close connections idle (or stalled mid-request) for ``CONNECTION_TIMEOUT_SECS``; once a second."""
        limit = time.monotonic() - CONNECTION_TIMEOUT_SECS
        for conn in [c for c in self.connections if not c.busy and c.active_since < limit]:
            conn._close()
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    # ------------------------------------------------------------------ in-flight requests

    def begin(self) -> None:
        self._active += 1
        self._idle_event.clear()

    def end(self) -> None:
        self._active -= 1
        if self._active <= 0:
            self._active = 0
            self._idle_event.set()

    async def drain(self, grace_secs: float) -> bool:
        """Wait until no request is in flight (idle keep-alive connections do not count); True if drained."""
        try:
            await asyncio.wait_for(self._idle_event.wait(), grace_secs)
        except TimeoutError:
            return False
        return True

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn._close()


def _fileno(conn: Connection) -> int:
    try:
        return conn.transport.get_extra_info("socket").fileno()
    except (AttributeError, OSError):
        return -1


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Cache-Control: no-store\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s")  # fmt: skip
_BUSY_BODY = b'{"error":{"code":"too_many_connections","message":"every connection is busy; try again"}}'


def _refuse(sock: socket.socket) -> None:
    """Answer a connection over the cap without reading its request (it is closed right after)."""
    try:
        sock.setblocking(False)
        sock.send(_BUSY % (len(_BUSY_BODY), _BUSY_BODY))
    except OSError:
        pass


def bind(address: tuple, family: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on ``address`` (SO_REUSEADDR; SO_REUSEPORT for several workers)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock
