"""Hostile identifiers and text (SPEC §6 ids, §12): ids that could reach a path, a shell or an option
parser are refused with exit 2 and nothing written; titles, bodies and labels full of shell syntax are
stored verbatim and reach the agent's prompt byte for byte, never through a shell."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetctl.cli import app
from fleetctl.errors import UsageError
from fleetctl.ids import ID_RE, branch_problem, check_id, check_task_id, new_task_id

BAD_IDS = [
    "../x", "..", ".", ".hidden", "a/b", "/etc/passwd", "a\0b", "a\nb", "a\rb", ";rm -rf /", "$(id)", "`id`",
    "a b", " a", "a\t", "-x", "--help", "x" * 129, "", "naïve", "a:b", "a*", "a'b", 'a"b', "a\\b",
]  # fmt: skip
#: A sample of BAD_IDS for the commands that only read or act on an existing id.
SAMPLE = ["../x", "..", "a\nb", "-x", "$(id)", "x" * 129]


def snapshot(tmp_path: Path) -> tuple:
    """Every row of the database, and every path under tmp_path except SQLite's -wal/-shm side files."""
    import sqlite3

    conn = sqlite3.connect(tmp_path / "fleet.db")
    try:
        rows = [conn.execute(f"SELECT * FROM {t}").fetchall() for t in ("events", "tasks", "agents", "attempts")]
    finally:
        conn.close()
    paths = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if not p.name.endswith(("-wal", "-shm"))}
    return rows, paths


@pytest.fixture
def refused(runner, write_config, tmp_path):
    """``refused(*args)``: the command exits 2 with one ``error:`` line and writes nothing; its stderr."""
    write_config()
    assert runner.invoke(app, ["task", "create", "--title", "seed", "--id", "seed-1"]).exit_code == 0
    assert runner.invoke(app, ["agent", "register", "seed-agent", "--type", "t"]).exit_code == 0

    def check(*args: str) -> str:
        before = snapshot(tmp_path)
        result = runner.invoke(app, list(args))
        assert result.exit_code == 2, (args, result.stdout, result.stderr, result.exception)
        assert result.stdout == "" and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, args
        assert snapshot(tmp_path) == before, f"{args!r} wrote something"
        return result.stderr

    yield check
    assert runner.invoke(app, ["db", "check"]).exit_code == 0


def test_bad_ids_are_refused_by_create_and_register(refused):
    for bad in BAD_IDS:
        assert "invalid task id" in refused("task", "create", "--title", "t", f"--id={bad}"), repr(bad)
        assert "invalid agent id" in refused("agent", "register", "--type", "t", "--", bad), repr(bad)


@pytest.mark.parametrize(
    "command",
    [
        ["task", "show"], ["task", "cancel"], ["task", "retry"], ["task", "complete"], ["task", "status"],
        ["task", "run-ended", "--attempt", "1", "--exit-code", "0"], ["agent", "show"], ["agent", "heartbeat"],
        ["agent", "drain"], ["agent", "deregister"],
    ],
    ids=lambda c: " ".join(c[:2]),
)  # fmt: skip
def test_bad_ids_are_refused_by_every_command_that_takes_one(refused, command):
    what = "invalid task id" if command[0] == "task" else "invalid agent id"
    for bad in SAMPLE:
        assert what in refused(*command, "--", bad), repr(bad)


@pytest.mark.parametrize(
    "args",
    [
        ["task", "create", "--title", "nul\0byte"],
        ["task", "create", "--title", "t", "--body", "nul\0byte"],
        ["task", "create", "--title", "t", "--label", "new\nline"],
        ["task", "create", "--title", "t", "--label", "   "],
        ["task", "create", "--title", "t", "--repo", "../etc", "--issue", "1"],
        ["task", "create", "--title", "t", "--repo", "a/b;rm", "--issue", "1"],
        ["agent", "register", "a1", "--type", "t", "--capability", "has space"],
    ],
    ids=["title-nul", "body-nul", "label-newline", "label-blank", "repo-dotdot", "repo-semicolon", "cap-space"],
)
def test_bad_text_is_refused(refused, args):
    refused(*args)


