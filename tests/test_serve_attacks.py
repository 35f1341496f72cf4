"""What issue 12 added to `fleetctl serve`, attacked: bad `--workers`, a client that keeps sending while its
request waits, a token replaced by another process while the fast dequeue still has it cached, and parked
long-polls that only a timer can wake (a backoff or a cooldown ends; no event marks either)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest
from conftest import ADMIN_TOKEN, LiveServer


@pytest.mark.parametrize("value", ["0", "65", "-1", "two"])
def test_workers_out_of_range_is_a_usage_error(tmp_path, value):
    server = LiveServer(tmp_path)
    done = subprocess.run([sys.executable, "-m", "fleetctl", "serve", "--config", str(server.config_path),
                           "--port", "0", "--workers", value], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--workers" in done.stderr and "Traceback" not in done.stderr


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    return int(head.split(b" ")[1]), rest[:length]


def test_a_client_that_floods_while_its_long_poll_waits_gets_its_answer_and_is_cut_off(tmp_path):
    """Bytes sent while a request is being answered are kept only up to a bound (then reading pauses): the
    long-poll still gets its 204, the garbage after it a 414 (a request line with no end), and serve keeps serving everyone else."""
    server = LiveServer(tmp_path).start()
    try:
        token = server.register("flood", ["x"])
        body = b'{"wait": 2}'
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(f"POST /api/v1/tasks/dequeue HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        flood = b"Z" * 65536
        sent = 0
        sock.setblocking(False)
        for _ in range(64):  # up to 4 MiB, as far as the kernel's buffers take it
            try:
                sent += sock.send(flood)
            except BlockingIOError:
                break
        sock.setblocking(True)
        assert sent > 64 * 1024
        status, _ = _read_response(sock)
        assert status == 204
        # the garbage, read as the next request: a line with no end → 414 and the connection closed; the
        # unread flood in serve's buffer makes the close a reset, which may overtake the 414 on the way
        try:
            status, answer = _read_response(sock)
        except ConnectionResetError:
            status = None
        if status is not None:
            assert status == 414 and json.loads(answer)["error"]["code"] == "uri_too_long"
        sock.close()
        with server.client(ADMIN_TOKEN) as admin:
            assert admin.get("/healthz").status_code == 200
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.stderr_path.read_text()


def test_a_token_replaced_by_another_process_is_refused_by_the_fast_dequeue_at_once(tmp_path):
    """The fast dequeue trusts the token cache only as far as the claim's guard: the agent's token replaced
    by another process (the CLI, a second serve) while the old one is still cached → 401, nothing claimed."""
    from fleetctl import services
    from fleetctl.store import Store

    server = LiveServer(tmp_path).start()
    try:
        token = server.register("rotated", ["x"])
        with server.client(ADMIN_TOKEN) as admin:
            task_id = admin.post("/api/v1/tasks", json={"title": "t", "labels": ["agent:y"]}).json()["task_id"]
        with Store.open(server.db_path) as store, server.client(token) as agent:
            assert agent.post("/api/v1/tasks/dequeue", json={}).status_code == 204  # the token is cached now
            services.register_agent(store, "rotated", agent_type="test", capabilities=["x", "y"])  # a new token
            with server.client(ADMIN_TOKEN) as admin:
                assert admin.get(f"/api/v1/tasks/{task_id}").json()["state"] == "queued"
            r = agent.post("/api/v1/tasks/dequeue", json={})
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
            assert store.task(task_id)["state"] == "queued"  # the old token claimed nothing
    finally:
        assert server.stop() == 0


def _poll(server: LiveServer, token: str, wait: float, out: list) -> threading.Thread:
    def run() -> None:
        with server.client(token) as c:
            out.append(c.post("/api/v1/tasks/dequeue", json={"wait": wait}, timeout=wait + 30))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _claimed_task(server: LiveServer, agent_id: str) -> tuple[str, str, dict]:
    """A new agent that has just claimed a new task: its token, the task id, the claim."""
    token = server.register(agent_id, ["x"])
    with server.client(ADMIN_TOKEN) as admin:
        task_id = admin.post("/api/v1/tasks", json={"title": "t", "labels": ["agent:x"]}).json()["task_id"]
    with server.client(token) as agent:
        claim = agent.post("/api/v1/tasks/dequeue", json={}).json()
    assert claim["task"]["task_id"] == task_id
    return token, task_id, claim


def test_a_parked_long_poll_is_woken_when_a_backoff_ends(tmp_path):
    """A failed attempt is retried after its backoff: the agent waiting meanwhile gets the task when the backoff
    ends (the room's timer), not a 204 at the end of its wait."""
    server = LiveServer(tmp_path, retry_backoff_secs=1, retry_backoff_max_secs=1).start()
    try:
        token, task_id, claim = _claimed_task(server, "patient")
        with server.client(token) as agent:
            r = agent.post(f"/api/v1/tasks/{task_id}/complete",
                           json={"attempt": claim["attempt"], "outcome": "failure", "summary": "flaky"})  # fmt: skip
            assert r.status_code == 200 and r.json()["state"] == "queued", r.text
        got: list = []
        _poll(server, token, 20, got).join(60)
        assert got and got[0].status_code == 200, got and got[0].status_code
        assert got[0].json()["task"]["task_id"] == task_id and got[0].json()["attempt"] == 2
    finally:
        assert server.stop() == 0


def test_a_parked_long_poll_of_an_agent_cooling_down_is_woken_when_its_cooldown_ends(tmp_path):
    server = LiveServer(tmp_path).start()
    try:
        token, task_id, claim = _claimed_task(server, "resting")
        with server.client(token) as agent:
            r = agent.post(f"/api/v1/tasks/{task_id}/status",
                           json={"attempt": claim["attempt"], "status": "rate_limited", "retry_after_secs": 1})  # fmt: skip
            assert r.status_code == 200, r.text
        got: list = []
        _poll(server, token, 20, got).join(60)
        assert got and got[0].status_code == 200, got and got[0].status_code
        assert got[0].json()["task"]["task_id"] == task_id
    finally:
        assert server.stop() == 0
