"""Dispatch planning: 10,000 queued tasks × 1,000 agents (SPEC §11: ≤ 0.5 s, growing linearly).

Times, median of N (in-process, ``time.perf_counter``):
  * ``fleetctl.matching.plan`` — the pure planner — at 2,500 / 5,000 / 10,000 queued tasks × 1,000 agents,
    in two scenarios: *realistic* (``max_concurrency`` 1–4, a third of it already taken: the planner
    stops when no agent has room left) and *stress* (10–20 slots each: every placeable task is placed,
    so the work grows with the queue — this is where linear growth shows);
  * ``fleetctl.passes.plan_dispatch(store, ts)`` — reading the agents, their running counts and the whole
    ready queue from a real database (built with those rows, consistent with its events: ``db check``
    says ok), then planning; its pairs must equal ``plan()``'s on the same rows.

The workload: 20 distinct requirement sets (one that no agent serves, so the planner must walk past
tasks it cannot place), 1,000 agents with 2–6 capabilities each, tasks at three priorities.

Reference, measured in the same run: the obvious O(tasks · agents) planner — for each task, scan every
agent for the least-loaded, longest-idle capable one with room — i.e. what ``plan`` exists to beat. It
runs at 1,000 tasks, must give the *same pairs* as ``plan`` there (a correctness cross-check), and its
time per task walked is extrapolated to the number of tasks ``plan`` walks at each size. As a
machine-speed yardstick the run also times ``sorted()`` of 10,000 (priority, seq, id) tuples.

Usage: python bench/bench_dispatch_plan.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CAPABILITIES, REQUIREMENT_SETS, header, result, verdict  # noqa: E402

from fleetctl.matching import AgentSlot, QueuedTask, plan  # noqa: E402

TARGET_S = 0.5
N_AGENTS = 1000
SIZES = (2_500, 5_000, 10_000)


def workload(n_tasks: int, seed: int = 11, slots_per_agent: tuple[int, int] = (1, 4)) -> tuple[list, list, list]:
    """Tasks (sorted by priority desc, then age), agents as dicts, and each task's priority.

    One agent in ten is a specialist (``code:cobol`` only): it can take only the tasks that need nothing
    in particular, so some capacity stays idle while the queue is walked past it.
    """
    rng = random.Random(seed)
    agents = []
    for i in range(N_AGENTS):
        cap = rng.randint(*slots_per_agent)
        agents.append({
            "agent_id": f"host{i // 8:03d}.agent{i:04d}", "capabilities": frozenset(rng.sample(CAPABILITIES,
                                                                                          rng.randint(2, 6))),
            "max_concurrency": cap, "running": rng.randint(0, cap) if rng.random() < 0.5 else 0,
            "idle_since": 1_700_000_000.0 + rng.uniform(0, 86400),
        })  # fmt: skip
        if i % 10 == 9:
            agents[-1]["capabilities"] = frozenset({"code:cobol"})
    prios = [rng.choices([0, 1, 5], [80, 15, 5])[0] for _ in range(n_tasks)]
    reqs = [rng.choice(REQUIREMENT_SETS) for _ in range(n_tasks)]
    order = sorted(range(n_tasks), key=lambda i: (-prios[i], i))
    tasks = [QueuedTask(f"t-{i:010x}", reqs[i]) for i in order]
    return tasks, agents, [prios[i] for i in order]


def slots(agents: list[dict]) -> list[AgentSlot]:
    return [AgentSlot(a["agent_id"], a["capabilities"], a["max_concurrency"], a["running"], a["idle_since"])
            for a in agents]  # fmt: skip


def naive_plan(tasks: list[QueuedTask], agents: list[AgentSlot], now: float = 0.0) -> tuple[list, int]:
    """The O(tasks · agents) planner with plan()'s rules; returns (pairs, tasks walked)."""
    free_total = sum(max(0, a.free) for a in agents if a.max_concurrency > 0)
    out, walked = [], 0
    for task in tasks:
        if free_total <= 0:
            break
        walked += 1
        need = set(task.requirements)
        best = None
        for a in agents:
            if (
                a.max_concurrency > 0
                and a.free > 0
                and need <= a.capabilities
                and (best is None or a.key() < best.key())
            ):
                best = a
        if best is None:
            continue
        out.append((task.task_id, best.agent_id))
        best.running += 1
        best.idle_since = now
        free_total -= 1
    return out, walked


