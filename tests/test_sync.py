"""``fleetctl sync`` against the fake Forgejo: what webhooks missed is applied through the same mapping, once.

No hook is set on the fake here: every change below is a delivery that never arrived.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fleetctl import services
from fleetctl.config import load_config_text
from fleetctl.store import Store
from fleetctl.sync import sync

REPO = "acme/widgets"


@pytest.fixture
def cfg(tmp_path, forgejo):
    text = (f'[forgejo]\nurl = "{forgejo.url}"\ntoken = "{forgejo.bot_token}"\nwebhook_secret = "s"\n'
            f'repositories = ["{REPO}"]\n[orchestrator]\ndb_path = "fleet.db"\n')  # fmt: skip
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return load_config_text(text, path)


@pytest.fixture
def db(cfg):
    with Store.open(cfg.orchestrator.db_path) as store:
        yield store


def state_of(db) -> list[tuple]:
    return [(t["issue_number"], t["state"]) for t in db.tasks()]


def test_sync_creates_the_task_of_a_missed_labelled_issue_and_a_second_run_changes_nothing(db, cfg, forgejo):
    n = forgejo.open_issue(REPO, "Fix the parser", "It breaks on tabs", labels=["agent:code:python", "bug"])
    forgejo.open_issue(REPO, "Not for agents", labels=["bug"])
    forgejo.open_pull(REPO, "feature", title="A PR is never a task", body="")
    report = sync(db, cfg)
    assert report.errors == [] and report.issues_seen == 2
    [task] = db.tasks()
    assert (task["issue_number"], task["requirements"], task["title"]) == (n, ["code:python"], "Fix the parser")
    events = db.max_event_id()
    again = sync(db, cfg)
    assert again.changes == [] and db.max_event_id() == events
    assert db.check().ok
    assert db.meta("forgejo_login") == "fleet-bot"  # remembered from GET /user


def test_sync_completes_a_task_whose_merge_was_missed(db, cfg, forgejo):
    n = forgejo.open_issue(REPO, "Add retries", labels=["agent:code"])
    sync(db, cfg)
    [task] = db.tasks()
    services.register_agent(db, "a1", agent_type="t", capabilities=["code"], now=1.0)
    services.claim_task(db, cfg, db.agent("a1"))
    forgejo.push_branch(REPO, f"fleet/{task['task_id']}")
    pr = forgejo.open_pull(REPO, f"fleet/{task['task_id']}", title="Add retries", body=f"Closes #{n}")
    forgejo.merge_pull(REPO, pr)  # merges, and closes issue n with the merge commit
    report = sync(db, cfg)
    done = db.task(task["task_id"])
    assert done["state"] == "completed" and done["pull_request"]["number"] == pr, report.to_json()
    assert sync(db, cfg).changes == []
    assert db.check().ok


def test_sync_cancels_a_task_whose_close_was_missed_and_requeues_on_a_missed_reopen(db, cfg, forgejo):
    n = forgejo.open_issue(REPO, "Flaky test", labels=["agent:ci"])
    sync(db, cfg)
    forgejo.close_issue(REPO, n)
    sync(db, cfg)
    assert state_of(db) == [(n, "cancelled")]
    assert sync(db, cfg).changes == []
    forgejo.reopen_issue(REPO, n)
    sync(db, cfg)
    assert state_of(db) == [(n, "queued")]  # the same task, re-queued with a new budget
    assert sync(db, cfg).changes == []


def test_sync_cancels_when_the_last_agent_label_was_removed_and_requeues_when_relabelled(db, cfg, forgejo):
    n = forgejo.open_issue(REPO, "Docs", labels=["agent:docs"])
    sync(db, cfg)
    forgejo.set_labels(REPO, n, ["docs"])
    sync(db, cfg)
    assert state_of(db) == [(n, "cancelled")]
    forgejo.set_labels(REPO, n, ["agent:docs"])
    sync(db, cfg)
    assert state_of(db) == [(n, "queued")]


def test_an_operator_cancel_is_not_undone_by_sync(db, cfg, forgejo):
    forgejo.open_issue(REPO, "Docs", labels=["agent:docs"])
    sync(db, cfg)
    [task] = db.tasks()
    services.cancel_task(db, task["task_id"], "not now")
    assert sync(db, cfg).changes == []
    assert db.task(task["task_id"])["state"] == "cancelled"


def test_sync_pages_through_many_issues(db, cfg, forgejo):
    for i in range(120):
        forgejo.open_issue(REPO, f"issue {i}", labels=["agent:x"] if i % 2 else ["bug"])
    report = sync(db, cfg)
    assert report.issues_seen == 120 and len(db.tasks()) == 60


def test_forgejo_down_is_exit_5_and_changes_nothing(tmp_path, cfg, forgejo):
    forgejo.open_issue(REPO, "Docs", labels=["agent:docs"])
    forgejo.down()
    cmd = [sys.executable, "-m", "fleetctl", "--config", str(cfg.path), "sync", "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 5, result.stderr
    assert "cannot reach Forgejo" in result.stderr
    forgejo.up()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["changes"]) == 1


def test_sync_needs_repositories_and_a_token(tmp_path):
    text = '[forgejo]\nurl = "http://127.0.0.1:9"\nwebhook_secret = "s"\n[orchestrator]\ndb_path = "f.db"\n'
    path = tmp_path / "c.toml"
    path.write_text(text)
    path.chmod(0o600)
    result = subprocess.run([sys.executable, "-m", "fleetctl", "--config", str(path), "sync"], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "forgejo.repositories" in result.stderr
    result = subprocess.run([sys.executable, "-m", "fleetctl", "--config", str(path), "sync", "--repo", "a/b"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "forgejo.token" in result.stderr


def test_a_task_whose_issue_was_deleted_is_cancelled(db, cfg, forgejo):
    n = forgejo.open_issue(REPO, "Soon gone", labels=["agent:x"])
    sync(db, cfg)
    with forgejo.lock:
        del forgejo.repos[REPO].issues[n]  # Forgejo lets an admin delete an issue: GET answers 404 then
    report = sync(db, cfg)
    assert state_of(db) == [(n, "cancelled")] and "no longer exists" in report.changes[0]["detail"]
    assert sync(db, cfg).changes == []


def test_long_titles_and_odd_labels_are_cut_to_fit_a_task(db, cfg, forgejo):
    n = forgejo.open_issue(REPO, "T" * 1500, labels=["agent:x", "L" * 300])
    sync(db, cfg)
    [task] = db.tasks()
    assert task["issue_number"] == n and len(task["title"]) == 1000 and task["labels"] == ["agent:x"]
