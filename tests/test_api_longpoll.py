"""Long-poll dequeue waits without work: it claims again only when a write may have made a task claimable."""

from __future__ import annotations

import json
import re
import threading

from conftest import ADMIN_TOKEN, REGISTRATION_TOKEN, LiveServer, wait_for

from fleetctl.config import load_config
from fleetctl.server.api import Api
from fleetctl.server.http import Headers


def _headers(token: str) -> Headers:
    h = Headers()
    h.add("Authorization", f"Bearer {token}")
    return h


def _post(api: Api, path: str, token: str, doc: dict):
    return api.handle("POST", path, _headers(token), json.dumps(doc).encode())


def _claim_attempts(server: LiveServer) -> int:
    with server.client(ADMIN_TOKEN) as admin:
        text = admin.get("/metrics").text
    return int(re.search(r"^fleetctl_claim_attempts_total (\d+)$", text, re.M).group(1))


def test_waiting_long_polls_are_woken_only_for_a_task_they_can_take(tmp_path):
    """20 agents wait. Heartbeats and tasks none of them can take wake nobody; one task they can all take wakes
    one of them (it gets the task), not all 20 (before, every write made every waiter claim again)."""
    server = LiveServer(tmp_path).start()
    try:
        tokens = [server.register(f"idle-{i}", ["x"]) for i in range(20)]
        answers: dict[int, int] = {}

        def poll(i: int) -> None:
            with server.client(tokens[i]) as c:
                answers[i] = c.post("/api/v1/tasks/dequeue", json={"wait": 8}, timeout=30).status_code

        waiters = [threading.Thread(target=poll, args=(i,)) for i in range(20)]
        for w in waiters:
            w.start()
        assert wait_for(lambda: _claim_attempts(server) >= 20, timeout=20, what="every long-poll claimed once")
        assert _claim_attempts(server) == 20
        with server.client(tokens[0]) as c:
            for _ in range(5):
                assert c.post("/api/v1/agents/heartbeat", json={}).status_code == 200
        with server.client(ADMIN_TOKEN) as admin:
            for n in range(3):  # for an agent with capability y: none of the waiters
                assert admin.post("/api/v1/tasks", json={"title": f"y{n}", "labels": ["agent:y"]}).status_code == 201
            assert admin.post("/api/v1/tasks", json={"title": "for x", "labels": ["agent:x"]}).status_code == 201
        for w in waiters:
            w.join(30)
        assert sorted(answers.values()) == [200] + [204] * 19, answers
        # one claim each at the start, one for the task (a second if a claim raced): never one per waiter
        assert 21 <= _claim_attempts(server) <= 22, _claim_attempts(server)
    finally:
        server.stop()


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
    cfg, api, token = _api_with_a_broken_template(tmp_path)
    try:
        task_id = json.loads(_post(api, "/api/v1/tasks", ADMIN_TOKEN, {"title": "x"}).body)["task_id"]
        r = _post(api, "/api/v1/tasks/dequeue", token, {})
        assert r.status == 503 and json.loads(r.body)["error"]["code"] == "bad_template", r.body
    finally:
        api.close()
        api.shutdown()
    _assert_released(cfg, task_id)


def test_the_fast_dequeue_releases_a_claim_whose_prompt_does_not_render_as_the_ordinary_path_does(tmp_path):
    """The event loop's fast dequeue (token in the cache: the claim goes straight to the writer) falls back to
    the ordinary path's rest when the prompt does not render: 503, the attempt released at once."""
    cfg, api, token = _api_with_a_broken_template(tmp_path)
    try:
        assert _post(api, "/api/v1/tasks/dequeue", token, {}).status == 204  # puts the token in the cache
        task_id = json.loads(_post(api, "/api/v1/tasks", ADMIN_TOKEN, {"title": "x"}).body)["task_id"]
        call = api.dequeue_fast("POST", "/api/v1/tasks/dequeue", _headers(token), b"{}")
        assert call is not None, "a cached agent token takes the fast path"
        assert api.dequeue_fast("POST", "/api/v1/tasks/dequeue", _headers("not-a-token"), b"{}") is None
        assert api.dequeue_fast("POST", "/api/v1/tasks/dequeue", _headers(token), b"[1]") is None  # bad body
        got: list = []
        done = threading.Event()
        api.dequeue_fast_claim(call, lambda task, error: (got.append((task, error)), done.set()))
        assert done.wait(10)
        task, error = got[0]
        assert error is None and task["task_id"] == task_id
        assert api.dequeue_fast_answer(call, task) is None  # the prompt does not render
        r = api.dequeue_fast_rest(call, task)
        assert r.status == 503 and json.loads(r.body)["error"]["code"] == "bad_template", r.body
    finally:
        api.close()
        api.shutdown()
    _assert_released(cfg, task_id)


def _assert_released(cfg, task_id: str) -> None:
    """The claimed attempt was released at once: the task is queued again (launch_failed), db check ok."""
    from fleetctl.store import Store

    with Store.open(cfg.orchestrator.db_path) as store:
        task = store.task(task_id)
        assert (task["state"], task["failure_reason"], task["agent_id"]) == ("queued", "launch_failed", None)
        assert store.check().ok


def _api_with_a_broken_template(tmp_path):
    """An Api whose prompt template cannot render (what `config check` refuses), and an agent's token."""
    from dataclasses import replace

    cfg = load_config(LiveServer(tmp_path).config_path)
    cfg = replace(cfg, orchestrator=replace(cfg.orchestrator, prompt_template="{0}"))
    api = Api(cfg)
    r = _post(api, "/api/v1/agents/register", REGISTRATION_TOKEN, {"agent_id": "a", "agent_type": "t"})
    return cfg, api, json.loads(r.body)["token"]