def walked_by_plan(tasks: list[QueuedTask], agents: list[dict], pairs: list) -> int:
    """How many queued tasks plan() looked at: it stops once no agent has room left."""
    free = sum(max(0, a["max_concurrency"] - a["running"]) for a in agents)
    if len(pairs) < free:
        return len(tasks)
    last = pairs[-1][0]
    return next(i for i, t in enumerate(tasks) if t.task_id == last) + 1


def timed(fn, runs: int) -> tuple[float, object]:
    samples, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), out


def build_db(path: Path, tasks: list[QueuedTask], agents: list[dict], prios: list[int]) -> None:
    """A real database: 1,000 online ssh_cli agents, their running tasks, and the queue — via events."""
    from fleetctl.projections import AGENT_COLUMNS, ATTEMPT_COLUMNS, JSON_COLUMNS, TASK_COLUMNS, Projections, apply
    from fleetctl.store import Store

    store = Store.open(path)
    p = Projections()
    events = []

    def emit(ts, type_, task_id, agent_id, attempt, data):
        ev = {"id": len(events) + 1, "ts": ts, "type": type_, "task_id": task_id, "agent_id": agent_id,
              "attempt": attempt, "data": data}  # fmt: skip
        apply(p, ev)
        events.append((ev["id"], ts, type_, task_id, agent_id, attempt, json.dumps(data, sort_keys=True,
                                                                                   separators=(",", ":"))))  # fmt: skip

    ts = 1_700_000_000.0
    for a in agents:
        emit(ts, "agent.registered", None, a["agent_id"], None, {
            "agent_type": "codex-cli", "capabilities": sorted(a["capabilities"]), "max_concurrency": a["max_concurrency"],
            "mode": "ssh_cli", "host_id": a["agent_id"].split(".")[0], "status": "online"})  # fmt: skip
    n = 0
    for a in agents:  # the capacity already taken
        for _ in range(a["running"]):
            n += 1
            tid = f"r-{n:09d}"
            emit(ts, "task.created", tid, None, None, {"title": f"running {n}", "requirements": [], "labels": [],
                                                       "max_attempts": 3})  # fmt: skip
            emit(ts, "task.assigned", tid, a["agent_id"], 1, {"lease_expires_at": ts + 3600})
            emit(ts, "task.started", tid, a["agent_id"], 1, {})
    for task, prio in zip(tasks, prios, strict=True):
        labels = [f"agent:{r}" for r in task.requirements] + ([f"priority:{prio}"] if prio else [])
        emit(ts, "task.created", task.task_id, None, None, {"title": f"queued {task.task_id}", "labels": labels,
             "requirements": list(task.requirements), "priority": prio, "max_attempts": 3})  # fmt: skip
    conn = store.conn
    with store.write():
        conn.executemany("INSERT INTO events (id, ts, type, task_id, agent_id, attempt, data) VALUES (?,?,?,?,?,?,?)",
                         events)  # fmt: skip
        for name, table, cols in (("agents", p.agents, AGENT_COLUMNS), ("tasks", p.tasks, TASK_COLUMNS),
                                  ("attempts", p.attempts, ATTEMPT_COLUMNS)):  # fmt: skip
            conn.executemany(
                f"INSERT INTO {name} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [[json.dumps(r[c], sort_keys=True, separators=(",", ":")) if c in JSON_COLUMNS and r[c] is not None
                  else r[c] for c in cols] for r in table.values()],
            )  # fmt: skip
    report = store.check()
    store.close()
    if not report.ok:
        raise SystemExit(f"the generated database is inconsistent: {report.problems[:5]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    header(f"dispatch planning: queued tasks x {N_AGENTS:,} agents")

    # reference 1: the naive planner on 1,000 tasks, cross-checked against plan()
    small, agents, _ = workload(1_000)
    (naive_pairs, walked) = naive_plan(small, slots(agents))
    t_naive, _ = timed(lambda: naive_plan(small, slots(agents)), max(3, args.runs // 2))
    fast_pairs = plan(small, slots(agents))
    if fast_pairs != naive_pairs:
        raise SystemExit("plan() and the naive planner disagree on the same input")
    # reference 2: a machine-speed yardstick
    rng = random.Random(3)
    tuples = [(rng.randint(0, 5), i, f"t-{i:010x}") for i in range(10_000)]
    t_sort, _ = timed(lambda: sorted(tuples), args.runs)

    print(f"\n   reference: naive O(T*A) planner, 1,000 tasks x {N_AGENTS:,} agents: {t_naive * 1000:.1f} ms "
          f"({walked} tasks walked, {len(naive_pairs)} placed; same pairs as plan())")  # fmt: skip
    print(f"   yardstick: sorted() of 10,000 (priority, seq, id) tuples: {t_sort * 1000:.2f} ms")

    scenarios = {
        "realistic: 1-4 slots per agent, a third busy": (1, 4),
        "stress: 10-20 slots per agent, everything placeable placed": (10, 20),
    }
    per_size: dict[tuple[str, int], float] = {}
    for label, slot_range in scenarios.items():
        print(f"\n   {label}")
        print(f"{'tasks':>8} {'agents':>7} {'placed':>7} {'walked':>7}   {'plan() median':>13}   {'per task':>9}"
              "   naive, extrapolated to the tasks walked")  # fmt: skip
        for n in SIZES:
            tasks, ags, _ = workload(n, slots_per_agent=slot_range)
            t_plan, pairs = timed(lambda tasks=tasks, ags=ags: plan(tasks, slots(ags)), args.runs)
            walked_n = walked_by_plan(tasks, ags, pairs)
            naive_est = t_naive / walked * walked_n
            per_size[(label, n)] = t_plan
            print(f"{n:>8,} {N_AGENTS:>7,} {len(pairs):>7,} {walked_n:>7,}   {t_plan * 1000:10.1f} ms   "
                  f"{t_plan / n * 1e6:6.2f} µs   {naive_est * 1000:6.0f} ms -> plan() {naive_est / t_plan:4.0f}x faster")  # fmt: skip
        g = per_size[(label, SIZES[-1])] / per_size[(label, SIZES[0])]
        marginal = (per_size[(label, SIZES[-1])] - per_size[(label, SIZES[0])]) / (SIZES[-1] - SIZES[0])
        print(f"   2,500 -> 10,000 tasks: {g:.2f}x the time for 4x the tasks; {marginal * 1e6:.2f} µs per extra task")
    realistic, stress = list(scenarios)
    growth = per_size[(stress, SIZES[-1])] / per_size[(stress, SIZES[0])]

    # the full read + plan against a real database
    from fleetctl.passes import plan_dispatch
    from fleetctl.store import Store

    tasks, ags, prios = workload(SIZES[-1])
    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-plan-") as tmp:
        db = Path(tmp) / "fleet.db"
        t0 = time.perf_counter()
        build_db(db, tasks, ags, prios)
        print(f"\n   built {db.name}: {len(tasks):,} queued + running tasks, {len(ags):,} agents, db check ok "
              f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
        with Store.open(db) as store:
            ts = 1_800_000_000.0
            t_full, (pairs, read_slots) = timed(lambda: plan_dispatch(store, ts), args.runs)
        copies = [AgentSlot(s.agent_id, s.capabilities, s.max_concurrency, s.running, s.idle_since) for s in read_slots]
        same = pairs == plan(tasks, copies, now=ts) and len(read_slots) == len(ags)
        print(f"   plan_dispatch(store, ts), {len(tasks):,} queued x {len(ags):,} agents: median {t_full * 1000:.1f} ms, "
              f"{len(pairs):,} placed ({'same pairs as plan() on the same rows' if same else 'DIFFERENT pairs'})")  # fmt: skip

    print()
    for label, name in ((realistic, "plan() 10,000 x 1,000"), (stress, "plan() 10,000 x 1,000, stress")):
        t10 = per_size[(label, SIZES[-1])]
        result(name, f"{t10 * 1000:.0f} ms (= {t10 / t_sort:.0f}x sorting 10k tuples)", f"<= {TARGET_S * 1000:.0f} ms",
               verdict(t10 <= TARGET_S))  # fmt: skip
    result("plan() growth 2.5k -> 10k, stress", f"{growth:.2f}x for 4x tasks", "~4x or less (linear)",
           verdict(growth <= 4.8))  # fmt: skip
    result("plan_dispatch(store) 10,000 x 1,000", f"{t_full * 1000:.0f} ms", f"<= {TARGET_S * 1000:.0f} ms",
           verdict(t_full <= TARGET_S and same))  # fmt: skip


if __name__ == "__main__":
    main()
