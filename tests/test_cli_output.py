"""What people read (issue 6, rough edges): tables at 80 columns keep ids whole and drop low-value columns
first, piped output is never cut or padded, no Python reprs, one event format for the backlog and
--follow, plurals, the backoff a queued task waits out, --type checked against the known event types,
and agent resume / the deregister of a config-defined agent. In-process tests run at COLUMNS=80."""

from __future__ import annotations

import json
import os
import re
import select
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleetctl.cli import app
from fleetctl.cli.events import known_event_types

LONG_AGENT = "local.myagent-with-a-long-name"
LONG_TITLE = "Port the command line parser to the new argument model and keep every old flag working"


@pytest.fixture
def narrow(fleet):
    """Invoke the app at 80 columns (or piped: ``cols=None``) against a configured fleet."""
    fleet.configure(orchestrator={"retry_backoff_secs": 600, "retry_backoff_max_secs": 600})

    def invoke(*args: str, cols: int | None = 80, ok: bool = True):
        env = {"NO_COLOR": "1", "COLUMNS": str(cols) if cols else None}
        result = CliRunner(env=env).invoke(app, list(args))
        if ok:
            assert result.exit_code == 0, (args, result.output, result.exception)
        return result

    invoke.fleet = fleet
    return invoke


def _claimed(narrow, title: str = LONG_TITLE) -> str:
    fleet = narrow.fleet
    task_id = narrow("task", "create", "--title", title, "-l", "agent:code:python").stdout.strip()
    narrow("agent", "register", LONG_AGENT, "--type", "codex-cli", "-C", "code:python", "-C", "docs")
    fleet.claim(task_id, LONG_AGENT, ("code:python", "docs"))
    return task_id


def test_task_list_at_80_columns_keeps_ids_whole(narrow):
    """Regression: titles were squeezed to 2-4 characters and ids cut (``local.myagen``)."""
    task_id = _claimed(narrow)
    out = narrow("task", "list").stdout
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), out
    assert task_id in out and LONG_AGENT in out
    header, row = lines[0].split(), lines[1]
    assert header[:2] == ["ID", "STATE"] and "TITLE" in header and "UPDATED" not in header  # dropped first
    title = row.split(LONG_AGENT, 1)[1].strip() if "AGENT" in header else row
    assert len(title) >= 24 and title.endswith("…") and LONG_TITLE.startswith(title[:-1].split("  ")[-1])


def test_piped_output_is_never_cut_or_padded(narrow):
    task_id = _claimed(narrow)
    out = narrow("task", "list", cols=None).stdout
    assert LONG_TITLE in out and task_id in out and "UPDATED" in out.splitlines()[0]
    assert all(line == line.rstrip() for line in out.splitlines()), out
    shown = narrow("task", "show", task_id, cols=None).stdout
    assert all(line == line.rstrip() for line in shown.splitlines())


def test_agent_list_and_show_print_no_python_reprs(narrow):
    _claimed(narrow)
    for args in (("agent", "list"), ("agent", "show", LONG_AGENT), ("agent", "list", "--capability", "docs")):
        out = narrow(*args).stdout
        assert "code:python, docs" in out and "['" not in out and "None" not in out, (args, out)
        assert LONG_AGENT in out
    shown = narrow("agent", "show", LONG_AGENT).stdout
    assert re.search(r"^capabilities\s+code:python, docs$", shown, re.M), shown
    assert re.search(r"^running\s+1$", shown, re.M), shown


def test_task_show_never_prints_none(narrow):
    """Regression: a PR receipt on a task without a repository showed ``None#12``."""
    task_id = _claimed(narrow)
    done = narrow("task", "complete", task_id, "--attempt", "1", "--pr", "12", "--summary", "opened", ok=False)
    assert done.exit_code in (0, 6), done.output
    shown = narrow("task", "show", task_id).stdout
    assert "None" not in shown and "[" not in shown.split("events")[0], shown
    assert all(len(line) <= 80 for line in shown.splitlines()), shown


def test_task_list_shows_the_backoff_a_queued_task_waits_out(narrow):
    task_id = _claimed(narrow)
    narrow("task", "complete", task_id, "--attempt", "1", "--outcome", "failure", "--summary", "flaky")
    doc = json.loads(narrow("task", "show", task_id, "--json").stdout)
    assert doc["state"] == "queued" and doc["not_before"]
    out = narrow("task", "list").stdout
    assert "BACKOFF" in out.splitlines()[0]
    assert re.search(r"until \d\d:\d\d:\d\d \(in \d+m\)", out), out
    shown = narrow("task", "show", task_id).stdout
    assert re.search(r"^not before\s+\S+Z \(waits out a retry backoff: in \d+m\)$", shown, re.M), shown
    narrow("task", "cancel", task_id)
    narrow("task", "create", "--title", "no wait")
    assert "BACKOFF" not in narrow("task", "list").stdout  # only when a listed task waits


def test_plural_grammar(narrow):
    narrow("agent", "register", "solo", "--type", "x")
    out = narrow("db", "check").stdout
    assert "1 agent," in out and "0 tasks" in out and "0 attempts" in out and "1 events" not in out, out


# ---------------------------------------------------------------------------------------------- events


