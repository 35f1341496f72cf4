"""Services against a real database: create, fencing, receipts, retries, cancel/retry, agents (SPEC §2).

Every scenario ends with ``store.check()``: whatever the services did, replaying the events must give
exactly the stored projections.
"""

from __future__ import annotations

import pytest
from conftest import config_of

from fleetctl import services
from fleetctl.config import OrchestratorConfig
from fleetctl.errors import Conflict, InvalidTransition, LeaseLost, NotFound, UsageError, ValidationFailed
from fleetctl.states import AgentStatus, FailureReason

PR = {"kind": "pull_request", "repo": "acme/app", "number": 7}
OK = {"outcome": "success", "summary": "done"}


@pytest.fixture(autouse=True)
def _db_stays_consistent(store):
    """After each scenario, events replay to exactly the stored projections."""
    yield
    report = store.check()
    assert report.ok, report.problems


@pytest.fixture
def agent(store):
    """An online pull agent ``a1`` (python, capacity 3)."""
    return services.register_agent(store, "a1", agent_type="codex-cli", capabilities=["python"], max_concurrency=3,
                                   now=100.0).agent  # fmt: skip


def claim(store, agent_id="a1", ts=200.0, caps=("python",), **kw):
    return store.claim(agent_id=agent_id, capabilities=caps, max_concurrency=3, lease_secs=300, ts=ts, **kw)


def running(store, orch, task_id="t1", labels=("agent:python",), **kw):
    """A task created, claimed by a1 and started: attempt 1 running."""
    services.create_task(store, orch, title="work", task_id=task_id, labels=list(labels), now=150.0, **kw)
    assert claim(store, task_id=task_id)["task_id"] == task_id
    return services.start_task(store, task_id, agent_id="a1", attempt=1, now=210.0)


def types(store, task_id="t1"):
    return [e["type"] for e in store.events(task_id=task_id)]


# ---------------------------------------------------------------------------------------------- create


def test_create_reads_its_knobs_from_labels(store, orch):
    t = services.create_task(store, orch, title="Fix CI", body="details", task_id="t1", now=5.0,
                             labels=["agent:code:python", "agent:gpu", "priority:5", "retries:4", "timeout:900",
                                     "bug", "bug"])  # fmt: skip
    assert t["state"] == "queued" and t["attempt"] == 0
    assert t["requirements"] == ["code:python", "gpu"]
    assert (t["priority"], t["max_attempts"], t["timeout_secs"]) == (5, 5, 900)
    assert t["labels"] == ["agent:code:python", "agent:gpu", "priority:5", "retries:4", "timeout:900", "bug"]
    assert (t["created_at"], t["seq"]) == (5.0, store.events(task_id="t1")[0]["id"])
    assert types(store) == ["task.created"]


def test_create_defaults_and_configured_prefix(store, tmp_path):
    orch = OrchestratorConfig(db_path=tmp_path / "fleet.db", default_max_retries=0, requirement_prefix="needs/")
    t = services.create_task(store, orch, title="x", labels=["needs/rust", "agent:python"])
    assert t["task_id"].startswith("t-")
    assert (t["requirements"], t["priority"], t["max_attempts"], t["timeout_secs"]) == (["rust"], 0, 1, None)


def test_create_default_budget_is_one_plus_default_retries(store, orch):
    assert services.create_task(store, orch, title="x")["max_attempts"] == 1 + orch.default_max_retries == 3


def test_duplicate_task_id_is_a_conflict(store, orch):
    services.create_task(store, orch, title="first", task_id="t1")
    with pytest.raises(Conflict) as err:
        services.create_task(store, orch, title="second", task_id="t1")
    assert err.value.code == "task_exists"
    assert store.task("t1")["title"] == "first" and types(store) == ["task.created"]


