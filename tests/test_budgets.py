"""Budgets (issue 10): usage recorded per attempt from receipts and status reports; ``[budgets]`` per task, per
day (the whole fleet) and per repository; dispatch and dequeue start nothing past a budget (``blocked_by =
"budget"``, an event once); a report over the per-task budget stops the run and fails it ``budget_exceeded``
(not retried); ``fleetctl usage`` totals equal the recorded usage.

Real components: SQLite files in tmp_path, ``fleetctl`` processes and real local runs, a real ``fleetctl serve``.
Time is driven with the services' ``now=`` where a day boundary matters.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
from conftest import config_of, wait_for
from test_dispatch import dispatch

from fleetctl import services
from fleetctl.config import BudgetsConfig
from fleetctl.errors import UsageError

DAY = 86400.0
T0 = 1_700_000_000.0 - 1_700_000_000.0 % DAY + 3600  # 01:00 UTC on some day


def _cfg(orch, **budgets):
    repo = budgets.pop("repository", {})
    return replace(config_of(replace(orch, default_max_retries=2)), budgets=BudgetsConfig(repository=repo, **budgets))


def _claim(store, cfg, agent_id: str, ts: float):
    return services.claim_task(store, cfg, store.agent(agent_id), now=ts)


@pytest.fixture
def agent(store):
    services.register_agent(store, "a", agent_type="t", max_concurrency=10, now=T0)
    return "a"


def test_a_status_report_over_the_task_budget_fails_it_budget_exceeded_and_is_not_retried(store, orch, agent):
    cfg = _cfg(orch, max_cost_per_task=1.0)
    task = services.create_task(store, cfg.orchestrator, title="t", now=T0)
    tid = task["task_id"]
    _claim(store, cfg, agent, T0)
    services.report_status(store, cfg.orchestrator, tid, "progress", usage={"cost_usd": 0.6, "input_tokens": 100},
                           agent_id=agent, attempt=1, now=T0 + 1, cfg=cfg)  # fmt: skip
    assert store.task(tid)["state"] == "assigned" and store.task(tid)["spent_usd"] == pytest.approx(0.6)
    after = services.report_status(store, cfg.orchestrator, tid, "progress", usage={"cost_usd": 1.2}, agent_id=agent,
                                   attempt=1, now=T0 + 2, cfg=cfg)  # fmt: skip
    assert (after["state"], after["failure_reason"]) == ("failed", "budget_exceeded")  # retries left, not retried
    assert "over its $1.00 budget" in after["failure_detail"]
    # the agent is told to stop it by its heartbeat reply
    reply = services.heartbeat(store, cfg.orchestrator, agent, now=T0 + 3)
    assert {"task_id": tid, "attempt": 1, "reason": "over_budget"} in reply["stop"]
    # bad usage changes nothing
    t2 = services.create_task(store, cfg.orchestrator, title="t2", now=T0)["task_id"]
    _claim(store, cfg, agent, T0 + 4)
    before = len(store.events())
    for bad in ({"cost_usd": -1}, {"cost_usd": "1"}, {"tokens": 3}, {"input_tokens": 1.5}, [1]):
        with pytest.raises(UsageError):
            services.report_status(store, cfg.orchestrator, t2, "progress", usage=bad, agent_id=agent, attempt=1,
                                   now=T0 + 5, cfg=cfg)  # fmt: skip
    assert len(store.events()) == before
    assert not store.check().problems


def test_an_operator_retry_gives_a_task_a_new_budget_and_a_task_at_its_budget_is_held_back(store, orch, agent):
    cfg = _cfg(orch, max_cost_per_task=1.0)
    tid = services.create_task(store, cfg.orchestrator, title="t", now=T0)["task_id"]
    _claim(store, cfg, agent, T0)
    services.hand_in_receipt(store, cfg, tid, {"outcome": "failure", "usage": {"cost_usd": 1.0}}, agent_id=agent,
                             attempt=1, now=T0 + 1)  # fmt: skip
    queued = store.task(tid)  # exactly at the budget: not over, so retried — but held back from a new attempt
    assert (queued["state"], queued["failure_reason"]) == ("queued", "agent_error")
    assert _claim(store, cfg, agent, T0 + 100) is None
    assert services.mark_blocked(store, cfg, T0 + 100)["blocked"] == 1
    assert store.task(tid)["blocked_by"] == "budget"
    assert services.mark_blocked(store, cfg, T0 + 101)["blocked"] == 0  # the event once
    assert [e["type"] for e in store.events(task_id=tid)].count("task.blocked") == 1
    services.cancel_task(store, tid, now=T0 + 102)
    retried = services.retry_task(store, cfg.orchestrator, tid, now=T0 + 103)
    assert retried["spent_usd"] == 0 and retried["blocked_by"] is None
    assert _claim(store, cfg, agent, T0 + 200).task["task_id"] == tid
    assert not store.check().problems


def test_the_days_budget_holds_back_every_new_attempt_until_the_next_utc_day(store, orch, agent):
    cfg = _cfg(orch, max_cost_per_day=2.0, repository={"acme/b": {"max_cost_per_day": 0.5}})
    ids = [services.create_task(store, cfg.orchestrator, title=f"t{i}", repo=r, issue_number=i + 1, now=T0)["task_id"]
           for i, r in enumerate(["acme/a", "acme/b", "acme/a", "acme/b"])]  # fmt: skip
    first = _claim(store, cfg, agent, T0)
    assert first.task["task_id"] == ids[0]
    second = _claim(store, cfg, agent, T0)
    assert second.task["task_id"] == ids[1]
    services.report_status(store, cfg.orchestrator, ids[1], usage={"cost_usd": 0.5}, agent_id=agent, attempt=1,
                           now=T0 + 1, cfg=cfg)  # fmt: skip
    nxt = _claim(store, cfg, agent, T0 + 2)  # acme/b has spent its day: acme/a's next task, not acme/b's
    assert nxt.task["task_id"] == ids[2]
    held = services.blocking(store, cfg, T0 + 2)
    assert held.fleet is None and "acme/b has spent $0.50 of its $0.50 budget today" in held.repos["acme/b"]
    services.report_status(store, cfg.orchestrator, ids[0], usage={"cost_usd": 1.6}, agent_id=agent, attempt=1,
                           now=T0 + 3, cfg=cfg)  # fmt: skip
    assert services.blocking(store, cfg, T0 + 3).fleet == "the fleet has spent $2.10 of its $2.00 budget today"
    services.cancel_task(store, ids[2], now=T0 + 4)
    services.retry_task(store, cfg.orchestrator, ids[2], now=T0 + 5)
    assert _claim(store, cfg, agent, T0 + 6) is None  # nothing starts past the fleet's budget
    assert _claim(store, cfg, agent, T0 - T0 % DAY + DAY + 1) is not None  # the next UTC day: spend starts at 0
    assert not store.check().problems


def test_dispatch_with_the_days_budget_nearly_spent_starts_nothing_and_says_why_once(fleet):
    fleet.configure(agents=[{"agent_type": "ok", "agent_id": "w", "max_concurrency": 4}])
    text = fleet.config.read_text() + "\n[budgets]\nmax_cost_per_day = 1.0\n"
    fleet.config.write_text(text)
    assert fleet.run("agent", "register", "other", "--type", "t").returncode == 0
    first = fleet.create("--title", "spender")
    fleet.claim(first, "other")
    done = fleet.run("task", "complete", first, "--summary", "done", "--cost-usd", "0.99",
                     env={"FLEET_AGENT_ID": "other", "FLEET_ATTEMPT": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert dispatch(fleet)["budget"] is None  # 0.99 of 1.00: still under
    waiting = [fleet.create("--title", f"w{i}") for i in range(3)]
    report = dispatch(fleet)
    assert len(report["launched"]) == 3  # under budget, they start; each run reports nothing: fine
    for t in waiting:
        fleet.wait_state(t, "completed")
    fleet.claim(fleet.create("--title", "spends a cent"), "other")
    last = fleet.query("SELECT task_id FROM tasks WHERE state = 'assigned'")[0]["task_id"]
    done = fleet.run(
        "task", "status", last, "--cost-usd", "0.02", env={"FLEET_AGENT_ID": "other", "FLEET_ATTEMPT": "1"}
    )
    assert done.returncode == 0, done.stderr
    held = [fleet.create("--title", f"h{i}") for i in range(2)]
    report = dispatch(fleet)
    assert report["launched"] == [] and report["planned"] == []
    assert (
        report["budget"]["blocked"] == 2
        and "the fleet has spent $1.01 of its $1.00 budget today" in report["budget"]["why"]
    )
    again = dispatch(fleet)
    assert again["launched"] == [] and again["budget"]["blocked"] == 0  # said once
    for t in held:
        task = fleet.task(t)
        assert (task["state"], task["blocked_by"]) == ("queued", "budget")
        assert [e["type"] for e in fleet.events(t)].count("task.blocked") == 1
    human = fleet.run("dispatch")
    assert "held back by a budget: the fleet has spent $1.01" in human.stdout
    fleet.check_db()


def test_usage_totals_equal_the_recorded_usage(fleet):
    fleet.configure(agents=[])
    for agent_id in ("ag1", "ag2"):
        assert fleet.run("agent", "register", agent_id, "--type", "t").returncode == 0
    reports = {("acme/a", 1): [(100, 10, 0.25), (300, 30, 0.75)], ("acme/b", 2): [(50, 5, 0.1)]}
    expected = {"input": 0, "output": 0, "cost": 0.0}
    for (repo, n), attempts in reports.items():
        tid = fleet.create("--title", repo, "--repo", repo, "--issue", str(n), "--label", "retries:3")
        for i, (tin, tout, cost) in enumerate(attempts, start=1):
            fleet.claim(tid, f"ag{n}")
            env = {"FLEET_AGENT_ID": f"ag{n}", "FLEET_ATTEMPT": str(i)}
            # an earlier report of the same attempt is replaced by the later one
            assert fleet.run("task", "status", tid, "--cost-usd", "9.99", env=env).returncode == 0
            done = fleet.run("task", "complete", tid, "--outcome", "failure", "--input-tokens", str(tin),
                             "--output-tokens", str(tout), "--cost-usd", str(cost), env=env)  # fmt: skip
            assert done.returncode == 0, done.stderr
            expected["input"] += tin
            expected["output"] += tout
            expected["cost"] += cost
            if i < len(attempts):  # wait out the retry backoff (0.2 s here) before the next attempt
                wait_for(lambda t=tid: (fleet.task(t)["not_before"] or 0) <= time.time(), what="the backoff")
    doc = json.loads(fleet.run("usage", "--by", "repo", "--json").stdout)
    assert doc["total"] == {"attempts": 3, "input_tokens": expected["input"], "output_tokens": expected["output"],
                            "cost_usd": pytest.approx(expected["cost"])}  # fmt: skip
    assert [(i["key"], i["attempts"], i["cost_usd"]) for i in doc["items"]] == [("acme/a", 2, 1.0), ("acme/b", 1, 0.1)]
    for by in ("task", "agent", "day"):
        other = json.loads(fleet.run("usage", "--by", by, "--json").stdout)
        assert other["total"] == doc["total"]
    table = fleet.run("usage", "--by", "agent", env={"COLUMNS": "120"}).stdout
    assert table.split()[:5] == ["AGENT", "ATTEMPTS", "INPUT", "TOKENS", "OUTPUT"] and "$1.10" in table
    bad = fleet.run("usage", "--by", "week")
    assert bad.returncode == 2 and "--by must be one of task, repo, agent, day" in bad.stderr
    detail = json.loads(fleet.run("task", "show", fleet.query("SELECT task_id FROM tasks LIMIT 1")[0]["task_id"],
                                  "--json").stdout)  # fmt: skip
    assert all("usage" in a for a in detail["attempts"])
    fleet.check_db()


def test_a_dispatched_run_over_its_budget_is_killed_by_the_sweep(fleet):
    fleet.configure(agents=[{"agent_type": "hang", "agent_id": "w", "max_concurrency": 1}],
                    agent_types={"hang": {"command": ["sleep", "30"], "prompt": "stdin"}})  # fmt: skip
    fleet.config.write_text(fleet.config.read_text() + "\n[budgets]\nmax_cost_per_task = 0.5\n")
    tid = fleet.create("--title", "expensive")
    (launched,) = dispatch(fleet)["launched"]
    assert fleet.pid_alive(launched["pid"])
    done = fleet.run("task", "status", tid, "--cost-usd", "0.75", "--json", env={"FLEET_AGENT_ID": "w",
                                                                                  "FLEET_ATTEMPT": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (json.loads(done.stdout)["state"], json.loads(done.stdout)["failure_reason"]) == (
        "failed",
        "budget_exceeded",
    )
    swept = fleet.run("sweep-timeouts", "--json")
    assert swept.returncode == 0, swept.stderr
    killed = [a for a in json.loads(swept.stdout)["actions"] if a["action"] == "task.run_killed"]
    assert [(a["task"], a["why"]) for a in killed] == [(tid, "budget_exceeded")]
    wait_for(lambda: not fleet.pid_alive(launched["pid"]), what="the run to be gone")
    fleet.check_db()


def test_a_failure_receipt_over_budget_fails_the_task_and_its_repeat_is_answered_as_recorded(store, orch, agent):
    cfg = _cfg(orch, max_cost_per_task=1.0)
    tid = services.create_task(store, cfg.orchestrator, title="t", now=T0)["task_id"]
    _claim(store, cfg, agent, T0)
    receipt = {"outcome": "failure", "summary": "gave up", "usage": {"cost_usd": 3.0}}
    first = services.hand_in_receipt(store, cfg, tid, receipt, agent_id=agent, attempt=1, now=T0 + 1)
    assert (first.task["state"], first.task["failure_reason"]) == ("failed", "budget_exceeded")
    again = services.hand_in_receipt(store, cfg, tid, receipt, agent_id=agent, attempt=1, now=T0 + 2)
    assert again.repeated and again.task["state"] == "failed"
    assert not store.check().problems
