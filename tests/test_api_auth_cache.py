"""The server's token cache (``fleetctl.server.api.AUTH_CACHE_SECS``) never makes a dequeue act on a stale
agent: changes made over the API take effect at once, and changes made by another process (the CLI) are
re-checked when a dequeue with a cached row finds nothing."""

from __future__ import annotations

from conftest import ADMIN_TOKEN

from fleetctl import services
from fleetctl.config import OrchestratorConfig
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
    assert dequeue(live_server, token) == 200  # an offline agent that dequeues is back online

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
