"""Regression tests for defects found in the review of the Forgejo integration (all fixed).

Every test drives the real ingest path (``services.issues.ingest``: signature, headers, payload, mapping,
store) with signed copies of the shared Forgejo payloads, as the webhook route and ``ingest-webhook`` do.
"""

from __future__ import annotations

import json

from test_webhooks import SHARED, cfg, db, forgejo_bytes, send  # noqa: F401 - fixtures

from fleetctl import services
from fleetctl.services import issues


def _doc(name: str) -> dict:
    return json.loads((SHARED / name).read_bytes())


def _running(db, cfg) -> str:  # noqa: F811
    """Issue #42's task, claimed by agent a1 (state assigned)."""
    tid = send(db, cfg, "issues-opened-with-labels.json").task_id
    services.register_agent(db, "a1", agent_type="t", capabilities=["task"], now=1.0)
    services.claim_task(db, cfg, db.agent("a1"))
    return tid


def test_an_out_of_order_label_change_does_not_undo_a_newer_one(db, cfg):  # noqa: F811
    tid = send(db, cfg, "issues-opened-with-labels.json").task_id
    added = _doc("issue_label-label_updated.json")  # the agent- label (re)added at :01 ...
    added["issue"]["updated_at"] = "2030-01-01T00:00:01Z"
    removed = _doc("issue_label-label_updated.json")  # ... and removed at :02; Forgejo delivers :02 first
    removed["issue"]["labels"] = []
    removed["issue"]["updated_at"] = "2030-01-01T00:00:02Z"
    assert send(db, cfg, "issue_label-label_updated.json", forgejo_bytes(removed)).verdict == "accepted"
    assert db.task(tid)["state"] == "cancelled"
    late = send(db, cfg, "issue_label-label_updated.json", forgejo_bytes(added))
    # the issue has no agent- label now: the late delivery must not re-queue the task
    assert db.task(tid)["state"] == "cancelled", late


def test_one_active_task_per_issue_whatever_the_case_of_the_repository_name(db, cfg):  # noqa: F811
    send(db, cfg, "issues-opened-with-labels.json")
    doc = _doc("issues-opened-with-labels.json")
    doc["repository"]["full_name"] = "ACME/widgets"  # Forgejo owner/repo names are case-insensitive
    doc["issue"]["updated_at"] = "2030-01-01T00:00:00Z"
    send(db, cfg, "issues-opened-with-labels.json", forgejo_bytes(doc))
    active = [t for t in db.tasks() if t["state"] not in ("completed", "failed", "cancelled")]
    assert len(active) == 1, [(t["task_id"], t["repo"], t["issue_number"], t["state"]) for t in active]


def test_a_fork_pull_request_on_a_fleet_branch_is_not_the_tasks_own(db, cfg):  # noqa: F811
    tid = _running(db, cfg)
    doc = _doc("pull_request-closed.json")
    head = doc["pull_request"]["head"]
    head["label"] = head["ref"] = f"fleet/{tid}"  # Forgejo's head.label is the bare branch name, forks too
    head["repo"] = {**head["repo"], "full_name": "mallory/widgets", "fork": True}
    head["repo_id"] = 999
    doc["pull_request"]["user"]["login"] = doc["sender"]["login"] = "mallory"
    doc["pull_request"]["body"] = ""
    result = send(db, cfg, "pull_request-closed.json", forgejo_bytes(doc))
    task = db.task(tid)
    assert (task["state"], task["failure_reason"]) == ("assigned", None), result


def test_two_different_edits_in_the_same_second_are_both_applied(db, cfg):  # noqa: F811
    tid = send(db, cfg, "issues-opened-with-labels.json").task_id
    first = _doc("issues-edited.json")
    first["issue"]["title"] = "New title"
    first["issue"]["updated_at"] = "2030-01-01T00:00:00Z"
    second = json.loads(json.dumps(first))
    second["issue"]["body"] = "A new body, edited in the same second"
    assert send(db, cfg, "issues-edited.json", forgejo_bytes(first)).verdict == "accepted"
    result = send(db, cfg, "issues-edited.json", forgejo_bytes(second))
    assert db.task(tid)["body"] == "A new body, edited in the same second", result


def test_a_bot_label_change_that_is_not_write_back_is_applied(db, cfg):  # noqa: F811
    tid = send(db, cfg, "issues-opened-with-labels.json").task_id
    issues.remember_login(db, "fleet-bot")
    doc = _doc("issue_label-label_updated-bot.json")
    doc["issue"]["labels"] = [label for label in doc["issue"]["labels"]
                              if not label["name"].startswith("agent-")]  # fmt: skip
    doc["issue"]["updated_at"] = "2030-01-01T00:00:00Z"
    result = send(db, cfg, "issue_label-label_updated-bot.json", forgejo_bytes(doc))
    assert db.task(tid)["state"] == "cancelled", result
