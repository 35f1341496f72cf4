"""Claims in batches: ``Store.claim_many`` and the server writer's grouped claims (fleetctl/server/writer.py).

Several claims in one transaction must behave exactly like the same claims one after another: each sees
the ones before it (capacity, the queue), their events come in claim order, and ``db check`` replays them
to the stored rows. In the writer, one bad claim must not fail the others of its batch.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import threading

import pytest

from fleetctl import services
from fleetctl.server.writer import Writer
from fleetctl.states import AgentStatus
from fleetctl.store import ClaimRequest, Store


def _queue(store, orch, n: int, labels=()) -> list[str]:
    return [services.create_task(store, orch, title=f"t{i}", labels=list(labels))["task_id"] for i in range(n)]


def test_claim_many_is_the_same_claims_in_order(store, orch):
    services.register_agent(store, "one", agent_type="t", capabilities=["x"], max_concurrency=1)
    services.register_agent(store, "many", agent_type="t", capabilities=["x", "gpu"], max_concurrency=5)
    services.register_agent(store, "plain", agent_type="t", capabilities=[], max_concurrency=5)
    ids = _queue(store, orch, 4, ["agent:x"]) + _queue(store, orch, 1, ["agent:gpu"])
    requests = [ClaimRequest("one", ["x"], 1, 60, 1000.0 + i) for i in range(2)]  # the second is over capacity
    requests += [ClaimRequest("many", ["x", "gpu"], 5, 60, 1010.0 + i) for i in range(5)]
    requests += [ClaimRequest("plain", [], 5, 60, 1020.0)]  # nothing it can serve
    rows = store.claim_many(requests)
    got = [r and r["task_id"] for r in rows]
    assert got[1] is None and got[-1] is None and got[6] is None  # capacity, nothing left, no capability
    assert sorted(filter(None, got)) == sorted(ids)
    assert got[0] == ids[0]  # oldest first, each claim seeing the ones before it
    events = store.events(types=["task.assigned"])
    assert [e["task_id"] for e in events] == [g for g in got if g]  # ids in claim order
    assert [e["ts"] for e in events] == [r.ts for r, g in zip(requests, got, strict=True) if g]
    assert store.agent("many")["last_assigned_at"] == max(r.ts for r, g in zip(requests, got, strict=True)
                                                          if g and r.agent_id == "many")  # fmt: skip
    assert store.check().ok


def test_claim_many_of_more_than_one_chunk(store, orch):
    """Multi-row statements go in slices of 32, 16, …: 45 claims make three of each kind."""
    for i in range(9):
        services.register_agent(store, f"a{i}", agent_type="t", max_concurrency=10)
    ids = _queue(store, orch, 50)
    rows = store.claim_many([ClaimRequest(f"a{i % 9}", [], 10, 60, 2000.0 + i) for i in range(45)])
    assert [r["task_id"] for r in rows] == ids[:45]
    assert {a["attempt"] for a in (store.attempt(t, 1) for t in ids[:45])} == {1}
    assert store.check().ok


def _one_batch(writer: Writer, requests: list) -> dict[int, object]:
    """Each ``requests[i]`` (a ``ClaimRequest`` factory) claimed by its own thread, in this order, all in ONE
    batch of the writer (held busy until they all wait): what each got, or the exception it raised."""
    gate, entered = threading.Event(), threading.Event()

    def hold(s: Store) -> None:
        entered.set()
        gate.wait(10)

    results: dict[int, object] = {}

    def claim(i: int) -> None:
        try:
            results[i] = writer.claim(requests[i])
        except RuntimeError as exc:
            results[i] = exc

    blocker = threading.Thread(target=lambda: writer.submit(hold))
    blocker.start()
    assert entered.wait(10)  # the writer is busy with the blocker's batch
    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(requests))]
    for i, t in enumerate(threads):  # queued in order, one after another; they wait together: one batch
        t.start()
        while len(writer._pending) <= i:
            threading.Event().wait(0.01)
    gate.set()
    for t in [blocker, *threads]:
        t.join(10)
    return results


def test_one_bad_claim_in_a_writer_batch_fails_alone(orch):
    store = Store.open(orch.db_path)
    services.register_agent(store, "w", agent_type="t", max_concurrency=10)
    ids = _queue(store, orch, 3)
    writer = Writer(Store.open(orch.db_path))

    def request(i: int) -> ClaimRequest:
        if i == 1:
            raise RuntimeError("a broken request")
        return ClaimRequest("w", [], 10, 60, 3000.0 + i)

    results = _one_batch(writer, [lambda i=i: request(i) for i in range(3)])
    writer.close()
    writer.store.close()
    assert isinstance(results[1], RuntimeError)
    assert sorted(results[i]["task_id"] for i in (0, 2)) == sorted(ids[:2])
    assert store.check().ok
    store.close()


def test_a_writer_batch_claims_at_one_time_with_one_statement(orch):
    """The claims of one batch get the batch's time (the first's), so that one statement claims for them
    all; a claim of a given task still has its own."""
    store = Store.open(orch.db_path)
    for i in range(4):
        services.register_agent(store, f"w{i}", agent_type="t", max_concurrency=5)
    ids = _queue(store, orch, 6)
    writer = Writer(Store.open(orch.db_path))
    statements: list[str] = []
    writer.store.conn.set_trace_callback(statements.append)
    requests = [lambda i=i: ClaimRequest(f"w{i}", [], 5, 60, 4000.0 + i) for i in range(3)]
    requests.append(lambda: ClaimRequest("w3", [], 5, 60, 4010.0, task_id=ids[5]))
    results = _one_batch(writer, requests)
    writer.close()
    writer.store.close()
    assert sorted(results[i]["task_id"] for i in range(3)) == sorted(ids[:3])
    assert results[3]["task_id"] == ids[5]
    assigned = store.events(types=["task.assigned"])
    assert {e["ts"] for e in assigned if e["task_id"] != ids[5]} == {4000.0}  # the first's time for the run
    assert sum(q.startswith("WITH req AS MATERIALIZED") for q in statements) == 1
    assert sum(q.startswith("UPDATE tasks SET") for q in statements) == 1  # the given task's own
    assert store.check().ok
    store.close()


def _temp_files() -> list[str]:
    """SQLite's temporary files open in this process (it unlinks them at once; /proc still names them)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "etilqs_" in target:
            found.append(target)
    return found


