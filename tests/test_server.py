"""``fleetctl serve`` end to end: a real server process, real HTTP clients acting as agents."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import ADMIN_TOKEN


def fleetctl(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleetctl", *args, "--config", str(server.config_path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def db_check(server) -> None:
    done = fleetctl(server, "db", "check")
    assert done.returncode == 0, done.stdout + done.stderr


def create(admin, title: str, labels: list[str]) -> dict:
    r = admin.post("/api/v1/tasks", json={"title": title, "labels": labels})
    assert r.status_code == 201, r.text
    return r.json()


def test_agents_with_different_capabilities_get_only_matching_tasks(live_server):
    admin = live_server.client(ADMIN_TOKEN)
    agents = {"py": ["code:python"], "rust": ["code:rust"], "both": ["code:python", "docs"]}
    tokens = {name: live_server.register(f"agent-{name}", caps, max_concurrency=2) for name, caps in agents.items()}
    wanted = [["agent:code:python"], ["agent:code:rust"], ["agent:docs", "agent:code:python"], ["agent:docs"],
              ["agent:code:rust", "priority:3"], []]  # fmt: skip
    created = {create(admin, f"task {i}", labels)["task_id"]: labels for i, labels in enumerate(wanted)}
    done: dict[str, str] = {}
    for name, token in tokens.items():
        with live_server.client(token) as c:
            assert c.post("/api/v1/agents/heartbeat", json={}).status_code == 200
            while True:
                r = c.post("/api/v1/tasks/dequeue", json={"wait": 0})
                if r.status_code == 204:
                    break
                assert r.status_code == 200, r.text
                got = r.json()
                task, attempt = got["task"], got["attempt"]
                assert set(task["requirements"]) <= set(agents[name]), (name, task)
                assert task["agent_id"] == f"agent-{name}" and task["state"] == "assigned" and attempt == 1
                assert got["task_token"] and task["task_id"] in got["prompt"]
                r = c.post(f"/api/v1/tasks/{task['task_id']}/status",
                           json={"attempt": attempt, "status": "running", "message": "on it"})  # fmt: skip
                assert r.status_code == 200 and r.json()["state"] == "running", r.text
                r = c.post(f"/api/v1/tasks/{task['task_id']}/complete",
                           json={"attempt": attempt, "outcome": "success", "summary": f"done by {name}"})  # fmt: skip
                assert r.status_code == 200 and r.json()["state"] == "completed", r.text
                done[task["task_id"]] = name
    assert set(done) == set(created)
    listing = admin.get("/api/v1/tasks", params={"state": "completed", "limit": 100}).json()
    assert {t["task_id"] for t in listing["items"]} == set(created) and listing["next"] is None
    db_check(live_server)


def test_concurrent_dequeues_never_hand_out_a_task_twice(live_server):
    admin = live_server.client(ADMIN_TOKEN)
    total = 240
    ids = {create(admin, f"t{i}", ["agent:x"])["task_id"] for i in range(total)}
    tokens = [live_server.register(f"worker-{i}", ["x"], max_concurrency=1000) for i in range(16)]
    received: list[str] = []
    lock = threading.Lock()

    def work(token: str) -> None:
        with live_server.client(token) as c:
            for _ in range(total):  # bounded
                r = c.post("/api/v1/tasks/dequeue", json={"wait": 0})
                if r.status_code == 204:
                    return
                assert r.status_code == 200, r.text
                with lock:
                    received.append(r.json()["task"]["task_id"])

    with ThreadPoolExecutor(len(tokens)) as pool:
        list(pool.map(work, tokens))
    assert len(received) == len(set(received)) == total
    assert set(received) == ids
    db_check(live_server)


def test_an_agent_that_lost_its_lease_gets_409_and_the_new_holder_completes(make_server):
    server = make_server(lease_secs=1, retry_backoff_secs=0.05, retry_backoff_max_secs=0.1).start()
    admin = server.client(ADMIN_TOKEN)
    slow, fast = server.register("slow", ["x"]), server.register("fast", ["x"])
    task_id = create(admin, "contended", ["agent:x"])["task_id"]
    with server.client(slow) as c:
        first = c.post("/api/v1/tasks/dequeue", json={}).json()
    assert first["attempt"] == 1
    time.sleep(1.2)  # the lease runs out: no heartbeat from "slow"
    swept = fleetctl(server, "sweep-timeouts", "--json")
    assert swept.returncode == 0 and "task.lease_expired" in swept.stdout, swept.stdout + swept.stderr
    with server.client(fast) as c:
        second = None
        for _ in range(50):  # the backoff is 50-100 ms
            r = c.post("/api/v1/tasks/dequeue", json={"wait": 1})
            if r.status_code == 200:
                second = r.json()
                break
        assert second and second["task"]["task_id"] == task_id and second["attempt"] == 2
    receipt = {"attempt": 1, "outcome": "success", "summary": "late"}
    with server.client(slow) as c:
        r = c.post(f"/api/v1/tasks/{task_id}/complete", json=receipt)
    assert r.status_code == 409 and r.json()["error"]["code"] == "lease_lost", r.text
    receipt = {"attempt": 2, "outcome": "success", "summary": "on time"}
    with server.client(fast) as c:
        r = c.post(f"/api/v1/tasks/{task_id}/complete", json=receipt)
        assert r.status_code == 200 and r.json()["state"] == "completed" and r.json()["repeated"] is False
        events_before = len(admin.get(f"/api/v1/tasks/{task_id}").json()["events"])
        again = c.post(f"/api/v1/tasks/{task_id}/complete", json=receipt)
        assert again.status_code == 200 and again.json()["repeated"] is True
        assert len(admin.get(f"/api/v1/tasks/{task_id}").json()["events"]) == events_before
    # a task token acts on its own attempt only
    with server.client(second["task_token"]) as c:
        assert c.get(f"/api/v1/tasks/{task_id}").status_code == 200
        r = c.post(f"/api/v1/tasks/{task_id}/complete", json={"attempt": 1, "outcome": "success"})
        assert r.status_code == 409
    db_check(server)


def test_long_poll_wakes_when_another_process_creates_a_matching_task(live_server):
    token = live_server.register("waiter", ["docs"])
    result = {}

    def wait() -> None:
        with live_server.client(token) as c:
            started = time.monotonic()
            r = c.post("/api/v1/tasks/dequeue", json={"wait": 20})
            result.update(status=r.status_code, body=r.json() if r.status_code == 200 else None,
                          waited=time.monotonic() - started)  # fmt: skip

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)
    done = fleetctl(live_server, "task", "create", "--title", "wake up", "--label", "agent:docs")
    assert done.returncode == 0, done.stderr
    t.join(30)
    assert result["status"] == 200, result  # woken by the CLI's commit, not by the 20 s timeout (that is a 204)
    assert result["body"]["task"]["task_id"] == done.stdout.strip()
    assert result["waited"] < 20


def test_heartbeat_lists_cancelled_tasks_and_sigterm_is_graceful(live_server):
    admin = live_server.client(ADMIN_TOKEN)
    token = live_server.register("hb", ["x"])
    task_id = create(admin, "to cancel", ["agent:x"])["task_id"]
    with live_server.client(token) as c:
        assert c.post("/api/v1/tasks/dequeue", json={}).status_code == 200
        assert c.post("/api/v1/agents/heartbeat", json={}).json()["cancelled"] == []
        assert admin.post(f"/api/v1/tasks/{task_id}/cancel", json={"reason": "not needed"}).status_code == 200
        assert c.post("/api/v1/agents/heartbeat", json={}).json()["cancelled"] == [task_id]
        r = c.post(f"/api/v1/tasks/{task_id}/complete", json={"attempt": 1, "outcome": "success"})
        assert r.status_code == 409
    # a long-poll in flight when SIGTERM arrives gets its answer, and the server exits 0
    status = {}

    def wait() -> None:
        with live_server.client(token) as c:
            status["code"] = c.post("/api/v1/tasks/dequeue", json={"wait": 25}).status_code

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)
    assert live_server.stop() == 0
    t.join(10)
    assert status.get("code") == 204
    db_check(live_server)
