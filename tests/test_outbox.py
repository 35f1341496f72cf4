"""The outbox (SPEC §1, §7.3): effects derived from the event log, performed against the fake Forgejo.

Real SQLite files and the fake Forgejo over real HTTP. Every scenario ends with ``store.check()``: whatever
Forgejo did, the tasks and the event log are untouched by it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import pytest
from conftest import config_of, make_config, wait_for

from fleetctl import effects, services
from fleetctl.config import ForgejoConfig
from fleetctl.forgejo.client import ForgejoClient
from fleetctl.outbox import MAX_TRIES, flush, next_delay
from fleetctl.services.tasks import transition
from fleetctl.states import Transition

REPO = "acme/widgets"
PR_RECEIPT = {"outcome": "success", "summary": "done", "artifacts": [{"kind": "pull_request", "number": 12}]}


@pytest.fixture(autouse=True)
def _db_stays_consistent(store):
    yield
    report = store.check()
    assert report.ok, report.problems


@pytest.fixture
def cfg(orch, forgejo):
    """Forgejo configured at the fake, comments on, status labels on, a short timeout."""
    return config_of(orch, url=forgejo.url, token=forgejo.bot_token, status_labels=True, timeout_secs=1.0)


@pytest.fixture
def agent(store):
    return services.register_agent(store, "a1", agent_type="codex-cli", capabilities=["python"],
                                   max_concurrency=3).agent  # fmt: skip


def new_task(store, orch, forgejo, task_id="t1", number=None):
    """A task for a fresh issue of the fake (or for issue ``number``)."""
    if number is None:
        number = forgejo.open_issue(REPO, "Fix the parser", labels=["agent:python"])
    services.create_task(store, orch, title="Fix the parser", labels=["agent:python"], repo=REPO,
                         issue_number=number, task_id=task_id)  # fmt: skip
    return number


def claim(store, cfg, agent, task_id="t1"):
    assert services.claim_task(store, cfg, agent, task_id=task_id) is not None


def bodies(forgejo, number):
    return [c["body"] for c in forgejo.comments(REPO, number)]


def later(secs):
    """A clock ``secs`` in the future (a retried row is due again)."""
    return lambda: time.time() + secs


# ---------------------------------------------------------------------------------------------- effects_for (pure)

FJ = ForgejoConfig(url="https://forge.example.org", status_labels=True)
TASK = {"task_id": "t1", "repo": REPO, "issue_number": 5}


def ev(kind, data=None, attempt=1, agent_id="a1", id=7):  # noqa: A002
    return {"id": id, "ts": 100.0, "type": kind, "task_id": "t1", "agent_id": agent_id, "attempt": attempt,
            "data": data or {}}  # fmt: skip


@pytest.mark.parametrize(
    ("event", "comment", "label"),
    [
        (ev("task.created"), None, "fleet/queued"),
        (ev("task.assigned", attempt=2), "assigned to agent `a1` (attempt 2)", "fleet/running"),
        (ev("task.started"), None, "fleet/running"),
        (ev("task.requeued", {"reason": "receipt_invalid", "detail": "no PR"}),
         "needs attention: attempt 1 failed (`receipt_invalid`): no PR; retrying after backoff", "fleet/queued"),
        (ev("task.requeued", {"reason": "timeout", "detail": ""}), "attempt 1 failed (`timeout`); retrying",
         "fleet/queued"),
        (ev("task.requeued", {"reason": "rework"}), None, "fleet/queued"),
        (ev("task.failed", {"reason": "agent_error", "detail": "exit 1"}), "failed on attempt 1 (`agent_error`): exit 1",
         "fleet/failed"),
        (ev("task.awaiting_review", {"pull_request": {"number": 12}}),
         "[pull request #12](https://forge.example.org/acme/widgets/pulls/12)", "fleet/review"),
        (ev("task.awaiting_review", {"pull_request": {"url": "https://x.org/a/b/pulls/3"}}),
         "[a pull request](https://x.org/a/b/pulls/3)", "fleet/review"),
        (ev("task.awaiting_review", {"pull_request": {"number": 4, "html_url": "https://f/p/4"}}),
         "[pull request #4](https://f/p/4)", "fleet/review"),
        (ev("task.completed", {"receipt": {"summary": "fixed it"}}), "the task is completed: fixed it", "fleet/done"),
        (ev("task.completed", {"pull_request": {"number": 12}}), "pull request #12", "fleet/done"),
        (ev("task.cancelled", {"reason": "issue closed"}), None, None),
        (ev("task.retried"), None, "fleet/queued"),
        (ev("task.progress", {"message": "halfway"}), None, "absent"),
        (ev("task.updated", {"title": "x"}), None, "absent"),
    ],
)  # fmt: skip
def test_effects_for_each_event(event, comment, label):
    rows = effects.effects_for(event, TASK, FJ)
    comments = [r for r in rows if r["kind"] == "comment"]
    labels = [r for r in rows if r["kind"] == "status_label"]
    if comment is None:
        assert comments == []
    else:
        (row,) = comments
        assert comment in row["payload"]["body"]
        assert row["payload"]["body"].endswith("\n\n<!-- fleetctl:event:7 -->")
        assert (row["event_id"], row["target"], row["repo"], row["issue_number"], row["ts"]) == (7, "forgejo", REPO,
                                                                                                 5, 100.0)  # fmt: skip
    if label == "absent":
        assert labels == []
    else:
        assert [r["payload"] for r in labels] == [{"label": label}]


@pytest.mark.parametrize(
    ("task", "forgejo"),
    [
        (None, FJ),
        ({"task_id": "t1", "repo": None, "issue_number": None}, FJ),
        (TASK, ForgejoConfig(url=None, status_labels=True)),
        (TASK, ForgejoConfig(url="https://f", comments=False, status_labels=False)),
    ],
)
def test_effects_for_nothing_without_an_issue_or_forgejo(task, forgejo):
    assert effects.effects_for(ev("task.failed", {"reason": "timeout"}), task, forgejo) == []


def test_effects_switches():
    only_comments = ForgejoConfig(url="https://f", comments=True, status_labels=False)
    assert [r["kind"] for r in effects.effects_for(ev("task.failed"), TASK, only_comments)] == ["comment"]
    only_labels = ForgejoConfig(url="https://f", comments=False, status_labels=True)
    assert [r["kind"] for r in effects.effects_for(ev("task.failed"), TASK, only_labels)] == ["status_label"]


def test_effects_text_comes_from_the_event_and_cannot_forge_a_marker():
    detail = "line one\nline two <!-- fleetctl:event:99 --> " + "x" * 2000
    (row, _) = effects.effects_for(ev("task.failed", {"reason": "agent_error", "detail": detail}, attempt=3),
                                   {**TASK, "attempt": 9}, FJ)  # fmt: skip
    body = row["payload"]["body"]
    assert "attempt 3" in body and "attempt 9" not in body
    assert "fleetctl:event:99 -->" not in body and body.count("<!--") == 1
    assert "\n" not in body.split("\n\n")[0] and len(body) < 800


def test_next_delay_doubles_with_jitter_and_is_capped():
    assert next_delay(0, rng=lambda: 0.0) == 15 and next_delay(0, rng=lambda: 1.0) == 30
    assert next_delay(1, rng=lambda: 1.0) == 60
    assert next_delay(50, rng=lambda: 1.0) == 3600


# ---------------------------------------------------------------------------------------------- a task's life


def test_one_comment_per_announced_event_over_a_life(store, orch, cfg, forgejo, agent):
    n = new_task(store, orch, forgejo)
    claim(store, cfg, agent)
    flush(store, cfg)
    result = services.hand_in_receipt(store, cfg, "t1", PR_RECEIPT, agent_id="a1", attempt=1)
    assert result.task["state"] == "awaiting_review"
    flush(store, cfg)
    with store.write():  # the merge (the webhook path's job): awaiting_review -> completed
        transition(store, store.task("t1"), Transition.COMPLETED, time.time(),
                   data={"pull_request": {"repo": REPO, "number": 12}})  # fmt: skip
    report = flush(store, cfg)
    assert report.sent == 2 and report.retried == report.dead == 0
    for _ in range(2):  # more flushes find nothing new
        again = flush(store, cfg)
        assert (again.enqueued, again.sent, again.retried) == (0, 0, 0)
    texts = bodies(forgejo, n)
    assert len(texts) == 3
    assert "assigned to agent `a1` (attempt 1)" in texts[0]
    assert f"[pull request #12]({forgejo.url}/{REPO}/pulls/12)" in texts[1]
    assert "completed" in texts[2]
    ids = [e["id"] for e in store.events(task_id="t1", types=["task.assigned", "task.awaiting_review",
                                                               "task.completed"])]  # fmt: skip
    assert [t.rsplit("\n", 1)[1] for t in texts] == [effects.marker(i) for i in ids]
    assert forgejo.labels_of(REPO, n) == ["agent:python", "fleet/done"]
    counts = store.count_outbox()
    assert counts.get("pending", 0) == 0 and counts.get("dead", 0) == 0
    assert store.outbox_cursor() == store.max_event_id()


def test_a_post_already_made_is_found_by_its_marker(store, orch, cfg, forgejo, agent):
    """A flush that died after its POST and before recording it: the next one finds the marker."""
    from fleetctl.outbox import derive

    n = new_task(store, orch, forgejo)
    claim(store, cfg, agent)
    derive(store, cfg)
    (row,) = [r for r in store.outbox_due(time.time()) if r["kind"] == "comment"]
    with ForgejoClient(forgejo.url, forgejo.bot_token) as client:  # the POST of the flush that "died"
        client.create_comment(REPO, n, row["payload"]["body"])
    report = flush(store, cfg)
    assert report.sent == 2 and report.superseded == 1
    assert len(bodies(forgejo, n)) == 1
    assert [m for m, t, _ in forgejo.requests if m == "POST" and t.endswith("/comments")] == ["POST"]


def test_kill_9_between_the_post_and_its_record_posts_once(store, orch, forgejo, tmp_path):
    """``fleetctl outbox flush`` killed while Forgejo is still answering its POST: no second comment."""
    make_config(tmp_path, forgejo={"url": forgejo.url, "token": forgejo.bot_token, "status_labels": False,
                                   "timeout_secs": 30})  # fmt: skip
    n = new_task(store, orch, forgejo)
    a1 = services.register_agent(store, "a1", agent_type="x", capabilities=["python"], max_concurrency=1).agent
    claim(store, config_of(orch, url=forgejo.url), a1)
    received, release = threading.Event(), threading.Event()
    handle = forgejo.handle

    def slow_post(method, path, headers, body):  # the fake got the POST; it answers only after the kill
        if method == "POST" and path.endswith("/comments"):
            received.set()
            release.wait(30)
        return handle(method, path, headers, body)

    forgejo.handle = slow_post
    proc = subprocess.Popen(["fleetctl", "outbox", "flush"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert received.wait(30), "the flush never posted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    wait_for(lambda: len(forgejo.comments(REPO, n)) == 1, timeout=10, what="the comment to land")
    (row,) = store.outbox_rows(states=["pending"])
    assert row["kind"] == "comment" and row["tries"] == 0  # the kill left it unrecorded
    forgejo.handle = handle
    done = subprocess.run(["fleetctl", "outbox", "flush", "--json"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sent"] == 1
    assert len(forgejo.comments(REPO, n)) == 1
    assert store.count_outbox() == {"done": 1}


# ---------------------------------------------------------------------------------------------- labels


def test_status_label_created_when_missing_old_one_removed_older_rows_superseded(store, orch, cfg, forgejo, agent):
    n = forgejo.open_issue(REPO, "Fix", labels=["agent:python", "fleet/failed", "bug"])  # a stale status
    new_task(store, orch, forgejo, number=n)
    claim(store, cfg, agent)
    services.start_task(store, "t1", agent_id="a1", attempt=1)
    report = flush(store, cfg)
    rows = {r["event_id"]: r["state"] for r in store.outbox_rows() if r["kind"] == "status_label"}
    assert list(rows.values()) == ["done", "superseded", "superseded"]  # started; assigned and created skipped
    assert report.superseded == 2
    assert sorted(forgejo.labels_of(REPO, n)) == ["agent:python", "bug", "fleet/running"]
    repo_labels = [lab.name for lab in forgejo.repos[REPO].labels.values()]
    assert repo_labels.count("fleet/running") == 1
    services.cancel_task(store, "t1")
    flush(store, cfg)
    assert sorted(forgejo.labels_of(REPO, n)) == ["agent:python", "bug"]
    services.retry_task(store, orch, "t1")
    flush(store, cfg)
    assert sorted(forgejo.labels_of(REPO, n)) == ["agent:python", "bug", "fleet/queued"]
    assert [lab.name for lab in forgejo.repos[REPO].labels.values()].count("fleet/queued") == 1


# ---------------------------------------------------------------------------------------------- failures


def _state(store, task_id="t1"):
    return store.task(task_id)["state"]


@pytest.mark.parametrize(("status", "retry_after"), [(500, None), (502, None), (429, 0), (401, None), (422, None)])
def test_errors_are_retried_later_and_change_no_task(store, orch, cfg, forgejo, agent, status, retry_after):
    n = new_task(store, orch, forgejo)
    claim(store, cfg, agent)
    forgejo.fail_next(100, status, retry_after)
    report = flush(store, cfg)
    assert (report.sent, report.superseded, report.retried, report.dead) == (0, 1, 2, 0)
    assert _state(store) == "assigned"
    pending = store.outbox_rows(states=["pending"])
    assert len(pending) == 2 and all(r["tries"] == 1 and str(status) in r["last_error"] for r in pending)
    assert all(r["next_try_at"] >= time.time() + 10 for r in pending)
    assert flush(store, cfg).retried == 0  # not due yet
    forgejo._fail.clear()
    report = flush(store, cfg, now=later(3600))
    assert (report.sent, report.retried) == (2, 0)
    assert len(bodies(forgejo, n)) == 1 and "fleet/running" in forgejo.labels_of(REPO, n)


def test_forgejo_down_stops_the_flush_and_rows_wait(store, orch, cfg, forgejo, agent):
    n = new_task(store, orch, forgejo)
    claim(store, cfg, agent)
    forgejo.down()
    report = flush(store, cfg)
    assert (report.retried, report.deferred, report.sent) == (1, 1, 0)  # one try, not one timeout per row
    (tried,) = [r for r in store.outbox_rows() if r["tries"]]
    assert "cannot reach Forgejo" in tried["last_error"]
    services.start_task(store, "t1", agent_id="a1", attempt=1)  # tasks go on meanwhile
    forgejo.up()
    flush(store, cfg, now=later(3600))
    assert len(bodies(forgejo, n)) == 1 and "fleet/running" in forgejo.labels_of(REPO, n)
    assert store.count_outbox().get("pending", 0) == 0


def test_a_hanging_forgejo_times_out_once(store, orch, cfg, forgejo, agent):
    new_task(store, orch, forgejo)
    claim(store, cfg, agent)
    forgejo.hang_next(2, 3.0)  # longer than timeout_secs (1 s), for the first try and the client's retry
    report = flush(store, cfg)
    assert (report.retried, report.deferred) == (1, 1)
    (tried,) = [r for r in store.outbox_rows() if r["tries"]]
    assert "timed out" in tried["last_error"]
    assert _state(store) == "assigned"


def test_an_issue_that_is_gone_is_dead_at_once(store, orch, cfg, forgejo, agent):
    new_task(store, orch, forgejo, number=999)
    claim(store, cfg, agent)
    report = flush(store, cfg)
    assert report.dead == 2 and report.superseded == 1 and report.retried == 0
    dead = store.outbox_rows(states=["dead"])
    assert all("404" in r["last_error"] and r["tries"] == 0 for r in dead)
    assert _state(store) == "assigned"


def test_a_row_dies_after_max_tries(store, orch, cfg, forgejo):
    forgejo_cfg = config_of(orch, url=forgejo.url, token=forgejo.bot_token, timeout_secs=1.0)
    new_task(store, orch, forgejo)
    services.cancel_task(store, "t1")  # no comment, no label: nothing to do
    assert flush(store, forgejo_cfg).enqueued == 0
    agent = services.register_agent(store, "a1", agent_type="x", capabilities=["python"], max_concurrency=1).agent
    services.retry_task(store, orch, "t1")
    claim(store, forgejo_cfg, agent)
    forgejo.fail_next(10_000, 503, 0)
    clock = time.time()
    with ForgejoClient(forgejo.url, forgejo.bot_token, retries=0) as client:  # no in-client retries: fast
        for i in range(MAX_TRIES):
            report = flush(store, forgejo_cfg, client=client, now=lambda i=i: clock + i * 4000)
    assert report.dead == 1
    (row,) = store.outbox_rows(states=["dead"])
    assert row["tries"] == MAX_TRIES - 1 and "503" in row["last_error"]


def test_re_deriving_after_a_crash_adds_nothing(store, orch, cfg, forgejo, agent):
    """A flush that died after inserting rows but before (say) a later batch: the same events give the same rows."""
    from fleetctl.outbox import derive

    n = new_task(store, orch, forgejo)
    claim(store, cfg, agent)
    assert derive(store, cfg) == 3
    flush(store, cfg)
    store.set_meta("outbox_cursor", "0")  # as if the cursor had never moved
    assert derive(store, cfg, batch=2) == 0
    assert flush(store, cfg).sent == 0 and len(bodies(forgejo, n)) == 1
    assert store.outbox_cursor() == store.max_event_id()


def test_without_forgejo_the_cursor_moves_and_nothing_is_queued(store, orch, forgejo):
    new_task(store, orch, forgejo)
    report = flush(store, config_of(orch))
    assert report.enqueued == 0 and store.outbox_cursor() == store.max_event_id()
    assert forgejo.requests == []


def test_a_second_flush_skips_while_one_runs(store, cfg):
    from fleetctl.passes import pass_lock

    with pass_lock(store.path, "outbox") as locked:
        assert locked
        assert flush(store, cfg).skipped == "another outbox flush is running"


# ---------------------------------------------------------------------------------------------- passes and CLI


def test_dispatch_and_sweep_flush_and_report(store, orch, forgejo, tmp_path):
    from fleetctl.config import load_config
    from fleetctl.passes import dispatch, sweep

    make_config(tmp_path, forgejo={"url": forgejo.url, "token": forgejo.bot_token, "require_pull_request": False},
                agents=[])  # fmt: skip
    cfg = load_config(tmp_path / "config.toml")
    n = new_task(store, orch, forgejo)
    services.cancel_task(store, "t1")
    services.retry_task(store, orch, "t1")
    assert dispatch(store, cfg).outbox["enqueued"] == 0  # created, cancelled, retried: no comments
    agent = services.register_agent(store, "a1", agent_type="x", capabilities=["python"], max_concurrency=1).agent
    claim(store, cfg, agent)
    forgejo.down()
    report = sweep(store, cfg).to_json()
    assert report["outbox"]["retried"] == 1 and _state(store) == "assigned"
    forgejo.up()
    # an hour later the silent agent is lost: its attempt is re-queued, and that is announced as well
    assert sweep(store, cfg, now=later(3600)).outbox["sent"] == 2
    texts = bodies(forgejo, n)
    assert len(texts) == 2 and "needs attention: attempt 1 failed (`agent_lost`)" in texts[1]


def test_a_failing_flush_never_fails_the_pass(store, orch, monkeypatch):
    import fleetctl.outbox
    from fleetctl.passes import sweep

    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(fleetctl.outbox, "flush", broken)
    report = sweep(store, config_of(orch))
    assert report.outbox == {"error": "RuntimeError: boom"} and report.skipped is None


def test_cli_list_and_flush(store, orch, forgejo, agent, tmp_path, runner):
    from fleetctl.cli import app

    make_config(tmp_path, forgejo={"url": forgejo.url, "token": forgejo.bot_token, "status_labels": True,
                                   "timeout_secs": 1})  # fmt: skip
    new_task(store, orch, forgejo)
    claim(store, config_of(orch, url=forgejo.url), agent)
    forgejo.fail_next(100, 500)
    done = runner.invoke(app, ["outbox", "flush"])
    assert done.exit_code == 0, done.output
    assert done.stdout == "queued 3, sent 0, superseded 1, retry later 2, dead 0, waiting 0\n"
    listed = runner.invoke(app, ["outbox", "list"])
    assert listed.exit_code == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "TARGET", "KIND", "ISSUE", "TASK", "TRIES", "NEXT", "TRY", "LAST",
                                "ERROR"]  # fmt: skip
    assert lines[1].split()[1:7] == ["pending", "forgejo", "status_label", "acme/widgets#1", "t1", "1"]
    assert "Forgejo answered 500" in lines[1] and "in " in lines[1]  # the next try
    assert lines[3].split()[1:4] == ["superseded", "forgejo", "status_label"]
    assert lines[-1] == "pending 2, done 0, superseded 1, dead 0"
    doc = json.loads(runner.invoke(app, ["outbox", "list", "--json", "--state", "pending", "-n", "1"]).stdout)
    assert len(doc["items"]) == 1 and doc["counts"] == {"pending": 2, "done": 0, "superseded": 1, "dead": 0}
    assert doc["items"][0]["last_error"].startswith("Forgejo answered 500")
    assert json.loads(runner.invoke(app, ["outbox", "list", "--json", "--state", "dead"]).stdout)["items"] == []
    bad = runner.invoke(app, ["outbox", "list", "--state", "lost"])
    assert bad.exit_code == 2 and "unknown outbox state 'lost'" in bad.stderr
    forgejo._fail.clear()
    doc = json.loads(runner.invoke(app, ["outbox", "flush", "--json"]).stdout)
    assert doc["sent"] == 0 and doc["retried"] == 0  # not due yet: nothing is tried before its time
