"""The server's token cache (``fleetctl.server.api.AUTH_CACHE_SECS``) may remember, never authorise: a token
replaced or revoked by another process (the CLI) is refused at once by every endpoint, and a claim always
uses the agent's current capabilities and limit (the claim's ``UPDATE … WHERE`` re-checks the agent row)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ADMIN_TOKEN

from fleetctl import services
from fleetctl.config import OrchestratorConfig, load_config
from fleetctl.states import AgentStatus
from fleetctl.store import Store


def dequeue(server, token: str) -> int:
    with server.client(token) as c:
        return c.post("/api/v1/tasks/dequeue", json={"wait": 0}).status_code


def create(server, labels: list[str]) -> str:
    with server.client(ADMIN_TOKEN) as admin:
        r = admin.post("/api/v1/tasks", json={"title": "cached", "labels": labels})
        assert r.status_code == 201, r.text
        return r.json()["task_id"]


def fleetctl(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleetctl", *args, "--config", str(server.config_path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def calls(server, token: str, task_id: str, attempt: int) -> dict[str, int]:
    """Every endpoint an agent token may call, once each (in this order); their statuses."""
    with server.client(token) as c:
        return {
            "get": c.get(f"/api/v1/tasks/{task_id}").status_code,
            "status": c.post(f"/api/v1/tasks/{task_id}/status", json={"attempt": attempt, "status": "running"}).status_code,
            "receipts": c.post("/api/v1/receipts", json={"task_id": task_id, "attempt": attempt,
                                                         "outcome": "success"}).status_code,
            "complete": c.post(f"/api/v1/tasks/{task_id}/complete", json={"attempt": attempt,
                                                                         "outcome": "success"}).status_code,
            "heartbeat": c.post("/api/v1/agents/heartbeat", json={}).status_code,
            "dequeue": c.post("/api/v1/tasks/dequeue", json={"wait": 0}).status_code,
            "deregister": c.post("/api/v1/agents/deregister", json={}).status_code,
        }  # fmt: skip


REFUSED = dict.fromkeys(("get", "status", "receipts", "complete", "heartbeat", "dequeue", "deregister"), 401)


def test_an_agent_another_process_changed_is_read_afresh(live_server):
    token = live_server.register("cached-1", ["a"], max_concurrency=5)
    assert dequeue(live_server, token) == 204  # its token and row are cached now
    with Store.open(live_server.db_path) as store:  # another process: the server's cache does not see it
        services.register_agent(store, "cached-1", agent_type="test", capabilities=["a", "gpu"], max_concurrency=5,
                                issue_token=False)  # fmt: skip
    create(live_server, ["agent:gpu"])
    assert dequeue(live_server, token) == 200  # the new capability counts at once

    with Store.open(live_server.db_path) as store:
        services.set_agent_status(store, OrchestratorConfig(), "cached-1", AgentStatus.OFFLINE, "test")
    create(live_server, ["agent:a"])
    assert dequeue(live_server, token) == 200  # an offline (lost) agent that dequeues is back online

    with Store.open(live_server.db_path) as store:
        services.set_agent_status(store, OrchestratorConfig(), "cached-1", AgentStatus.DRAINING, "test")
    task_id = create(live_server, ["agent:a"])
    assert dequeue(live_server, token) == 204  # draining: nothing, cached row or not
    with Store.open(live_server.db_path) as store:
        assert store.task(task_id)["state"] == "queued"
        assert store.agent("cached-1")["status"] == "draining"


def test_registering_again_over_the_api_revokes_the_old_token_at_once(live_server):
    old = live_server.register("cached-2", ["a"])
    assert dequeue(live_server, old) == 204
    new = live_server.register("cached-2", ["a"])
    assert dequeue(live_server, old) == 401
    assert dequeue(live_server, new) == 204


def test_a_lower_limit_set_by_another_process_is_honoured_by_the_very_next_dequeues(live_server):
    token = live_server.register("limit-1", ["a"], max_concurrency=5)
    held = create(live_server, ["agent:a"])
    assert dequeue(live_server, token) == 200  # holds one task; its row (max 5) is cached now
    for _ in range(3):
        create(live_server, ["agent:a"])
    with Store.open(live_server.db_path) as store:  # the same token, a limit of 1 (already reached)
        services.register_agent(store, "limit-1", agent_type="test", capabilities=["a"], max_concurrency=1,
                                issue_token=False)  # fmt: skip
    assert [dequeue(live_server, token) for _ in range(3)] == [204, 204, 204]
    with Store.open(live_server.db_path) as store:
        services.register_agent(store, "limit-1", agent_type="test", capabilities=["a"], max_concurrency=2,
                                issue_token=False)  # fmt: skip
        assert store.task(held)["agent_id"] == "limit-1"
    assert [dequeue(live_server, token) for _ in range(3)] == [200, 204, 204]


def test_a_token_replaced_by_another_process_is_refused_at_once_everywhere(live_server):
    old = live_server.register("replaced-1", ["a"], max_concurrency=5)
    task_id = create(live_server, ["agent:a"])
    assert dequeue(live_server, old) == 200
    with live_server.client(old) as c:  # the old token's principal and agent row are in the cache now
        assert c.get(f"/api/v1/tasks/{task_id}").status_code == 200
    with Store.open(live_server.db_path) as store:  # what `fleetctl agent register` does, without its start-up
        new = services.register_agent(store, "replaced-1", agent_type="test", capabilities=["a"],
                                      max_concurrency=1).token  # fmt: skip
    assert calls(live_server, old, task_id, 1) == REFUSED
    for _ in range(3):
        create(live_server, ["agent:a"])
    with live_server.client(new) as c:
        r = c.post(f"/api/v1/tasks/{task_id}/complete", json={"attempt": 1, "outcome": "success"})
        assert r.status_code == 200, r.text  # the new token acts for the same agent
    assert [dequeue(live_server, new) for _ in range(3)] == [200, 204, 204]  # max_concurrency 1 now
    with Store.open(live_server.db_path) as store:
        assert store.agent("replaced-1")["status"] == "online"
        assert len(store.tasks(states=("assigned",), agent_id="replaced-1")) == 1


def test_fleetctl_agent_register_replaces_the_token_and_the_limit_at_once(live_server):
    old = live_server.register("replaced-2", ["a"], max_concurrency=5)
    task_id = create(live_server, ["agent:a"])
    assert dequeue(live_server, old) == 200
    for _ in range(3):
        create(live_server, ["agent:a"])
    done = fleetctl(live_server, "agent", "register", "replaced-2", "--type", "test", "-C", "a",
                    "--max-concurrency", "2", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    new = json.loads(done.stdout)["token"]
    assert dequeue(live_server, old) == 401
    with live_server.client(old) as c:
        assert c.post("/api/v1/agents/heartbeat", json={}).status_code == 401
        assert c.post(f"/api/v1/tasks/{task_id}/complete", json={"attempt": 1}).status_code == 401
    assert [dequeue(live_server, new) for _ in range(3)] == [200, 204, 204]  # one held + one = the new limit


@pytest.mark.parametrize("drained", [False, True])
def test_an_agent_the_operator_deregisters_stays_out_its_old_token_is_refused(live_server, drained):
    token = live_server.register("dereg-1", ["a"])
    task_id = create(live_server, ["agent:a"])
    assert dequeue(live_server, token) == 200
    with live_server.client(token) as c:  # cached now
        assert c.post("/api/v1/agents/heartbeat", json={}).status_code == 200
        assert c.get(f"/api/v1/tasks/{task_id}").status_code == 200
    if drained:
        done = fleetctl(live_server, "agent", "drain", "dereg-1")
        assert done.returncode == 0, done.stderr
    done = fleetctl(live_server, "agent", "deregister", "dereg-1")
    assert done.returncode == 0, done.stderr
    create(live_server, ["agent:a"])
    assert calls(live_server, token, task_id, 1) == REFUSED
    with Store.open(live_server.db_path) as store:
        assert store.agent("dereg-1")["status"] == "offline"  # it did not come back online
        assert store.tasks(states=("assigned", "running"), agent_id="dereg-1") == []


def test_the_operator_deregister_in_process_is_refused_within_the_cache_lifetime(live_server):
    """As above without a CLI start-up in between: well inside the cache's lifetime."""
    token = live_server.register("dereg-2", ["a"])
    assert dequeue(live_server, token) == 204  # cached now
    with Store.open(live_server.db_path) as store:
        services.deregister_agent(store, load_config(live_server.config_path), "dereg-2")
    create(live_server, ["agent:a"])
    assert dequeue(live_server, token) == 401
    with live_server.client(token) as c:
        assert c.post("/api/v1/agents/heartbeat", json={}).status_code == 401
    with Store.open(live_server.db_path) as store:
        assert store.agent("dereg-2")["status"] == "offline"


