"""The store at 100,000 tasks / 1,000,000 events: list, show and db check (SPEC §11).

Builds (once, then cached in bench/results/, keyed by the generator version, fleetctl's version, its
migrations and the size) a database of 100,000 tasks whose ~1,000,000 events are consistent with the
projections: events are generated as the services would append them, replayed through
``fleetctl.projections.apply`` in Python, and both are bulk-inserted in one transaction into a database
that ``Store.open`` created and migrated. ``fleetctl db check`` must then say ok — that is the proof the
generator is consistent — and is timed.

Timed (median of N, wall, as a new process each time, like an operator or a script would run them):
  fleetctl task list --state queued --json      (default limit)        target ≤ 150 ms
  fleetctl task show ID --json                  (a task with 3 attempts) target ≤ 150 ms
  fleetctl db check                                                     target ≤ 30 s
References measured in the same run: ``python -c "import typer"`` (wall), and a bare sqlite3 query of
the same rows (in-process query time, and as a ``python -c`` process).

Usage: python bench/bench_store.py [--tasks N] [--runs N] [--check-runs N] [--rebuild]
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    CAPABILITIES,
    PYTHON,
    REQUIREMENT_SETS,
    RESULTS_DIR,
    clean_env,
    describe,
    fleetctl_exe,
    header,
    median_ms,
    result,
    run_timed,
    verdict,
)

#: Bump when the generator changes what it writes: the cached database is rebuilt.
GENERATOR_VERSION = "g1"
T0 = 1_750_000_000.0  # a fixed epoch: the same build every time
SPAN = 60 * 86400.0  # tasks are created over 60 days
N_AGENTS = 200


def cache_path(n_tasks: int) -> Path:
    import fleetctl
    from fleetctl.schema import MIGRATION_NAMES

    key = f"{GENERATOR_VERSION}|{fleetctl.__version__}|{'+'.join(MIGRATION_NAMES)}|{n_tasks}"
    return RESULTS_DIR / f"store-{n_tasks}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.db"


# --------------------------------------------------------------------------------------------- generator


def _agents(rng: random.Random) -> list[dict]:
    agents = []
    for i in range(N_AGENTS):
        caps = sorted(rng.sample(CAPABILITIES, rng.randint(2, 6)))
        mode = "ssh_cli" if i % 3 else "http_pull"
        agents.append({
            "agent_id": f"host{i // 4:02d}.agent{i:03d}", "agent_type": rng.choice(["codex-cli", "claude-code"]),
            "capabilities": caps, "max_concurrency": rng.randint(1, 4), "mode": mode,
            "host_id": f"host{i // 4:02d}" if mode == "ssh_cli" else None,
            "token_hash": hashlib.sha256(f"t{i}".encode()).hexdigest() if mode == "http_pull" else None,
        })  # fmt: skip
    for a in agents[:: N_AGENTS // 10]:  # every requirement set but gpu:a100 has some agent
        a["capabilities"] = sorted(set(a["capabilities"]) | set(CAPABILITIES[: len(CAPABILITIES) // 2]))
    for a in agents[1 :: N_AGENTS // 10]:
        a["capabilities"] = sorted(set(a["capabilities"]) | set(CAPABILITIES[len(CAPABILITIES) // 2 :]))
    return agents


def _final(rng: random.Random, recent: bool) -> str:
    """How a task ends up: mostly finished long ago, the recent ones still moving."""
    if recent:
        return rng.choices(
            ["queued", "queued_retry", "assigned", "running", "awaiting_review", "completed", "failed", "cancelled"],
            [25, 5, 5, 10, 10, 40, 3, 2],
        )[0]
    return rng.choices(["completed", "completed_review", "failed", "cancelled", "queued", "retried"],
                       [62, 20, 7, 6, 1, 4])[0]  # fmt: skip


def _task_events(rng: random.Random, i: int, created: float, capable: dict, final: str, recent: bool) -> list[tuple]:
    """One task's events as (ts, type, task_id, agent_id, attempt, data), in the order the services append."""
    starved = final == "queued" and (not recent or rng.random() < 0.2)  # old queued tasks: nobody can serve them
    reqs = REQUIREMENT_SETS[19] if starved else rng.choice(REQUIREMENT_SETS[:19])
    task_id = f"t-{i:010x}"
    repo = f"org/repo{i % 50:02d}"
    labels = [f"agent:{r}" for r in reqs] + rng.sample(["bug", "enhancement", "ci", "priority:5", "priority:1"], 2)
    prio = 5 if "priority:5" in labels else 1 if "priority:1" in labels else 0
    max_attempts = 3
    ev = [(created, "task.created", task_id, None, None, {
        "title": f"Fix issue {i}: {rng.choice(['flaky test', 'parser crash', 'docs typo', 'slow query'])}",
        "body": "Steps to reproduce:\n" + "x" * rng.randint(50, 400), "labels": labels, "requirements": list(reqs),
        "priority": prio, "repo": repo, "issue_number": i // 50 + 1, "max_attempts": max_attempts,
        "timeout_secs": None})]  # fmt: skip
    t = created
    if rng.random() < 0.05:
        t += rng.uniform(10, 600)
        ev.append((t, "task.updated", task_id, None, None, {"labels": [*labels, "triaged"]}))
    if final in ("queued",) or (final == "cancelled" and rng.random() < 0.5):
        if final == "cancelled":
            ev.append((t + rng.uniform(60, 3600), "task.cancelled", task_id, None, None, {"reason": "issue closed"}))
        return ev
    fails = {"failed": 3, "queued_retry": rng.randint(1, 2), "retried": 3}.get(
        final, rng.choices([0, 1, 2], [75, 18, 7])[0]
    )
    attempt = 0
    agents = capable[reqs]

    def run_attempt(outcome: str) -> None:
        nonlocal t, attempt
        attempt += 1
        agent = rng.choice(agents)
        t += rng.uniform(5, 120)
        ev.append((t, "task.assigned", task_id, agent, attempt, {
            "lease_expires_at": t + 300, "host_id": agent.split(".")[0],
            "token_hash": hashlib.sha256(f"{task_id}{attempt}".encode()).hexdigest()}))  # fmt: skip
        if outcome == "assigned":
            return
        t += rng.uniform(1, 10)
        ev.append((t, "task.started", task_id, agent, attempt, {"workspace": f"/srv/ws/{task_id}/{attempt}"}))
        for k in range(rng.choice([2, 3, 4, 5])):
            t += rng.uniform(20, 300)
            ev.append((t, "task.progress", task_id, agent, attempt, {"message": f"step {k + 1}: running the tests"}))
        if outcome == "running":
            return
        t += rng.uniform(20, 300)
        if outcome in ("requeued", "failed"):
            reason = rng.choice(["agent_error", "timeout", "no_receipt", "agent_lost"])
            data = {"reason": reason, "detail": f"the run failed ({reason})", "why": "attempts remain"}
            if outcome == "requeued":
                data["not_before"] = t + 30 * 2 ** (attempt - 1)
            ev.append((t, f"task.{outcome}", task_id, agent, attempt, data))
            return
        receipt = {"outcome": "success", "summary": "Fixed it; tests pass", "artifacts": []}
        data = {"receipt": receipt}
        if outcome == "awaiting_review":
            pr = {"kind": "pull_request", "number": 1000 + i, "repo": repo}
            receipt["artifacts"].append(pr)
            data["pull_request"] = pr
        ev.append((t, f"task.{outcome}", task_id, agent, attempt, data))

    for _ in range(fails):
        run_attempt("requeued" if attempt + 1 < max_attempts else "failed")
    if final == "retried":  # an operator retried the failed task; it then went through
        t += rng.uniform(600, 86400)
        ev.append((t, "task.retried", task_id, ev[-1][3], attempt, {"max_attempts": attempt + 1 + 2}))
        run_attempt("completed")
    elif final in ("completed", "completed_review", "awaiting_review", "assigned", "running"):
        run_attempt({"completed": "completed", "completed_review": "awaiting_review"}.get(final, final))
        if final == "completed_review":
            t += rng.uniform(600, 86400)
            ev.append((t, "task.completed", task_id, ev[-1][3], attempt, {}))
    elif final == "cancelled":
        run_attempt("running")
        ev.append((t + rng.uniform(60, 3600), "task.cancelled", task_id, ev[-1][3], attempt, {"reason": "operator"}))
    return ev


