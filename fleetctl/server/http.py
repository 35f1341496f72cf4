"""The HTTP transport of ``fleetctl serve``: stdlib ``http.server``, hardened and tuned (SPEC §6).

- HTTP/1.1 keep-alive, ``TCP_NODELAY``, a listen backlog of 256, one thread per connection.
- Limits checked before anything is read: request line (414), header block (431), ``Content-Length``
  required on bodies (411), body cap per route (413); a per-connection read timeout for slow clients.
- Every response, errors included, is JSON (``{"error": {"code", "message"}}``) written with one
  buffered ``write``; no traceback ever reaches a client.
- SIGTERM/SIGINT: stop accepting, wake long-polls, let in-flight requests finish within a grace
  period, exit 0.
"""

from __future__ import annotations

import errno
import heapq
import json
import os
import resource
import select
import socket
import socketserver
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from fleetctl.log import log

if TYPE_CHECKING:
    from fleetctl.server.api import Api

MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 32768
MAX_HEADERS = 100
CONNECTION_TIMEOUT_SECS = 60.0  # idle keep-alive and slow-client read timeout (long-poll waits are ≤ 30 s)
#: File descriptors kept free of connections, beyond those open when serving starts: two per pooled
#: reader connection (the database file and its WAL; ``api.READER_POOL`` is 64), and room for a backup,
#: a migration check or a log reopen. Connections are capped at the open-files limit minus this.
FD_RESERVE = 2 * 64 + 32
#: How long the accept loop pauses when accept() fails for want of file descriptors (instead of spinning).
ACCEPT_BACKOFF_SECS = 0.05


class Headers:
    """Request headers: case-insensitive ``get``; repeated headers keep the last value — except the
    framing ones: every ``Content-Length`` value is kept in ``lengths``, so that disagreeing copies can be
    refused (RFC 9112 §6.3) instead of one of them silently winning."""

    __slots__ = ("_items", "lengths")

    def __init__(self) -> None:
        self._items: dict[str, tuple[str, str]] = {}
        self.lengths: list[str] = []

    def add(self, name: str, value: str) -> None:
        key = name.lower()
        if key == "content-length":
            self.lengths.append(value)
        self._items[key] = (name, value)

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