def test_one_active_task_per_issue(store, orch, agent):
    services.create_task(store, orch, title="a", task_id="t1", repo="acme/app", issue_number=3)
    with pytest.raises(Conflict, match="acme/app#3 already has an active task t1"):
        services.create_task(store, orch, title="b", task_id="t2", repo="acme/app", issue_number=3)
    services.create_task(store, orch, title="other issue", task_id="t3", repo="acme/app", issue_number=4)
    services.create_task(store, orch, title="other repo", task_id="t4", repo="acme/lib", issue_number=3)
    services.cancel_task(store, "t1")
    services.create_task(store, orch, title="b", task_id="t2", repo="acme/app", issue_number=3)  # t1 is terminal
    with pytest.raises(Conflict):  # re-opening t1 would make two active tasks for the issue
        services.retry_task(store, orch, "t1")
    assert store.task("t1")["state"] == "cancelled"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"title": ""},
        {"title": "x", "task_id": "../etc"},
        {"title": "x", "repo": "acme/app"},  # repo without issue
        {"title": "x", "repo": "acme/app", "issue_number": 0},
        {"title": "x", "labels": ["bad\nlabel"]},
        {"title": "nul\0"},
    ],
)
def test_create_refuses_bad_input(store, orch, kwargs):
    with pytest.raises(UsageError):
        services.create_task(store, orch, **kwargs)
    assert store.events() == []


# ---------------------------------------------------------------------------------------------- fencing


def test_complete_success_without_pr(store, orch, agent):
    running(store, orch)
    result = services.complete_task(store, config_of(orch), "t1", OK, agent_id="a1", attempt=1, now=300.0)
    assert not result.repeated and result.task["state"] == "completed"
    att = store.attempt("t1", 1)
    assert (att["outcome"], att["ended_at"], att["receipt"]["summary"]) == ("completed", 300.0, "done")
    assert types(store)[-1] == "task.completed"


def test_complete_with_pr_awaits_review(store, orch, agent):
    running(store, orch, repo="acme/app", issue_number=9)
    result = services.complete_task(store, config_of(orch), "t1", {**OK, "artifacts": [PR]}, agent_id="a1", attempt=1)
    assert result.task["state"] == "awaiting_review"
    assert result.task["pull_request"] == {"kind": "pull_request", "repo": "acme/app", "number": 7}


@pytest.mark.parametrize(
    ("agent_id", "attempt"), [("a2", 1), ("a1", 2), ("a2", None)], ids=["wrong-agent", "wrong-attempt", "other"]
)
def test_complete_by_someone_without_the_lease_changes_nothing(store, orch, agent, agent_id, attempt):
    running(store, orch)
    before = store.events()
    with pytest.raises(LeaseLost) as err:
        services.complete_task(store, config_of(orch), "t1", OK, agent_id=agent_id, attempt=attempt)
    assert err.value.code == "lease_lost" and err.value.http_status == 409
    assert store.events() == before and store.task("t1")["state"] == "running"


def test_complete_of_a_never_claimed_task_is_a_conflict_not_a_usage_error(store, orch):
    """Found by test_property: no attempt given, task at attempt 0 → was UsageError 'attempt must be positive'."""
    services.create_task(store, orch, title="x", task_id="t1")
    with pytest.raises(LeaseLost, match="task is queued"):
        services.complete_task(store, config_of(orch), "t1", OK)
    with pytest.raises(UsageError, match="attempt must be a positive integer"):  # an explicit bad attempt still is
        services.complete_task(store, config_of(orch), "t1", OK, attempt=0)
    assert types(store) == ["task.created"]


def test_repeated_identical_completion_records_nothing_twice(store, orch, agent):
    running(store, orch)
    first = services.complete_task(store, config_of(orch), "t1", OK, agent_id="a1", attempt=1, now=300.0)
    events = store.events()
    again = services.complete_task(store, config_of(orch), "t1", dict(OK), agent_id="a1", attempt=1, now=400.0)
    assert again.repeated and again.task == first.task
    assert store.events() == events
    with pytest.raises(LeaseLost):  # a different receipt after completion is a late write
        services.complete_task(store, config_of(orch), "t1", {"outcome": "success", "summary": "other"}, agent_id="a1",
                               attempt=1)  # fmt: skip
    with pytest.raises(LeaseLost):  # … and so is the same receipt from another agent
        services.complete_task(store, config_of(orch), "t1", OK, agent_id="a2", attempt=1)
    assert store.events() == events


def test_late_completion_after_requeue_and_reassignment(store, orch, agent):
    services.register_agent(store, "a2", agent_type="x", capabilities=["python"], max_concurrency=3, now=100.0)
    running(store, orch)
    requeued = services.fail_attempt(store, orch, "t1", "timeout", agent_id="a1", attempt=1, now=220.0)
    assert claim(store, "a2", ts=requeued["not_before"])["attempt"] == 2
    with pytest.raises(LeaseLost):
        services.complete_task(store, config_of(orch), "t1", OK, agent_id="a1", attempt=1)
    with pytest.raises(LeaseLost):
        services.start_task(store, "t1", agent_id="a1", attempt=1)
    with pytest.raises(LeaseLost):
        services.report_progress(store, "t1", "still here", agent_id="a1", attempt=1)
    task = store.task("t1")
    assert (task["state"], task["agent_id"], task["attempt"]) == ("assigned", "a2", 2)
    assert (
        services.complete_task(store, config_of(orch), "t1", OK, agent_id="a2", attempt=2).task["state"] == "completed"
    )


