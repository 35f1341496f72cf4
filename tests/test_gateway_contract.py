"""The gateway contract (fleetctl/gateway.py): one suite, run once against ``LocalGateway`` (the services on
the database) and once against ``RemoteGateway`` (a real ``fleetctl serve``). Same calls, same shapes,
same errors — so ``task complete``/``task status``/``agent register``/``agent heartbeat`` behave the same
with and without ``--api-url``."""

from __future__ import annotations

import pytest
from conftest import ADMIN_TOKEN, REGISTRATION_TOKEN

from fleetctl.errors import FleetError, Forbidden, LeaseLost, NotFound, UsageError, ValidationFailed
from fleetctl.gateway import Gateway, LocalGateway, RemoteGateway

TASK_KEYS = {"task_id", "state", "attempt", "agent_id", "pull_request", "failure_reason"}
AGENT_KEYS = {"agent_id", "agent_type", "capabilities", "max_concurrency", "mode", "status", "running"}


class Harness:
    """A live server and a way to act as one of its agents, locally or remotely (``kind``)."""

    def __init__(self, server, kind: str):
        from fleetctl.config import load_config

        self.server, self.kind = server, kind
        self.cfg = load_config(server.config_path)
        self.tokens: dict[str, str] = {}
        self.opened: list = []

    def gateway(self, token: str | None = None) -> Gateway:
        if self.kind == "local":
            gw = LocalGateway(self.cfg)
        else:
            from fleetctl.remote import Client

            gw = RemoteGateway(Client(self.server.url, token or REGISTRATION_TOKEN, retry_secs=0))
        self.opened.append(gw)
        return gw

    def agent(self, agent_id: str) -> Gateway:
        """A gateway acting as ``agent_id`` (remotely: with its token)."""
        if agent_id not in self.tokens:
            self.tokens[agent_id] = self.server.register(agent_id, capabilities=("code:python",))
        return self.gateway(self.tokens[agent_id])

    def claimed_task(self, agent_id: str, **fields) -> str:
        """A new task, claimed by ``agent_id`` (attempt 1); its id."""
        self.agent(agent_id)
        with self.server.client(ADMIN_TOKEN) as admin:
            r = admin.post("/api/v1/tasks", json={"title": "Fix the parser", "labels": ["agent:code:python"], **fields})
            assert r.status_code == 201, r.text
            task_id = r.json()["task_id"]
        with self.server.client(self.tokens[agent_id]) as c:
            r = c.post("/api/v1/tasks/dequeue", json={})
            assert r.status_code == 200 and r.json()["task"]["task_id"] == task_id, r.text
        return task_id

    def task(self, task_id: str) -> dict:
        with self.server.client(ADMIN_TOKEN) as admin:
            return admin.get(f"/api/v1/tasks/{task_id}").json()

    def close(self) -> None:
        for gw in self.opened:
            gw.close()


@pytest.fixture(params=["local", "remote"])
def h(request, live_server):
    harness = Harness(live_server, request.param)
    try:
        yield harness
    finally:
        harness.close()


# ---------------------------------------------------------------------------------------------- complete


def test_complete_success_then_an_identical_repeat(h):
    task_id = h.claimed_task("builder")
    gw = h.agent("builder")
    out = gw.complete(task_id, {"summary": "fixed"}, attempt=1, agent_id="builder")
    assert TASK_KEYS | {"repeated"} <= out.keys()
    assert (out["task_id"], out["state"], out["repeated"]) == (task_id, "completed", False)
    again = gw.complete(task_id, {"summary": "fixed"}, attempt=1, agent_id="builder")
    assert (again["state"], again["repeated"]) == ("completed", True)
    assert [e["type"] for e in h.task(task_id)["events"]].count("task.completed") == 1


def test_complete_without_attempt_means_the_current_one(h):
    task_id = h.claimed_task("builder")
    out = h.agent("builder").complete(task_id, {"summary": "fixed"}, agent_id="builder")
    assert out["state"] == "completed" and out["attempt"] == 1