def test_edge_ids_that_are_fine(runner, write_config):
    write_config()
    for good in ("x" * 128, "a.b_c-D9", "9", "A-", "a.lockb", "a.LOCK"):
        result = runner.invoke(app, ["task", "create", "--title", "t", "--id", good, "--json"])
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["task_id"] == good
        shown = runner.invoke(app, ["task", "show", good, "--json"])
        assert json.loads(shown.stdout)["task_id"] == good
    assert runner.invoke(app, ["db", "check"]).exit_code == 0


# ------------------------------------------------------------------------------------- ids as git branches
# issue 6: `fix..parser`, `bump.lock`, `release.` were accepted, and every run of such a task was told to push to
# a branch fleet/<task-id> that git refuses. The rule is proven against the real `git check-ref-format`.

GIT = shutil.which("git")


def git_accepts_branch(task_id: str) -> bool:
    assert GIT, "git is needed to prove the branch rule"
    return subprocess.run([GIT, "check-ref-format", f"fleet/{task_id}"], capture_output=True).returncode == 0


REF_TABLE = [
    # refused by git: the cases from the issue, then every rule reachable with [A-Za-z0-9._-]
    ("fix..parser", False), ("bump.lock", False), ("release.", False), ("a..", False), ("a...b", False),
    ("x-.", False), ("a_.lock", False), ("v1.2.lock", False), ("a" * 123 + ".lock", False),
    # accepted by git
    ("t-3f9a1c2b7e", True), ("fix-parser", True), ("v1.2.3", True), ("a.lockb", True), ("a.lock.b", True),
    ("a.LOCK", True), ("lock", True), ("a.-b", True), ("A-", True), ("a_", True), ("9", True), ("x" * 128, True),
    ("a-.b", True), ("a._b", True),
]  # fmt: skip


@pytest.mark.parametrize(("task_id", "valid"), REF_TABLE, ids=[t for t, _ in REF_TABLE])
def test_task_id_rule_matches_git_check_ref_format(task_id, valid):
    assert ID_RE.match(task_id)  # all in the id charset: only the branch rule decides
    assert git_accepts_branch(task_id) is valid  # the table is git's verdict, not an assumption
    if valid:
        assert check_task_id(task_id) == task_id
    else:
        with pytest.raises(UsageError) as info:
            check_task_id(task_id)
        assert info.value.code == "invalid_id" and info.value.exit_code == 2
        message = info.value.message
        assert message.startswith(f"invalid task id {task_id!r}: git cannot use it in the branch fleet/<task-id>")
        assert "must not contain '..' or end with '.' or '.lock'" in message


@pytest.mark.parametrize("task_id", [".hidden", "..", ".", "-x", "a/b", ""])
def test_ids_outside_the_charset_or_start_are_refused_before_the_branch_rule(task_id):
    with pytest.raises(UsageError, match="invalid task id"):
        check_task_id(task_id)


