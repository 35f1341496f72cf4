"""SPEC §12: no task is ever claimed twice, whoever claims at once; ``kill -9`` at any point loses no task.

Real processes and threads against one database file. Every loop is bounded in count and in time, and
only the processes started here are ever signalled.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from fleetctl import services
from fleetctl.errors import StoreBusy
from fleetctl.store import Store

#: A claimer: registers its own agent, waits for the start file, claims until the queue is empty, reports.
CLAIMER = """
import json, os, sys, time
from fleetctl import services
from fleetctl.errors import StoreBusy
from fleetctl.store import Store

db, agent, go, out = sys.argv[1:5]
store = Store.open(db)
services.register_agent(store, agent, agent_type="claimer", max_concurrency=1000, now=time.time())
deadline = time.monotonic() + 30
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.002)
claimed, busy = [], 0
while time.monotonic() < deadline:
    try:
        row = store.claim(agent_id=agent, capabilities=[], max_concurrency=10**6, lease_secs=600, ts=time.time())
    except StoreBusy:
        busy += 1
        continue
    if row is None:
        break
    claimed.append(row["task_id"])
with open(out, "w") as fh:
    json.dump({"claimed": claimed, "busy": busy, "timed_out": time.monotonic() >= deadline}, fh)
"""

#: A busy fleet in one process: create (print the id once committed), claim, start, then complete or fail.
CHURN = """
import sys, time
from fleetctl import services
from fleetctl.config import Config, ForgejoConfig, MatrixConfig, OrchestratorConfig, ServerConfig
from fleetctl.store import Store

db, prefix = sys.argv[1:3]
orch = OrchestratorConfig(db_path=db, retry_backoff_secs=0, retry_backoff_max_secs=0)
store = Store.open(db)
agent = "churn-" + prefix
services.register_agent(store, agent, agent_type="churn", max_concurrency=1000, now=time.time())
deadline = time.monotonic() + 20
for i in range(200_000):
    if time.monotonic() > deadline:
        break
    task_id = f"{prefix}-{i}"
    services.create_task(store, orch, title="churn", task_id=task_id, labels=["retries:1"], now=time.time())
    print(task_id, flush=True)
    row = store.claim(agent_id=agent, capabilities=[], max_concurrency=1000, lease_secs=60, ts=time.time())
    if row is None:
        continue
    fence = dict(agent_id=agent, attempt=row["attempt"], now=time.time())
    services.start_task(store, row["task_id"], **fence)
    if i % 3 == 0:
        services.fail_attempt(store, orch, row["task_id"], "agent_error", "churn", **fence)
    else:
        services.complete_task(store, Config(ServerConfig(), ForgejoConfig(), orch, (), {}, MatrixConfig()), row["task_id"], {"outcome": "success", "summary": "ok"}, **fence)
"""


def queue(store: Store, orch, n: int) -> set[str]:
    """``n`` queued tasks, created in one transaction (fast); their ids."""
    ids = {f"q{i:05d}" for i in range(n)}
    with store.write():
        for task_id in sorted(ids):
            services.create_task(store, orch, title="work", task_id=task_id, now=1.0)
    return ids


def assert_each_claimed_once(store: Store, ids: set[str], claims: dict[str, list[str]]) -> None:
    """Every task claimed by exactly one claimer, and the database agrees with what each claimer saw."""
    counted = Counter(t for got in claims.values() for t in got)
    twice = [t for t, n in counted.items() if n > 1]
    assert not twice, f"claimed more than once: {twice[:10]}"
    assert set(counted) == ids
    holder = {t: agent for agent, got in claims.items() for t in got}
    for task in store.tasks():
        assert (task["state"], task["attempt"], task["agent_id"]) == ("assigned", 1, holder[task["task_id"]])
    assert len(store.events(types=["task.assigned"])) == len(ids)
    report = store.check()
    assert report.ok, report.problems
    assert report.attempts == len(ids)


def test_processes_claiming_at_once_never_share_a_task(tmp_path, store, orch):
    ids = queue(store, orch, 2000)
    go = tmp_path / "go"
    procs = {
        f"p{i}": subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(store.path), f"p{i}", str(go), str(tmp_path / f"p{i}.json")],
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(8)
    }
    try:
        deadline = time.monotonic() + 60
        while len(store.agents()) < len(procs) and time.monotonic() < deadline:  # all registered: start together
            time.sleep(0.01)
        go.touch()
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, f"{name}: {err}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in procs}
    assert not any(r["timed_out"] for r in results.values())
    claims = {name: r["claimed"] for name, r in results.items()}
    assert sum(1 for got in claims.values() if got) >= 2, {n: len(g) for n, g in claims.items()}  # really at once
    assert_each_claimed_once(store, ids, claims)


def test_threads_with_their_own_stores_never_share_a_task(store, orch):
    ids = queue(store, orch, 800)
    n = 8
    for i in range(n):
        services.register_agent(store, f"th{i}", agent_type="thread", max_concurrency=1000)
    claims: dict[str, list[str]] = {f"th{i}": [] for i in range(n)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n, timeout=30)

    def claimer(agent: str) -> None:
        try:
            with Store.open(store.path) as mine:
                barrier.wait()
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        row = mine.claim(agent_id=agent, capabilities=[], max_concurrency=10**6, lease_secs=600,
                                         ts=time.time())  # fmt: skip
                    except StoreBusy:
                        continue
                    if row is None:
                        return
                    claims[agent].append(row["task_id"])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(agent,)) for agent in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert_each_claimed_once(store, ids, claims)


def _read_ids(data: bytes) -> list[str]:
    """Complete lines only: a line cut short by the kill was never acknowledged."""
    return data.decode().split("\n")[:-1]


@pytest.mark.parametrize("rounds", [6])
def test_kill_9_at_a_random_moment_loses_no_committed_task(tmp_path, orch, rounds):
    db = tmp_path / "churn.db"
    rng = random.Random(os.getpid())
    printed: list[str] = []
    for r in range(rounds):
        proc = subprocess.Popen([sys.executable, "-c", CHURN, str(db), f"r{r}"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)  # fmt: skip
        out = b""
        try:
            if r % 2:  # at any moment, even while it opens or migrates the database …
                time.sleep(rng.uniform(0.0, 0.6))
            else:  # … or once it is busy creating and moving tasks
                ready, _, _ = select.select([proc.stdout], [], [], 30)
                assert ready, "the churn process printed nothing in 30 s"
                out = os.read(proc.stdout.fileno(), 65536)
                time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            rest, err = proc.communicate(timeout=30)
        assert proc.returncode in (-signal.SIGKILL, 0), err.decode()[-2000:]
        printed += _read_ids(out + rest)

        with Store.open(db) as s:  # after each kill: opens, replays cleanly, and has every acknowledged task
            report = s.check()
            assert report.ok, report.problems
            present = {t["task_id"] for t in s.tasks()}
            missing = [t for t in printed if t not in present]
            assert not missing, f"round {r}: committed but lost: {missing[:10]}"
            assert not s.conn.execute("SELECT 1 FROM attempts a JOIN tasks t USING (task_id) "
                                      "WHERE a.attempt > t.attempt").fetchone()  # fmt: skip
    assert len(printed) > rounds  # the kills landed while work was going on