def test_failure_receipt_requeues_with_backoff_then_fails_when_budget_is_spent(store, orch, agent):
    running(store, orch, labels=("agent:python", "retries:1"))
    bad = {"outcome": "failure", "summary": "tests fail"}
    t = services.complete_task(store, config_of(orch), "t1", bad, agent_id="a1", attempt=1, now=300.0).task
    assert (t["state"], t["failure_reason"], t["agent_id"]) == ("queued", "agent_error", None)
    assert 300.0 + 15 <= t["not_before"] <= 300.0 + 30  # 30 s base with half of it jitter
    assert store.attempt("t1", 1)["outcome"] == "failed"
    assert claim(store, ts=t["not_before"] - 1) is None
    assert claim(store, ts=t["not_before"])["attempt"] == 2
    t = services.complete_task(store, config_of(orch), "t1", bad, agent_id="a1", attempt=2, now=400.0).task
    assert (t["state"], t["failure_reason"], t["not_before"]) == ("failed", "agent_error", None)
    assert types(store).count("task.requeued") == 1 and types(store)[-1] == "task.failed"
    assert "no attempts left (2 of 2 used)" in store.events(task_id="t1")[-1]["data"]["why"]


def test_pull_request_required_rejection_commits_the_failed_attempt(store, orch, agent):
    running(store, orch, repo="acme/app", issue_number=9)  # a Forgejo task: the config requires a pull request
    with pytest.raises(ValidationFailed) as err:
        services.complete_task(store, config_of(orch, url="http://forge.invalid"), "t1", OK, agent_id="a1",
                               attempt=1, now=300.0)  # fmt: skip
    assert err.value.code == "receipt_invalid" and err.value.details["state"] == "queued"
    t = store.task("t1")
    assert (t["state"], t["failure_reason"]) == ("queued", "receipt_invalid")
    assert "a pull request is required" in t["failure_detail"]
    assert store.attempt("t1", 1)["receipt"]["summary"] == "done"  # the refused receipt is kept for the record
    assert types(store)[-1] == "task.requeued"


def test_pull_request_in_another_repository_is_refused(store, orch, agent):
    running(store, orch, repo="acme/app", issue_number=1)
    foreign = {**OK, "artifacts": [{"kind": "pull_request", "repo": "evil/fork", "number": 1}]}
    with pytest.raises(ValidationFailed, match="not in the task's repository acme/app"):
        services.complete_task(store, config_of(orch), "t1", foreign, agent_id="a1", attempt=1)
    assert store.task("t1")["failure_reason"] == "receipt_invalid"


def test_malformed_receipt_changes_nothing(store, orch, agent):
    running(store, orch)
    before = store.events()
    with pytest.raises(UsageError):
        services.complete_task(store, config_of(orch), "t1", {"outcome": "maybe"}, agent_id="a1", attempt=1)
    assert store.events() == before


def test_start_is_fenced_and_idempotent(store, orch, agent):
    services.create_task(store, orch, title="x", task_id="t1", labels=["agent:python"])
    with pytest.raises(LeaseLost):  # queued: nobody holds it
        services.start_task(store, "t1", agent_id="a1", attempt=1)
    claim(store)
    services.start_task(store, "t1", agent_id="a1", attempt=1, workspace="/w/t1/1", now=210.0)
    events = store.events()
    assert services.start_task(store, "t1", agent_id="a1", attempt=1, now=220.0)["state"] == "running"
    assert store.events() == events
    assert store.attempt("t1", 1)["workspace"] == "/w/t1/1"


def test_pr_closed_fails_without_retry(store, orch, agent):
    running(store, orch, repo="acme/app", issue_number=9)
    services.complete_task(store, config_of(orch), "t1", {**OK, "artifacts": [PR]}, agent_id="a1", attempt=1)
    t = services.fail_attempt(store, orch, "t1", "pr_closed", "closed without merge", now=500.0)
    assert (t["state"], t["failure_reason"], t["attempt"], t["max_attempts"]) == ("failed", "pr_closed", 1, 3)


