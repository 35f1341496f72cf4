"""The agent skill (skill/SKILL.md), line by line: every command block is run for real, as an agent would run
it — ``bash`` with the environment a run gets, ``fleetctl`` on PATH in remote mode — against a live
``fleetctl serve`` whose receipts are checked against the fake Forgejo, and each does what the skill says.

A block holds one or more commands, each after its own ``#`` comment; each command is one scenario, on a
fresh task claimed by a pull agent. ``EXPECTED`` maps every command of the skill to the check of what the
skill promises; a command the skill gains without a check here fails ``test_every_command_is_checked``.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ADMIN_TOKEN, LiveServer, stop_cleanly

ROOT = Path(__file__).resolve().parent.parent
SKILL = ROOT / "skill" / "SKILL.md"
OWNER = "acme"
SECRET = "skill-webhook-secret"


def skill_commands() -> list[str]:
    """Every command of the skill's ```sh blocks: the text between one comment line (or the block's start)
    and the next, with continuation lines kept."""
    out = []
    for block in re.findall(r"^```sh\n(.*?)^```$", SKILL.read_text(), flags=re.M | re.S):
        current: list[str] = []
        for line in block.splitlines():
            if line.lstrip().startswith("#"):
                if current:
                    out.append("\n".join(current))
                current = []
            elif line.strip():
                current.append(line)
        if current:
            out.append("\n".join(current))
    return out


def key(command: str) -> str:
    return " ".join(command.split())


@dataclass
class Run:
    """One scenario: its repository, issue, task, claim, and what the command printed."""

    repo: str
    issue: int
    task_id: str
    attempt: int
    agent_id: str
    agent_token: str
    task_token: str
    done: subprocess.CompletedProcess | None = None


class Agentland:
    """The live serve, the fake Forgejo, a pull agent per scenario, and a way to run a command as a run would."""

    def __init__(self, tmp: Path, forgejo) -> None:
        self.tmp, self.forgejo = tmp, forgejo
        self.server = LiveServer(tmp, forgejo={"url": forgejo.url, "token": forgejo.bot_token,
                                               "webhook_secret": SECRET}).start()  # fmt: skip
        self.bin = tmp / "bin"
        self.bin.mkdir()
        shim = self.bin / "fleetctl"
        shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m fleetctl "$@"\n')
        shim.chmod(0o755)
        self.home = tmp / "home"
        self.home.mkdir()
        self.count = 0

    def admin(self, method: str, path: str, **kwargs) -> dict:
        with self.server.client(ADMIN_TOKEN) as c:
            r = c.request(method, path, **kwargs)
        assert r.status_code < 300, (path, r.status_code, r.text)
        return r.json()

    def task(self, task_id: str) -> dict:
        return self.admin("GET", f"/api/v1/tasks/{task_id}")

    def agent(self, agent_id: str) -> dict:
        return next(a for a in self.admin("GET", "/api/v1/agents")["items"] if a["agent_id"] == agent_id)

    def claim(self, pr_number: int | None = None) -> Run:
        """A fresh repository with an issue, a task for it, claimed by a fresh pull agent; with ``pr_number``,
        the agent's pull request (branch fleet/<task>, Closes #1) gets that number."""
        self.count += 1
        repo = f"{OWNER}/skill-{self.count}"
        self.forgejo.add_repo(repo)
        issue = self.forgejo.open_issue(repo, "Fix the leap-day parse", "It breaks on 29 February.")
        # the task requires a capability only this scenario's agent has: tasks re-queued by earlier scenarios
        # (a failure, a usage limit) stay with nobody
        task = self.admin("POST", "/api/v1/tasks", json={"title": "Fix the leap-day parse", "repo": repo,
                                                          "issue_number": issue, "labels": [f"agent:skill-{self.count}"]})  # fmt: skip
        agent_id = f"skill-agent-{self.count}"
        agent_token = self.server.register(agent_id, capabilities=[f"skill-{self.count}"], agent_type="claude-code")
        with self.server.client(agent_token) as c:
            r = c.post("/api/v1/tasks/dequeue", json={"wait": 0})
        assert r.status_code == 200, r.text
        claim = r.json()
        assert claim["task"]["task_id"] == task["task_id"]
        if pr_number is not None:
            while self.forgejo.open_issue(repo, "filler") < pr_number - 1:
                pass
            self.forgejo.push_branch(repo, f"fleet/{task['task_id']}")
            pr = self.forgejo.open_pull(repo, f"fleet/{task['task_id']}", body=f"Closes #{issue}")
            assert pr == pr_number
        return Run(repo, issue, task["task_id"], claim["attempt"], agent_id, agent_token, claim["task_token"])

    def run(self, command: str, run: Run) -> Run:
        workspace = self.tmp / "ws" / run.task_id / str(run.attempt)
        (workspace / ".fleet").mkdir(parents=True, exist_ok=True)
        (workspace / ".fleet" / "prompt.md").write_text("# the task\n")
        env = {
            "PATH": f"{self.bin}:{os.environ['PATH']}", "HOME": str(self.home), "LANG": "C.UTF-8",
            "FLEET_TASK_ID": run.task_id, "FLEET_ATTEMPT": str(run.attempt), "FLEET_AGENT_ID": run.agent_id,
            "FLEET_API_URL": self.server.url, "FLEET_TASK_TOKEN": run.task_token, "FLEET_AGENT_TOKEN": run.agent_token,
            "FLEET_WORKSPACE": str(workspace), "FLEET_BRANCH": f"fleet/{run.task_id}", "FLEET_REPO": run.repo,
            "FLEET_ISSUE": str(run.issue), "FLEET_PROMPT_FILE": str(workspace / ".fleet" / "prompt.md"),
        }  # fmt: skip
        run.done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], capture_output=True, text=True,
                                  env=env, cwd=workspace, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
        return run

    def flush(self) -> None:
        """The outbox, as the sweep flushes it: comments and labels reach the issues."""
        done = subprocess.run([sys.executable, "-m", "fleetctl", "outbox", "flush", "--config",
                               str(self.server.config_path)], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def land(tmp_path_factory):
    from fakes.forgejo import FakeForgejo

    fake = FakeForgejo().start()
    land = Agentland(tmp_path_factory.mktemp("skill"), fake)
    try:
        yield land
    finally:
        stop_cleanly(land.server)
        fake.stop()


def ok(run: Run) -> None:
    assert run.done is not None and run.done.returncode == 0, (run.done.returncode, run.done.stdout, run.done.stderr)


def last_attempt(land: Agentland, run: Run) -> dict:
    return land.task(run.task_id)["attempts"][-1]


# ----------------------------------------------------------------------------------- what each command does


def progress_is_recorded(land: Agentland, run: Run) -> None:
    """§3: a progress message is an event of the task; the attempt goes on."""
    ok(run)
    task = land.task(run.task_id)
    messages = [e["data"].get("message") for e in task["events"] if e["type"] == "task.progress"]
    assert messages == ["tests pass, opening the PR"] and task["state"] in ("assigned", "running")


def usage_is_counted(land: Agentland, run: Run) -> None:
    """§3: the usage so far is recorded on the attempt and counted against the task's budget."""
    ok(run)
    task = land.task(run.task_id)
    assert task["spent_usd"] == pytest.approx(0.42)
    assert task["attempts"][-1]["usage"] == {"input_tokens": 120000, "output_tokens": 8000, "cost_usd": 0.42}


def success_with_pr(land: Agentland, run: Run) -> None:
    """§4: the receipt names pull request 12, which Forgejo confirms: the task awaits review (exit 0)."""
    ok(run)
    task = land.task(run.task_id)
    assert task["state"] == "awaiting_review", task
    receipt = task["attempts"][-1]["receipt"]
    assert receipt["outcome"] == "success" and {"kind": "pull_request", "number": 12} in receipt["artifacts"]


def failure_receipt(land: Agentland, run: Run) -> None:
    """§4: a failure ends the attempt (agent_error, the summary as its detail); the task may be retried."""
    ok(run)
    attempt = last_attempt(land, run)
    assert attempt["outcome"] == "failed" and attempt["failure_reason"] == "agent_error"
    assert attempt["failure_detail"] == "cannot reproduce on main"
    assert land.task(run.task_id)["state"] in ("queued", "failed")


def success_over_http(land: Agentland, run: Run) -> None:
    """§4, with curl: the same receipt over HTTP, answered 200 with the task."""
    ok(run)
    answer = json.loads(run.done.stdout)
    assert answer["task_id"] == run.task_id and answer["state"] == "awaiting_review", answer
    assert land.task(run.task_id)["attempts"][-1]["receipt"]["artifacts"] == [{"kind": "pull_request", "number": 12}]


def heartbeat_over_http(land: Agentland, run: Run) -> None:
    """§5: the agent's heartbeat extends its lease and answers what to stop (nothing here) and when to come back."""
    ok(run)
    answer = json.loads(run.done.stdout)
    assert answer["agent"]["agent_id"] == run.agent_id and answer["agent"]["status"] == "online"
    assert answer["stop"] == [] and answer["heartbeat_interval_secs"] == 60


def rate_limited(land: Agentland, run: Run) -> None:
    """§7: back to the queue without using a retry; this agent rests for the 20 minutes it named."""
    ok(run)
    task = land.task(run.task_id)
    assert task["state"] == "queued" and task["max_attempts"] == 4, task  # 3 (default 2 retries) + this one back
    assert last_attempt(land, run)["failure_reason"] == "rate_limited"
    agent = land.agent(run.agent_id)
    until = calendar.timegm(time.strptime(agent["cooldown_until"][:19], "%Y-%m-%dT%H:%M:%S"))  # UTC
    assert 1200 - 120 < until - time.time() <= 1200, agent


def question(land: Agentland, run: Run) -> None:
    """§8: the question ends the attempt, and fleetctl posts it on the issue, where a person answers."""
    ok(run)
    attempt = last_attempt(land, run)
    assert attempt["failure_reason"] == "agent_error"
    land.flush()
    bodies = [c["body"] for c in land.forgejo.comments(run.repo, run.issue)]
    assert any("Question: should the parser accept 24:00 as midnight?" in b for b in bodies), bodies


EXPECTED: dict[str, tuple[int | None, Callable[[Agentland, Run], None]]] = {
    key('fleetctl task status "$FLEET_TASK_ID" --message "tests pass, opening the PR"'): (None, progress_is_recorded),
    key('fleetctl task status "$FLEET_TASK_ID" --input-tokens 120000 --output-tokens 8000 --cost-usd 0.42'):
        (None, usage_is_counted),
    key('fleetctl task complete "$FLEET_TASK_ID" --summary "Fixed the leap-day parse; added a test" --pr 12'):
        (12, success_with_pr),
    key('fleetctl task complete "$FLEET_TASK_ID" --outcome failure --summary "cannot reproduce on main"'):
        (None, failure_receipt),
    key("""curl -s -X POST "$FLEET_API_URL/api/v1/tasks/$FLEET_TASK_ID/complete" \\
  -H "Authorization: Bearer $FLEET_TASK_TOKEN" -H 'Content-Type: application/json' \\
  -d "{\\"attempt\\": $FLEET_ATTEMPT, \\"outcome\\": \\"success\\", \\"summary\\": \\"…\\",
       \\"artifacts\\": [{\\"kind\\": \\"pull_request\\", \\"number\\": 12}]}\""""): (12, success_over_http),
    key("""curl -s -X POST "$FLEET_API_URL/api/v1/agents/heartbeat" \\
  -H "Authorization: Bearer $FLEET_AGENT_TOKEN" -H 'Content-Type: application/json' -d '{}'"""):
        (None, heartbeat_over_http),
    key('fleetctl task complete "$FLEET_TASK_ID" --outcome rate_limited --retry-after 1200 --summary "429: hourly quota"'):
        (None, rate_limited),
    key('fleetctl task complete "$FLEET_TASK_ID" --outcome failure --summary "Question: should the parser accept 24:00 as midnight?"'):
        (None, question),
}  # fmt: skip

COMMANDS = skill_commands()


def test_every_command_is_checked():
    """A command added to the skill needs its check here; a check whose command left the skill goes too."""
    found = {key(c) for c in COMMANDS}
    assert found == set(EXPECTED), {"unchecked": sorted(found - set(EXPECTED)), "gone": sorted(set(EXPECTED) - found)}
    assert len(COMMANDS) == len(found), "the same command twice in the skill"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: key(c)[:70])
