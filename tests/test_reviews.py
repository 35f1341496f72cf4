"""Review feedback becomes the next attempt (issue 10; SPEC §2 ``rework``, §7.2).

End to end with the fake Forgejo and a real ``fleetctl serve``: "changes requested" with inline comments on the
task's pull request → the next dispatch/sweep pass reads the comments → a ``rework`` attempt (no retry used)
whose prompt carries them → the agent updates the same pull request → approval and merge complete the task. A
re-delivered rejection, a second rejection of the same head and ``sync`` change nothing; past the cap the task
stays in review flagged ``needs_human`` with one comment and one label. Plus the pure pieces on their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import httpx
from conftest import stop_cleanly

from fleetctl import effects
from fleetctl.forgejo import mapping
from fleetctl.forgejo.webhooks import REVIEW_REJECTED, Change, Pull
from fleetctl.prompt import render_prompt
from fleetctl.services import reviews

REPO = "acme/widgets"
SECRET = "review-webhook-secret"
COMMENTS = [("src/http.py", 12, "Retry only idempotent methods."), ("tests/test_http.py", 40, "Add a test for 503.")]


def fleet(server, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fleetctl", "--config", str(server.config_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def show(server, tid: str) -> dict:
    return json.loads(fleet(server, "task", "show", tid, "--json").stdout)


def events(server, tid: str) -> list[str]:
    return [json.loads(line)["type"] for line in fleet(server, "events", "--task", tid, "--json").stdout.splitlines()]


def passes(server) -> None:
    for cmd in ("dispatch", "sweep-timeouts"):
        done = fleet(server, cmd)
        assert done.returncode == 0, done.stderr


def redeliver(server, forgejo, index: int, *, new_id: bool) -> httpx.Response:
    """POST delivery ``index`` again: as Forgejo's retry of the same delivery, or its "Replay" (a new id)."""
    headers, body = forgejo.deliveries[index]
    headers = dict(headers)
    if new_id:
        fresh = str(uuid.uuid4())
        for prefix in ("Forgejo", "Gitea", "Gogs", "GitHub"):
            headers[f"X-{prefix}-Delivery"] = fresh
    return httpx.post(f"{server.url}/api/v1/webhooks/forgejo", content=body, headers=headers, timeout=30)


def hand_in(agent, job: dict, pr: int) -> None:
    r = agent.post(f"/api/v1/tasks/{job['task']['task_id']}/complete",
                   json={"attempt": job["attempt"], "summary": "done", "artifacts": [{"kind": "pull_request",
                                                                                       "number": pr}]})  # fmt: skip
    assert r.status_code == 200 and r.json()["state"] == "awaiting_review", r.text


def serve(make_server, forgejo, **settings):
    """A started serve with Forgejo configured (and its webhook pointed at it); ``bob`` can review too."""
    server = make_server(forgejo={"url": forgejo.url, "token": forgejo.bot_token, "webhook_secret": SECRET,
                                  "repositories": [REPO], **settings})  # fmt: skip
    server.start()
    forgejo.set_hook(f"{server.url}/api/v1/webhooks/forgejo", SECRET)
    forgejo.add_user("bob")
    return server


def in_review(server, forgejo, title: str, labels: list[str]) -> tuple[str, int, int, str]:
    """An issue whose task an agent took, worked on ``fleet/<task-id>`` and handed in with its pull request:
    ``(task id, issue, pull request, agent token)``."""
    n = forgejo.open_issue(REPO, title, "", labels=labels)
    items = json.loads(fleet(server, "task", "list", "--json").stdout)["items"]
    (tid,) = [t["task_id"] for t in items if t["issue_number"] == n]
    token = server.register(f"coder-{n}", capabilities=["code"])
    with server.client(token) as agent:
        job = agent.post("/api/v1/tasks/dequeue", json={"wait": 0}).json()
        forgejo.push_branch(REPO, f"fleet/{tid}")
        pr = forgejo.open_pull(REPO, f"fleet/{tid}", title=title, body=f"Closes #{n}", user="fleet-bot")
        hand_in(agent, job, pr)
    return tid, n, pr, token