# ---------------------------------------------------------------------------------------------- cancel and retry


def test_cancel_from_each_live_state_and_not_from_terminal(store, orch, agent):
    services.create_task(store, orch, title="q", task_id="q")
    running(store, orch, "r")
    assert services.cancel_task(store, "q")["state"] == "cancelled"
    t = services.cancel_task(store, "r", "issue closed", now=300.0)
    assert (t["state"], t["lease_expires_at"]) == ("cancelled", None)
    att = store.attempt("r", 1)
    assert (att["outcome"], att["ended_at"], att["failure_detail"]) == ("cancelled", 300.0, "issue closed")
    with pytest.raises(InvalidTransition, match="cannot cancel a task that is cancelled"):
        services.cancel_task(store, "r")
    with pytest.raises(LeaseLost):  # the cancelled run's agent can no longer report
        services.complete_task(store, config_of(orch), "r", OK, agent_id="a1", attempt=1)
    with pytest.raises(NotFound):
        services.cancel_task(store, "nope")


def test_retry_gives_a_new_budget(store, orch, agent):
    running(store, orch, labels=("agent:python", "retries:0"))
    failed = services.fail_attempt(store, orch, "t1", "agent_error", now=300.0)
    assert (failed["state"], failed["max_attempts"]) == ("failed", 1)
    t = services.retry_task(store, orch, "t1", now=350.0)
    assert (t["state"], t["attempt"], t["max_attempts"], t["failure_reason"], t["agent_id"]) == (
        "queued", 1, 2, None, None)  # fmt: skip
    assert claim(store, ts=400.0)["attempt"] == 2
    services.fail_attempt(store, orch, "t1", "agent_error", now=410.0)  # budget of the retry: 1 attempt
    assert store.task("t1")["state"] == "failed"


def test_retry_of_cancelled_and_refusals(store, orch, agent):
    services.create_task(store, orch, title="x", task_id="t1")
    with pytest.raises(InvalidTransition, match="cannot retry a task that is queued"):
        services.retry_task(store, orch, "t1")
    services.cancel_task(store, "t1")
    assert services.retry_task(store, orch, "t1")["state"] == "queued"
    running(store, orch, "t2")
    services.complete_task(store, config_of(orch), "t2", OK, agent_id="a1", attempt=1)
    with pytest.raises(InvalidTransition, match=r"completed: only failed or cancelled tasks can be retried"):
        services.retry_task(store, orch, "t2")


# ---------------------------------------------------------------------------------------------- agents


def test_register_updates_and_tokens(store):
    first = services.register_agent(store, "a1", agent_type="codex-cli", capabilities=["b", "a", "a"], now=1.0)
    assert first.created and first.token and services.token_matches(first.token, first.agent["token_hash"])
    assert first.agent["capabilities"] == ["a", "b"] and first.agent["status"] == "online"
    again = services.register_agent(store, "a1", agent_type="codex-cli", capabilities=["c"], max_concurrency=4,
                                    now=2.0)  # fmt: skip
    assert not again.created and again.token != first.token
    assert not services.token_matches(first.token, again.agent["token_hash"])
    assert (again.agent["capabilities"], again.agent["max_concurrency"]) == (["c"], 4)
    ssh = services.register_agent(store, "s1", agent_type="claude", mode="ssh_cli", host_id="h1", now=3.0)
    assert ssh.token is None and ssh.agent["token_hash"] is None
    with pytest.raises(UsageError):
        services.register_agent(store, "a2", agent_type="x", max_concurrency=0)
    with pytest.raises(UsageError):
        services.register_agent(store, "a2", agent_type="x", capabilities=["has space"])


def test_heartbeat_extends_leases_and_brings_offline_agents_back(store, orch, agent):
    running(store, orch)
    services.create_task(store, orch, title="y", task_id="t2", labels=["agent:python"])
    claim(store, ts=205.0)
    assert store.task("t1")["lease_expires_at"] == 200.0 + orch.lease_secs
    events = len(store.events())
    hb = services.heartbeat(store, orch, "a1", now=1000.0)
    assert len(store.events()) == events  # a heartbeat of an online agent is not an event
    assert hb["agent"]["last_heartbeat_at"] == 1000.0 and hb["cancelled"] == []
    assert {store.task(t)["lease_expires_at"] for t in ("t1", "t2")} == {1000.0 + orch.lease_secs}

    services.set_agent_status(store, orch, "a1", AgentStatus.OFFLINE, "heartbeats stopped", now=1100.0)
    back = services.heartbeat(store, orch, "a1", now=1200.0)
    assert back["agent"]["status"] == "online"
    assert [e["type"] for e in store.events(agent_id="a1", types=["agent.*"])][-2:] == ["agent.offline",
                                                                                        "agent.online"]  # fmt: skip
    with pytest.raises(NotFound):
        services.heartbeat(store, orch, "ghost")