def test_events_type_must_be_known(narrow):
    result = narrow("events", "--type", "bogus", ok=False)
    assert result.exit_code == 2 and result.stdout == ""
    assert "unknown event type 'bogus'" in result.stderr and "task.progress" in result.stderr
    assert "agent.registered" in result.stderr
    assert narrow("events", "--type", "task.*").exit_code == 0
    assert narrow("events", "--type", "task.progress").exit_code == 0
    assert narrow("events", "--type", "nothing.*", ok=False).exit_code == 2


def _emitted_types() -> set[str]:
    """Every event type written anywhere in fleetctl/ (literal ``emit("x.y"``, or an f-string over an enum)."""
    from fleetctl.states import AgentStatus, Transition

    found: set[str] = set()
    root = Path(__file__).resolve().parent.parent / "fleetctl"
    for path in root.rglob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r"\.emit\(\s*\"([a-z_]+\.[a-z_]+)\"", text))
        if re.search(r"\.emit\(\s*f\"task\.\{kind\.value\}\"", text):
            found |= {f"task.{t.value}" for t in Transition}
        if re.search(r"\.emit\(\s*f\"agent\.\{status\.value\}\"", text):
            found |= {f"agent.{s.value}" for s in AgentStatus}
        dynamic = re.findall(r"\.emit\(\s*f\"([^\"]+)\"", text)
        assert set(dynamic) <= {"task.{kind.value}", "agent.{status.value}"}, (path, dynamic)
    return found


def test_every_emitted_event_type_is_known():
    emitted = _emitted_types()
    assert {"task.created", "task.progress", "agent.registered", "task.started"} <= emitted
    assert emitted - set(known_event_types()) == set()


def test_events_backlog_and_follow_share_one_format(fleet):
    fleet.configure()
    fleet.create("--title", "before")
    proc = fleet.popen("events", "--follow")
    fd, buffer = proc.stdout.fileno(), [b""]

    def line(timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in buffer[0] and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                buffer[0] += os.read(fd, 65536)
        if b"\n" not in buffer[0]:
            pytest.fail("events --follow printed nothing")
        first, buffer[0] = buffer[0].split(b"\n", 1)
        return first.decode()

    header, backlog = line(), line()
    assert header.split() == ["ID", "TIME", "TYPE", "TASK", "DETAIL"]
    fleet.create("--title", "after")
    followed = line()
    shape = re.compile(r"^\s*\d+  \d\d-\d\d \d\d:\d\d:\d\d  task\.created {8}  t-[0-9a-f]{10}  '(before|after)' needs")
    assert shape.match(backlog) and shape.match(followed), (backlog, followed)
    assert [m.start() for m in re.finditer(r"  \S", backlog)][:4] == [
        m.start() for m in re.finditer(r"  \S", followed)
    ][:4]
    proc.kill()


# ---------------------------------------------------------------------------------------------- agents


def test_agent_resume_brings_a_drained_agent_back(narrow):
    narrow("agent", "register", "puller", "--type", "x")
    assert narrow("agent", "drain", "puller").stdout.strip() == "puller draining"
    assert narrow("agent", "resume", "puller").stdout.strip() == "puller online"
    assert narrow("agent", "resume", "puller").stdout.strip() == "puller online"  # no-op
    events = [e["type"] for e in narrow.fleet.events() if e["agent_id"] == "puller"]
    assert events.count("agent.online") == 1 and events.count("agent.draining") == 1
    narrow("agent", "deregister", "puller")
    offline = narrow("agent", "resume", "puller", ok=False)
    assert offline.exit_code == 4 and "offline" in offline.stderr


def test_deregistering_a_config_agent_is_refused_with_a_hint(narrow):
    narrow("dispatch")  # brings the config's agents (local-ok) into the registry
    result = narrow("agent", "deregister", "local-ok", ok=False)
    assert result.exit_code == 4 and result.stdout == ""
    assert "configuration" in result.stderr and "fleetctl agent drain local-ok" in result.stderr
    assert "config" in narrow("agent", "deregister", "--help").stdout


def test_pull_request_text_never_says_none():
    from fleetctl.cli.render import pull_request_text

    assert pull_request_text({"kind": "pull_request", "number": 12, "repo": None}) == "#12"
    assert pull_request_text({"number": 12, "repo": "acme/tool"}) == "acme/tool#12"
    assert pull_request_text(None) == ""


def test_table_lines_drop_columns_by_value_and_never_cut_ids():
    from fleetctl.cli._common import Col, table_lines

    cols = [Col("ID", "id"), Col("LOW", drop=9), Col("MID", drop=5), Col("TITLE", "text", min=10)]
    rows = [["x" * 30, "low value", "middle", "t" * 100]]
    assert table_lines(cols, rows, None)[1] == "  ".join(rows[0])  # piped: everything, nothing cut
    narrow = table_lines(cols, rows, 60)
    assert narrow[0].split() == ["ID", "MID", "TITLE"] and "x" * 30 in narrow[1] and len(narrow[1]) == 60
    tight = table_lines(cols, rows, 20)  # too narrow for anything: the id still stands whole
    assert tight[0].split() == ["ID", "TITLE"] and "x" * 30 in tight[1]
    assert table_lines(["A", "B"], [[["p", "q"], None]], 80) == ["A     B", "p, q"]