def test_complete_with_a_lost_lease_changes_nothing(h):
    task_id = h.claimed_task("builder")
    before = h.task(task_id)
    with pytest.raises(LeaseLost):
        h.agent("builder").complete(task_id, {"summary": "late"}, attempt=2, agent_id="builder")
    after = h.task(task_id)
    assert (after["state"], len(after["events"])) == ("assigned", len(before["events"]))


def test_complete_of_a_task_another_agent_holds_is_refused(h):
    """The one deliberate difference: the API authenticates, so a token that never held the task is
    Forbidden (exit 2); locally the agent id is only a claim, and the write is fenced (LeaseLost, exit 4)."""
    task_id = h.claimed_task("builder")
    h.agent("other")
    with pytest.raises(FleetError) as info:
        h.agent("other").complete(task_id, {"summary": "not mine"}, attempt=1, agent_id="other")
    assert type(info.value) is (LeaseLost if h.kind == "local" else Forbidden)
    assert h.task(task_id)["state"] == "assigned"
    assert h.task(task_id)["state"] == "assigned"


def test_complete_with_a_refused_receipt_raises_validation_failed(h):
    task_id = h.claimed_task("builder", repo="acme/tool", issue_number=7)
    receipt = {"summary": "wrong repo", "artifacts": [{"kind": "pull_request", "repo": "other/thing", "number": 3}]}
    with pytest.raises(ValidationFailed, match="not in the task's repository"):
        h.agent("builder").complete(task_id, receipt, attempt=1, agent_id="builder")
    task = h.task(task_id)
    assert task["state"] in ("queued", "failed") and task["attempts"][0]["failure_reason"] == "receipt_invalid"


def test_complete_with_a_malformed_receipt_is_a_usage_error(h):
    task_id = h.claimed_task("builder")
    with pytest.raises(UsageError, match="invalid receipt"):
        h.agent("builder").complete(task_id, {"outcome": "maybe"}, attempt=1, agent_id="builder")
    assert h.task(task_id)["state"] == "assigned"


def test_complete_of_an_unknown_task(h):
    h.agent("builder")
    with pytest.raises(FleetError) as info:
        h.agent("builder").complete("t-nosuch", {"summary": "x"}, attempt=1, agent_id="builder")
    assert type(info.value) is NotFound


# ---------------------------------------------------------------------------------------------- status


def test_status_running_then_progress(h):
    task_id = h.claimed_task("builder")
    gw = h.agent("builder")
    view = gw.status(task_id, "running", attempt=1, agent_id="builder")
    assert TASK_KEYS <= view.keys() and view["state"] == "running"
    assert gw.status(task_id, "running", attempt=1, agent_id="builder")["state"] == "running"  # a no-op repeat
    view = gw.status(task_id, "progress", "tests pass", attempt=1, agent_id="builder")
    assert view["state"] == "running"
    types = [e["type"] for e in h.task(task_id)["events"]]
    assert types.count("task.started") == 1 and types.count("task.progress") == 1
    progress = [e for e in h.task(task_id)["events"] if e["type"] == "task.progress"][0]
    assert progress["data"]["message"] == "tests pass"


def test_status_running_with_a_too_long_message_changes_nothing(h):
    """Regression: the CLI path started the task, then refused the message (exit 2, task left running)."""
    task_id = h.claimed_task("builder")
    before = h.task(task_id)
    with pytest.raises(UsageError, match="message"):
        h.agent("builder").status(task_id, "running", "x" * 5000, attempt=1, agent_id="builder")
    after = h.task(task_id)
    assert (after["state"], len(after["events"])) == ("assigned", len(before["events"]))


def test_status_with_a_lost_lease_and_a_bad_status(h):
    task_id = h.claimed_task("builder")
    gw = h.agent("builder")
    with pytest.raises(LeaseLost):
        gw.status(task_id, "running", attempt=5, agent_id="builder")
    with pytest.raises(UsageError, match="running, progress or rate_limited"):
        gw.status(task_id, "done", attempt=1, agent_id="builder")
    assert h.task(task_id)["state"] == "assigned"


# ---------------------------------------------------------------------------------------------- agents