def test_heartbeat_reports_cancelled_attempts(store, orch, agent):
    running(store, orch)
    services.heartbeat(store, orch, "a1", now=250.0)
    services.cancel_task(store, "t1", now=260.0)
    assert services.heartbeat(store, orch, "a1", now=270.0)["cancelled"] == ["t1"]


def test_going_offline_fails_active_attempts_with_agent_lost(store, orch, agent):
    services.create_task(store, orch, title="review", task_id="t4", labels=["agent:python"], now=150.0,
                         repo="acme/app", issue_number=4)  # fmt: skip
    claim(store, task_id="t4")
    services.complete_task(store, config_of(orch), "t4", {**OK, "artifacts": [PR]}, agent_id="a1", attempt=1)
    running(store, orch, "t1")
    services.create_task(store, orch, title="assigned", task_id="t2", labels=["agent:python"], now=150.0)
    claim(store, task_id="t2")
    running(store, orch, "t3", labels=("agent:python", "retries:0"))
    services.create_task(store, orch, title="waiting", task_id="t5", now=150.0)

    agent = services.set_agent_status(store, orch, "a1", AgentStatus.OFFLINE, "heartbeats stopped", now=900.0)
    assert agent["status"] == "offline"
    states = {t: (store.task(t)["state"], store.task(t)["failure_reason"]) for t in ("t1", "t2", "t3", "t4", "t5")}
    assert states == {
        "t1": ("queued", "agent_lost"), "t2": ("queued", "agent_lost"), "t3": ("failed", "agent_lost"),
        "t4": ("awaiting_review", None), "t5": ("queued", None),
    }  # fmt: skip
    assert store.running_counts() == {}
    assert claim(store, ts=10_000.0) is None  # offline agents claim nothing
    events = len(store.events())
    services.set_agent_status(store, orch, "a1", AgentStatus.OFFLINE, "again", now=901.0)
    assert len(store.events()) == events  # already offline: nothing to record


def test_deregister_and_draining(store, orch, agent):
    running(store, orch)
    services.drain_agent(store, orch, "a1", now=300.0)
    assert store.task("t1")["state"] == "running"  # draining finishes what it has
    assert store.agent("a1")["token_hash"] is not None
    services.deregister_agent(store, config_of(orch), "a1", now=310.0)
    assert store.events(agent_id="a1", types=["agent.*"])[-1]["type"] == "agent.deregistered"
    assert store.task("t1")["failure_reason"] == "agent_lost"
    assert store.agent("a1")["token_hash"] is None  # the token is revoked: coming back takes a registration
    assert store.check().ok


def test_resume_brings_a_drained_agent_back(store, orch, agent):
    services.drain_agent(store, orch, "a1", now=300.0)
    assert services.resume_agent(store, orch, "a1", now=301.0)["status"] == "online"
    assert services.resume_agent(store, orch, "a1", now=302.0)["status"] == "online"  # no-op when online
    services.deregister_agent(store, config_of(orch), "a1", now=303.0)
    with pytest.raises(Conflict, match="offline, not drained"):
        services.resume_agent(store, orch, "a1")


def test_an_agent_of_the_configuration_cannot_be_deregistered(store, orch):
    from fleetctl.config import AgentSpec, HostConfig

    cfg = config_of(orch)
    host = HostConfig(host_id="local", hostname="localhost", local=True, work_dir="/tmp/w",
                      agents=(AgentSpec(agent_id="local.a", agent_type="example", capabilities=("x",)),))  # fmt: skip
    cfg = type(cfg)(**{**vars(cfg), "hosts": (host,)})
    services.register_agent(store, "local.a", agent_type="example", capabilities=["x"], mode="ssh_cli",
                            host_id="local", issue_token=False)  # fmt: skip
    with pytest.raises(Conflict, match="defined in the configuration") as err:
        services.deregister_agent(store, cfg, "local.a")
    assert "agent drain local.a" in err.value.message and store.agent("local.a")["status"] == "online"