def test_the_command_does_what_the_skill_says(land, command):
    pr_number, check = EXPECTED[key(command)]
    check(land, land.run(command, land.claim(pr_number)))


def test_the_exit_codes_the_skill_promises(land):
    """§4's table: a repeat of the same receipt is accepted again (0, "repeated"); a receipt for an attempt
    that is over is refused as lease_lost (4); a malformed one is a usage error (2)."""
    run = land.claim(12)
    receipt = 'fleetctl task complete "$FLEET_TASK_ID" --summary "Fixed" --pr 12'
    ok(land.run(receipt, run))
    again = land.run(receipt + " --json", run)
    ok(again)
    assert json.loads(again.done.stdout).get("repeated") is True, again.done.stdout
    other = land.run('fleetctl task complete "$FLEET_TASK_ID" --outcome failure --summary "late"', run)
    assert other.done.returncode == 4 and "nothing more can be reported" in other.done.stderr, other.done.stderr
    bad = land.run('fleetctl task complete "$FLEET_TASK_ID" --outcome maybe', land.claim())
    assert bad.done.returncode == 2, bad.done.stderr
    refused = land.run('fleetctl task complete "$FLEET_TASK_ID" --summary "wrong PR" --pr 99', land.claim())
    assert refused.done.returncode == 6, refused.done.stderr
