"""A run's end reported without a database (SPEC §8 step 4), against a real ``fleetctl serve``:

- ``POST /api/v1/tasks/{task_id}/run-ended`` settles an attempt the way the sweep does (a Forgejo task's pull
  request looked up by branch in the request thread), and answers ``settled: false`` when there is nothing to
  settle;
- ``fleetctl task run-ended`` in remote mode (``FLEET_API_URL`` and the task token) goes through it;
- the run wrapper posts it with curl, else wget (else leaves the run to the sweep), the task token never on a
  command line;
- end to end: ``fleetctl dispatch`` starts a run on an SSH host (the ``sshd`` fixture) with
  ``server.public_url`` pointing at the serve; the run's end is settled without any ``sweep-timeouts``, and a
  run that handed in its receipt (curl, or ``python3 -m fleetctl task complete`` in remote mode) is left as is.

Everything is a real process; waits poll with a deadline (``wait_for``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomlkit
from conftest import ADMIN_TOKEN, REPO_ROOT, LiveServer, reap_runs, stop_cleanly, wait_for
from test_executor_contract import spec

from fleetctl.executors import LocalExecutor

REPO = "acme/widgets"


@pytest.fixture
def serve(tmp_path):
    """``serve(**settings)``: a started live serve with a long backoff (a failed attempt stays queued). At
    teardown the runs a test started are reaped, and the serve must stop cleanly."""
    started: list[LiveServer] = []

    def start(**settings) -> LiveServer:
        started.append(LiveServer(tmp_path, retry_backoff_secs=60, retry_backoff_max_secs=60, **settings).start())
        return started[-1]

    yield start
    reap_runs(tmp_path)
    for srv in started:
        stop_cleanly(srv)


@pytest.fixture
def server(serve):
    return serve()


def claimed(server: LiveServer, task_id: str, agent: str = "puller", **fields) -> str:
    """Create ``task_id`` and claim it as pull agent ``agent``; the attempt's task token."""
    token = server.register(agent, ["re"])
    with server.client(ADMIN_TOKEN) as admin:
        r = admin.post("/api/v1/tasks", json={"task_id": task_id, "title": "t", "labels": ["agent:re"], **fields})
        assert r.status_code == 201, r.text
    with server.client(token) as c:
        r = c.post("/api/v1/tasks/dequeue", json={})
        assert r.status_code == 200 and r.json()["task"]["task_id"] == task_id, r.text
    return r.json()["task_token"]


def detail(server: LiveServer, task_id: str) -> dict:
    with server.client(ADMIN_TOKEN) as admin:
        return admin.get(f"/api/v1/tasks/{task_id}").json()


def run_ended(server: LiveServer, token: str, task_id: str, body: dict):
    with server.client(token) as c:
        return c.post(f"/api/v1/tasks/{task_id}/run-ended", json=body)


# ---------------------------------------------------------------------------------------------- the route


@pytest.mark.parametrize(
    ("exit_code", "reason", "why"),
    [(3, "agent_error", "the run exited with status 3: boom"), (0, "no_receipt", "exited 0 without handing in"),
     (None, "agent_error", "without an exit status"), (127, "launch_failed", "could not be started (exit 127)")],
)  # fmt: skip
def test_the_route_settles_an_attempt_without_a_receipt_as_the_sweep_would(server, exit_code, reason, why):
    token = claimed(server, "t-1")
    r = run_ended(server, token, "t-1", {"attempt": 1, "exit_code": exit_code, "detail": "boom"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["settled"], doc["reason"], doc["state"], doc["failure_reason"]) == (True, None, "queued", reason)
    assert why in doc["failure_detail"]
    events = detail(server, "t-1")["events"]
    again = run_ended(server, token, "t-1", {"attempt": 1, "exit_code": exit_code})
    assert again.status_code == 200 and (again.json()["settled"], again.json()["reason"]) == (False, "attempt_over")
    assert detail(server, "t-1")["events"] == events


def test_after_the_receipt_the_report_changes_nothing_and_says_so(server):
    token = claimed(server, "t-1")
    with server.client(token) as c:
        assert c.post("/api/v1/tasks/t-1/complete", json={"summary": "done"}).json()["state"] == "completed"
    before = detail(server, "t-1")
    r = run_ended(server, token, "t-1", {"attempt": 1, "exit_code": 3})
    assert r.status_code == 200, r.text
    assert (r.json()["settled"], r.json()["reason"], r.json()["state"]) == (False, "attempt_over", "completed")
    assert detail(server, "t-1") == before


@pytest.fixture
def forgejo_server(serve, forgejo):
    return serve(forgejo={"url": forgejo.url, "token": forgejo.bot_token, "webhook_secret": "test-secret"})


def test_the_server_looks_the_pull_request_up_by_branch_before_settling(forgejo_server, forgejo):
    issue = forgejo.open_issue(REPO, "Fix the parser", user="alice")
    token = claimed(forgejo_server, "t-pr", repo=REPO, issue_number=issue)
    n = forgejo.open_pull(REPO, head="fleet/t-pr", title="Parser fix")
    r = run_ended(forgejo_server, token, "t-pr", {"attempt": 1, "exit_code": 0})
    assert r.status_code == 200, r.text
    assert (r.json()["settled"], r.json()["state"], r.json()["pull_request"]["number"]) == (True, "awaiting_review", n)


def test_forgejo_down_defers_the_run_to_the_sweep_and_changes_nothing(forgejo_server, forgejo):
    issue = forgejo.open_issue(REPO, "Fix the parser", user="alice")
    token = claimed(forgejo_server, "t-pr", repo=REPO, issue_number=issue)
    before = detail(forgejo_server, "t-pr")
    forgejo.down()
    r = run_ended(forgejo_server, token, "t-pr", {"attempt": 1, "exit_code": 0})
    assert r.status_code == 200, r.text
    assert (r.json()["settled"], r.json()["reason"], r.json()["state"]) == (False, "deferred", "assigned")
    forgejo.up()
    assert detail(forgejo_server, "t-pr")["events"] == before["events"]


# ---------------------------------------------------------------------------------------------- the CLI


def test_task_run_ended_in_remote_mode_goes_through_the_api(server, tmp_path):
    token = claimed(server, "t-cli")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_API_URL=server.url, FLEET_TASK_TOKEN=token, FLEET_ATTEMPT="1", FLEETCTL_HOME=str(tmp_path))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fleetctl", "task", "run-ended", "t-cli", *args], env=env,
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip

    done = cli("--exit-code", "3", "--detail", "it broke")
    assert (done.returncode, done.stdout, done.stderr) == (0, "t-cli queued\n", "")
    task = detail(server, "t-cli")
    assert task["failure_reason"] == "agent_error" and task["failure_detail"].endswith("it broke")
    again = cli("--exit-code", "3", "--json")
    assert again.returncode == 0, again.stderr
    assert (json.loads(again.stdout)["settled"], json.loads(again.stdout)["reason"]) == (False, "attempt_over")
    other = cli("--exit-code", "3", "--attempt", "2")  # the token is attempt 1's
    assert other.returncode == 4 and "another attempt" in other.stderr


