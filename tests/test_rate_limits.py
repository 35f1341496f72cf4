"""Usage limits (issue 10; SPEC §2 ``rate_limited``): an attempt that ends ``rate_limited`` — by a receipt, a
status report, over HTTP, from the CLI, or by exit status 75 (with ``.fleet/retry_after``) of a local or SSH
run — goes back to the queue without consuming a retry, and its agent cools down: dispatch and dequeue skip it
until then, another agent may take the task meanwhile, the same one afterwards.

Real components: SQLite files in tmp_path, ``fleetctl`` processes, a real ``fleetctl serve``, real runs, a real
sshd. Time is driven through the services' ``now=`` where it matters; every wait is bounded.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import ADMIN_TOKEN, DEFAULT_AGENT_TYPES, REGISTRATION_TOKEN, config_of, wait_for
from test_dispatch import dispatch, types
from test_ssh_fleet import agent_type, box, configure, sweep

from fleetctl import services
from fleetctl.errors import UsageError
from fleetctl.store import Store

T0 = 1_700_000_000.0


@pytest.fixture
def cfg(orch):
    return config_of(replace(orch, rate_limit_cooldown_secs=300, default_max_retries=0))


def _agents(store: Store, *ids: str) -> None:
    for agent_id in ids:
        services.register_agent(store, agent_id, agent_type="codex", capabilities=["py"], max_concurrency=1, now=T0)


def _claim(store: Store, cfg, agent_id: str, ts: float):
    return services.claim_task(store, cfg, store.agent(agent_id), now=ts)


def test_a_rate_limited_receipt_requeues_without_a_retry_and_cools_the_agent_down(store, cfg):
    _agents(store, "a1", "a2")
    task = services.create_task(store, cfg.orchestrator, title="t", labels=["agent:py"], now=T0)
    assert task["max_attempts"] == 1  # default_max_retries 0: one attempt, no retry to spend
    assert _claim(store, cfg, "a1", T0 + 1).attempt == 1
    result = services.hand_in_receipt(store, cfg, task["task_id"], {"outcome": "rate_limited", "retry_after_secs": 120,
                                      "summary": "429 from the model"}, agent_id="a1", attempt=1, now=T0 + 2)  # fmt: skip
    after = result.task
    assert (after["state"], after["failure_reason"], after["max_attempts"], after["agent_id"]) == (
        "queued", "rate_limited", 2, None)  # fmt: skip
    assert after["not_before"] is None  # no backoff: another agent may take it at once
    a1 = store.agent("a1")
    assert a1["cooldown_until"] == T0 + 2 + 120 and "usage limit" in a1["cooldown_reason"]
    (attempt,) = store.attempts(task["task_id"])
    assert (attempt["outcome"], attempt["failure_reason"]) == ("failed", "rate_limited")
    assert attempt["receipt"]["retry_after_secs"] == 120

    assert _claim(store, cfg, "a1", T0 + 60) is None  # cooling down
    other = _claim(store, cfg, "a2", T0 + 60)  # another agent takes it meanwhile
    assert (other.task["task_id"], other.attempt) == (task["task_id"], 2)
    # a2 hits a limit too, without saying for how long: the fleet's default cooldown (300 s)
    services.report_status(store, cfg.orchestrator, task["task_id"], "rate_limited", "quota", agent_id="a2",
                           attempt=2, now=T0 + 70)  # fmt: skip
    assert store.agent("a2")["cooldown_until"] == T0 + 70 + 300
    assert store.task(task["task_id"])["max_attempts"] == 3
    assert _claim(store, cfg, "a1", T0 + 121) is None  # still 1 s to go
    again = _claim(store, cfg, "a1", T0 + 123)  # the same agent once its cooldown is over
    assert again.attempt == 3
    services.hand_in_receipt(store, cfg, task["task_id"], {"outcome": "success", "summary": "done"}, agent_id="a1",
                             attempt=3, now=T0 + 130)  # fmt: skip
    done = store.task(task["task_id"])
    assert done["state"] == "completed"  # limited twice, never failed, never spent a retry
    events = [e for e in store.events(task_id=task["task_id"])]
    assert types(events) == ["task.created", "task.assigned", "task.rate_limited", "task.assigned",
                             "task.rate_limited", "task.assigned", "task.completed"]  # fmt: skip
    cooldowns = [
        e for e in store.events(agent_id="a1") + store.events(agent_id="a2") if e["type"] == "agent.cooled_down"
    ]
    assert sorted((e["agent_id"], e["data"]["until"]) for e in cooldowns) == [("a1", T0 + 122), ("a2", T0 + 370)]
    assert not store.check().problems


def test_a_cooldown_is_never_shortened_and_bad_reports_change_nothing(store, cfg):
    _agents(store, "a1")
    task = services.create_task(store, cfg.orchestrator, title="t", labels=["agent:py"], now=T0)
    _claim(store, cfg, "a1", T0)
    services.rate_limit_attempt(store, cfg.orchestrator, task["task_id"], 1000, agent_id="a1", attempt=1, now=T0)
    _claim(store, cfg, "a1", T0 + 2000)
    services.rate_limit_attempt(store, cfg.orchestrator, task["task_id"], 10, agent_id="a1", attempt=2, now=T0 + 2001)
    assert store.agent("a1")["cooldown_until"] == T0 + 2011
    _claim(store, cfg, "a1", T0 + 2012)
    events = len(store.events())
    for doc in ({"outcome": "rate_limited", "retry_after_secs": -1}, {"outcome": "rate_limited", "retry_after_secs": "x"},
                {"outcome": "success", "retry_after_secs": 5}, {"outcome": "rate_limited", "retry_after_secs": True}):  # fmt: skip
        with pytest.raises(UsageError):
            services.hand_in_receipt(store, cfg, task["task_id"], doc, agent_id="a1", attempt=3, now=T0 + 2013)
    with pytest.raises(UsageError):
        services.report_status(store, cfg.orchestrator, task["task_id"], "progress", retry_after=5, agent_id="a1",
                               attempt=3, now=T0 + 2013)  # fmt: skip
    assert len(store.events()) == events and store.task(task["task_id"])["state"] == "assigned"
    # a wait beyond a week is cut to a week: the agent is asked again then
    services.rate_limit_attempt(store, cfg.orchestrator, task["task_id"], None, agent_id="a1", attempt=3,
                                now=T0 + 2020)  # fmt: skip
    from fleetctl.receipts import MAX_RETRY_AFTER, parse_retry_after

    assert parse_retry_after(10**9) == MAX_RETRY_AFTER
    assert not store.check().problems


# ---------------------------------------------------------------------------------------------- HTTP and CLI


def test_over_http_a_rate_limited_status_frees_the_task_for_another_pull_agent_and_the_list_shows_the_cooldown(
    live_server,
):
    with live_server.client(REGISTRATION_TOKEN) as c:
        tokens = {}
        for agent_id in ("p1", "p2"):
            r = c.post("/api/v1/agents/register", json={"agent_id": agent_id, "agent_type": "t", "max_concurrency": 1})
            tokens[agent_id] = r.json()["token"]
    with live_server.client(ADMIN_TOKEN) as admin:
        task_id = admin.post("/api/v1/tasks", json={"title": "limited", "labels": ["retries:0"]}).json()["task_id"]
    with live_server.client(tokens["p1"]) as p1, live_server.client(tokens["p2"]) as p2:
        got = p1.post("/api/v1/tasks/dequeue", json={"wait": 0})
        assert got.status_code == 200 and got.json()["task"]["task_id"] == task_id
        bad = p1.post(f"/api/v1/tasks/{task_id}/status", json={"attempt": 1, "status": "rate_limited",
                                                               "retry_after_secs": -3})  # fmt: skip
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_field"
        r = p1.post(f"/api/v1/tasks/{task_id}/status", json={"attempt": 1, "status": "rate_limited",
                                                             "retry_after_secs": 600, "message": "HTTP 429"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert (r.json()["state"], r.json()["failure_reason"], r.json()["max_attempts"]) == (
            "queued",
            "rate_limited",
            2,
        )
        assert p1.post("/api/v1/tasks/dequeue", json={"wait": 0}).status_code == 204  # cooling down
        got = p2.post("/api/v1/tasks/dequeue", json={"wait": 0})
        assert got.status_code == 200 and got.json()["attempt"] == 2
        done = p2.post(f"/api/v1/tasks/{task_id}/complete", json={"attempt": 2, "outcome": "rate_limited"})
        assert done.status_code == 200 and done.json()["state"] == "queued", done.text
    with live_server.client(ADMIN_TOKEN) as admin:
        agents = {a["agent_id"]: a for a in admin.get("/api/v1/agents").json()["items"]}
    assert agents["p1"]["cooldown_until"] is not None and agents["p2"]["cooldown_until"] is not None
    assert "usage limit" in agents["p1"]["cooldown_reason"]


def test_the_cli_reports_a_usage_limit_and_agent_list_shows_the_cooldown(fleet):
    fleet.configure(agents=[])
    task_id = fleet.create("--title", "t", "--label", "retries:0")
    assert fleet.run("agent", "register", "w1", "--type", "codex").returncode == 0
    fleet.claim(task_id, "w1")
    bad = fleet.run("task", "complete", task_id, "--retry-after", "60", env={"FLEET_AGENT_ID": "w1"})
    assert bad.returncode == 2 and "--retry-after goes with --outcome rate_limited" in bad.stderr
    done = fleet.run("task", "complete", task_id, "--outcome", "rate_limited", "--retry-after", "60",
                     "--summary", "limit", "--json", env={"FLEET_AGENT_ID": "w1", "FLEET_ATTEMPT": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "queued"
    listed = fleet.run("agent", "list", "--json")
    (agent,) = [a for a in json.loads(listed.stdout)["items"] if a["agent_id"] == "w1"]
    assert agent["cooldown_until"] is not None
    table = fleet.run("agent", "list", env={"COLUMNS": "200"})
    assert "COOLDOWN" in table.stdout and "(in " in table.stdout, table.stdout
    fleet.check_db()


# ---------------------------------------------------------------------------------------------- exit 75


LIMITED = "echo 45 > .fleet/retry_after; echo 'usage limit reached' >&2; exit 75"


def test_a_local_run_exiting_75_requeues_and_another_local_agent_takes_the_task(fleet):
    fleet.configure(
        agents=[{"agent_type": "limited", "agent_id": "a-tired", "max_concurrency": 1},
                {"agent_type": "ok", "agent_id": "b-fresh", "max_concurrency": 1}],
        agent_types={"limited": {"command": ["sh", "-c", LIMITED], "prompt": "stdin"}, **DEFAULT_AGENT_TYPES},
        orchestrator={"default_max_retries": 0},
    )  # fmt: skip
    task_id = fleet.create("--title", "limited once")
    report = dispatch(fleet)  # two idle agents: the planner breaks the tie by id
    assert [(p["task_id"], p["agent_id"]) for p in report["launched"]] == [(task_id, "a-tired")], report
    task = fleet.wait_state(task_id, "queued", "completed", "failed")
    assert (task["state"], task["failure_reason"], task["max_attempts"]) == ("queued", "rate_limited", 2), task
    tired = fleet.query("SELECT cooldown_until FROM agents WHERE agent_id = 'a-tired'")[0]["cooldown_until"]
    ev = [e for e in fleet.events(task_id) if e["type"] == "task.rate_limited"][0]
    assert ev["data"]["retry_after_secs"] == 45 and tired == pytest.approx(ev["ts"] + 45)
    assert ev["data"]["detail"].startswith("the run exited 75 (a usage limit)")
    report = dispatch(fleet)  # the tired agent is skipped: the fresh one takes it
    assert [(p["task_id"], p["agent_id"]) for p in report["launched"]] == [(task_id, "b-fresh")], report
    assert fleet.wait_state(task_id, "completed")["attempt"] == 2
    fleet.check_db()


def test_an_ssh_run_exiting_75_is_settled_by_the_sweep_as_a_usage_limit(fleet, sshd, tmp_path):
    host = box(sshd, tmp_path)
    configure(fleet, [host], {"agent": agent_type("sh", "-c", LIMITED)}, orchestrator={"default_max_retries": 0})
    task_id = fleet.create("--title", "limited over ssh")
    report = dispatch(fleet)
    assert [p["agent_id"] for p in report["launched"]] == ["box-1.agent"], report
    ws = tmp_path / "box-1" / task_id / "1"
    wait_for(lambda: (ws / ".fleet" / "exit_status").exists(), what="the run to end")
    actions = sweep(fleet)
    ended = [a for a in actions if a["action"] == "task.run_ended"]
    assert [(a["exit_code"], a["state"]) for a in ended] == [(75, "queued")], actions
    task = fleet.task(task_id)
    assert (task["failure_reason"], task["max_attempts"]) == ("rate_limited", 2)
    agent = fleet.query("SELECT cooldown_until, cooldown_reason FROM agents WHERE agent_id = 'box-1.agent'")[0]
    ev = [e for e in fleet.events(task_id) if e["type"] == "task.rate_limited"][0]
    assert agent["cooldown_until"] == pytest.approx(ev["ts"] + 45)
    assert dispatch(fleet)["launched"] == []  # its only agent rests: the task waits, queued, not failed
    assert fleet.task(task_id)["state"] == "queued"
    fleet.check_db()