class Handler(BaseHTTPRequestHandler):
    """Parses one request at a time off a keep-alive connection and hands it to the ``Api``."""

    protocol_version = "HTTP/1.1"
    server_version = "fleetctl"
    sys_version = ""
    timeout = CONNECTION_TIMEOUT_SECS
    server: FleetHTTPServer

    def setup(self) -> None:
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def handle_one_request(self) -> None:
        conns = self.server.connections
        conns[self.connection] = time.monotonic()  # idle since now: may be closed to make room
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            conns[self.connection] = None  # busy until the next request
            if len(self.raw_requestline) > MAX_REQUEST_LINE:
                self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
                self._send(error_response(414, "uri_too_long", "request line too long"), close=True)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            self._dispatch()
            self.wfile.flush()
        except (TimeoutError, ConnectionError):
            self.close_connection = True

    def parse_request(self) -> bool:
        """A strict, fast replacement for http.server's parser (which runs the email package per request)."""
        line = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = line
        self.request_version = "HTTP/1.1"
        self.command = ""
        words = line.split(" ")
        if len(words) != 3 or not all(words):
            self._send(error_response(400, "bad_request", "malformed request line"), close=True)
            return False
        command, path, version = words
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            self._send(error_response(505, "http_version", "HTTP/1.0 or HTTP/1.1 only"), close=True)
            return False
        self.command, self.path, self.request_version = command, path, version
        self.close_connection = version == "HTTP/1.0"
        headers = Headers()
        total = 0
        for _ in range(MAX_HEADERS + 1):
            raw = self.rfile.readline(MAX_HEADER_BYTES + 1)
            total += len(raw)
            if total > MAX_HEADER_BYTES:
                self._send(error_response(431, "headers_too_large", "request headers too large"), close=True)
                return False
            if raw in (b"\r\n", b"\n", b""):
                break
            name, sep, value = raw.decode("iso-8859-1").partition(":")
            if not sep or not name or name != name.strip() or any(c in name for c in " \t\r\n"):
                self._send(error_response(400, "bad_request", "malformed header line"), close=True)
                return False
            headers.add(name, value.rstrip("\r\n").strip(" \t"))  # OWS is SP and HTAB only
        else:
            self._send(error_response(431, "headers_too_large", "too many request headers"), close=True)
            return False
        self.headers = headers
        connection = headers.get("Connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, header parse errors), as JSON."""
        slug = {400: "bad_request", 414: "uri_too_long", 431: "headers_too_large", 505: "http_version"}.get(
            code, "http_error"
        )
        self._send(error_response(code, slug, message or HTTPStatus(code).phrase), close=True)

    def _dispatch(self) -> None:
        api = self.server.api
        body = b""
        lengths = self.headers.lengths
        if "Transfer-Encoding" in self.headers:
            if lengths:  # RFC 9112 §6.1: a message with both is a smuggling attempt or a broken proxy
                self._send(error_response(400, "bad_request", "Transfer-Encoding together with Content-Length"),
                           close=True)  # fmt: skip
            else:
                self._send(error_response(411, "length_required", "send a Content-Length, not chunked"),
                           close=True)  # fmt: skip
            return
        if lengths:
            length = content_length(lengths)
            if length is None:
                self._send(error_response(400, "bad_request", "invalid Content-Length"), close=True)
                return
            cap = api.body_cap(self.path)
            if length > cap:
                self._send(error_response(413, "body_too_large", f"request body over {cap} bytes"), close=True)
                return
            if length and (self.headers.get("Expect") or "").lower() == "100-continue":
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # only once the size is known to be fine
            body = self.rfile.read(length)
            if len(body) != length:
                self.close_connection = True
                return
        elif self.command == "POST":
            self._send(error_response(411, "length_required", "a request with a body needs Content-Length"),
                       close=True)  # fmt: skip
            return
        started = time.perf_counter()
        self.server.begin()
        try:
            response = api.handle(self.command, self.path, self.headers, body)
            api.metrics.observe(self.command, response.status, time.perf_counter() - started)
            if api.closing:
                self.close_connection = True
            self._send(response)
        finally:
            self.server.end()

    def __getattr__(self, name: str):
        # every method token (GET, POST, PATCH, BREW…) goes through the router, which answers 405 or 404
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _send(self, response: Response, close: bool = False) -> None:
        if close:
            self.close_connection = True
        head = [f"HTTP/1.1 {response.status} {_phrase(response.status)}",
                f"Content-Type: {response.content_type}", f"Content-Length: {len(response.body)}",
                "Cache-Control: no-store"]  # fmt: skip
        head += [f"{k}: {v}" for k, v in response.headers.items()]
        if self.close_connection:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (response.body if self.command != "HEAD" else b"")
        try:
            self.wfile.write(data)
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # one line per action is logged by the Api, never the Authorization header


def content_length(values: list[str]) -> int | None:
    """The body length the ``Content-Length`` field values agree on; None if any is not 1*DIGIT or two differ.

    RFC 9112 §6.3: a list (``5, 5``) or repeated fields are only acceptable when every member is the same
    number. ``int()`` alone would also take ``+5``, ``5_0``, ``-0`` and non-ASCII digits.
    """
    length = None
    for value in values:
        for member in value.split(","):
            member = member.strip(" \t")
            if not member or not member.isascii() or not member.isdigit():
                return None
            member = member.lstrip("0") or "0"  # 1*DIGIT: leading zeros are allowed and mean nothing
            number = int(member) if len(member) <= 18 else 10**18  # past any body cap: a 413 either way
            if length is not None and number != length:
                return None
            length = number
    return length


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


class FleetHTTPServer(ThreadingHTTPServer):
    """A threading server with a deep listen queue, fast restarts, a graceful stop and a connection cap.

    Open connections are capped at ``max_connections`` (``connection_cap()``, below the open-files
    limit): at the cap a new connection makes room by closing the longest-idle keep-alive connections;
    if every connection is busy it is answered 503 and closed. Should accept() still fail for want of
    descriptors (EMFILE/ENFILE) idle connections are shed and the accept loop backs off briefly instead
    of spinning. Either is logged once per episode (``serve.connection_limit``).
    """

    request_queue_size = 256
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple, api: Api | None = None, *, family: int = socket.AF_INET,
                 max_connections: int | None = None):  # fmt: skip
        self.address_family = family
        self.api = api
        self._active = 0
        self._active_lock = threading.Condition()
        #: every open connection: the monotonic time it went idle, or None while a request is in flight
        #: (written by its own handler thread; plain dict operations, atomic under the GIL)
        self.connections: dict[socket.socket, float | None] = {}
        self.max_connections = max_connections or connection_cap()
        self._limited = 0  # in an episode of the cap or of EMFILE: the connections open when it started
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: no reverse DNS lookup of the address
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self) -> tuple[socket.socket, object]:
        try:
            return self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                shed = self._shed(self._idle(share=4))
                self._episode("out_of_files", shed)
                time.sleep(ACCEPT_BACKOFF_SECS)
            raise  # socketserver drops this round; the next one accepts again

    def verify_request(self, request: socket.socket, client_address: object) -> bool:
        """Admit a new connection under the cap, closing the longest-idle ones to make room."""
        conns = self.connections
        over = len(conns) + 1 - self.max_connections
        if over > 0:
            shed = self._shed(self._idle(over))
            self._episode("max_connections", shed)
            if shed < over:  # every other connection is busy: refuse this one, quickly and in JSON
                _refuse(request)
                return False
        elif self._limited and len(conns) < self._limited * 3 // 4:
            self._limited = 0  # the episode is over; the next one is logged again
        conns[request] = time.monotonic()
        return True

    def shutdown_request(self, request: socket.socket) -> None:
        self.connections.pop(request, None)
        super().shutdown_request(request)

    def _idle(self, count: int = 0, *, share: int = 0) -> list[socket.socket]:
        """The ``count`` (or one in ``share``, at least one) longest-idle connections, oldest first, leaving
        out those with bytes already waiting (a request on its way). Only runs at the cap: O(connections)."""
        idle = [(since, id(sock), sock) for sock, since in list(self.connections.items()) if since is not None]
        if share:
            count = max(1, len(idle) // share)
        want = count
        while idle and count > 0:
            candidates = heapq.nsmallest(min(len(idle), want + 8), idle)
            poller = select.poll()
            for _since, _id, sock in candidates:
                try:
                    poller.register(sock, select.POLLIN)
                except (OSError, ValueError):  # closed meanwhile
                    pass
            ready = {fd for fd, _events in poller.poll(0)}
            found = [sock for _since, _id, sock in candidates if _fileno(sock) not in ready]
            if len(found) >= count or len(candidates) == len(idle):
                return found[:count]
            want *= 2
        return []

    def _shed(self, socks: list[socket.socket]) -> int:
        """Close ``socks`` (their handler threads see end-of-file and finish); how many."""
        for sock in socks:
            self.connections.pop(sock, None)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(socks)

    def _episode(self, reason: str, shed: int) -> None:
        if not self._limited:
            self._limited = max(1, min(len(self.connections), self.max_connections))
            log("serve.connection_limit", reason=reason, max_connections=self.max_connections,
                open=len(self.connections), closed_idle=shed)  # fmt: skip

    def begin(self) -> None:
        """A request is in flight."""
        with self._active_lock:
            self._active += 1

    def end(self) -> None:
        with self._active_lock:
            self._active -= 1
            self._active_lock.notify_all()

    def drain(self, grace_secs: float) -> bool:
        """Wait until no request is in flight (idle keep-alive connections do not count); True if drained."""
        deadline = time.monotonic() + grace_secs
        with self._active_lock:
            while self._active > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._active_lock.wait(left)
        return True

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        log("http.error", client=client_address[0], error=type(exc).__name__)


def _fileno(sock: socket.socket) -> int:
    try:
        return sock.fileno()
    except OSError:
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