def build(path: Path, n_tasks: int, seed: int = 7) -> dict:
    """Generate, replay and bulk-insert; returns counts. Written to a temporary file, then renamed."""
    from fleetctl.projections import AGENT_COLUMNS, ATTEMPT_COLUMNS, JSON_COLUMNS, TASK_COLUMNS, Projections, apply
    from fleetctl.store import Store

    rng = random.Random(seed)
    t_start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".building")
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    store = Store.open(tmp)  # creates and migrates: the real schema, with every index
    conn = store.conn

    agents = _agents(rng)
    capable = {
        reqs: [a["agent_id"] for a in agents if set(reqs) <= set(a["capabilities"])] or [agents[0]["agent_id"]]
        for reqs in REQUIREMENT_SETS
    }
    p = Projections()
    events: list[tuple] = []
    next_id = 1

    def emit(ts: float, type_: str, task_id, agent_id, attempt, data: dict) -> None:
        nonlocal next_id
        ev = {"id": next_id, "ts": ts, "type": type_, "task_id": task_id, "agent_id": agent_id,
              "attempt": attempt, "data": data}  # fmt: skip
        apply(p, ev)
        events.append((next_id, ts, type_, task_id, agent_id, attempt,
                       json.dumps(data, sort_keys=True, separators=(",", ":"))))  # fmt: skip
        next_id += 1

    for k, a in enumerate(agents):
        data = {key: a[key] for key in ("agent_type", "capabilities", "max_concurrency", "mode", "host_id",
                                          "token_hash") if a[key] is not None}  # fmt: skip
        emit(T0 - 86400 + k, "agent.registered", None, a["agent_id"], None, {**data, "status": "online"})

    # Tasks are generated in creation order; their later events wait in a heap until their time comes,
    # so the log interleaves tasks the way a live fleet would.
    heap: list[tuple] = []
    order = 0
    gap = SPAN / n_tasks
    conn.execute("BEGIN IMMEDIATE")
    for i in range(n_tasks):
        created = T0 + i * gap + rng.uniform(0, gap)
        while heap and heap[0][0] <= created:
            ts, _, rec = heapq.heappop(heap)
            emit(ts, *rec)
        if i % 5000 == 0 and i:  # agents come and go now and then
            a = rng.choice(agents)["agent_id"]
            emit(created - 1, "agent.offline", None, a, None, {"reason": "no heartbeat for 200s"})
            emit(created - 0.5, "agent.online", None, a, None, {"reason": "heartbeat"})
        recent = i >= n_tasks * 0.97
        for ev in _task_events(rng, i, created, capable, _final(rng, recent), recent):
            heapq.heappush(heap, (ev[0], order, ev[1:]))
            order += 1
        if len(events) >= 200_000:
            conn.executemany("INSERT INTO events (id, ts, type, task_id, agent_id, attempt, data) "
                             "VALUES (?,?,?,?,?,?,?)", events)  # fmt: skip
            events.clear()
    while heap:
        ts, _, rec = heapq.heappop(heap)
        emit(ts, *rec)
    conn.executemany("INSERT INTO events (id, ts, type, task_id, agent_id, attempt, data) VALUES (?,?,?,?,?,?,?)",
                     events)  # fmt: skip
    n_events = next_id - 1
    t_events = time.perf_counter()

    def rows(table: dict, columns: tuple) -> list[list]:
        return [[json.dumps(r[c], sort_keys=True, separators=(",", ":")) if c in JSON_COLUMNS and r[c] is not None
                 else r[c] for c in columns] for r in table.values()]  # fmt: skip

    for name, table, columns in (("agents", p.agents, AGENT_COLUMNS), ("tasks", p.tasks, TASK_COLUMNS),
                                 ("attempts", p.attempts, ATTEMPT_COLUMNS)):  # fmt: skip
        conn.executemany(f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                         rows(table, columns))  # fmt: skip
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    states = Counter(t["state"] for t in p.tasks.values())
    store.close()
    tmp.rename(path)
    for suffix in ("-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    info = {"events": n_events, "tasks": len(p.tasks), "agents": len(p.agents), "attempts": len(p.attempts),
            "states": dict(sorted(states.items())), "seconds": round(time.perf_counter() - t_start, 1),
            "replay_and_event_insert_seconds": round(t_events - t_start, 1)}  # fmt: skip
    Path(str(path) + ".json").write_text(json.dumps(info, indent=1))
    return info


