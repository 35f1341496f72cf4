"""``fleetctl serve`` as an operator starts it: a busy port or a bad ``--bind`` is a one-line error naming the
address (exit 1 / exit 2) and touches no database; past the open-files limit the server keeps answering."""

from __future__ import annotations

import http.client
import json
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LiveServer, wait_for


def serve(server: LiveServer, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleetctl", "serve", "--config", str(server.config_path), *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip


@pytest.fixture
def taken():
    """A port something else already listens on (127.0.0.1)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_a_port_in_use_is_a_one_line_error_exit_1(tmp_path, taken):
    server = LiveServer(tmp_path)
    done = serve(server, "--port", str(taken))
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"error: port {taken} on 127.0.0.1 is already in use\n"
    assert not server.db_path.exists(), "the database was opened before the address was known to work"


def test_a_port_in_use_from_the_config_names_the_configured_address(tmp_path, taken):
    server = LiveServer(tmp_path)
    server.config_path.write_text(server.config_path.read_text().replace("[server]\n", f"[server]\nport = {taken}\n"))
    done = serve(server, "--bind", "localhost")
    assert done.returncode == 1, done.stderr
    assert re.fullmatch(rf"error: port {taken} on localhost( \(127\.0\.0\.1\))? is already in use\n", done.stderr)


@pytest.mark.parametrize(
    "bind,says",
    [
        ("no-such-host.invalid", "not an address, or a name that does not resolve"),
        ("999.1.1.1", "not an address, or a name that does not resolve"),
        ("127.0.0.1:9090", "give the port with --port"),
        ("", "not an address"),
        ("192.0.2.1", "that address is not on this machine"),  # TEST-NET-1: never a local address
    ],
)
def test_a_bad_bind_is_a_one_line_usage_error_exit_2(tmp_path, bind, says):
    server = LiveServer(tmp_path)
    done = serve(server, "--bind", bind, "--port", "0")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: cannot listen on ") and done.stderr.count("\n") == 1, done.stderr
    assert f"{bind!r} (--bind)" in done.stderr or f"{bind} (--bind)" in done.stderr, done.stderr
    assert says in done.stderr and "unexpected" not in done.stderr and "Traceback" not in done.stderr
    assert not server.db_path.exists()


def test_a_bad_server_bind_in_the_config_names_the_key(tmp_path):
    server = LiveServer(tmp_path)
    server.config_path.write_text(
        server.config_path.read_text().replace("[server]\n", '[server]\nbind = "no-such-host.invalid"\n')
    )
    done = serve(server, "--port", "0")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: cannot listen on 'no-such-host.invalid' (server.bind): "), done.stderr


# ------------------------------------------------------------------------------------------------------
# the open-files limit

NOFILE = 160  # the server's soft RLIMIT_NOFILE in the test below: a few dozen connections at most


#: ``fleetctl serve`` with its connection cap lifted, so that accept() itself runs out of descriptors
UNCAPPED = """
import sys
import fleetctl.server.http as http
from fleetctl.config import load_config
from fleetctl.server import serve
http.connection_cap = lambda: 1_000_000
sys.exit(serve(load_config(sys.argv[1]), port=0))
"""


def start_with_nofile(server: LiveServer, soft: int, *, uncapped: bool = False) -> LiveServer:
    """``server.start()``, with the child's soft RLIMIT_NOFILE lowered to ``soft``."""

    def lower() -> None:
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    argv = [sys.executable, "-m", "fleetctl", "serve", "--config", str(server.config_path), "--port", "0"]
    if uncapped:
        argv = [sys.executable, "-c", UNCAPPED, str(server.config_path)]
    log = open(server.stderr_path, "a")  # noqa: SIM115 - the child owns it
    server.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                   preexec_fn=lower)  # fmt: skip
    log.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.findall(r"action=serve.listening bind=\S+ port=(\d+)", server.stderr_path.read_text())
        if found:
            server.port = int(found[-1])
            return server
        assert server.proc.poll() is None, server.stderr_path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"fleetctl serve did not start: {server.stderr_path.read_text()[-2000:]}")


