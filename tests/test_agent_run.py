"""``fleetctl agent run`` (fleetctl/pull_agent.py) against a real ``fleetctl serve`` process.

The task commands are small python scripts; a command that must wait for the test waits for a file to
appear (bounded), never for a fixed time. The server heartbeats every 0.5 s so that heartbeats, and the
cancellations they carry, are seen quickly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ADMIN_TOKEN, REGISTRATION_TOKEN, pid_alive, reap_runs, wait_for

from fleetctl.pull_agent import STOP_REASONS

COMPLETE = """
import os, subprocess, sys
prompt = open(sys.argv[-1]).read()
assert "Write the changelog" in prompt, "the prompt names the task"
with open(os.path.join(os.environ["FLEET_WORKSPACE"], "env.json"), "w") as fh:
    json = __import__("json"); json.dump({k: v for k, v in os.environ.items() if k.startswith("FLEET_")}, fh)
done = subprocess.run(["fleetctl", "task", "complete", os.environ["FLEET_TASK_ID"], "--summary",
                       f"read {len(prompt)} chars", "--branch", os.environ["FLEET_BRANCH"]])
sys.exit(done.returncode)
"""
QUIET_OK = "print('step 1'); print('all done: 3 files changed')"
FAIL = "import sys; print('boom: the tests failed', file=sys.stderr); sys.exit(3)"
SLEEPER = """
import os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
open(os.path.join(here, "started"), "w").write(str(os.getpid()))
deadline = time.monotonic() + 20
while not os.path.exists(os.path.join(here, "go")) and time.monotonic() < deadline:
    time.sleep(0.02)