def db_check(server) -> None:
    check = fleet(server, "db", "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_changes_requested_become_a_rework_with_the_comments_then_approval_and_merge_complete(make_server, forgejo):
    server = serve(make_server, forgejo, status_labels=True)
    tid, n, pr, token = in_review(server, forgejo, "Retry the HTTP client", ["agent:code", "retries:0"])
    with server.client(token) as agent:
        # changes requested, with two inline comments: recorded at once, the comments read by the next pass
        first = len(forgejo.deliveries)
        forgejo.review(REPO, pr, "REQUEST_CHANGES", "Close, but not yet.", user="alice", comments=COMMENTS)
        rejected = show(server, tid)
        assert rejected["state"] == "awaiting_review" and events(server, tid)[-1] == "task.review_rejected"
        # Forgejo's retry of that delivery, its "Replay" (a new id), and a second rejection of the same head:
        assert redeliver(server, forgejo, first, new_id=False).json()["verdict"] == "duplicate"
        assert redeliver(server, forgejo, first, new_id=True).json()["verdict"] in ("ignored", "accepted")
        forgejo.review(REPO, pr, "REQUEST_CHANGES", "Also fix the typo.", user="bob")
        assert events(server, tid).count("task.review_rejected") == 1
        passes(server)
        queued = show(server, tid)
        assert (queued["state"], queued["attempt_kind"], queued["review_rounds"]) == ("queued", "rework", 1)
        assert queued["max_attempts"] == 2  # retries:0, and still a second attempt: a rework uses no retry
        synced = json.loads(fleet(server, "sync", "--json").stdout)  # sync sees the same review: nothing
        assert synced["changes"] == [] and synced["errors"] == [], synced
        assert events(server, tid).count("task.rework") == 1

        # the rework attempt: its prompt carries both comments with path and line, and the same branch and PR
        job = agent.post("/api/v1/tasks/dequeue", json={"wait": 0}).json()
        assert job["attempt"] == 2 and job["task"]["attempt_kind"] == "rework"
        prompt = job["prompt"]
        assert "`src/http.py:12`: Retry only idempotent methods." in prompt
        assert "`tests/test_http.py:40`: Add a test for 503." in prompt
        assert "Close, but not yet." in prompt and f"fleet/{tid}" in prompt and f"pull request #{pr}" in prompt
        attempts = show(server, tid)["attempts"]
        assert [a["kind"] for a in attempts] == ["run", "rework"]
        forgejo.push_branch(REPO, f"fleet/{tid}")  # the agent updates the same pull request
        hand_in(agent, job, pr)
    forgejo.review(REPO, pr, "APPROVED", "LGTM", user="alice")
    forgejo.merge_pull(REPO, pr, user="alice")
    done = show(server, tid)
    assert done["state"] == "completed" and done["needs_human"] is False
    passes(server)
    bodies = [c["body"] for c in forgejo.comments(REPO, n)]
    assert sum("changes were requested" in b and "rework attempt" in b for b in bodies) == 1
    db_check(server)
    stop_cleanly(server)


def test_past_the_cap_the_task_waits_for_a_person_with_one_comment_and_one_label(make_server, forgejo):
    server = serve(make_server, forgejo)
    tid, n, pr, token = in_review(server, forgejo, "Fix it", ["agent:code", "review-rounds:1"])
    assert show(server, tid)["max_review_rounds"] == 1
    with server.client(token) as agent:
        forgejo.review(REPO, pr, "REQUEST_CHANGES", "No.", user="alice", comments=COMMENTS[:1])
        passes(server)
        job = agent.post("/api/v1/tasks/dequeue", json={"wait": 0}).json()
        assert job["task"]["attempt_kind"] == "rework"
        forgejo.push_branch(REPO, f"fleet/{tid}")  # a new head
        hand_in(agent, job, pr)
    forgejo.review(REPO, pr, "REQUEST_CHANGES", "Still no.", user="alice")  # round 2 of 1: a person must look
    forgejo.review(REPO, pr, "REQUEST_CHANGES", "And again.", user="bob")  # the same head again: nothing more
    flagged = show(server, tid)
    assert (flagged["state"], flagged["needs_human"], flagged["review_rounds"]) == ("awaiting_review", True, 1)
    assert events(server, tid).count("task.needs_human") == 1
    passes(server)
    passes(server)  # a second flush adds nothing
    flags = [c for c in forgejo.comments(REPO, n) if "needs a person" in c["body"]]
    assert len(flags) == 1
    assert forgejo.labels_of(REPO, n).count("fleet/needs-human") == 1
    synced = json.loads(fleet(server, "sync", "--json").stdout)
    assert synced["errors"] == [] and events(server, tid).count("task.needs_human") == 1
    # an approval clears the flag and takes the label off
    forgejo.review(REPO, pr, "APPROVED", "ok then", user="alice")
    assert show(server, tid)["needs_human"] is False
    passes(server)
    assert "fleet/needs-human" not in forgejo.labels_of(REPO, n)
    db_check(server)
    stop_cleanly(server)


def test_sync_finds_a_rejection_that_no_webhook_delivered(make_server, forgejo):
    server = serve(make_server, forgejo)
    tid, _n, pr, token = in_review(server, forgejo, "Missed", ["agent:code"])
    removed = ("src/legacy.py", -7, "Keep this check.")  # on a removed line: Forgejo's original_position
    forgejo.review(REPO, pr, "REQUEST_CHANGES", "Webhook lost this.", user="alice", comments=[*COMMENTS, removed],
                   hook=False)  # fmt: skip
    assert show(server, tid)["state"] == "awaiting_review"
    synced = json.loads(fleet(server, "sync", "--json").stdout)
    assert synced["errors"] == [], synced
    after = show(server, tid)
    assert (after["state"], after["attempt_kind"], after["review_rounds"]) == ("queued", "rework", 1)
    again = json.loads(fleet(server, "sync", "--json").stdout)
    assert again["changes"] == [] and events(server, tid).count("task.rework") == 1
    with server.client(token) as agent:
        prompt = agent.post("/api/v1/tasks/dequeue", json={"wait": 0}).json()["prompt"]
    assert "`src/http.py:12`: Retry only idempotent methods." in prompt
    assert "`src/legacy.py` (line 7 before your change, now removed): Keep this check." in prompt
    db_check(server)
    stop_cleanly(server)


def test_forgejo_unreachable_leaves_rejections_pending_and_the_pass_stops_asking(make_server, forgejo):
    server = serve(make_server, forgejo)
    first = in_review(server, forgejo, "One", ["agent:code"])
    second = in_review(server, forgejo, "Two", ["agent:code"])
    for _tid, _n, pr, _token in (first, second):
        forgejo.review(REPO, pr, "REQUEST_CHANGES", "Not yet.", user="alice", comments=COMMENTS[:1])
    forgejo.down()
    try:
        done = fleet(server, "dispatch")
        assert done.returncode == 0, done.stderr
        # one try, not one per task: each would wait for an unreachable Forgejo as long again
        assert done.stderr.count("action=review.fetch_failed") == 1, done.stderr
        assert [show(server, t[0])["state"] for t in (first, second)] == ["awaiting_review"] * 2
    finally:
        forgejo.up()
    passes(server)  # Forgejo is back: both become rework attempts
    assert [show(server, t[0])["attempt_kind"] for t in (first, second)] == ["rework"] * 2
    db_check(server)
    stop_cleanly(server)


def test_a_rejection_whose_pull_request_is_closed_before_the_pass_costs_no_request(make_server, forgejo):
    server = serve(make_server, forgejo)
    tid, _n, pr, _token = in_review(server, forgejo, "Closed", ["agent:code"])
    forgejo.review(REPO, pr, "REQUEST_CHANGES", "No.", user="alice")
    forgejo.close_pull(REPO, pr, user="alice")  # closed unmerged: the attempt fails pr_closed
    assert show(server, tid)["state"] == "failed"
    before = len(forgejo.requests)
    passes(server)
    passes(server)
    reviews = "/repos/{owner}/{repo}/pulls/{index}/reviews"
    assert [r for r in forgejo.requests[before:] if r[1] == reviews] == []
    assert "task.rework" not in events(server, tid)
    db_check(server)
    stop_cleanly(server)


# ---------------------------------------------------------------------------------------------- pure pieces


def _pull(number: int = 7, head_sha: str = "abc123", branch: str = "fleet/t1") -> Pull:
    return Pull(number=number, title="x", body="", head_branch=branch, head_sha=head_sha, state="open", merged=False)


def test_mapping_only_the_tasks_own_pull_request_in_review_counts():
    task = {"task_id": "t1", "state": "awaiting_review", "repo": REPO, "issue_number": 3,
            "pull_request": {"number": 7}, "needs_human": 0}  # fmt: skip
    change = Change(REVIEW_REJECTED, "reviewed", REPO, "alice", pull=_pull(), review="fix")
    op = mapping.pull_op(change, task)
    assert op.kind == "review_rejected" and op.fields["review"] == {"pr": 7, "head_sha": "abc123", "body": "fix",
                                                                    "reviewer": "alice"}  # fmt: skip
    assert mapping.pull_op(change, {**task, "state": "running"}).kind == "none"
    other = Change(REVIEW_REJECTED, "reviewed", REPO, "alice", pull=_pull(8, branch="someone/else"), review="")
    assert mapping.pull_op(other, task).kind == "none"  # a person's pull request that says Closes #3


def test_the_prompt_of_a_rework_and_of_a_custom_template_without_the_placeholder():
    task = {"task_id": "t1", "max_attempts": 3, "title": "T", "body": "", "repo": REPO, "issue_number": 3,
            "labels": [], "attempt_kind": "rework",
            "review": {"pr": 7, "round": 2, "reviewer": "alice", "body": "two things",
                       "comments": [{"path": "a.py", "line": 3, "body": "rename"}, {"path": "b.py", "line": None,
                                                                                     "body": "whole file"},
                                    {"path": "c.py", "line": 9, "old": True, "body": "keep"}]}}  # fmt: skip
    text = render_prompt(task, 2)
    assert "review round 2" in text and "`a.py:3`: rename" in text and "`b.py`: whole file" in text
    assert "`c.py` (line 9 before your change, now removed): keep" in text
    custom = render_prompt(task, 2, "Do {title} on {branch}.")
    assert custom.startswith("Do T on fleet/t1.") and "`a.py:3`: rename" in custom
    assert render_prompt({**task, "attempt_kind": "run"}, 2, "Do {title}.{review}") == "Do T."


def test_an_inline_comments_line_follows_forgejos_position_and_original_position():
    c = {"path": "a.py", "body": "x" * (reviews.MAX_COMMENT + 5)}
    assert reviews._comment({**c, "position": 4, "original_position": 0})["line"] == 4
    assert reviews._comment({**c, "position": 0, "original_position": 6}) == {
        "path": "a.py", "line": 6, "old": True, "body": "x" * reviews.MAX_COMMENT}  # fmt: skip
    assert reviews._comment({**c, "position": 0, "original_position": 0})["line"] is None


def test_effects_of_the_flag_and_of_a_rework():
    from fleetctl.config import ForgejoConfig

    fj = ForgejoConfig(url="https://forge.example.org", token="t", comments=True)
    task = {"task_id": "t1", "repo": REPO, "issue_number": 3}
    flag = effects.effects_for({"id": 5, "type": "task.needs_human", "ts": 1.0, "data": {"pr": 7,
                                "max_review_rounds": 3}}, task, fj)  # fmt: skip
    assert [r["kind"] for r in flag] == [effects.COMMENT, effects.FLAG_LABEL]
    assert flag[1]["payload"] == {"label": "fleet/needs-human", "on": True}
    assert "pulls/7" in flag[0]["payload"]["body"]
    # a task in review cannot be retried: the comment never suggests it; /fleet rework only where it works
    assert "retry" not in flag[0]["payload"]["body"] and "/fleet rework" not in flag[0]["payload"]["body"]
    on = effects.effects_for({"id": 5, "type": "task.needs_human", "ts": 1.0, "data": {"pr": 7}}, task,
                             ForgejoConfig(url="https://forge.example.org", token="t", comments=True,
                                           comment_commands=True))  # fmt: skip
    assert "comment `/fleet rework` for one more rework attempt" in on[0]["payload"]["body"]
    cleared = effects.effects_for({"id": 6, "type": "task.needs_human_cleared", "ts": 2.0, "data": {}}, task, fj)
    assert [(r["kind"], r["payload"]["on"]) for r in cleared] == [(effects.FLAG_LABEL, False)]