def test_the_claim_guard_claims_nothing_for_a_row_that_changed(store):
    reg = services.register_agent(store, "guarded", agent_type="t", capabilities=["b", "a"], max_concurrency=2)
    agent = store.agent("guarded")
    services.create_task(store, OrchestratorConfig(), title="g", labels=["agent:a"], task_id="t-g")
    th = services.hash_token(reg.token)
    base = {"agent_id": "guarded", "lease_secs": 60, "ts": 1e10}
    caps, limit = agent["capabilities"], agent["max_concurrency"]
    assert store.claim(**base, capabilities=caps, max_concurrency=limit, agent_token_hash="0" * 64) is None
    assert store.claim(**base, capabilities=[*caps, "c"], max_concurrency=limit, agent_token_hash=th) is None
    assert store.claim(**base, capabilities=caps, max_concurrency=limit + 1, agent_token_hash=th) is None
    assert store.task("t-g")["state"] == "queued"
    row = store.claim(**base, capabilities=caps, max_concurrency=limit, agent_token_hash=th)
    assert row is not None and row["task_id"] == "t-g" and row["agent_id"] == "guarded"


def test_turning_a_pull_agent_into_an_ssh_agent_revokes_its_token_at_once(live_server):
    token = live_server.register("converted-1", ["a"])
    assert dequeue(live_server, token) == 204  # cached now
    with Store.open(live_server.db_path) as store:  # what `fleetctl agent register … --mode ssh_cli` does
        services.register_agent(store, "converted-1", agent_type="test", capabilities=["a"], mode="ssh_cli",
                                allow_mode_change=True)  # fmt: skip
    create(live_server, ["agent:a"])
    assert dequeue(live_server, token) == 401
    with live_server.client(token) as c:
        assert c.post("/api/v1/agents/heartbeat", json={}).status_code == 401