def test_mode_change_to_ssh_cli_revokes_the_pull_token(store, orch, agent):
    assert store.agent("a1")["token_hash"] is not None
    services.register_agent(store, "a1", agent_type="codex-cli", mode="ssh_cli", host_id="h", allow_mode_change=True)
    assert store.agent("a1")["token_hash"] is None and store.check().ok


def test_heartbeat_lists_every_attempt_the_agent_must_stop(store, orch, agent):
    """Timed out, cancelled or lost while the agent still runs it: the reply says stop (and why)."""
    running(store, orch, "t1")
    running(store, orch, "t2")
    running(store, orch, "t3")
    services.heartbeat(store, orch, "a1", now=300.0)
    services.expire_or_time_out(store, orch, store.task("t1"), FailureReason.TIMEOUT, "over", now=310.0)
    services.cancel_task(store, "t2", now=311.0)
    services.complete_task(store, config_of(orch), "t3", {"outcome": "failure", "summary": "cannot"},
                           agent_id="a1", attempt=1, now=312.0)  # its own failure receipt: nothing to stop  # fmt: skip
    reply = services.heartbeat(store, orch, "a1", now=320.0)
    assert reply["stop"] == [{"task_id": "t1", "attempt": 1, "reason": "timeout"},
                             {"task_id": "t2", "attempt": 1, "reason": "cancelled"}]  # fmt: skip
    assert reply["cancelled"] == ["t1", "t2"]


def test_settle_run_fails_an_open_attempt_by_exit_status(store, orch, agent):
    running(store, orch, "t1")
    running(store, orch, "t2")
    assert services.settle_run(store, orch, "t1", 1, 0, now=300.0)["failure_reason"] == "no_receipt"
    t2 = services.settle_run(store, orch, "t2", 1, 3, "boom", now=300.0)
    assert (t2["failure_reason"], t2["failure_detail"]) == ("agent_error", "the run exited with status 3: boom")
    events = store.events()
    assert services.settle_run(store, orch, "t1", 1, 0, now=301.0) is None  # already settled
    assert store.events() == events


def test_a_registration_cannot_take_over_an_agent_of_another_mode(store):
    services.register_agent(
        store, "local.coder", agent_type="example", mode="ssh_cli", host_id="local", issue_token=False
    )
    with pytest.raises(Conflict) as err:
        services.register_agent(store, "local.coder", agent_type="example", mode="http_pull")
    assert err.value.code == "agent_mode_conflict"
    assert store.agent("local.coder")["mode"] == "ssh_cli"
    converted = services.register_agent(store, "local.coder", agent_type="example", mode="http_pull",
                                         allow_mode_change=True)  # fmt: skip
    assert converted.agent["mode"] == "http_pull" and converted.token
    assert store.check().ok


def test_a_pull_request_receipt_on_a_task_without_a_repository_completes_it(store, orch, agent):
    """No issue and no repository: nothing would ever follow the pull request to its merge, so the task does
    not wait in awaiting_review forever; the pull request is kept as the record (docs/architecture.md)."""
    running(store, orch)
    pr = {"kind": "pull_request", "url": "https://forge.example.org/acme/app/pulls/12"}
    t = services.complete_task(store, config_of(orch), "t1", {**OK, "artifacts": [pr]}, agent_id="a1", attempt=1).task
    assert t["state"] == "completed"
    assert t["pull_request"]["number"] == 12 and t["pull_request"]["repo"] == "acme/app"
    assert store.check().ok


def test_a_second_receipt_for_an_attempt_awaiting_review_says_so(store, orch, agent):
    running(store, orch, repo="acme/app", issue_number=9)
    services.complete_task(store, config_of(orch), "t1", {**OK, "artifacts": [PR]}, agent_id="a1", attempt=1)
    with pytest.raises(LeaseLost) as err:
        services.complete_task(store, config_of(orch), "t1", {**OK, "summary": "other"}, agent_id="a1", attempt=1)
    assert "already handed in its receipt" in err.value.message and "awaiting review" in err.value.message
    assert "no longer holds" not in err.value.message


