"""Per-repository concurrency (issue 10): ``forgejo.max_active_per_repo`` and ``[forgejo.repository."o/n"]`` cap
the tasks of a repository that are assigned, running or awaiting review — for dispatch and dequeue alike, with
the claim's own guarantee (one conditional ``UPDATE`` under the write lock), and without starving the other
repositories (the planner passes over a capped repository's tasks).

Real components: ``fleetctl serve`` and ``fleetctl dispatch`` processes over one SQLite file, real local runs.
Every loop is bounded in count and time.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter

from conftest import ADMIN_TOKEN, REGISTRATION_TOKEN, LiveServer, config_of
from sshd import free_port

from fleetctl import services
from fleetctl.config import ForgejoConfig

T0 = 1_700_000_000.0


def test_the_claim_keeps_each_repository_under_its_cap_and_case_does_not_matter(store, orch):
    cfg = config_of(orch)
    cfg = type(cfg)(**{**cfg.__dict__, "forgejo": ForgejoConfig(max_active_per_repo=2,
                                                                 repository={"acme/b": {"max_active_per_repo": 1},
                                                                             "acme/free": {"max_active_per_repo": None}})})  # fmt: skip
    services.register_agent(store, "a", agent_type="t", max_concurrency=50, now=T0)
    made = []
    for repo, n in (("acme/a", 4), ("Acme/B", 3), ("acme/free", 4)):
        for i in range(n):
            made.append(services.create_task(store, cfg.orchestrator, title="t", repo=repo, issue_number=i + 1,
                                             now=T0)["task_id"])  # fmt: skip
    claimed = [c for c in (services.claim_task(store, cfg, store.agent("a"), now=T0 + 1) for _ in range(20)) if c]
    by_repo = Counter(c.task["repo"].lower() for c in claimed)
    assert by_repo == {"acme/a": 2, "acme/b": 1, "acme/free": 4}
    # a task awaiting review still holds its repository's slot; its completion frees it
    one_b = next(c for c in claimed if c.task["repo"] == "Acme/B")
    services.hand_in_receipt(store, cfg, one_b.task["task_id"], {"outcome": "success", "artifacts": [
        {"kind": "pull_request", "number": 7}]}, now=T0 + 2)  # fmt: skip
    assert store.task(one_b.task["task_id"])["state"] == "awaiting_review"
    assert services.claim_task(store, cfg, store.agent("a"), now=T0 + 3) is None
    services.cancel_task(store, one_b.task["task_id"], now=T0 + 4)
    freed = services.claim_task(store, cfg, store.agent("a"), now=T0 + 5)
    assert freed is not None and freed.task["repo"] == "Acme/B"
    assert not store.check().problems


def test_dispatch_plans_around_a_full_repository_instead_of_wasting_the_slot(fleet):
    fleet.configure(agents=[{"agent_type": "hang", "agent_id": "w", "max_concurrency": 2}],
                    agent_types={"hang": {"command": ["sleep", "30"], "prompt": "stdin"}},
                    forgejo={"max_active_per_repo": 1})  # fmt: skip
    first = [fleet.create("--title", f"a{i}", "--repo", "acme/a", "--issue", str(i), "--label", "priority:9")
             for i in (1, 2)]  # fmt: skip
    other = fleet.create("--title", "b", "--repo", "acme/b", "--issue", "1")
    done = fleet.run("dispatch", "--json")
    assert done.returncode == 0, done.stderr
    import json

    launched = [p["task_id"] for p in json.loads(done.stdout)["launched"]]
    # acme/a's second task has the higher priority but its repository is full: acme/b's task gets the slot
    assert launched == [first[0], other], launched
    assert fleet.task(first[1])["state"] == "queued"
    fleet.check_db()


DEQUEUER = """
import json, sys, time, httpx
url, token, out = sys.argv[1:4]
got, deadline = [], time.monotonic() + 30
with httpx.Client(base_url=url, headers={"Authorization": "Bearer " + token}, timeout=30) as c:
    empty = 0
    while empty < 3 and time.monotonic() < deadline:
        r = c.post("/api/v1/tasks/dequeue", json={"wait": 0})
        if r.status_code == 204:
            empty += 1
            time.sleep(0.05)
            continue
        r.raise_for_status()
        got.append(r.json()["task"]["task_id"])
with open(out, "w") as fh:
    json.dump(got, fh)
"""


def test_eight_dequeuers_and_two_dispatch_passes_at_once_never_exceed_a_repositorys_cap(fleet, tmp_path):
    port = free_port()
    fleet.configure(
        agents=[{"agent_type": "hang", "agent_id": "w", "max_concurrency": 3}],
        agent_types={"hang": {"command": ["sleep", "30"], "prompt": "stdin"}},
        server={"port": port, "admin_token": ADMIN_TOKEN},
        orchestrator={"http_pull_token": REGISTRATION_TOKEN},
        forgejo={"max_active_per_repo": 2, "repository": {"acme/b": {"max_active_per_repo": 1}}},
    )  # fmt: skip
    server = LiveServer(fleet.dir, config=fleet.config).start(port)
    try:
        tasks = {repo: [fleet.create("--title", f"{repo} {i}", "--repo", repo, "--issue", str(i)) for i in range(1, 7)]
                 for repo in ("acme/a", "acme/b")}  # fmt: skip
        tasks[None] = [fleet.create("--title", f"free {i}") for i in range(4)]
        tokens = [server.register(f"p{i}", max_concurrency=2) for i in range(8)]
        script = tmp_path / "dequeuer.py"
        script.write_text(DEQUEUER)
        go = threading.Event()
        procs: list[subprocess.Popen] = []

        def start_dequeuers() -> None:
            go.wait(10)
            for i, token in enumerate(tokens):
                procs.append(subprocess.Popen([sys.executable, str(script), server.url, token,
                                               str(tmp_path / f"got{i}.json")]))  # fmt: skip

        starter = threading.Thread(target=start_dequeuers)
        starter.start()
        go.set()
        passes = [fleet.popen("dispatch", "--json") for _ in range(2)]
        starter.join(15)
        for p in [*passes, *procs]:
            p.wait(60)
        assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]
        held = fleet.query("SELECT lower(repo) AS repo, count(*) AS n FROM tasks "
                           "WHERE state IN ('assigned', 'running', 'awaiting_review') GROUP BY lower(repo)")  # fmt: skip
        counts = {row["repo"]: row["n"] for row in held}
        assert counts == {"acme/a": 2, "acme/b": 1, None: 4}, counts  # full, never over, nothing else starved
        # at no point over the cap either: replay the claims and releases in event order
        live: Counter = Counter()
        repo_of = {t: r for r, ids in tasks.items() for t in ids}
        for ev in fleet.events():
            repo = repo_of.get(ev["task_id"])
            if ev["type"] == "task.assigned":
                live[repo] += 1
                assert repo is None or live[repo] <= (1 if repo == "acme/b" else 2), (ev, live)
            elif ev["type"] in ("task.requeued", "task.failed", "task.completed", "task.cancelled"):
                live[repo] -= 1
        fleet.check_db()
    finally:
        deadline = time.monotonic() + 10
        for p in procs if "procs" in locals() else []:
            if p.poll() is None and time.monotonic() < deadline:
                p.kill()
        server.stop()