@pytest.mark.parametrize("in_memory", [True, False])
def test_the_writer_keeps_its_savepoint_journals_in_memory(orch, in_memory):
    """A write in the writer's batch runs in a savepoint; its journal (the pages as they were) goes to a
    temporary file past 64 KiB unless the connection keeps it in memory — a page written for each page
    touched. ``in_memory=False`` shows the file the writer's connection no longer makes."""
    store = Store.open(orch.db_path)
    _queue(store, orch, 1)
    store.execute("CREATE TABLE pad (id INTEGER PRIMARY KEY, v TEXT)")
    store.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200) "
        "INSERT INTO pad (v) SELECT printf('%.2000c', 'x') FROM n"
    )  # about 100 pages
    store.close()
    writer = Writer(Store.open(orch.db_path))
    if not in_memory:
        writer.store.execute("PRAGMA temp_store=DEFAULT")

    def touch_every_page(s: Store) -> list[str]:
        s.execute("UPDATE pad SET v = printf('%.2000c', 'y')")
        files = _temp_files()
        raise RuntimeError(files)  # rolled back: the test leaves the database as it was

    with pytest.raises(RuntimeError) as raised:
        writer.submit(touch_every_page)
    writer.close()
    writer.store.close()
    assert (raised.value.args[0] == []) is in_memory
    store = Store.open(orch.db_path)
    assert store.execute("SELECT count(*) FROM pad WHERE v LIKE 'y%'").fetchone()[0] == 0
    assert store.check().ok
    store.close()


def _fleet(store, orch, rng: random.Random) -> tuple[dict[str, dict], list[str]]:
    """Agents with assorted capabilities and limits (one draining, one cooling down, some already busy) and
    tasks with assorted requirements and priorities, some still in their backoff at t=1000."""
    agents = {}
    for i in range(6):
        caps = rng.choice([["x"], ["x"], ["gpu", "x", "y"], sorted(rng.sample(["x", "y", "gpu"], rng.randint(0, 3)))])
        services.register_agent(store, f"a{i}", agent_type="t", capabilities=caps, mode="http_pull",
                                max_concurrency=rng.randint(1, 4), now=900.0)  # fmt: skip
        agents[f"a{i}"] = store.agent(f"a{i}")
    services.drain_agent(store, orch, "a5", now=901.0)
    ids = []
    for i in range(24):
        labels = [f"agent:{c}" for c in rng.sample(["x", "y", "gpu"], rng.choice([0, 0, 0, 1, 1, 2]))]
        labels += [f"priority:{p}"] if (p := rng.choice([0, 0, 1, 5])) else []
        ids.append(services.create_task(store, orch, title=f"t{i}", labels=labels, now=910.0 + i)["task_id"])
    helper = services.register_agent(store, "helper", agent_type="t", capabilities=["x", "y", "gpu"],
                                     max_concurrency=10, now=920.0).agent  # fmt: skip
    for k in range(2):  # two tasks failed once: back in the queue, ready at 1000 + 10·k … or not yet
        [row] = store.claim_many([ClaimRequest("helper", helper["capabilities"], 10, 60, 930.0 + k)])
        services.fail_attempt(store, orch, row["task_id"], "agent_error", now=1000.0 + 10 * k - orch.retry_backoff_secs)
    [row] = store.claim_many([ClaimRequest("helper", helper["capabilities"], 10, 60, 940.0)])
    services.rate_limit_attempt(store, orch, row["task_id"], retry_after=5, now=998.0)  # helper cools till 1003
    for agent_id in rng.sample(["a0", "a1", "a2", "a3"], 2):  # busy with one task already
        a = agents[agent_id]
        store.claim_many([ClaimRequest(agent_id, a["capabilities"], a["max_concurrency"], 60, 950.0)])
    return {k: store.agent(k) for k in [*agents, "helper"]}, ids