print("woke up and finished")
"""


class Agent:
    """``fleetctl agent run`` as a subprocess; its stderr (the action log) goes to a file we can poll."""

    def __init__(self, tmp_path: Path, server, script: str, *args: str, env: dict | None = None):
        """Run ``script`` (python source; or, starting with ``$ ``, a command line as it is) for each task."""
        self.log_path = tmp_path / f"agent-{time.monotonic_ns()}.log"
        script_path = tmp_path / f"cmd-{time.monotonic_ns()}.py"
        script_path.write_text(script)
        command = script[2:] if script.startswith("$ ") else f"{sys.executable} {script_path}"
        base = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env = {**base, "FLEET_REGISTRATION_TOKEN": REGISTRATION_TOKEN, **(env or {})}
        argv = [sys.executable, "-m", "fleetctl", "agent", "run", "--api-url", server.url, "--command", command,
                "--workspace-root", str(tmp_path / "ws"), *args]  # fmt: skip
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float = 20) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"agent run did not exit within {timeout}s:\n{self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc.stdout.close()


@pytest.fixture
def server(make_server):
    return make_server(heartbeat_interval_secs=0.5).start()


@pytest.fixture
def agents(tmp_path, server):
    started: list[Agent] = []

    def start(script: str, *args: str, env: dict | None = None) -> Agent:
        agent = Agent(tmp_path, server, script, *args, env=env)
        started.append(agent)
        return agent

    try:
        yield start
    finally:
        for a in started:
            a.stop()
        reap_runs(tmp_path / "ws")  # runs are detached (setsid): stop any an agent left behind, by group


def create(server, title: str, labels=("agent:py",)) -> str:
    with server.client(ADMIN_TOKEN) as admin:
        r = admin.post("/api/v1/tasks", json={"title": title, "labels": list(labels)})
        assert r.status_code == 201, r.text
        return r.json()["task_id"]


def task(server, task_id: str) -> dict:
    with server.client(ADMIN_TOKEN) as admin:
        return admin.get(f"/api/v1/tasks/{task_id}").json()


def db_check(server) -> None:
    done = subprocess.run([sys.executable, "-m", "fleetctl", "db", "check", "--config", str(server.config_path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_one_job_runs_the_command_which_hands_in_its_own_receipt(server, agents, tmp_path):
    task_id = create(server, "Write the changelog")
    creds = tmp_path / "creds" / "builder.json"
    agent = agents(COMPLETE, "--one-job", "--agent-id", "builder", "-C", "py", "--credentials", str(creds),
                   env={"FLEET_AGENT_TOKEN": "leak?", "SOME_SECRET": "leak?"})  # fmt: skip
    assert agent.wait() == 0, agent.log
    t = task(server, task_id)
    assert t["state"] == "completed", agent.log
    assert t["attempts"][0]["receipt"]["summary"].startswith("read ")
    assert {"kind": "branch", "name": f"fleet/{task_id}"} in t["attempts"][0]["receipt"]["artifacts"]
    assert "action=complete.by_command" in agent.log and "action=complete.ok" not in agent.log
    # the run's environment (SPEC §8 item 5): its own task token, never the agent's or the registration token
    ws = tmp_path / "ws" / task_id / "1"
    env = json.loads((ws / "env.json").read_text())
    saved = json.loads(creds.read_text())
    assert env["FLEET_TASK_ID"] == task_id and env["FLEET_ATTEMPT"] == "1" and env["FLEET_AGENT_ID"] == "builder"
    assert env["FLEET_API_URL"] == server.url and env["FLEET_BRANCH"] == f"fleet/{task_id}"
    assert env["FLEET_WORKSPACE"] == str(ws) and env["FLEET_PROMPT_FILE"] == str(ws / ".fleet" / "prompt.md")
    assert env["FLEET_TASK_TOKEN"] and env["FLEET_TASK_TOKEN"] != saved["token"]
    assert REGISTRATION_TOKEN not in json.dumps(env) and saved["token"] not in json.dumps(env)
    assert "FLEET_AGENT_TOKEN" not in env and "FLEET_REGISTRATION_TOKEN" not in env  # a whitelist, not a copy
    # the credential file: 0600, reused next time without the registration token
    assert saved["agent_id"] == "builder" and stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert saved["token"] not in agent.log and REGISTRATION_TOKEN not in agent.log
    db_check(server)


def test_exit_0_without_a_receipt_gets_one_and_a_failure_is_requeued(server, agents, tmp_path):
    creds = str(tmp_path / "quiet.json")
    ok_task = create(server, "quiet")
    first = agents(QUIET_OK, "--one-job", "--agent-id", "quiet", "-C", "py", "--credentials", creds)
    assert first.wait() == 0, first.log
    t = task(server, ok_task)
    assert t["state"] == "completed" and t["attempts"][0]["receipt"]["summary"] == "step 1\nall done: 3 files changed"
    assert "action=agent.registered" in first.log and "action=complete.ok" in first.log
    # the agent settles its runs: the wrapper does not race it with a run-ended report of its own
    assert not (tmp_path / "ws" / ok_task / "1" / ".fleet" / "report.log").exists()

    bad_task = create(server, "failing")
    second = agents(FAIL, "--one-job", "--agent-id", "quiet", "-C", "py", "--credentials", creds,
                    env={"FLEET_REGISTRATION_TOKEN": ""})  # fmt: skip
    assert second.wait() == 0, second.log
    assert "action=agent.resumed" in second.log  # the saved token, no registration token needed
    t = task(server, bad_task)
    assert t["state"] == "queued" and t["failure_reason"] == "agent_error"
    receipt = t["attempts"][0]["receipt"]
    assert receipt["outcome"] == "failure" and receipt["summary"] == "exit status 3: boom: the tests failed"

    # a saved token the server no longer takes (401): register again
    Path(creds).write_text(json.dumps({"agent_id": "quiet", "token": "revoked", "api_url": server.url}))
    create(server, "third")  # (the failed one waits out its retry backoff)
    third = agents(FAIL, "--one-job", "--agent-id", "quiet", "-C", "py", "--credentials", creds)
    assert third.wait() == 0, third.log
    assert "action=agent.credentials_rejected" in third.log and "action=agent.reregistered" in third.log
    assert json.loads(Path(creds).read_text())["token"] != "revoked"
    db_check(server)


def sleeping(server, agents, tmp_path, agent_id: str) -> tuple[str, Agent, int]:
    """A task whose command (SLEEPER) runs under a one-job agent: task id, agent, the command's pid."""
    task_id = create(server, f"long job for {agent_id}")
    agent = agents(SLEEPER, "--one-job", "--agent-id", agent_id, "-C", "py")
    started = tmp_path / "started"
    pid = int(wait_for(lambda: started.exists() and started.read_text(), what="the command to start"))
    wait_for(lambda: task(server, task_id)["state"] == "running", what="running")
    return task_id, agent, pid


def test_survives_a_server_restart_mid_task(server, agents, tmp_path):
    task_id, agent, _ = sleeping(server, agents, tmp_path, "steady")
    port = server.port
    assert server.stop() == 0
    (tmp_path / "go").write_text("")  # the command ends while the server is down
    wait_for(lambda: "action=complete.retry" in agent.log, what="a completion retry")
    server.start(port=port)  # same port, same database
    assert agent.wait() == 0, agent.log
    t = task(server, task_id)
    assert t["state"] == "completed", agent.log
    assert t["attempts"][0]["receipt"]["summary"] == "woke up and finished"
    assert "action=complete.ok" in agent.log
    db_check(server)


