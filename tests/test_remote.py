"""Remote mode of the CLI (fleetctl/remote.py): ``task complete``, ``task status``, ``agent register`` and
``agent heartbeat`` through a real ``fleetctl serve`` give the output and exit codes of the local commands.

Each scenario runs twice on one database — locally (``--config``) and through the API (``--api-url``
plus a token) — on twin agents and tasks, and the two outputs are compared with the ids masked.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
from conftest import ADMIN_TOKEN, REGISTRATION_TOKEN

from fleetctl.errors import ExitCode


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    return subprocess.run([sys.executable, "-m", "fleetctl", *args], capture_output=True, text=True, timeout=60,
                          env={**base, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})})  # fmt: skip


class Twins:
    """One agent registered locally, its twin registered remotely; one task each, claimed over HTTP."""

    def __init__(self, server):
        self.server = server
        self.config = str(server.config_path)
        self.tokens: dict[str, str] = {}

    def local(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return cli(*args, "--config", self.config, env=env)

    def remote(self, *args: str, token: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        extra = {"FLEET_API_URL": self.server.url, **({"FLEET_AGENT_TOKEN": token} if token else {}), **(env or {})}
        return cli(*args, env=extra)

    def task(self, title: str, cap: str, **extra) -> str:
        with self.server.client(ADMIN_TOKEN) as admin:
            r = admin.post("/api/v1/tasks", json={"title": title, "labels": [f"agent:{cap}"], **extra})
            assert r.status_code == 201, r.text
            return r.json()["task_id"]

    def claim(self, agent: str) -> dict:
        with self.server.client(self.tokens[agent]) as c:
            r = c.post("/api/v1/tasks/dequeue", json={})
            assert r.status_code == 200, r.text
            return r.json()


def same(local: subprocess.CompletedProcess, remote: subprocess.CompletedProcess, *pairs: tuple[str, str]) -> None:
    """Equal exit codes, and equal stdout and stderr once each (local, remote) pair of ids is masked."""

    def mask(text: str, index: int) -> str:
        for n, pair in enumerate(pairs):
            text = text.replace(pair[index], f"<{n}>")
        text = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "<time>", text)
        return re.sub(r"token: \S+", "token: <token>", text)

    assert local.returncode == remote.returncode, (local.stderr, remote.stderr)
    assert mask(local.stdout, 0) == mask(remote.stdout, 1)
    assert mask(local.stderr, 0) == mask(remote.stderr, 1)


@pytest.fixture
def twins(make_server):
    server = make_server()
    server.config_path.write_text(
        server.config_path.read_text() + '[forgejo]\nurl = "http://127.0.0.1:9"\nwebhook_secret = "w"\n'
    )
    return Twins(server.start())


def test_remote_commands_print_and_exit_like_local_ones(twins):
    # agent register: created, then updated; the token is printed once either way
    loc = twins.local("agent", "register", "alpha", "--type", "t", "-C", "cap-a")
    rem = twins.remote(
        "agent", "register", "bravo", "--type", "t", "-C", "cap-b", env={"FLEET_REGISTRATION_TOKEN": REGISTRATION_TOKEN}
    )
    same(loc, rem, ("alpha", "bravo"))
    assert loc.returncode == 0 and "registered (online)" in loc.stdout
    twins.tokens = {"alpha": loc.stdout.split("token: ")[1].strip(), "bravo": rem.stdout.split("token: ")[1].strip()}
    again = twins.remote(
        "agent", "register", "bravo", "--type", "t", "-C", "cap-b", "--token", REGISTRATION_TOKEN, "--json"
    )
    assert again.returncode == 0 and '"status": "online"' in again.stdout
    twins.tokens["bravo"] = __import__("json").loads(again.stdout)["token"]

    # agent heartbeat, plain and --json
    same(twins.local("agent", "heartbeat", "alpha"), twins.remote("agent", "heartbeat", "bravo", token=twins.tokens["bravo"]),
         ("alpha", "bravo"))  # fmt: skip
    same(twins.local("agent", "heartbeat", "alpha", "--json"),
         twins.remote("agent", "heartbeat", "bravo", "--json", token=twins.tokens["bravo"]), ("alpha", "bravo"), ("cap-a", "cap-b"))  # fmt: skip

    # task status running / progress, then complete, then the identical repeat
    tl, tr = twins.task("a task", "cap-a"), twins.task("a task", "cap-b")
    twins.claim("alpha"), twins.claim("bravo")
    ids = (("alpha", "bravo"), (tl, tr), ("cap-a", "cap-b"))
    who = ("--agent", "alpha", "--attempt", "1")
    tok = twins.tokens["bravo"]
    same(twins.local("task", "status", tl, "--status", "running", *who),
         twins.remote("task", "status", tr, "--status", "running", "--attempt", "1", token=tok), *ids)  # fmt: skip
    same(twins.local("task", "status", tl, "-m", "halfway", *who, "--json"),
         twins.remote("task", "status", tr, "-m", "halfway", "--attempt", "1", "--json", token=tok), *ids)  # fmt: skip
    done_l = twins.local("task", "complete", tl, "--summary", "done", *who)
    done_r = twins.remote("task", "complete", tr, "--summary", "done", "--attempt", "1", token=tok)
    same(done_l, done_r, *ids)
    assert done_r.stdout == f"{tr} completed\n"
    rep_l = twins.local("task", "complete", tl, "--summary", "done", *who)
    rep_r = twins.remote("task", "complete", tr, "--summary", "done", "--attempt", "1", token=tok)
    same(rep_l, rep_r, *ids)
    assert rep_r.stdout == f"{tr} completed (repeat: already recorded)\n"

    # lease lost (4): another receipt for the finished attempt, a status for an attempt never held
    same(twins.local("task", "complete", tl, "--summary", "other", *who),
         twins.remote("task", "complete", tr, "--summary", "other", "--attempt", "1", token=tok), *ids)  # fmt: skip
    lost = twins.remote("task", "status", tr, "-m", "late", "--attempt", "2", token=tok)
    same(twins.local("task", "status", tl, "-m", "late", "--agent", "alpha", "--attempt", "2"), lost, *ids)
    assert lost.returncode == ExitCode.CONFLICT and "no longer holds" in lost.stderr

    # unknown task (3), bad task id (2), receipt refused (6: a pull request is required for a repo task)
    for args in (("task", "complete", "nosuch", "--attempt", "1"), ("task", "complete", "nosuch"),
                 ("task", "status", "nosuch", "--attempt", "1"), ("task", "complete", "../etc", "--attempt", "1")):  # fmt: skip
        same(twins.local(*args), twins.remote(*args, token=tok))
    assert twins.remote("task", "complete", "nosuch", token=tok).returncode == ExitCode.NOT_FOUND
    pl = twins.task("pr task", "cap-a", repo="o/r", issue_number=1)
    pr = twins.task("pr task", "cap-b", repo="o/r", issue_number=2)
    twins.claim("alpha"), twins.claim("bravo")
    refused_l = twins.local("task", "complete", pl, "--summary", "no pr", *who)
    refused_r = twins.remote("task", "complete", pr, "--summary", "no pr", "--attempt", "1", token=tok)
    same(refused_l, refused_r, ("alpha", "bravo"), (pl, pr))
    assert refused_r.returncode == ExitCode.VALIDATION

    # with a run's task token (what `agent run` hands a command), only its own task
    task_token = twins.task("token task", "cap-b")
    claim = twins.claim("bravo")
    env = {"FLEET_TASK_TOKEN": claim["task_token"], "FLEET_ATTEMPT": "1"}
    ok = twins.remote("task", "complete", task_token, "--summary", "via task token", env=env)
    assert (ok.returncode, ok.stdout) == (0, f"{task_token} completed\n")
    other = twins.remote("task", "complete", tr, "--summary", "x", env=env)
    assert other.returncode == ExitCode.USAGE and "another task" in other.stderr

    done = twins.local("db", "check")
    assert done.returncode == 0, done.stdout + done.stderr
    # no token ever reaches output or logs
    log = twins.server.stderr_path.read_text()
    for t in (*twins.tokens.values(), claim["task_token"], REGISTRATION_TOKEN, ADMIN_TOKEN):
        assert t not in log


def test_auth_failures_and_a_down_server_have_their_exit_codes(live_server):
    wrong = cli("task", "status", "t-1", "--token", "not-a-token", "--api-url", live_server.url)
    assert (wrong.returncode, wrong.stderr) == (ExitCode.USAGE, "error: unknown token\n")
    token = live_server.register("someone")
    as_other = cli("agent", "heartbeat", "somebody-else", "--api-url", live_server.url, "--token", token)
    assert as_other.returncode == ExitCode.USAGE and "belongs to agent someone" in as_other.stderr
    no_token = cli("task", "complete", "t-1", env={"FLEET_API_URL": live_server.url})
    assert no_token.returncode == ExitCode.USAGE and "needs a token" in no_token.stderr
    assert token not in wrong.stderr + as_other.stderr

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {"FLEET_API_URL": down, "FLEET_TASK_TOKEN": "secret-task-token", "FLEET_API_RETRY_SECS": "0.5"}
    for args in (("task", "complete", "t-1", "--attempt", "1"), ("task", "status", "t-1"),
                 ("agent", "heartbeat", "a1", "--token", "secret-task-token"),
                 ("agent", "register", "a1", "--type", "t", "--token", "secret-task-token")):  # fmt: skip
        done = cli(*args, env=env)
        assert done.returncode == ExitCode.REMOTE, done.stderr
        assert "cannot reach the fleetctl API" in done.stderr and "secret-task-token" not in done.stderr


def test_local_task_complete_never_imports_httpx(tmp_path):
    code = (
        "import sys\nfrom fleetctl.cli import main\n"
        "sys.argv = ['fleetctl', 'task', 'complete', 'nosuch', '--attempt', '1']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    print('exit', exc.code)\n"
        "print('httpx' in sys.modules, 'fleetctl.remote' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.stdout.split("\n")[-3:] == ["exit 3", "False False", ""], out.stdout + out.stderr


@pytest.mark.parametrize(
    "status,code,error,exit_code",
    [
        (400, "invalid_field", "UsageError", ExitCode.USAGE),
        (401, "unauthorized", "Unauthorized", ExitCode.USAGE),
        (403, "forbidden", "Forbidden", ExitCode.USAGE),
        (404, "task_not_found", "NotFound", ExitCode.NOT_FOUND),
        (405, "method_not_allowed", "UsageError", ExitCode.USAGE),
        (409, "lease_lost", "LeaseLost", ExitCode.CONFLICT),
        (409, "task_exists", "Conflict", ExitCode.CONFLICT),
        (422, "invalid_transition", "InvalidTransition", ExitCode.CONFLICT),
        (422, "receipt_invalid", "ValidationFailed", ExitCode.VALIDATION),
        (422, "validation_failed", "ValidationFailed", ExitCode.VALIDATION),
        (500, "internal_error", "RemoteError", ExitCode.REMOTE),
        (503, "store_busy", "RemoteError", ExitCode.REMOTE),
    ],
)
def test_api_errors_map_back_to_local_exit_codes(status, code, error, exit_code):
    from fleetctl.remote import error_for

    exc = error_for(status, {"error": {"code": code, "message": "m"}}, "POST /x")
    assert (type(exc).__name__, exc.exit_code, exc.code) == (error, exit_code, code)
    if code not in ("invalid_transition", "task_exists"):  # without our JSON body the status alone decides
        assert error_for(status, None, "POST /x").exit_code == exit_code


def test_token_resolution_order():
    from fleetctl.remote import AGENT_TOKEN_ENV, REGISTRATION_TOKEN_ENV, TASK_TOKEN_ENV, resolve_token

    env = {"FLEET_TASK_TOKEN": "task", "FLEET_AGENT_TOKEN": "agent", "FLEET_API_TOKEN": "api",
           "FLEET_REGISTRATION_TOKEN": "reg"}  # fmt: skip
    assert resolve_token("opt", TASK_TOKEN_ENV, env) == "opt"
    assert resolve_token(None, TASK_TOKEN_ENV, env) == "task"
    assert resolve_token(None, TASK_TOKEN_ENV, {"FLEET_AGENT_TOKEN": "agent", "FLEET_API_TOKEN": "api"}) == "agent"
    assert resolve_token(None, TASK_TOKEN_ENV, {"FLEET_API_TOKEN": "api"}) == "api"
    assert resolve_token(None, AGENT_TOKEN_ENV, env) == "agent"
    assert resolve_token(None, REGISTRATION_TOKEN_ENV, env) == "reg"
    assert resolve_token(None, REGISTRATION_TOKEN_ENV, {"FLEET_API_TOKEN": "api"}) == "api"
    assert resolve_token(None, TASK_TOKEN_ENV, {}) is None