@settings(max_examples=150, deadline=None)
@given(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z"))
def test_any_id_in_the_charset_is_accepted_exactly_when_git_accepts_its_branch(task_id):
    assert (branch_problem(task_id) is None) is git_accepts_branch(task_id), task_id


def test_generated_task_ids_are_always_valid_branches():
    ids = [new_task_id() for _ in range(200)]
    assert len(set(ids)) == 200
    for task_id in ids:
        assert check_task_id(task_id) == task_id
    assert all(git_accepts_branch(task_id) for task_id in ids[:20])


def test_lookups_still_take_ids_made_before_the_branch_rule():
    assert check_id("fix..parser", "task id") == "fix..parser"  # show/cancel/retry of an old task keep working


# ---------------------------------------------------------------------------------------------- verbatim

TITLE = """Fix "quoted" & 'single' $(touch PWNED1) `touch PWNED2`; touch PWNED3 | tee PWNED4 > /dev/null {task_id} %s"""
BODY = (
    "Line one with $HOME and ${PATH} and $$ and !!\n"
    "  indented \"double\" 'single' `back` \\backslash\\ C:\\temp\\new\n"
    "\ttab, unicode: naïve — ✓ 🚀, braces {title} }{ {0} %(x)s\n"
    "'; DROP TABLE tasks; --\n"
    "$(touch PWNED5)\n"
    "trailing spaces   \n\n"
)
LABELS = ["a;b", "$(touch PWNED6)", '"quoted"', "it's", "x|y&z", "{braces}", "back`tick", "glob*?[x]"]

#: Copies the prompt it was given (path, stdin or one argument) to DEST, byte for byte.
COPY_PROMPT = """\
import os, sys
mode, dest = sys.argv[1], sys.argv[2]
if mode == "file":
    data = open(sys.argv[3], "rb").read()
elif mode == "stdin":
    data = sys.stdin.buffer.read()
else:
    data = os.fsencode(sys.argv[3])
with open(dest + ".tmp", "wb") as fh:
    fh.write(data)
with open(dest + ".argc", "w") as fh:
    fh.write(str(len(sys.argv)))
os.rename(dest + ".tmp", dest)
"""


def test_hostile_text_is_stored_verbatim_and_reaches_the_prompt_byte_for_byte(fleet, tmp_path):
    from fleetctl.prompt import render_prompt

    script = tmp_path / "copy_prompt.py"
    script.write_text(COPY_PROMPT)
    modes = ("file", "stdin", "arg")
    fleet.configure(
        agents=[{"agent_type": f"copy-{m}", "agent_id": f"copier-{m}", "capabilities": [f"prompt:{m}"]} for m in modes],
        agent_types={
            f"copy-{m}": {"command": ["{python}", str(script), m, str(tmp_path / f"prompt-{m}.out")], "prompt": m}
            for m in modes
        },
    )
    tasks = {}
    for m in modes:
        args = ["--title", TITLE, "--body", BODY, "--label", f"agent:prompt:{m}", "--label", "retries:0"]
        tasks[m] = fleet.create(*args, *[a for label in LABELS for a in ("--label", label)])
        stored = json.loads(fleet.run("task", "show", tasks[m], "--json").stdout)
        assert (stored["title"], stored["body"]) == (TITLE, BODY)
        assert stored["labels"] == [f"agent:prompt:{m}", "retries:0", *LABELS]
    dispatched = fleet.run("dispatch", "--json")
    assert dispatched.returncode == 0, dispatched.stderr
    assert len(json.loads(dispatched.stdout)["launched"]) == 3

    for m in modes:
        out = tmp_path / f"prompt-{m}.out"
        fleet.wait_state(tasks[m], "failed")  # exit 0 without a receipt: no_receipt, no retries left
        task = fleet.task(tasks[m])
        assert task["failure_reason"] == "no_receipt"
        expected = render_prompt(task, 1).encode()
        assert TITLE.encode() in expected and BODY.encode() in expected
        assert ", ".join([f"agent:prompt:{m}", "retries:0", *LABELS]).encode() in expected
        got = out.read_bytes()
        if m == "arg":  # one argument, exactly, trailing newlines included
            assert (tmp_path / f"prompt-{m}.out.argc").read_text() == "4"
        assert got == expected
        ws = Path(fleet.attempts(tasks[m])[0]["workspace"])
        assert ws == tmp_path / "ws" / tasks[m] / "1"
        assert (ws / ".fleet" / "prompt.md").read_bytes() == expected
    pwned = [p for p in tmp_path.rglob("PWNED*")] + [p for p in Path("/tmp").glob("PWNED*")]
    assert pwned == [], "text from a task reached a shell"
    fleet.check_db()


@pytest.mark.parametrize("bad", ["fix..parser", "bump.lock", "release."])
def test_create_refuses_ids_git_cannot_branch(refused, bad):
    assert "git cannot use it in the branch" in refused("task", "create", "--title", "t", f"--id={bad}")


@pytest.mark.parametrize("label", ["timeout:30x", "retries:-1", "priority:abc", "timeout:0"])
def test_create_refuses_a_knob_label_that_does_not_parse(refused, label):
    assert label in refused("task", "create", "--title", "t", "--label", label)


def test_create_warns_of_a_label_that_looks_like_a_misspelt_requirement(fleet):
    fleet.configure()
    done = fleet.run("task", "create", "--title", "t", "--label", "agnet:code:rust")
    assert done.returncode == 0 and done.stdout.strip()
    assert "warning:" in done.stderr and "agent:code:rust" in done.stderr