def test_a_cancelled_task_is_stopped_and_heartbeats_go_on_meanwhile(server, agents, tmp_path):
    task_id, agent, pid = sleeping(server, agents, tmp_path, "stoppable")

    def heartbeat_at() -> str:
        with server.client(ADMIN_TOKEN) as admin:
            items = admin.get("/api/v1/agents").json()["items"]
        return next(a["last_heartbeat_at"] for a in items if a["agent_id"] == "stoppable")

    first = heartbeat_at()
    wait_for(lambda: heartbeat_at() > first, timeout=10, what="a heartbeat while the command runs")

    cancel = subprocess.run([sys.executable, "-m", "fleetctl", "task", "cancel", task_id, "--config",
                             str(server.config_path)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert cancel.returncode == 0, cancel.stderr
    wait_for(lambda: not pid_alive(pid), timeout=15, what="the cancelled command's process to be gone")
    assert agent.wait() == 0, agent.log
    t = task(server, task_id)
    assert t["state"] == "cancelled"
    assert t["attempts"][0]["receipt"] is None
    assert not [e for e in t["events"] if e["type"] in ("task.completed", "task.failed", "task.retry_later")]
    assert "action=task.stop_requested" in agent.log and "reason=cancelled" in agent.log
    db_check(server)


def test_sigterm_drains_the_running_task_and_takes_no_more(server, agents, tmp_path):
    first, second = create(server, "first"), create(server, "second")
    agent = agents(SLEEPER, "--agent-id", "drainer", "-C", "py")
    wait_for((tmp_path / "started").exists, what="the command to start")
    agent.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "action=agent.stopping" in agent.log, what="the agent to start draining")
    (tmp_path / "go").write_text("")
    assert agent.wait() == 0, agent.log
    assert task(server, first)["state"] == "completed", agent.log
    assert task(server, second)["state"] == "queued"

    idle = agents(SLEEPER, "--agent-id", "idler", "-C", "nothing-matches")
    wait_for(lambda: "action=agent.started" in idle.log, what="the idle agent to start")
    idle.proc.send_signal(signal.SIGINT)
    assert idle.wait(10) == 0, idle.log
    db_check(server)


def test_bad_usage_is_2_and_an_unreachable_server_is_5(tmp_path, server, agents):
    assert agents(QUIET_OK, "--prompt", "carrier-pigeon").wait() == 2
    no_token = agents(QUIET_OK, "--agent-id", "stranger", env={"FLEET_REGISTRATION_TOKEN": ""})
    assert no_token.wait() == 2 and "no registration token" in no_token.log
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server.port = port  # nobody listens there
    down = agents(QUIET_OK, "--agent-id", "lonely", env={"FLEET_API_RETRY_SECS": "0.5"})
    assert down.wait() == 5 and "cannot reach the fleetctl API" in down.log
    assert REGISTRATION_TOKEN not in down.log


def test_prompt_modes_shell_commands_and_a_command_that_cannot_start(server, agents, tmp_path):
    by_stdin = create(server, "Count the words")
    agent = agents("$ wc -w > words.txt && echo counted", "--shell", "--prompt", "stdin", "--one-job", "-C", "py")
    assert agent.wait() == 0, agent.log
    assert task(server, by_stdin)["state"] == "completed", agent.log
    assert int((tmp_path / "ws" / by_stdin / "1" / "words.txt").read_text()) > 10

    by_arg = create(server, "Echo the prompt")
    agent = agents('$ printf %s "$1" > prompt.txt', "--shell", "--prompt", "arg", "--one-job", "-C", "py")
    assert agent.wait() == 0, agent.log
    assert "Echo the prompt" in (tmp_path / "ws" / by_arg / "1" / "prompt.txt").read_text()

    missing = create(server, "Nothing to run it with")
    agent = agents("$ /nonexistent/agent-cli --yes", "--one-job", "-C", "py")
    assert agent.wait() == 0, agent.log
    t = task(server, missing)
    assert t["state"] == "queued" and t["failure_reason"] == "agent_error"
    assert t["attempts"][0]["receipt"]["summary"].startswith("cannot start /nonexistent/agent-cli --yes")


#: Prints 3 MiB on stdout and on stderr (64 KiB lines), then a last line on each; exits 0.
LOUD = """
import sys
line = "x" * 65535 + "\\n"
for _ in range(48):
    sys.stdout.write(line)
    sys.stderr.write(line)
print("the end")
print("the end", file=sys.stderr)
"""


def test_command_output_is_capped_like_a_dispatched_run(server, agents, tmp_path):
    """The pull agent runs its command through the same wrapper: stdout/stderr capped, no SIGPIPE."""
    task_id = create(server, "A very chatty agent")
    agent = agents(LOUD, "--one-job", "-C", "py")
    assert agent.wait() == 0, agent.log
    meta = tmp_path / "ws" / task_id / "1" / ".fleet"
    cap = 1048576  # the default output_cap_bytes
    assert (meta / "stdout.log").stat().st_size == cap and (meta / "stderr.log").stat().st_size == cap
    assert (meta / "exit_status").read_text().strip() == "0"  # exited normally (141 would be SIGPIPE)
    t = task(server, task_id)
    assert t["state"] == "completed" and t["attempts"][0]["receipt"]["outcome"] == "success"
    db_check(server)


# ------------------------------------------------------------------------------------------------------
# Unit tests of the pull agent's run handling: a real run through the local executor, a fake server.


class FakeClient:
    """Stands in for the task-token client of one run: records what the agent sends."""

    def __init__(self):
        self.calls: list[tuple] = []

    def status(self, task_id, *, attempt, status):
        self.calls.append(("status", task_id, attempt, status))
        return {"state": "running"}

    def task(self, task_id):
        return {"state": "running", "attempts": [{"attempt": 1, "receipt": None, "outcome": None}]}

    def complete(self, task_id, receipt, *, attempt):
        self.calls.append(("complete", task_id, attempt, receipt))
        return {"state": "completed"}


def make_agent(tmp_path, command: str, **overrides):
    from fleetctl.pull_agent import PullAgent, make_settings

    settings = make_settings(command=command, shell=True, api_url="http://127.0.0.1:9", token="unused",
                             agent_id="unit", workspace_root=tmp_path / "ws", env={})  # fmt: skip
    from dataclasses import replace

    return PullAgent(replace(settings, **overrides))


def run_in_thread(agent, task_id: str, attempt: int, client: FakeClient):
    """``agent.run_task``'s body for a claim, in a thread (as a worker runs it); the thread and its Run."""
    import threading

    from fleetctl.pull_agent import Run

    run = Run(task_id, attempt, "task-token")
    with agent.lock:
        agent.runs[task_id, attempt] = run
    claim = {"task": {"task_id": task_id, "title": "t"}, "attempt": attempt, "prompt": "do it\n"}
    thread = threading.Thread(target=agent._run, args=(run, claim["task"], claim, client), daemon=True)
    thread.start()
    return thread, run


WAIT_FOREVER = 'echo $$ > "$FLEET_WORKSPACE/pid.txt"; trap "" TERM; while :; do sleep 0.05; done'


@pytest.mark.parametrize("reason", STOP_REASONS)
def test_a_run_listed_in_the_heartbeat_stop_list_is_stopped_without_a_receipt(tmp_path, capsys, reason):
    """The hard-timeout defect: the server says stop (task id AND attempt); the command must not run on."""
    agent = make_agent(tmp_path, WAIT_FOREVER, kill_grace_secs=0.2)
    client = FakeClient()
    thread, run = run_in_thread(agent, "t-slow", 2, client)
    pid_file = tmp_path / "ws" / "t-slow" / "2" / "pid.txt"
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), what="the command to start"))
    try:
        # another attempt of the same task, and another task: neither is this run
        agent._heard({"cancelled": ["t-slow"], "stop": [{"task_id": "t-slow", "attempt": 1, "reason": reason},
                                                         {"task_id": "t-other", "attempt": 2, "reason": reason}]})  # fmt: skip
        assert not run.stop.is_set() and pid_alive(pid)
        agent._heard({"cancelled": ["t-slow"], "stop": [{"task_id": "t-slow", "attempt": 2, "reason": reason}]})
        thread.join(30)
        assert not thread.is_alive(), "the run was not stopped"
    finally:
        reap_runs(tmp_path / "ws")
    assert not pid_alive(pid)  # its TERM-ignoring shell was killed with its group
    assert run.stop_reason == reason
    assert [c[0] for c in client.calls] == ["status"]  # no receipt: the attempt is no longer the agent's
    err = capsys.readouterr().err
    assert f"action=task.stop_requested task=t-slow attempt=2 reason={reason}" in err
    assert f"action=task.stopped task=t-slow attempt=2 reason={reason}" in err