# ---------------------------------------------------------------------------------------------- the wrapper

BROKEN = ("sh", "-c", "echo 'it broke: \"quoted\" \\ back' >&2; printf '\\001\\tsecond line\\n' >&2; exit 3")


def shim_dir(tmp_path: Path, hide: tuple[str, ...]) -> Path:
    """A PATH directory with everything of /usr/bin but ``hide``; curl and wget (if not hidden) are shims that
    record their argv in ``argv.<name>`` beside the directory, then run the real tool."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in Path("/usr/bin").iterdir():
        if tool.name not in hide and tool.name not in ("curl", "wget"):
            (bin_dir / tool.name).symlink_to(tool)
    for name in ("curl", "wget"):
        if name not in hide:
            shim = bin_dir / name
            shim.write_text(f'#!/bin/sh\nprintf \'%s\\n\' "$@" > {tmp_path}/argv.{name}\nexec /usr/bin/{name} "$@"\n')
            shim.chmod(0o755)
    return bin_dir


def wrapper_run(server: LiveServer, tmp_path: Path, token: str, hide: tuple[str, ...]) -> Path:
    """Run ``BROKEN`` through the wrapper as a remote run would be (no FLEET_PYTHON); its workspace."""
    path = str(shim_dir(tmp_path, hide))
    s = spec(tmp_path, BROKEN, task_id="t-w", extra_env={"FLEET_API_URL": server.url + "/", "FLEET_TASK_TOKEN": token,
                                                           "PATH": path})  # fmt: skip
    ex = LocalExecutor()
    ex.launch(s)
    return Path(s.workspace)


@pytest.mark.parametrize("tool", ["curl", "wget"])
def test_the_wrapper_reports_the_end_with_curl_or_wget_and_the_token_on_no_command_line(server, tmp_path, tool):
    token = claimed(server, "t-w")
    ws = wrapper_run(server, tmp_path, token, hide=("curl",) if tool == "wget" else ())
    task = wait_for(lambda: (t := detail(server, "t-w"))["state"] == "queued" and t, what="the report")
    assert task["failure_reason"] == "agent_error"
    assert task["failure_detail"] == 'the run exited with status 3: it broke: "quoted" \\ back second line'
    log = wait_for(lambda: (ws / ".fleet" / "report.log").read_text(), what="report.log")
    assert '"settled":true' in log and token not in log
    argv = (tmp_path / f"argv.{tool}").read_text()
    assert "/api/v1/tasks/t-w/run-ended" in argv and token not in argv
    meta = ws / ".fleet"
    wait_for(lambda: not (meta / "wgetrc").exists() and not (meta / "run-ended.json").exists(), what="the cleanup")


def test_without_curl_or_wget_the_wrapper_leaves_the_run_to_the_sweep(server, tmp_path):
    token = claimed(server, "t-w")
    ws = wrapper_run(server, tmp_path, token, hide=("curl", "wget"))
    log = wait_for(lambda: (p := ws / ".fleet" / "report.log").exists() and p.read_text(), what="report.log")
    assert "neither curl nor wget" in log
    assert (ws / ".fleet" / "exit_status").read_text() == "3\n"
    assert detail(server, "t-w")["state"] == "assigned"


# ---------------------------------------------------------------------------------------------- end to end

#: Hands in its receipt over the API with curl (the token from stdin), then exits 3.
CURL_RECEIPT = (
    "sh", "-c",
    'printf \'header = "Authorization: Bearer %s"\\n\' "$FLEET_TASK_TOKEN" | curl -sS -K - '
    '-d "{\\"attempt\\": $FLEET_ATTEMPT, \\"summary\\": \\"done with curl\\"}" '
    '"$FLEET_API_URL/api/v1/tasks/$FLEET_TASK_ID/complete" > receipt.out; exit 3',
)  # fmt: skip
#: Hands in its receipt with ``python3 -m fleetctl task complete`` in remote mode, then exits 3.
CLI_RECEIPT = ("sh", "-c", '"$0" -m fleetctl task complete "$FLEET_TASK_ID" --summary "done with the CLI" '
               "> receipt.out 2>&1; exit 3", sys.executable)  # fmt: skip


def dispatch_config(tmp_path: Path, sshd, server: LiveServer, command: tuple[str, ...]) -> Path:
    """The config ``dispatch`` runs with: the serve's database, one SSH host (the test sshd) with one agent,
    ``server.public_url`` = the serve."""
    doc = {
        "server": {"public_url": server.url},
        "orchestrator": {"db_path": str(server.db_path), "default_max_retries": 1, "retry_backoff_secs": 60,
                         "retry_backoff_max_secs": 60},
        "hosts": [{"host_id": "box", "hostname": sshd.host, "ssh_user": sshd.user, "ssh_port": sshd.port,
                   "ssh_key_path": str(sshd.key_path), "known_hosts": str(sshd.known_hosts),
                   "connect_timeout_secs": 10, "work_dir": str(tmp_path / "remote-ws"),
                   "agents": [{"agent_type": "agent", "agent_id": "box-agent"}]}],
        "agent_types": {"agent": {"command": list(command), "prompt": "file",
                                  "env": {"PYTHONPATH": str(REPO_ROOT)}}},
    }  # fmt: skip
    path = tmp_path / "dispatch.toml"
    path.write_text(tomlkit.dumps(doc))
    path.chmod(0o600)
    return path


def dispatch(config: Path, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    done = subprocess.run([sys.executable, "-m", "fleetctl", "dispatch", "--config", str(config), "--json"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["launched"]) == 1, report
    return report


def create(server: LiveServer, task_id: str) -> None:
    with server.client(ADMIN_TOKEN) as admin:
        assert admin.post("/api/v1/tasks", json={"task_id": task_id, "title": "t"}).status_code == 201


def test_a_run_on_an_ssh_host_that_exits_3_is_settled_by_its_own_report_without_a_sweep(sshd, server, tmp_path):
    create(server, "t-ssh")
    dispatch(dispatch_config(tmp_path, sshd, server, BROKEN), tmp_path)
    task = wait_for(lambda: (t := detail(server, "t-ssh"))["failure_reason"] and t, what="the run's report")
    assert (task["state"], task["attempt"], task["failure_reason"]) == ("queued", 1, "agent_error")
    assert task["failure_detail"].endswith('status 3: it broke: "quoted" \\ back second line')
    meta = tmp_path / "remote-ws" / "t-ssh" / "1" / ".fleet"
    log = wait_for(lambda: (p := meta / "report.log").exists() and "HTTP 200" in p.read_text() and p.read_text(),
                   what="report.log")  # fmt: skip
    assert '"settled":true' in log
    assert sorted(p.name for p in meta.iterdir()) == ["exit_status", "pid", "prompt.md", "report.log", "run.sh",
                                                      "started_at", "stderr.log", "stdout.log"]  # fmt: skip
    assert [e["data"]["reason"] for e in task["events"] if e["type"] == "task.requeued"] == ["agent_error"]


@pytest.mark.parametrize("command", [CURL_RECEIPT, CLI_RECEIPT], ids=["curl", "cli"])
def test_a_receipt_handed_in_from_the_run_stands_and_the_later_report_changes_nothing(sshd, server, tmp_path,
                                                                                     command):  # fmt: skip
    create(server, "t-ssh")
    dispatch(dispatch_config(tmp_path, sshd, server, command), tmp_path)
    ws = tmp_path / "remote-ws" / "t-ssh" / "1"
    log = wait_for(lambda: (p := ws / ".fleet" / "report.log").exists() and "HTTP " in p.read_text() and p.read_text(),
                   what="the wrapper's report")  # fmt: skip
    reply = json.loads(log.split("\nHTTP ")[0])
    assert (reply["settled"], reply["reason"], reply["state"]) == (False, "attempt_over", "completed"), log
    task = detail(server, "t-ssh")
    assert (task["state"], task["attempt"], task["failure_reason"]) == ("completed", 1, None)
    assert task["attempts"][0]["receipt"]["summary"].startswith("done with"), (ws / "receipt.out").read_text()
