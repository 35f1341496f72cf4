"""The CLI contract scripts and people rely on (SPEC §5, §6 shapes): ``--json`` documents, paging,
data on stdout and messages on stderr, ``NO_COLOR``, ``python -m fleetctl``, and the event log filters."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import time

import pytest

from fleetctl.cli import app

#: SPEC §6: the JSON shape of a task (fields may be added, none renamed).
TASK_FIELDS = {
    "task_id", "state", "title", "body", "labels", "requirements", "priority", "repo", "issue_number", "attempt",
    "max_attempts", "agent_id", "lease_expires_at", "not_before", "failure_reason", "pull_request", "created_at",
    "updated_at",
}  # fmt: skip
#: SPEC §6: the JSON shape of an agent.
AGENT_FIELDS = {
    "agent_id", "agent_type", "capabilities", "max_concurrency", "mode", "status", "last_heartbeat_at", "running",
}  # fmt: skip
EVENT_FIELDS = {"id", "ts", "type", "task_id", "agent_id", "attempt", "data"}
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ANSI = re.compile(r"\x1b\[")


@pytest.fixture
def cli(runner, fleet):
    """Invoke the app in-process against a configured fleet in tmp_path; returns the Result."""
    fleet.configure()

    def invoke(*args: str, ok: bool = True):
        result = runner.invoke(app, list(args))
        if ok:
            assert result.exit_code == 0, (args, result.stdout, result.stderr, result.exception)
        return result

    return invoke


# ---------------------------------------------------------------------------------------------- tasks


def test_task_create_prints_the_id_or_the_task_as_json(cli):
    plain = cli("task", "create", "--title", "Fix the parser")
    assert re.fullmatch(r"t-[0-9a-f]{10}\n", plain.stdout) and plain.stderr == ""
    result = cli("task", "create", "--title", "Port the CLI", "--body", "details\nhere", "--repo", "acme/tool",
                 "--issue", "42", "-l", "agent:code:python", "-l", "priority:5", "-l", "retries:3", "-l", "bug",
                 "-l", "timeout:90", "--json")  # fmt: skip
    task = json.loads(result.stdout)
    assert TASK_FIELDS <= task.keys()
    assert task["task_id"].startswith("t-") and task["state"] == "queued"
    assert (task["title"], task["body"], task["repo"], task["issue_number"]) == (
        "Port the CLI", "details\nhere", "acme/tool", 42,
    )  # fmt: skip
    assert task["labels"] == ["agent:code:python", "priority:5", "retries:3", "bug", "timeout:90"]
    assert task["requirements"] == ["code:python"] and task["priority"] == 5
    assert (task["attempt"], task["max_attempts"], task["timeout_secs"]) == (0, 4, 90)
    assert task["agent_id"] is task["lease_expires_at"] is task["not_before"] is task["failure_reason"] is None
    assert task["pull_request"] is None
    assert ISO.match(task["created_at"]) and ISO.match(task["updated_at"])
    shown = json.loads(cli("task", "show", task["task_id"], "--json").stdout)
    assert task.pop("warnings") == []  # what create said about its labels (none here); show has no such field
    assert {k: shown[k] for k in task} == task


def test_task_list_json_pages_with_limit_and_after(cli):
    ids = [cli("task", "create", "--title", f"task {i}").stdout.strip() for i in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        args = ["task", "list", "--json", "--limit", "2"] + (["--after", str(cursor)] if cursor is not None else [])
        page = json.loads(cli(*args).stdout)
        assert set(page) == {"items", "next"}
        assert all(TASK_FIELDS <= item.keys() for item in page["items"])
        seen += [item["task_id"] for item in page["items"]]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
        assert isinstance(cursor, int) and len(page["items"]) == 2
    assert seen == ids and pages == 3
    everything = json.loads(cli("task", "list", "--json", "--limit", "0").stdout)
    assert [t["task_id"] for t in everything["items"]] == ids and everything["next"] is None
    cli("task", "cancel", ids[1])
    cancelled = json.loads(cli("task", "list", "--json", "--state", "cancelled").stdout)
    assert [t["task_id"] for t in cancelled["items"]] == [ids[1]]
    queued = json.loads(cli("task", "list", "--json", "-s", "queued", "-s", "cancelled").stdout)
    assert len(queued["items"]) == 5


def test_task_list_table_on_stdout_paging_hint_on_stderr(cli):
    ids = [cli("task", "create", "--title", f"title number {i}").stdout.strip() for i in range(3)]
    result = cli("task", "list", "--limit", "2")
    assert result.stdout.split("\n")[0].split() == ["ID", "STATE", "PRI", "ATTEMPT", "AGENT", "NEEDS", "TITLE",
                                                    "UPDATED"]  # fmt: skip
    assert ids[0] in result.stdout and ids[1] in result.stdout and ids[2] not in result.stdout
    assert "title number 0" in result.stdout
    cursor = json.loads(cli("task", "list", "--json", "--limit", "2").stdout)["next"]
    assert result.stderr == f"more: --after {cursor}\n"
    assert not ANSI.search(result.stdout + result.stderr)


def test_task_show_json_has_attempts_and_events(cli, fleet):
    cli("agent", "register", "builder-1", "--type", "codex-cli", "-C", "code:python")
    task_id = cli("task", "create", "--title", "Show me", "-l", "agent:code:python").stdout.strip()
    fleet.claim(task_id, "builder-1", ("code:python",))
    as_agent = ["--agent", "builder-1", "--attempt", "1"]
    cli("task", "status", task_id, "--status", "running", *as_agent)
    cli("task", "status", task_id, "--message", "halfway", *as_agent)
    done = cli("task", "complete", task_id, "--summary", "all done", "--branch", f"fleet/{task_id}", *as_agent)
    assert done.stdout == f"{task_id} completed\n"
    doc = json.loads(cli("task", "show", task_id, "--json").stdout)
    assert TASK_FIELDS <= doc.keys() and doc["state"] == "completed" and doc["agent_id"] == "builder-1"
    (attempt,) = doc["attempts"]
    assert attempt["attempt"] == 1 and attempt["agent_id"] == "builder-1" and attempt["outcome"] == "completed"
    assert attempt["receipt"]["summary"] == "all done"
    assert {"kind": "branch", "name": f"fleet/{task_id}"} in attempt["receipt"]["artifacts"]
    assert [e["type"] for e in doc["events"]] == [
        "task.created", "task.assigned", "task.started", "task.progress", "task.completed",
    ]  # fmt: skip
    assert all(EVENT_FIELDS <= e.keys() and ISO.match(e["ts"]) for e in doc["events"])
    assert doc["events"][3]["data"] == {"message": "halfway"}
    human = cli("task", "show", task_id)
    assert f"task {task_id}" in human.stdout and "attempts" in human.stdout and "task.completed" in human.stdout
    assert human.stderr == ""


# ---------------------------------------------------------------------------------------------- agents


def test_agent_register_list_show_json_shapes(cli, fleet):
    reg = json.loads(
        cli("agent", "register", "builder-1", "--type", "codex-cli", "-C", "code:rust", "-C", "code:python",
            "--max-concurrency", "3", "--json").stdout
    )  # fmt: skip
    assert AGENT_FIELDS | {"token"} <= reg.keys()
    assert reg["agent_id"] == "builder-1" and reg["agent_type"] == "codex-cli" and reg["mode"] == "http_pull"
    assert reg["capabilities"] == ["code:python", "code:rust"] and reg["max_concurrency"] == 3
    assert reg["status"] == "online" and reg["running"] == 0 and ISO.match(reg["last_heartbeat_at"])
    token = reg["token"]
    assert isinstance(token, str) and len(token) >= 32
    ssh = json.loads(cli("agent", "register", "runner-1", "--type", "codex-cli", "--mode", "ssh_cli", "--json").stdout)
    assert ssh["mode"] == "ssh_cli" and ssh["token"] is None

    task_id = cli("task", "create", "--title", "t", "-l", "agent:code:python").stdout.strip()
    fleet.claim(task_id, "builder-1", ("code:python",))
    listed = json.loads(cli("agent", "list", "--json").stdout)
    assert set(listed) == {"items", "next"} and listed["next"] is None
    by_id = {a["agent_id"]: a for a in listed["items"]}
    assert set(by_id) == {"builder-1", "runner-1"} and all(AGENT_FIELDS <= a.keys() for a in listed["items"])
    assert by_id["builder-1"]["running"] == 1
    only = json.loads(cli("agent", "list", "--json", "-C", "code:rust").stdout)
    assert [a["agent_id"] for a in only["items"]] == ["builder-1"]

    shown = cli("agent", "show", "builder-1", "--json").stdout
    doc = json.loads(shown)
    assert AGENT_FIELDS <= doc.keys() and doc["tasks"] == [task_id] and doc["running"] == 1
    assert [e["type"] for e in doc["events"]] == ["agent.registered", "task.assigned"]
    listing = cli("agent", "list").stdout + cli("agent", "show", "builder-1").stdout
    for out in (shown, listing, cli("agent", "list", "--json").stdout, cli("events", "--json").stdout):
        assert token not in out, "an agent token is shown once, at registration"


def test_agent_register_human_output(cli):
    first = cli("agent", "register", "builder-1", "--type", "codex-cli")
    lines = first.stdout.splitlines()
    assert lines[0] == "builder-1 registered (online)" and lines[1].startswith("token: ")
    assert cli("agent", "drain", "builder-1").stdout == "builder-1 draining\n"
    again = cli("agent", "register", "builder-1", "--type", "codex-cli")
    assert again.stdout.splitlines()[0] == "builder-1 updated (online)"
    table = cli("agent", "list").stdout
    assert table.split()[:9] == [
        "AGENT",
        "TYPE",
        "MODE",
        "STATUS",
        "COOLDOWN",
        "RUNNING",
        "CAPABILITIES",
        "HOST",
        "HEARTBEAT",
    ]
    assert "builder-1" in table and "0/1" in table


# ---------------------------------------------------------------------------------------------- streams


def test_data_on_stdout_messages_on_stderr(cli):
    done = cli("dispatch")
    assert done.stdout == "launched 0, launch failures 0, ready in queue 0\n"
    report = json.loads(cli("dispatch", "--json").stdout)
    assert report["launched"] == [] and report["skipped"] is None
    err = cli("task", "show", "t-0000000000", ok=False)
    assert err.exit_code == 3 and err.stdout == "" and err.stderr == "error: no task 't-0000000000'\n"
    check = cli("db", "check")
    assert check.stdout.startswith("ok: ") and check.stderr == ""
    sweep = json.loads(cli("sweep-timeouts", "--json").stdout)
    outbox = sweep.pop("outbox")
    assert sweep == {"skipped": None, "actions": [], "backoff_released": 0}
    assert outbox["skipped"] is None and outbox["sent"] == outbox["enqueued"] == 0


def _run_in_terminal(args: list[str], env: dict[str, str]) -> bytes:
    """Run ``args`` with stdout and stderr on a pseudo-terminal (where rich would use colour); its output."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL, env=env)
    os.close(follower)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            out += chunk
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    return out