# --------------------------------------------------------------------------------------------- timing


def bare_query_ms(db: Path, sql: str, params: tuple, runs: int) -> float:
    """Median in-process time of one query on a fresh connection (what the CLI does, minus start-up)."""
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        conn = sqlite3.connect(db)
        conn.execute(sql, params).fetchall()
        conn.close()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--check-runs", type=int, default=3)
    ap.add_argument("--rebuild", action="store_true", help="ignore the cached database")
    args = ap.parse_args()

    header(f"store at {args.tasks:,} tasks: task list / task show / db check")
    db = cache_path(args.tasks)
    if args.rebuild or not db.exists():
        print(f"   building {db.name} ...", flush=True)
        info = build(db, args.tasks)
        print(f"   built in {info['seconds']} s (replay + event insert {info['replay_and_event_insert_seconds']} s)")
    else:
        info = json.loads(Path(str(db) + ".json").read_text())
        print(f"   cached: {db.name} (built in {info['seconds']} s)")
    print(f"   {info['events']:,} events, {info['tasks']:,} tasks, {info['attempts']:,} attempts, "
          f"{info['agents']} agents; {os.path.getsize(db) / 2**20:.0f} MiB")  # fmt: skip
    print(f"   task states: {info['states']}")

    with sqlite3.connect(db) as conn:
        show_id = conn.execute(
            "SELECT task_id FROM tasks WHERE attempt = 3 AND state = 'completed' ORDER BY seq LIMIT 1 OFFSET 100"
        ).fetchone()[0]
        n_show_events = conn.execute("SELECT count(*) FROM events WHERE task_id=?", (show_id,)).fetchone()[0]

    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-store-") as tmp:
        home = Path(tmp)
        env = clean_env(home, FLEET_DB_PATH=str(db))
        fc = fleetctl_exe()
        list_sql = "SELECT * FROM tasks WHERE state IN (?) ORDER BY seq LIMIT 101"
        cases = {
            "python -c 'import typer'": [PYTHON, "-c", "import typer"],
            "python -c sqlite3 query (same rows)": [PYTHON, "-c", "import sqlite3, sys; sqlite3.connect(sys.argv[1])"
                                                   f".execute({list_sql!r}, ('queued',)).fetchall()", str(db)],
            "fleetctl task list --state queued --json": fc + ["task", "list", "--state", "queued", "--json"],
            f"fleetctl task show {show_id} --json": fc + ["task", "show", show_id, "--json"],
        }  # fmt: skip
        _, out = run_timed(cases["fleetctl task list --state queued --json"], env=env, cwd=home)
        n_listed = len(json.loads(out)["items"])
        _, out = run_timed(cases[f"fleetctl task show {show_id} --json"], env=env, cwd=home)
        assert len(json.loads(out)["events"]) == n_show_events
        samples: dict[str, list[float]] = {k: [] for k in cases}
        names = list(cases)
        for i in range(args.runs + 2):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                dt, _ = run_timed(cases[name], env=env, cwd=home)
                if i >= 2:
                    samples[name].append(dt)
        q_list = bare_query_ms(db, list_sql, ("queued",), args.runs)
        q_show = bare_query_ms(db, "SELECT * FROM events WHERE task_id=? ORDER BY id", (show_id,), args.runs)

        check = []
        check_out = ""
        for _ in range(args.check_runs):
            dt, check_out = run_timed(fc + ["db", "check"], env=env, cwd=home, check=False)
            check.append(dt)
        check_ok = check_out.startswith("ok:")

    ref = median_ms(samples[names[0]])
    print(f"\n   listed {n_listed} queued tasks (default limit); showed {show_id} with {n_show_events} events")
    print(f"\n{'case':<52} {'wall time':<50} vs import typer")
    for name in names:
        print(f"{name:<52} {describe(samples[name])}   {median_ms(samples[name]) / ref:5.2f}x")
    print(f"{'bare sqlite3 query in-process: list rows':<52} median {q_list:7.2f} ms")
    print(f"{'bare sqlite3 query in-process: the task events':<52} median {q_show:7.2f} ms")
    print(f"{'fleetctl db check':<52} {describe(check)}")
    print(f"   db check said: {check_out.strip()}")

    print()
    for key, label in (
        ("fleetctl task list", "store task list --json"),
        ("fleetctl task show", "store task show --json"),
    ):
        name = next(n for n in names if n.startswith(key))
        m = median_ms(samples[name])
        result(label, f"{m:.0f} ms wall ({m / ref:.2f}x import typer = {ref:.0f} ms)", "<= 150 ms", verdict(m <= 150))
    m = statistics.median(check)
    result("store db check", f"{m:.1f} s wall, {'ok' if check_ok else 'NOT OK'} ({info['events']:,} events)",
           "<= 30 s, ok", verdict(m <= 30 and check_ok))  # fmt: skip


if __name__ == "__main__":
    main()
