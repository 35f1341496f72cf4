"""`fleetctl serve` with a fleet's worth of long-polls (issue 12): a thousand agents at once are all answered,
SIGTERM with a thousand waiting drains and exits 0, and a worker of `serve --workers 2` killed with kill -9
under load loses no acknowledged write. Bounded in count and time; no timing assertions."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import ADMIN_TOKEN, REGISTRATION_TOKEN, LiveServer, wait_for

AGENTS = 1000


@pytest.fixture(autouse=True)
def _enough_descriptors():
    """This process holds a thousand sockets, and so does serve (it inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 2 * AGENTS + 200:
        pytest.fail(f"the open-files hard limit ({hard}) is too low for {AGENTS} connections")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _request(method: str, path: str, token: str, doc: dict | None = None) -> bytes:
    body = b"" if doc is None else json.dumps(doc).encode()
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


async def _call(port: int, data: bytes, conn: list | None = None) -> tuple[int, bytes]:
    """One request on ``conn`` (a [reader, writer] kept between calls) or on a new connection."""
    if conn is None or not conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if conn is not None:
            conn[:] = [reader, writer]
    else:
        reader, writer = conn
    writer.write(data)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    body = await reader.readexactly(length)
    if conn is None:
        writer.close()
    return int(head.split(b" ", 2)[1]), body


async def _register(port: int, n: int, prefix: str, max_concurrency: int = 1) -> list[str]:
    tokens: list[str | None] = [None] * n

    async def worker(k: int) -> None:
        conn: list = []
        for i in range(k, n, 16):
            status, body = await _call(port, _request("POST", "/api/v1/agents/register", REGISTRATION_TOKEN, {
                "agent_id": f"{prefix}-{i:04d}", "agent_type": "t", "capabilities": ["x"],
                "max_concurrency": max_concurrency}), conn)  # fmt: skip
            assert status in (200, 201), body
            tokens[i] = json.loads(body)["token"]
        conn[1].close()

    await asyncio.gather(*(worker(k) for k in range(16)))
    return [t for t in tokens if t]


def _db(server: LiveServer) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{server.db_path}?mode=ro", uri=True)


def _db_check(server: LiveServer) -> None:
    done = subprocess.run([sys.executable, "-m", "fleetctl", "db", "check", "--config", str(server.config_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_thousand_concurrent_long_polls_are_all_answered(tmp_path):
    server = LiveServer(tmp_path).start()
    try:
        port = server.port

        async def run() -> tuple[list, list[str]]:
            tokens = await _register(port, AGENTS, "lp")
            dequeue = [_request("POST", "/api/v1/tasks/dequeue", t, {"wait": 3}) for t in tokens]
            polls = [asyncio.create_task(_call(port, d)) for d in dequeue]
            created = []
            for n in range(50):  # tasks created while the thousand wait
                status, body = await _call(port, _request("POST", "/api/v1/tasks", ADMIN_TOKEN,
                                                          {"title": f"t{n}", "labels": ["agent:x"]}))  # fmt: skip
                assert status == 201, body
                created.append(json.loads(body)["task_id"])
            answers = await asyncio.gather(*polls, return_exceptions=True)
            return answers, created

        answers, created = asyncio.run(run())
        errors = [a for a in answers if isinstance(a, BaseException)]
        assert not errors, f"{len(errors)} long-polls got no answer, e.g. {errors[0]!r}"
        statuses = [status for status, _body in answers]
        assert set(statuses) <= {200, 204}, {s: statuses.count(s) for s in set(statuses)}
        got = [json.loads(body)["task"]["task_id"] for status, body in answers if status == 200]
        assert sorted(got) == sorted(created)  # every task handed out, none twice
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.stderr_path.read_text()
    _db_check(server)


def test_sigterm_with_a_thousand_waiting_agents_answers_them_all_and_exits_0(tmp_path):
    server = LiveServer(tmp_path).start()
    port = server.port

    async def run() -> list:
        tokens = await _register(port, AGENTS, "term")
        polls = [asyncio.create_task(_call(port, _request("POST", "/api/v1/tasks/dequeue", t, {"wait": 30})))
                 for t in tokens]  # fmt: skip
        # every one of them claimed once and is parked now
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            _status, body = await _call(port, _request("GET", "/metrics", ADMIN_TOKEN))
            if int(re.search(rb"fleetctl_claim_attempts_total (\d+)", body).group(1)) >= AGENTS:
                break
            await asyncio.sleep(0.2)
        server.proc.send_signal(signal.SIGTERM)
        return await asyncio.gather(*polls, return_exceptions=True)

    answers = asyncio.run(run())
    assert server.proc.wait(30) == 0
    errors = [a for a in answers if isinstance(a, BaseException)]
    assert not errors, f"{len(errors)} waiting agents got no answer, e.g. {errors[0]!r}"
    assert {status for status, _ in answers} == {204}
    log = server.stderr_path.read_text()
    assert "action=serve.stopped drained=True" in log, log[-2000:]
    assert "Traceback" not in log


def _workers(server: LiveServer) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == server.proc.pid:
                        pids.append(int(entry))
            except (OSError, ValueError):
                pass
    return pids


def _serve_two_workers(tmp_path) -> LiveServer:
    """`fleetctl serve --workers 2` on a free port, once both workers serve."""
    server = LiveServer(tmp_path).start(extra=("--workers", "2"))
    try:
        wait_for(lambda: server.stderr_path.read_text().count("action=serve.worker ") == 2, timeout=30,
                 what="both workers of serve --workers 2 serving")  # fmt: skip
        assert len(_workers(server)) == 2
    except BaseException:
        server.proc.kill()  # its workers follow it (PR_SET_PDEATHSIG)
        server.proc.wait(10)
        raise
    return server


def test_a_worker_killed_under_load_loses_no_acknowledged_write(tmp_path):
    """`serve --workers 2`: agents claim and complete, tasks are created; one worker is killed with kill -9
    in the middle. Every write that was answered 2xx is in the database, the supervisor starts a new worker,
    and `db check` is clean."""
    server = _serve_two_workers(tmp_path)
    created: list[str] = []
    completed: list[str] = []
    try:

        async def run() -> None:
            port = server.port
            tokens = await _register(port, 40, "k9")
            stop = asyncio.Event()

            async def agent(token: str) -> None:
                conn: list = []
                while not stop.is_set():
                    try:
                        status, body = await _call(port, _request("POST", "/api/v1/tasks/dequeue", token,
                                                                  {"wait": 1}), conn)  # fmt: skip
                        if status != 200:
                            continue
                        doc = json.loads(body)
                        task_id = doc["task"]["task_id"]
                        status, body = await _call(port, _request("POST", f"/api/v1/tasks/{task_id}/complete", token,
                                                                  {"attempt": doc["attempt"], "outcome": "success",
                                                                   "summary": "done"}), conn)  # fmt: skip
                        if status == 200:
                            completed.append(task_id)
                    except (ConnectionError, asyncio.IncompleteReadError, OSError):
                        conn.clear()  # its worker died: connect again (to the other one, or the new one)
                        await asyncio.sleep(0.05)

            async def creator() -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    try:
                        status, body = await _call(port, _request("POST", "/api/v1/tasks", ADMIN_TOKEN,
                                                                  {"title": f"k{n}", "labels": ["agent:x"]}))  # fmt: skip
                    except (ConnectionError, asyncio.IncompleteReadError, OSError):
                        continue
                    if status == 201:
                        created.append(json.loads(body)["task_id"])
                    await asyncio.sleep(0.01)

            jobs = [asyncio.create_task(agent(t)) for t in tokens] + [asyncio.create_task(creator())]
            await asyncio.sleep(2)
            victim = _workers(server)[0]
            os.kill(victim, signal.SIGKILL)
            await asyncio.sleep(3)
            stop.set()
            await asyncio.wait(jobs, timeout=30)

        asyncio.run(run())
        wait_for(lambda: "action=serve.worker_exited" in server.stderr_path.read_text(), timeout=10,
                 what="the supervisor saw the worker die")  # fmt: skip
        wait_for(lambda: len(_workers(server)) == 2, timeout=30, what="a new worker")
    finally:
        assert server.stop() == 0
    assert created and completed
    with _db(server) as db:
        states = dict(db.execute("SELECT task_id, state FROM tasks"))
    assert set(created) <= set(states), "an acknowledged task creation is missing"
    assert all(states[t] == "completed" for t in completed), "an acknowledged completion is missing"
    _db_check(server)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for whoever inherited it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_stop_when_their_supervisor_is_killed(tmp_path):
    """`kill -9` of the supervisor of `serve --workers 2`: its workers are told (SIGTERM), drain and exit —
    no orphan goes on serving the port with nobody to restart or stop it."""
    server = _serve_two_workers(tmp_path)
    workers: list[int] = []
    try:
        port = server.port
        workers[:] = _workers(server)
        server.proc.kill()
        server.proc.wait(10)
        wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=30, what="the workers to stop")
        with pytest.raises(OSError):  # nobody listens on the port any more
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        for pid in workers:  # ours, whoever inherited them
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    text = server.stderr_path.read_text()
    assert text.count("action=serve.stopped") == 2, text[-2000:]  # each worker drained and said so
    assert "Traceback" not in text


def test_serve_with_workers_refuses_a_database_it_cannot_open_as_one_process_does(tmp_path):
    """The supervisor opens the database once before forking: the same error and exit code as without
    --workers, at once — not workers dying and being restarted one after the other."""
    (tmp_path / "fleet.db").mkdir()  # a directory where the database file should be
    server = LiveServer(tmp_path)
    codes = []
    for workers in ("1", "2"):
        done = subprocess.run([sys.executable, "-m", "fleetctl", "serve", "--config", str(server.config_path),
                               "--port", "0", "--workers", workers], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert "Traceback" not in done.stderr, done.stderr
        assert "serve.worker" not in done.stderr, done.stderr  # no worker was started
        codes.append((done.returncode, done.stderr.strip().splitlines()[-1]))
    assert codes[0] == codes[1] and codes[0][0] != 0, codes