@pytest.mark.parametrize("seed", range(40))
def test_a_batch_claims_exactly_what_the_same_claims_one_by_one_do(orch, tmp_path, seed):
    """Runs of requests share one statement (``_CLAIM_RUN_SQL``); the oracle is the one-request statement,
    one claim after another on a copy of the same database: same task for every request, same events."""
    rng = random.Random(seed)
    store = Store.open(orch.db_path)
    agents, _ids = _fleet(store, orch, rng)
    store.close()
    oracle_path = tmp_path / "oracle.db"
    shutil.copyfile(orch.db_path, oracle_path)
    requests = []
    for i in range(rng.randint(1, 20)):
        a = agents[rng.choice(list(agents))]
        ts = 1000.0 + (i // 6) * rng.choice([0.0, 10.0])  # a run needs one time (the writer gives a batch one)
        caps, most, guard = a["capabilities"], a["max_concurrency"], None
        if rng.random() < 0.3:  # the server's guard: the token and the row as it was read (or a stale read)
            guard = a["token_hash"] if rng.random() < 0.8 else "stale"
            if rng.random() < 0.2:
                most += 1
        requests.append(ClaimRequest(a["agent_id"], caps, most, 60, ts, extra={"n": i}, agent_token_hash=guard))
    if rng.random() < 0.3:  # a claim of one given task in the middle
        requests.insert(len(requests) // 2, ClaimRequest("a0", agents["a0"]["capabilities"], 3, 60, 1001.0,
                                                         task_id=_ids[rng.randrange(len(_ids))]))  # fmt: skip
    store = Store.open(orch.db_path)
    got = store.claim_many(copy.deepcopy(requests))
    oracle = Store.open(oracle_path)
    with oracle.write():
        want = [oracle._claim_one(r, {}) for r in requests]
        oracle._record_claims([(r, row) for r, row in zip(requests, want, strict=True) if row is not None])
    assert [r and r["task_id"] for r in got] == [r and r["task_id"] for r in want]
    assert got == want  # the rows, to the lease and the timestamps
    assert store.events() == oracle.events()  # the same events, in the same order, with the same ids
    assert store.check().ok and oracle.check().ok
    assert AgentStatus(store.agent("a5")["status"]) == AgentStatus.DRAINING
    store.close()
    oracle.close()


def test_claims_share_one_statement_only_where_they_cannot_see_each_other():
    from fleetctl.store import ClaimLimits, _claim_runs

    def r(agent, caps=("x",), lease_secs=60, **kw):
        return ClaimRequest(agent, list(caps), 2, lease_secs, 1.0, **kw)

    capped = ClaimLimits(repo_cap=1)
    reqs = [r("a"), r("b"), r("a"), r("c", ("y",)), r("d", ("y",)), r("e", task_id="t-1"), r("f"),
            r("g", limits=capped), r("h", limits=ClaimLimits()), r("i"), r("j", lease_secs=61)]  # fmt: skip
    reqs.append(ClaimRequest("k", ["x"], 2, 61, 2.0))
    runs = [[x.agent_id for x in run] for run in _claim_runs(reqs)]
    assert runs == [["a", "b"], ["a"], ["c", "d"], ["e"], ["f"], ["g"], ["h", "i"], ["j"], ["k"]]


@pytest.mark.parametrize("n", [1, 2, 3, 31, 32, 33, 64])
def test_chunks_cover_every_row_once_in_order(n):
    from fleetctl.store import _chunks

    chunks = list(_chunks(list(range(n))))
    assert [x for c in chunks for x in c] == list(range(n))
    assert all(len(c) in (1, 2, 4, 8, 16, 32) for c in chunks)