def test_without_a_stop_list_the_cancelled_task_ids_are_stopped(tmp_path, capsys):
    agent = make_agent(tmp_path, WAIT_FOREVER, kill_grace_secs=0.2)
    client = FakeClient()
    thread, run = run_in_thread(agent, "t-old-server", 1, client)
    pid_file = tmp_path / "ws" / "t-old-server" / "1" / "pid.txt"
    wait_for(pid_file.exists, what="the command to start")
    try:
        agent._heard({"cancelled": ["t-old-server"], "heartbeat_interval_secs": 7})
        thread.join(30)
        assert not thread.is_alive(), "the run was not stopped"
    finally:
        reap_runs(tmp_path / "ws")
    assert run.stop_reason == "cancelled" and agent.interval == 7
    assert [c[0] for c in client.calls] == ["status"]
    assert "action=task.stop_requested task=t-old-server attempt=1 reason=cancelled" in capsys.readouterr().err


def test_stop_requests_reads_stop_first_and_skips_malformed_entries():
    from fleetctl.pull_agent import stop_requests

    reply = {"cancelled": ["a"], "stop": [{"task_id": "b", "attempt": 3, "reason": "timeout"}, "junk",
                                          {"task_id": "c", "attempt": "1"}, {"task_id": "d", "attempt": True},
                                          {"task_id": "e", "attempt": 1}]}  # fmt: skip
    assert stop_requests(reply) == [("b", 3, "timeout"), ("e", 1, "cancelled")]
    assert stop_requests({"cancelled": ["a", 5]}) == [("a", None, "cancelled")]
    assert stop_requests({"stop": [], "cancelled": ["a"]}) == []  # a server that sends stop means it
    assert stop_requests({}) == []