def test_register_creates_then_updates_with_a_fresh_token(h):
    gw = h.gateway()
    reg = gw.register("puller-9", agent_type="codex-cli", capabilities=["code:rust", "code:python"],
                      max_concurrency=2)  # fmt: skip
    assert set(reg) == {"agent", "token", "created"} and reg["created"] is True
    assert AGENT_KEYS <= reg["agent"].keys() and "token" not in reg["agent"]
    assert (reg["agent"]["agent_id"], reg["agent"]["status"], reg["agent"]["mode"]) == ("puller-9", "online",
                                                                                       "http_pull")  # fmt: skip
    assert reg["agent"]["capabilities"] == ["code:python", "code:rust"] and reg["agent"]["max_concurrency"] == 2
    again = gw.register("puller-9", agent_type="codex-cli", capabilities=["code:rust"])
    assert again["created"] is False and again["token"] and again["token"] != reg["token"]
    assert again["agent"]["capabilities"] == ["code:rust"] and again["agent"]["max_concurrency"] == 1


def test_register_refuses_bad_input(h):
    with pytest.raises(UsageError):
        h.gateway().register("puller-9", agent_type="x", max_concurrency=0)
    with pytest.raises(UsageError):
        h.gateway().register("bad id!", agent_type="x")


def test_heartbeat(h):
    task_id = h.claimed_task("builder")
    out = h.agent("builder").heartbeat("builder")
    assert {"agent", "cancelled", "heartbeat_interval_secs"} <= out.keys()
    assert AGENT_KEYS <= out["agent"].keys()
    assert (out["agent"]["agent_id"], out["agent"]["status"], out["agent"]["running"]) == ("builder", "online", 1)
    assert out["cancelled"] == [] and out["heartbeat_interval_secs"] == 60
    with h.server.client(ADMIN_TOKEN) as admin:
        assert admin.post(f"/api/v1/tasks/{task_id}/cancel", json={}).status_code == 200
    assert h.agent("builder").heartbeat("builder")["cancelled"] == [task_id]


# ---------------------------------------------------------------------------------------------- run ended


def test_run_ended_settles_an_attempt_without_a_receipt_once(h):
    task_id = h.claimed_task("builder")
    gw = h.agent("builder")
    out = gw.run_ended(task_id, 1, 3, "Traceback: boom", agent_id="builder")
    assert TASK_KEYS | {"settled", "reason"} <= out.keys()
    assert (out["settled"], out["reason"], out["state"], out["failure_reason"]) == (True, None, "queued",
                                                                                   "agent_error")  # fmt: skip
    events = len(h.task(task_id)["events"])
    again = gw.run_ended(task_id, 1, 3, agent_id="builder")
    assert (again["settled"], again["reason"], again["state"]) == (False, "attempt_over", "queued")
    assert len(h.task(task_id)["events"]) == events
    assert "exited with status 3: Traceback: boom" in h.task(task_id)["attempts"][0]["failure_detail"]


def test_run_ended_after_the_receipt_changes_nothing(h):
    task_id = h.claimed_task("builder")
    gw = h.agent("builder")
    gw.complete(task_id, {"summary": "fixed"}, attempt=1, agent_id="builder")
    before = h.task(task_id)
    out = gw.run_ended(task_id, 1, 0, agent_id="builder")
    assert (out["settled"], out["reason"], out["state"]) == (False, "attempt_over", "completed")
    assert h.task(task_id)["events"] == before["events"]


def test_run_ended_exit_0_is_no_receipt_and_bad_input_is_refused(h):
    task_id = h.claimed_task("builder")
    gw = h.agent("builder")
    for attempt, code, detail in ((1, "3", ""), (1, 2**31, ""), (1, 0, "a\0b"), (1, 0, "x" * 5000)):
        with pytest.raises(UsageError):
            gw.run_ended(task_id, attempt, code, detail, agent_id="builder")
    assert h.task(task_id)["state"] == "assigned"
    out = gw.run_ended(task_id, 1, 0, agent_id="builder")
    assert (out["settled"], out["failure_reason"]) == (True, "no_receipt")


def test_run_ended_for_an_unknown_task(h):
    h.agent("builder")
    with pytest.raises(FleetError) as info:
        h.agent("builder").run_ended("t-nosuch", 1, 3, agent_id="builder")
    assert type(info.value) is NotFound
