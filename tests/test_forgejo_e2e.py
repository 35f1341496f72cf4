"""Issue 7 end to end: a labelled issue in (the fake) Forgejo becomes a task through a signed webhook to a real
``fleetctl serve``, a pull agent dequeues it, opens its pull request on ``fleet/<task-id>``, hands in a receipt
naming it (checked against Forgejo), the merge webhook completes the task, and the issue gets exactly one
comment per announced event — even when a flush is killed between its POST and its record.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading

from conftest import stop_cleanly, wait_for

REPO = "acme/widgets"
SECRET = "e2e-webhook-secret"


def fleet(server, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fleetctl", "--config", str(server.config_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def markers(forgejo, n: int) -> list[int]:
    """The event ids of fleetctl's comments on issue ``n``, in order."""
    found = []
    for c in forgejo.comments(REPO, n):
        m = re.search(r"<!-- fleetctl:event:(\d+) -->", c["body"])
        assert m, f"a comment without fleetctl's marker: {c['body']!r}"
        found.append(int(m.group(1)))
    return found


def test_issue_to_merged_pull_request(make_server, forgejo):
    server = make_server(forgejo={"url": forgejo.url, "token": forgejo.bot_token, "webhook_secret": SECRET,
                                  "repositories": [REPO], "status_labels": True})  # fmt: skip
    server.start()
    forgejo.set_hook(f"{server.url}/api/v1/webhooks/forgejo", SECRET)

    # 1. an issue labelled for agents: Forgejo's deliveries (opened, then label_updated) make one task
    n = forgejo.open_issue(REPO, "Retry the HTTP client", "Up to 3 times, with backoff.", labels=["agent:code"])
    assert [status for status, _secs in forgejo.delivery_results] == [200, 200]
    tasks = json.loads(fleet(server, "task", "list", "--json").stdout)["items"]
    assert [(t["repo"], t["issue_number"], t["state"], t["requirements"]) for t in tasks] == [
        (REPO, n, "queued", ["code"])]  # fmt: skip
    tid = tasks[0]["task_id"]

    # 2. a pull agent takes it and works on its branch
    token = server.register("coder", capabilities=["code"])
    with server.client(token) as agent:
        job = agent.post("/api/v1/tasks/dequeue", json={"wait": 0}).json()
        assert job["task"]["task_id"] == tid and f"fleet/{tid}" in job["prompt"]
        forgejo.push_branch(REPO, f"fleet/{tid}")
        pr = forgejo.open_pull(REPO, f"fleet/{tid}", title="Retry the HTTP client", body=f"Closes #{n}",
                               user="fleet-bot")  # fmt: skip
        # 3. the receipt names the pull request: Forgejo confirms it → awaiting review
        r = agent.post(
            f"/api/v1/tasks/{tid}/complete",
            json={"attempt": job["attempt"], "summary": "done", "artifacts": [{"kind": "pull_request", "number": pr}]},
        )
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "awaiting_review" and r.json()["pull_request"]["number"] == pr

    # 4. write-back: a flush killed after Forgejo received its POST, then the next pass: one comment each
    received, release = threading.Event(), threading.Event()
    handle = forgejo.handle

    def slow_post(method, path, headers, body):
        if method == "POST" and path.endswith("/comments") and not received.is_set():
            received.set()
            release.wait(30)
        return handle(method, path, headers, body)

    forgejo.handle = slow_post
    proc = subprocess.Popen([sys.executable, "-m", "fleetctl", "--config", str(server.config_path), "outbox",
                             "flush"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert received.wait(30), "the flush never posted a comment"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        release.set()
        forgejo.handle = handle
    wait_for(lambda: len(forgejo.comments(REPO, n)) == 1, timeout=10, what="the killed flush's comment to land")
    swept = fleet(server, "sweep-timeouts", "--json")
    assert swept.returncode == 0, swept.stderr

    # 5. the merge: the pull request webhook completes the task; the issue's close by that merge cancels nothing
    forgejo.merge_pull(REPO, pr, user="alice")
    detail = json.loads(fleet(server, "task", "show", tid, "--json").stdout)
    assert detail["state"] == "completed" and detail["pull_request"]["number"] == pr
    assert fleet(server, "sweep-timeouts").returncode == 0

    # exactly one comment per announced event: assigned, awaiting review, completed
    lines = fleet(server, "events", "--task", tid, "--json").stdout.splitlines()  # one JSON event a line
    events = {e["id"]: e["type"] for e in map(json.loads, lines)}
    announced = [i for i, kind in events.items() if kind in ("task.assigned", "task.awaiting_review",
                                                              "task.completed")]  # fmt: skip
    assert len(announced) == 3 and markers(forgejo, n) == announced
    assert "fleet/done" in forgejo.labels_of(REPO, n)
    conn = sqlite3.connect(server.db_path)
    try:  # the flush learned fleetctl's own login, for the webhook route to know its echoes
        assert conn.execute("SELECT value FROM meta WHERE key='forgejo_login'").fetchone() == ("fleet-bot",)
    finally:
        conn.close()
    # fleetctl's own comments and labels came back as webhooks: they changed nothing
    assert json.loads(fleet(server, "task", "list", "--json").stdout)["items"][0]["state"] == "completed"
    assert fleet(server, "outbox", "list", "--state", "pending", "--json").stdout.count('"id"') == 0
    check = fleet(server, "db", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    # a second sync finds nothing webhooks missed
    synced = json.loads(fleet(server, "sync", "--json").stdout)
    assert synced["changes"] == [] and synced["errors"] == []
    log = stop_cleanly(server)
    assert forgejo.bot_token not in log and SECRET not in log