def test_the_pull_agent_caps_output_at_its_setting_and_receipts_read_the_capped_logs(tmp_path):
    agent = make_agent(tmp_path, 'yes out | head -c 100000; yes err | head -c 100000 >&2; exit 4',
                       output_cap_bytes=1000)  # fmt: skip
    client = FakeClient()
    thread, _ = run_in_thread(agent, "t-loud", 1, client)
    thread.join(30)
    assert not thread.is_alive()
    meta = tmp_path / "ws" / "t-loud" / "1" / ".fleet"
    assert (meta / "stdout.log").read_bytes() == b"out\n" * 250 and (meta / "stderr.log").read_bytes() == b"err\n" * 250
    (_, _, _, receipt) = client.calls[-1]
    assert receipt["outcome"] == "failure" and receipt["summary"] == "exit status 4: err"


def test_the_run_environment_is_the_shared_whitelist(tmp_path, monkeypatch):
    from fleetctl.executors import INHERITED_ENV

    monkeypatch.setenv("FORGEJO_TOKEN", "orchestrator-secret")
    agent = make_agent(tmp_path, "true")
    env = agent.task_env({"task_id": "t-env", "repo": "o/r", "issue_number": 4}, 2, "tok", tmp_path / "w")
    assert "FORGEJO_TOKEN" not in env
    assert set(env) - set(INHERITED_ENV) == {"FLEET_TASK_ID", "FLEET_ATTEMPT", "FLEET_AGENT_ID", "FLEET_API_URL",
                                             "FLEET_TASK_TOKEN", "FLEET_BRANCH", "FLEET_WORKSPACE",
                                             "FLEET_PROMPT_FILE", "FLEET_REPO", "FLEET_ISSUE"}  # fmt: skip
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # its `fleetctl` is ours


def test_a_command_exiting_75_is_handed_in_as_a_usage_limit_and_the_agent_rests(server, agents, tmp_path):
    task_id = create(server, "limited", labels=("agent:py", "retries:0"))
    agent = agents("$ echo 90 > .fleet/retry_after; echo 'quota exhausted' >&2; exit 75", "--shell", "--one-job",
                   "--agent-id", "tired", "-C", "py")  # fmt: skip
    assert agent.wait() == 0, agent.log
    t = task(server, task_id)
    assert (t["state"], t["failure_reason"], t["max_attempts"]) == ("queued", "rate_limited", 2), t
    receipt = t["attempts"][0]["receipt"]
    assert receipt["outcome"] == "rate_limited" and receipt["retry_after_secs"] == 90
    assert "quota exhausted" in receipt["summary"]
    with server.client(ADMIN_TOKEN) as admin:
        (tired,) = [a for a in admin.get("/api/v1/agents").json()["items"] if a["agent_id"] == "tired"]
    assert tired["cooldown_until"] is not None
    cooled = [e for e in t["events"] if e["type"] == "task.rate_limited"]
    assert len(cooled) == 1 and cooled[0]["data"]["retry_after_secs"] == 90
    db_check(server)
