"""Claims in batches: ``Store.claim_many`` and the server writer's grouped claims (fleetctl/server/writer.py).

Several claims in one transaction must behave exactly like the same claims one after another: each sees
the ones before it (capacity, the queue), their events come in claim order, and ``db check`` replays them
to the stored rows. In the writer, one bad claim must not fail the others of its batch.
"""

from __future__ import annotations

import threading

import pytest

from fleetctl import services
from fleetctl.server.writer import Writer
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


def test_one_bad_claim_in_a_writer_batch_fails_alone(orch):
    store = Store.open(orch.db_path)
    services.register_agent(store, "w", agent_type="t", max_concurrency=10)
    ids = _queue(store, orch, 3)
    writer = Writer(Store.open(orch.db_path))
    gate, entered = threading.Event(), threading.Event()

    def hold(s: Store) -> None:
        entered.set()
        gate.wait(10)

    results: dict[int, object] = {}

    def claim(i: int) -> None:
        def request() -> ClaimRequest:
            if i == 1:
                raise RuntimeError("a broken request")
            return ClaimRequest("w", [], 10, 60, 3000.0 + i)

        try:
            results[i] = writer.claim(request)
        except RuntimeError as exc:
            results[i] = exc

    blocker = threading.Thread(target=lambda: writer.submit(hold))
    blocker.start()
    assert entered.wait(10)  # the writer is busy with the blocker's batch
    threads = [threading.Thread(target=claim, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    while len(writer._pending) < 3:  # the three claims wait together: one batch
        threading.Event().wait(0.01)
    gate.set()
    for t in [blocker, *threads]:
        t.join(10)
    writer.close()
    writer.store.close()
    assert isinstance(results[1], RuntimeError)
    assert sorted(results[i]["task_id"] for i in (0, 2)) == sorted(ids[:2])
    assert store.check().ok
    store.close()


@pytest.mark.parametrize("n", [1, 2, 3, 31, 32, 33, 64])
def test_chunks_cover_every_row_once_in_order(n):
    from fleetctl.store import _chunks

    chunks = list(_chunks(list(range(n))))
    assert [x for c in chunks for x in c] == list(range(n))
    assert all(len(c) in (1, 2, 4, 8, 16, 32) for c in chunks)
