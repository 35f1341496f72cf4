"""Every documented exit code (SPEC §5), each from a real ``fleetctl`` process.

0 ok, 1 operational, 2 usage or config, 3 not found, 4 conflict (invalid transition, lease lost),
6 receipt rejected, 130 interrupted. An error is one ``error: …`` message on stderr (a multi-problem
config error continues on indented lines), nothing on stdout, and never a traceback. Parser errors
(unknown option, bad option value) are one ``error: …`` line too, with a ``(try '… --help')`` hint, exit 2.
5 (remote failure) needs SSH/Forgejo/Matrix and is asserted with those adapters, not here.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time

import pytest

from fleetctl.errors import ExitCode


def assert_error(done: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Exit ``code``, nothing on stdout, one ``error: …`` message on stderr containing ``needles``."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stdout == ""
    first, *rest = done.stderr.splitlines()
    assert first.startswith("error: "), done.stderr
    assert all(line.startswith("  ") for line in rest), f"more than one message: {done.stderr!r}"
    for needle in needles:
        assert needle in done.stderr, (needle, done.stderr)
    return done.stderr


@pytest.fixture
def puller(fleet):
    """A configured fleet with a registered pull agent ``puller``."""
    fleet.configure()
    done = fleet.run("agent", "register", "puller", "--type", "codex-cli")
    assert done.returncode == 0, done.stderr
    return fleet


def event_count(fleet) -> int:
    return len(fleet.events())


def test_exit_codes_are_the_documented_ones():
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0, "ERROR": 1, "USAGE": 2, "NOT_FOUND": 3, "CONFLICT": 4, "REMOTE": 5, "VALIDATION": 6,
        "INTERRUPTED": 130,
    }  # fmt: skip


def test_0_success_prints_data_only(fleet):
    fleet.configure()
    done = fleet.run("task", "create", "--title", "Fix the flaky test")
    assert done.returncode == 0 and done.stderr == ""
    task_id = done.stdout.strip()
    listed = fleet.run("task", "list")
    assert listed.returncode == 0 and task_id in listed.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["task", "list", "--state", "bogus"], "unknown state 'bogus'"),
        (["task", "complete", "t-1", "--outcome", "maybe"], "--outcome must be success, failure or rate_limited"),
        (["task", "status", "t-1", "--status", "sleeping"], "--status must be running, progress or rate_limited"),
        (["events", "--since", "5x"], "--since '5x'"),
        (["agent", "register", "a1", "--type", "t", "--mode", "carrier-pigeon"], "mode must be http_pull or ssh_cli"),
        (["task", "create", "--title", "t", "--repo", "not-a-repo", "--issue", "1"], "invalid repository"),
        (["task", "create", "--title", "   "], "title must not be empty"),
    ],
)
def test_2_bad_values_checked_by_fleetctl(fleet, args, needle):
    fleet.configure()
    assert_error(fleet.run(*args), 2, needle)


@pytest.mark.parametrize(
    "args,needle,hint",
    [
        (["task", "list", "--limit", "-1"], "invalid value for '--limit'", "fleetctl task list --help"),
        (["task", "create"], "missing option '--title'", "fleetctl task create --help"),
        (["task", "list", "--frobnicate"], "no such option: --frobnicate", "fleetctl task list --help"),
        (["no-such-command"], "no such command 'no-such-command'", "fleetctl --help"),
        (["task", "show"], "missing argument 'TASK_ID'", "fleetctl task show --help"),
    ],
)
def test_2_parser_errors_are_one_line_with_a_hint(fleet, args, needle, hint):
    """Click's own usage errors read like fleetctl's: one ``error: …`` line (not a Usage block), exit 2."""
    fleet.configure()
    stderr = assert_error(fleet.run(*args), 2, needle, f"(try '{hint}')")
    assert len(stderr.splitlines()) == 1 and "Usage:" not in stderr


@pytest.mark.parametrize(
    "args,option,allowed",
    [
        (["task", "list", "--after", "9" * 30], "--after", "0 to 9223372036854775807"),
        (["task", "list", "--limit", "9" * 30], "--limit", "0 to 1000000"),
        (["events", "--limit", "9" * 30], "--limit", "0 to 1000000"),
        (["dispatch", "--limit", "9" * 30], "--limit", "0 to 1000000"),
        (["task", "create", "--title", "x", "--repo", "a/b", "--issue", "9" * 30], "--issue",
         "1 to 9223372036854775807"),
        (["task", "complete", "t-1", "--attempt", "9" * 30], "--attempt", "1 to 9223372036854775807"),
        (["task", "complete", "t-1", "--pr", "9" * 30], "--pr", "1 to 9223372036854775807"),
        (["task", "status", "t-1", "--attempt", "-" + "9" * 30], "--attempt", "1 to 9223372036854775807"),
        (["task", "run-ended", "t-1", "--attempt", "1", "--exit-code", "9" * 30], "--exit-code", "-2147483648 to 2147483647"),
        (["agent", "register", "a", "--type", "x", "--max-concurrency", "9" * 30], "--max-concurrency", "1 to 1000"),
    ],
)  # fmt: skip
def test_2_huge_integers_are_usage_errors_naming_the_range(fleet, args, option, allowed):
    """Regression: a 30-digit --after/--limit/--issue/--attempt ended in 'unexpected OverflowError', exit 1."""
    fleet.configure()
    stderr = assert_error(fleet.run(*args), 2, f"'{option}'", f"allowed: {allowed}")
    assert "OverflowError" not in stderr


def test_2_huge_fleet_attempt_in_the_environment_is_a_usage_error(fleet):
    fleet.configure()
    assert_error(fleet.run("task", "status", "t-1", env={"FLEET_ATTEMPT": "9" * 30}), 2, "$FLEET_ATTEMPT")


def test_2_bad_config_names_file_key_and_position(fleet):
    path = fleet.dir / "config.toml"
    path.write_text("[orchestrator]\ntask_timeout = 5\nretry_backoff_secs = -1\n")
    err = assert_error(fleet.run("task", "list"), 2, "2 configuration errors")
    assert f"{path}:2:1: orchestrator.task_timeout: unknown key (did you mean 'task_timeout_secs'?)" in err
    assert f"{path}:3:1: orchestrator.retry_backoff_secs" in err
    assert_error(fleet.run("task", "list", "--config", "missing.toml"), 2, "missing.toml: config file not found")
    path.write_text("[orchestrator\n")
    assert_error(fleet.run("dispatch"), 2, f"{path}:1:", "invalid TOML")
    assert not fleet.db.exists(), "a command with a bad config must not create the database"


def test_3_not_found(puller):
    assert_error(puller.run("task", "show", "t-0000000000"), 3, "no task 't-0000000000'")
    assert_error(puller.run("task", "cancel", "t-0000000000"), 3)
    assert_error(puller.run("task", "complete", "t-0000000000", "--attempt", "1"), 3)
    assert_error(puller.run("agent", "show", "ghost"), 3, "no agent 'ghost'")
    assert_error(puller.run("agent", "heartbeat", "ghost"), 3)


def test_4_cancel_a_completed_task(puller):
    task_id = puller.create("--title", "done soon")
    puller.claim(task_id, "puller")
    done = puller.run("task", "complete", task_id, "--attempt", "1", "--agent", "puller", "--summary", "did it")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [task_id, "completed"]
    before = event_count(puller)
    assert_error(puller.run("task", "cancel", task_id), 4, "completed")
    assert puller.task(task_id)["state"] == "completed"
    assert event_count(puller) == before


def test_4_lease_lost_changes_nothing_and_a_repeat_is_not_a_conflict(puller):
    task_id = puller.create("--title", "fenced")
    puller.claim(task_id, "puller")
    before = event_count(puller)
    assert_error(puller.run("task", "complete", task_id, "--attempt", "2", "--agent", "puller"), 4, "no longer holds")
    assert_error(puller.run("task", "complete", task_id, "--attempt", "1", "--agent", "impostor"), 4)
    # FLEET_ATTEMPT / FLEET_AGENT_ID are the defaults an agent's run relies on
    stale = puller.run("task", "complete", task_id, env={"FLEET_ATTEMPT": "7", "FLEET_AGENT_ID": "puller"})
    assert_error(stale, 4, "attempt 7")
    assert puller.task(task_id)["state"] == "assigned" and event_count(puller) == before
    ok = puller.run(
        "task", "complete", task_id, "--summary", "s", env={"FLEET_ATTEMPT": "1", "FLEET_AGENT_ID": "puller"}
    )
    assert ok.returncode == 0, ok.stderr
    again = puller.run(
        "task", "complete", task_id, "--summary", "s", env={"FLEET_ATTEMPT": "1", "FLEET_AGENT_ID": "puller"}
    )
    assert again.returncode == 0 and "repeat" in again.stdout
    assert [e["type"] for e in puller.events(task_id)].count("task.completed") == 1


def test_2_status_running_with_a_too_long_message_leaves_the_task_as_it_was(puller):
    """Regression: the CLI started the task in one transaction, then refused the message (exit 2, task running)."""
    task_id = puller.create("--title", "status")
    puller.claim(task_id, "puller")
    before = event_count(puller)
    done = puller.run("task", "status", task_id, "--status", "running", "--message", "x" * 5000,
                      "--attempt", "1", "--agent", "puller")  # fmt: skip
    assert_error(done, 2, "message")
    assert puller.task(task_id)["state"] == "assigned" and event_count(puller) == before


def test_6_receipt_without_a_required_pull_request(fleet):
    fleet.configure(forgejo={"url": "http://127.0.0.1:9", "require_pull_request": True})
    assert fleet.run("agent", "register", "puller", "--type", "codex-cli").returncode == 0
    task_id = fleet.create("--title", "needs a PR", "--repo", "owner/name", "--issue", "7")
    fleet.claim(task_id, "puller")
    done = fleet.run("task", "complete", task_id, "--attempt", "1", "--agent", "puller", "--summary", "no PR")
    assert_error(done, 6, "receipt rejected", "pull request is required")
    task = fleet.task(task_id)
    assert task["state"] == "queued" and task["failure_reason"] == "receipt_invalid"
    (attempt,) = fleet.attempts(task_id)
    assert attempt["failure_reason"] == "receipt_invalid" and attempt["receipt"]["summary"] == "no PR"
    (requeued,) = [e for e in fleet.events(task_id) if e["type"] == "task.requeued"]
    assert requeued["data"]["reason"] == "receipt_invalid"
    assert requeued["ts"] < task["not_before"] <= requeued["ts"] + 0.2  # backoff 0.2 s, with jitter
    # the next attempt (after its backoff) names the pull request; this Forgejo (port 9) cannot be asked, so
    # the receipt is stored as pending (exit 0, said on stderr) and the task keeps its state (SPEC §7.4)
    time.sleep(max(0.0, task["not_before"] - time.time()) + 0.01)
    fleet.claim(task_id, "puller")
    ok = fleet.run("task", "complete", task_id, "--attempt", "2", "--agent", "puller", "--pr", "12")
    assert ok.returncode == 0, ok.stderr
    assert "the receipt is stored and will be validated when Forgejo answers" in ok.stderr
    task = fleet.task(task_id)
    assert task["state"] == "assigned" and task["pull_request"] is None
    assert fleet.attempts(task_id)[1]["receipt_pending"] == 1


def test_1_db_check_finds_a_tampered_projection(puller):
    task_id = puller.create("--title", "honest title")
    puller.check_db()
    conn = sqlite3.connect(puller.db)
    with conn:
        conn.execute("UPDATE tasks SET title='forged' WHERE task_id=?", (task_id,))
    conn.close()
    done = puller.run("db", "check")
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    assert done.stdout.startswith("FAILED")
    assert f"problem: tasks {task_id}: title: replayed 'honest title' != stored 'forged'" in done.stderr


def test_1_corrupt_database_file(fleet):
    fleet.configure()
    fleet.db.write_bytes(b"this is not a database" * 100)
    assert_error(fleet.run("task", "list"), 1, "corrupt or not a SQLite database")
    assert_error(fleet.run("db", "check"), 1)


def test_1_store_locked_past_busy_timeout_writes_nothing(puller):
    """SPEC §12: a store locked past busy_timeout (5 s) is exit 1 and no partial state."""
    before = event_count(puller)
    holder = sqlite3.connect(puller.db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        done = puller.run("task", "create", "--title", "blocked")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_error(done, 1, "stayed locked", "nothing was written")
    assert event_count(puller) == before
    assert puller.query("SELECT count(*) AS n FROM tasks")[0]["n"] == 0


def test_130_interrupted_follow(fleet):
    fleet.configure()
    first = fleet.create("--title", "before following")
    proc = fleet.popen("events", "--follow", "--json", "--type", "task.*")
    assert first in proc.stdout.readline()  # the backlog is printed and flushed: it is now following
    second = fleet.create("--title", "while following")
    assert second in proc.stdout.readline()  # new events arrive while it follows
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip() == "interrupted" and "Traceback" not in out + err