def healthz(port: int, sock: socket.socket | None = None, timeout: float = 10.0) -> int:
    """GET /healthz (keep-alive) on ``sock`` or a new connection; the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    if sock is not None:
        conn.sock = sock
    conn.request("GET", "/healthz", headers={"Connection": "keep-alive"})
    response = conn.getresponse()
    response.read()
    return response.status


def test_past_the_open_files_limit_serve_sheds_idle_connections_and_keeps_answering(tmp_path):
    server = start_with_nofile(LiveServer(tmp_path), NOFILE)
    held: list[socket.socket] = []
    try:
        cap = int(re.findall(r"max_connections=(\d+)", server.stderr_path.read_text())[-1])
        assert 0 < cap < NOFILE
        for i in range(NOFILE + 40):  # more connections than the server has descriptors
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            held.append(sock)
            if i % 2 == 0:  # half of them idle keep-alive connections after one request, half never sent one
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                conn.sock = sock
                conn.request("GET", "/healthz")
                response = conn.getresponse()
                response.read()
                assert response.status == 200
        # the server is still there for a new client (and again), within a bounded wait
        assert healthz(server.port) == 200
        assert healthz(server.port) == 200
        # the connections it closed to stay under its cap were the idle ones, and it says so once
        alive = 0
        for sock in held:
            sock.settimeout(0)
            try:
                alive += sock.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        assert alive <= cap
        log = server.stderr_path.read_text()
        assert log.count("action=serve.connection_limit ") == 1, log
    finally:
        for sock in held:
            sock.close()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    log = server.stderr_path.read_text()
    assert "Traceback" not in log and "internal_error" not in log, log[-3000:]


def test_when_accept_runs_out_of_descriptors_serve_sheds_idle_connections_instead_of_spinning(tmp_path):
    """Even with no cap at all (something else ate the reserve), EMFILE on accept() closes idle connections
    and backs off: the connections waiting in the backlog, and a new /healthz, are still served."""
    server = start_with_nofile(LiveServer(tmp_path), NOFILE, uncapped=True)
    held: list[socket.socket] = []
    try:
        for _ in range(NOFILE + 40):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            held.append(sock)
            assert healthz(server.port, sock) == 200  # answered, even once accept() has hit the limit
        assert healthz(server.port) == 200
        log = server.stderr_path.read_text()
        assert log.count("action=serve.connection_limit reason=out_of_files ") == 1, log
    finally:
        for sock in held:
            sock.close()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    assert "Traceback" not in server.stderr_path.read_text()


def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503_and_the_server_stays_up(tmp_path):
    server = start_with_nofile(LiveServer(tmp_path), NOFILE)
    polls: list[socket.socket] = []
    try:
        cap = int(re.findall(r"max_connections=(\d+)", server.stderr_path.read_text())[-1])
        token = server.register("busy", ["nothing-matches"])
        body = b'{"wait": 8}'
        dequeue = (f"POST /api/v1/tasks/dequeue HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip
        for _ in range(cap):  # every connection the server allows, each in a long-poll
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(dequeue)
            polls.append(sock)
        # a long-poll is busy once its request was read: wait (bounded) until a new connection is refused
        deadline = time.monotonic() + 20
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            try:
                conn.request("GET", "/healthz")
                response = conn.getresponse()
                status, doc = response.status, response.read()
            except (ConnectionError, OSError):
                status, doc = None, b""
            finally:
                conn.close()
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 503, (status, doc)
        assert json.loads(doc)["error"]["code"] == "too_many_connections"
        assert response.getheader("Retry-After") == "1"
        # once the long-polls have answered (204 after their 8 s), their idle connections make room again
        assert wait_for(lambda: _healthz_or_none(server.port) == 200, timeout=30, what="healthz 200 again")
        assert server.proc.poll() is None
    finally:
        for sock in polls:
            sock.close()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    assert "Traceback" not in server.stderr_path.read_text()


def _healthz_or_none(port: int) -> int | None:
    try:
        return healthz(port, timeout=5)
    except (ConnectionError, OSError):
        return None


def test_serve_names_its_threads_for_the_kernel(live_server):
    """``top -H`` and ``/proc/PID/task/*/comm`` tell the writer, the checkpointer and the request threads apart
    (the claims benchmark reads each one's CPU from there)."""
    names = set()
    for comm in Path(f"/proc/{live_server.proc.pid}/task").glob("*/comm"):
        try:
            names.add(comm.read_text().strip())
        except OSError:  # a thread that ended meanwhile
            continue
    assert {"fleetctl-writer", "fleetctl-checkp", "fleetctl-reques"} <= names, names
