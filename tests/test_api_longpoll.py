"""Long-poll dequeue waits without work: it claims again only when a write may have made a task claimable."""

from __future__ import annotations

import json
import threading

from conftest import ADMIN_TOKEN, REGISTRATION_TOKEN, LiveServer

from fleetctl.config import load_config
from fleetctl.server.api import Api
from fleetctl.server.http import Headers


def _headers(token: str) -> Headers:
    h = Headers()
    h.add("Authorization", f"Bearer {token}")
    return h


def _post(api: Api, path: str, token: str, doc: dict):
    return api.handle("POST", path, _headers(token), json.dumps(doc).encode())


def test_waiting_dequeuers_do_not_spin_on_their_own_empty_claims(tmp_path):
    api = Api(load_config(LiveServer(tmp_path).config_path))
    try:
        tokens = []
        for i in range(3):
            r = _post(api, "/api/v1/agents/register", REGISTRATION_TOKEN,
                      {"agent_id": f"idle-{i}", "agent_type": "t", "capabilities": ["x"]})  # fmt: skip
            tokens.append(json.loads(r.body)["token"])
        claims = []
        real_claim = api.writer.claim
        api.writer.claim = lambda request: (claims.append(1), real_claim(request))[1]
        answers: list[int] = []
        waiters = [threading.Thread(target=lambda t=t: answers.append(
            _post(api, "/api/v1/tasks/dequeue", t, {"wait": 1}).status)) for t in tokens]  # fmt: skip
        for w in waiters:
            w.start()
        for w in waiters:
            w.join(30)
        assert answers == [204, 204, 204]
        assert len(claims) <= 2 * len(tokens), len(claims)  # once each (maybe twice), not thousands of times

        # …and a write that can make a task claimable still wakes them at once
        claims.clear()
        got: list[int] = []
        waiter = threading.Thread(target=lambda: got.append(
            _post(api, "/api/v1/tasks/dequeue", tokens[0], {"wait": 20}).status))  # fmt: skip
        waiter.start()
        while not claims:
            threading.Event().wait(0.01)
        r = _post(api, "/api/v1/tasks", ADMIN_TOKEN, {"title": "wake up", "labels": ["agent:x"]})
        assert r.status == 201
        waiter.join(15)
        assert got == [200]
    finally:
        api.close()
        api.shutdown()


def test_a_cancel_in_another_process_that_frees_the_agents_slot_wakes_its_long_poll(live_server):
    """The agent is full (max_concurrency 1); `fleetctl task cancel` in another process frees its slot: the
    waiting dequeue is woken and gets the next task (before, it waited out the whole poll and got 204)."""
    import subprocess
    import sys

    token = live_server.register("full", capabilities=["x"], max_concurrency=1)
    with live_server.client(ADMIN_TOKEN) as admin:
        first, second = (admin.post("/api/v1/tasks", json={"title": t, "labels": ["agent:x"]}).json()["task_id"]
                         for t in ("first", "second"))  # fmt: skip
    with live_server.client(token) as agent:
        assert agent.post("/api/v1/tasks/dequeue", json={}).json()["task"]["task_id"] == first
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(agent.post("/api/v1/tasks/dequeue", json={"wait": 30})))
        waiter.start()
        threading.Event().wait(0.5)  # let it start waiting (a claim now finds the agent full)
        done = subprocess.run([sys.executable, "-m", "fleetctl", "task", "cancel", first, "--config",
                               str(live_server.config_path)], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        waiter.join(15)  # woken by the cancel, not by the end of its 30 s poll (generous: a wake takes ms)
    assert got, "the long-poll was not woken by the cancel in another process"
    waiter.join(30)
    assert got[0].status_code == 200, got[0].status_code
    assert got[0].json()["task"]["task_id"] == second


def test_a_template_that_cannot_be_rendered_never_leaves_a_claimed_task_behind(tmp_path):
    """`config check` refuses such a template; should one reach a running server anyway, the dequeue answers
    503 (not 500) and the claimed attempt is released at once (launch_failed, retried) — not left assigned
    until its lease expires."""
    from dataclasses import replace

    from fleetctl.store import Store

    cfg = load_config(LiveServer(tmp_path).config_path)
    cfg = replace(cfg, orchestrator=replace(cfg.orchestrator, prompt_template="{0}"))
    api = Api(cfg)
    try:
        r = _post(api, "/api/v1/agents/register", REGISTRATION_TOKEN, {"agent_id": "a", "agent_type": "t"})
        token = json.loads(r.body)["token"]
        task_id = json.loads(_post(api, "/api/v1/tasks", ADMIN_TOKEN, {"title": "x"}).body)["task_id"]
        r = _post(api, "/api/v1/tasks/dequeue", token, {})
        assert r.status == 503 and json.loads(r.body)["error"]["code"] == "bad_template", r.body
    finally:
        api.close()
        api.shutdown()
    with Store.open(cfg.orchestrator.db_path) as store:
        task = store.task(task_id)
        assert (task["state"], task["failure_reason"], task["agent_id"]) == ("queued", "launch_failed", None)
        assert store.check().ok
