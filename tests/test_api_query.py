"""Query parameters over HTTP: an empty value (``?status=``, ``?agent_id=&repo=``) counts as absent, on every
listing, as docs/agent-api.md says — never a 400 and never a filter on the empty string."""

from __future__ import annotations

import pytest
from conftest import ADMIN_TOKEN


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    from conftest import LiveServer

    server = LiveServer(tmp_path_factory.mktemp("query")).start()
    try:
        server.register("q-a", ["x"], max_concurrency=2)
        token_b = server.register("q-b", ["y"])
        with server.client(ADMIN_TOKEN) as admin:
            for i in range(3):
                r = admin.post("/api/v1/tasks", json={"task_id": f"q-{i}", "title": f"q {i}", "labels": ["agent:y"]})
                assert r.status_code == 201, r.text
            r = admin.post("/api/v1/tasks", json={"task_id": "q-repo", "title": "r", "repo": "o/r", "issue_number": 1,
                                                  "labels": ["agent:nobody"]})  # fmt: skip
            assert r.status_code == 201, r.text
        with server.client(token_b) as b:
            assert b.post("/api/v1/tasks/dequeue", json={}).status_code == 200
        yield server
    finally:
        server.stop()


def get(server, path: str) -> list[str]:
    with server.client(ADMIN_TOKEN) as admin:
        r = admin.get(path)
    assert r.status_code == 200, r.text
    doc = r.json()
    return sorted(item.get("task_id") or item["agent_id"] for item in doc["items"])


@pytest.mark.parametrize("query", ["status=", "mode=", "capability=", "status=&mode=&capability=", "status"])
def test_an_empty_agent_filter_is_no_filter(listed, query):
    assert get(listed, f"/api/v1/agents?{query}") == get(listed, "/api/v1/agents") == ["q-a", "q-b"]


@pytest.mark.parametrize("query", ["agent_id=", "repo=", "agent_id=&repo=", "state=", "state=&state=", "cursor=",
                                   "limit=", "cursor=&limit=&state=&agent_id=&repo=", "agent_id"])  # fmt: skip
def test_an_empty_task_filter_is_no_filter(listed, query):
    everything = ["q-0", "q-1", "q-2", "q-repo"]
    assert get(listed, f"/api/v1/tasks?{query}") == get(listed, "/api/v1/tasks") == everything


def test_an_empty_value_beside_a_real_one_leaves_the_real_one(listed):
    assert get(listed, "/api/v1/tasks?agent_id=q-b&repo=") == ["q-0"]
    assert get(listed, "/api/v1/tasks?repo=o/r&agent_id=") == ["q-repo"]
    assert get(listed, "/api/v1/tasks?state=assigned&state=") == ["q-0"]
    assert get(listed, "/api/v1/agents?capability=y&status=") == ["q-b"]
    assert get(listed, "/api/v1/agents?status=draining&status=") == []  # the empty one is absent: draining stands
    assert get(listed, "/api/v1/tasks?limit=1&cursor=")[:1] == ["q-0"]