def test_no_color_means_no_escape_sequences_even_on_a_terminal(write_config):
    write_config()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")}
    env.update(TERM="xterm-256color", COLUMNS="200")
    subprocess.run(["fleetctl", "task", "create", "--title", "colourful"], check=True, capture_output=True, env=env)
    coloured = _run_in_terminal(["fleetctl", "task", "list"], env)
    assert ANSI.search(coloured.decode()), "precondition: on a terminal the table is styled"
    for args in (["task", "list"], ["events"], ["agent", "list"]):
        plain = _run_in_terminal(["fleetctl", *args], {**env, "NO_COLOR": "1"}).decode()
        assert "ID" in plain or "AGENT" in plain
        assert not ANSI.search(plain), f"NO_COLOR: escape sequences in `fleetctl {' '.join(args)}`: {plain[:200]!r}"


def test_python_dash_m_fleetctl(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fleetctl", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == ""
    assert "Usage: python -m fleetctl" in done.stdout
    for command in ("task", "agent", "events", "dispatch", "sweep-timeouts", "db", "config", "init", "demo"):
        assert re.search(rf"^\s+{re.escape(command)}\s", done.stdout, re.M), command
    script = subprocess.run(["fleetctl", "--help"], capture_output=True, text=True, timeout=60)
    assert script.stdout.replace("Usage: fleetctl", "Usage: python -m fleetctl") == done.stdout


# ---------------------------------------------------------------------------------------------- events


def test_events_filters_and_json_lines(cli):
    from fleetctl import services
    from fleetctl.config import load_config
    from fleetctl.store import Store

    cfg = load_config()
    with Store.open(cfg.orchestrator.db_path) as store:  # an old task: two hours ago
        old = services.create_task(store, cfg.orchestrator, title="old", now=time.time() - 7200)["task_id"]
    a = cli("task", "create", "--title", "a").stdout.strip()
    b = cli("task", "create", "--title", "b").stdout.strip()
    cli("agent", "register", "builder-1", "--type", "codex-cli")
    cli("task", "cancel", a, "--reason", "not needed")

    def lines(*args: str) -> list[dict]:
        result = cli("events", "--json", *args)
        assert result.stderr == ""
        docs = [json.loads(line) for line in result.stdout.splitlines()]
        assert all(set(d) == EVENT_FIELDS for d in docs)
        return docs

    everything = lines()
    assert [(e["type"], e["task_id"] or e["agent_id"]) for e in everything] == [
        ("task.created", old), ("task.created", a), ("task.created", b), ("agent.registered", "builder-1"),
        ("task.cancelled", a),
    ]  # fmt: skip
    assert [e["id"] for e in everything] == sorted(e["id"] for e in everything)
    assert [e["type"] for e in lines("--task", a)] == ["task.created", "task.cancelled"]
    assert lines("--task", a)[1]["data"] == {"reason": "not needed"}
    assert {e["type"] for e in lines("--type", "task.*")} == {"task.created", "task.cancelled"}
    assert [e["agent_id"] for e in lines("--type", "agent.*")] == ["builder-1"]
    assert len(lines("--type", "task.created", "--type", "task.cancelled")) == 4
    assert lines("--agent", "builder-1")[0]["type"] == "agent.registered"
    assert old not in {e["task_id"] for e in lines("--since", "5m")} and len(lines("--since", "5m")) == 4
    assert len(lines("--since", "3h")) == 5 and len(lines("--since", "7200s")) == 4
    assert lines("--since", "2099-01-01T00:00:00Z") == []
    assert [e["task_id"] for e in lines("--since", "5m", "--type", "task.created")] == [a, b]
    assert [e["type"] for e in lines("--limit", "2")] == ["agent.registered", "task.cancelled"]
    table = cli("events", "--task", a).stdout
    assert table.split()[:5] == ["ID", "TIME", "TYPE", "TASK", "DETAIL"]
    assert "task.cancelled" in table and "not needed" in table and b not in table


# ---------------------------------------------------------------------------------------------- --config, help


def test_config_before_the_command_and_a_later_one_wins(runner, tmp_path):
    """Regression: ``fleetctl --config X task list`` was 'No such option: --config' (exit 2)."""
    from conftest import make_config

    a = make_config(tmp_path, orchestrator={"db_path": "a.db"}, name="a.toml")
    b = make_config(tmp_path, orchestrator={"db_path": "b.db"}, name="b.toml")
    made = runner.invoke(app, ["--config", str(a), "task", "create", "--title", "in a"])
    assert made.exit_code == 0, made.output
    task_id = made.stdout.strip()

    def listed(*args: str) -> list[str]:
        result = runner.invoke(app, [*args, "--json"])
        assert result.exit_code == 0, result.output
        return [t["task_id"] for t in json.loads(result.stdout)["items"]]

    assert listed("--config", str(a), "task", "list") == [task_id]
    assert listed(f"--config={a}", "task", "list") == [task_id]
    assert listed("-c", str(b), "task", "list") == []
    assert listed("--config", str(b), "task", "list", "--config", str(a)) == [task_id]  # the later one wins
    assert listed("task", "list", "--config", str(b)) == []
    assert not (tmp_path / "fleet.db").exists()  # the search order was never used
    shown = runner.invoke(app, ["--config", str(a), "config", "show", "--json"])
    assert json.loads(shown.stdout)["orchestrator"]["db_path"].endswith("a.db")


def test_config_before_the_command_keeps_the_slim_app():
    from fleetctl.cli import app_for

    slim = app_for(["--config", "x.toml", "task", "list"])
    assert [g.name for g in slim.registered_groups] == ["task"] and slim.registered_commands == []
    assert [c.name for c in app_for(["-c", "x.toml", "dispatch"]).registered_commands] == ["dispatch"]


def _all_paths():
    import typer

    def walk(cmd, path):
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def test_help_shows_argument_names_not_types(runner):
    """Regression: help read ``task show [OPTIONS] {task_id}`` and ``task_id <str>``."""
    for path in _all_paths():
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, path
        assert not re.search(r"\{\w+\}|<(str|int|path|list\[\w+\])>", result.stdout), (path, result.stdout)
    show = runner.invoke(app, ["task", "show", "--help"]).stdout
    assert "task show [OPTIONS] TASK_ID" in show and re.search(r"^\s+TASK_ID\s+The task id", show, re.M)
    assert "AGENT_ID" in runner.invoke(app, ["agent", "drain", "--help"]).stdout
    listing = runner.invoke(app, ["task", "list", "--help"]).stdout
    assert "--limit N" in listing and "--after CURSOR" in listing and "--config PATH" in listing
    assert "on any command" in listing