def test_status_running_with_a_too_long_message_changes_nothing(store, orch, agent):
    """One transaction: the refused message must not leave the task started (the CLI did two)."""
    services.create_task(store, orch, title="w", task_id="t1", labels=["agent:python"], now=150.0)
    store.claim(agent_id="a1", capabilities=["python"], max_concurrency=1, lease_secs=300, ts=200.0)
    before = len(store.events())
    with pytest.raises(UsageError):
        services.report_status(store, orch, "t1", "running", "x" * 5000, agent_id="a1", attempt=1, now=210.0)
    assert store.task("t1")["state"] == "assigned" and len(store.events()) == before
    t = services.report_status(store, orch, "t1", "running", "started", agent_id="a1", attempt=1, now=211.0)
    assert t["state"] == "running" and [e["type"] for e in store.events()[-2:]] == ["task.started", "task.progress"]


def test_an_attempt_is_settled_with_the_retry_policy_it_was_launched_with(store, orch, agent, tmp_path):
    """The run wrapper's process may load another (default) configuration: the backoff is the launcher's."""
    from fleetctl.config import OrchestratorConfig

    fast = OrchestratorConfig(db_path=tmp_path / "fleet.db", retry_backoff_secs=0.5, retry_backoff_max_secs=1)
    services.create_task(store, fast, title="w", task_id="t1", labels=["agent:python"], now=100.0)
    claim = services.claim_task(store, config_of(fast), store.agent("a1"), now=200.0)
    assert claim is not None and claim.prompt and claim.token
    slow = OrchestratorConfig(db_path=tmp_path / "fleet.db")  # retry_backoff_secs = 30
    t = services.settle_run(store, slow, "t1", 1, 1, now=300.0)
    assert t["state"] == "queued" and t["not_before"] - 300.0 <= 1.0


def test_illegal_transition_events_are_refused_on_write_and_reported_on_replay(store, orch):
    """The reducer applies the transition table: task.started on a cancelled task is never stored, and a
    log that has one (written behind the store's back) fails db check."""
    services.create_task(store, orch, title="w", task_id="t1", now=1.0)
    services.cancel_task(store, "t1", now=2.0)
    with pytest.raises(InvalidTransition):
        with store.write():
            store.emit("task.started", ts=3.0, task_id="t1")
    assert store.task("t1")["state"] == "cancelled" and store.check().ok
    store.execute("INSERT INTO events (ts, type, task_id, data) VALUES (3.0, 'task.started', 't1', '{}')")
    report = store.check()
    assert not report.ok and any("not a legal transition" in p for p in report.problems)
    store.execute("DELETE FROM events WHERE type = 'task.started'")  # untamper, for the fixture's own check


def test_knob_labels_parse_with_units_or_refuse_the_task(store, orch):
    t = services.create_task(store, orch, title="x", labels=["timeout:30m", "agnet:code:rust"], now=1.0)
    assert t["timeout_secs"] == 1800 and any("agent:code:rust" in w for w in t["warnings"])
    assert store.events(task_id=t["task_id"])[0]["data"]["warnings"] == t["warnings"]
    with pytest.raises(UsageError, match="retries:-1") as err:
        services.create_task(store, orch, title="y", labels=["retries:-1"])
    assert err.value.code == "invalid_label"
    lenient = services.create_task(store, orch, title="z", labels=["retries:-1"], strict=False)
    assert lenient["max_attempts"] == 1 + orch.default_max_retries and "retries:-1" in lenient["warnings"][0]


def test_heartbeat_cancelled_ids_never_name_a_task_the_agent_still_runs(store, orch, agent):
    """Cancelled, retried and claimed again by the same agent: attempt 1 is to stop, attempt 2 runs on — a client
    that reads only `cancelled` (task ids) must not be told to stop it."""
    running(store, orch, "t1")
    services.heartbeat(store, orch, "a1", now=300.0)
    services.cancel_task(store, "t1", now=301.0)
    services.retry_task(store, orch, "t1", now=302.0)
    store.claim(agent_id="a1", capabilities=["python"], max_concurrency=5, lease_secs=300, ts=303.0)
    reply = services.heartbeat(store, orch, "a1", now=310.0)
    assert reply["stop"] == [{"task_id": "t1", "attempt": 1, "reason": "cancelled"}]
    assert reply["cancelled"] == []


def test_registering_an_agent_id_of_the_configuration_is_refused(store, orch):
    with pytest.raises(Conflict) as err:
        services.register_agent(store, "local.a", agent_type="x", reserved={"local.a"})
    assert err.value.code == "agent_in_config" and store.agent("local.a") is None
