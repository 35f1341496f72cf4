"""Pull API claims: 32 agents dequeuing for 10 s from `fleetctl serve`, vs a minimal stdlib server (SPEC §11).

``fleetctl serve`` runs as a real subprocess over a database pre-filled with 60,000 queued tasks (their
``task.created`` events consistent with the projections; see bench/_http.py). 32 pull agents register over
the API (max_concurrency 1000 each); 32 keep-alive connections, one per agent token, then POST
``/api/v1/tasks/dequeue {}`` back to back for 10 s (closed loop: each client sends its next request when
the previous answer is in). Load generator: ``wrk`` (one thread per connection, a Lua script gives each
its token; ``apt-get install wrk``), else a Python multi-process one (``--loadgen python``).

Reported: claims/s, p50/p90/p99 latency, serve RSS (VmRSS sampled during the run, VmHWM after) and CPU
per claim — for serve also by thread (the event loop, the writer, the checkpointer, the request threads;
user+system µs per claim, from /proc/PID/task) — and the proof of "zero tasks claimed twice", read from the
database after serve has stopped: every claimed task has exactly one ``task.assigned`` event and attempt 1,
their number equals the 200s the server answered (its /metrics) and is at least the 200s the clients
counted, every task id a client received is distinct and assigned in the database, and ``fleetctl db check``
says ok.

Reference, measured in the same run under the same load generator: a minimal stdlib
``ThreadingHTTPServer`` (in this file, run as its own process) doing the same one-statement claim — an
``UPDATE … RETURNING`` on the partial index of an equivalent minimal table, one connection, one lock,
autocommit — with no events, no projections, no auth beyond a dict lookup.

Targets: >= 3,000 claims/s, p99 <= 25 ms, zero double claims, serve RSS <= 80 MB.

Usage: python bench/bench_claims.py [--seconds 10] [--agents 32] [--tasks 60000] [--rounds 1]
                                    [--loadgen auto|wrk|python] [--procs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, header, result, verdict  # noqa: E402
from _http import (  # noqa: E402
    CAPABILITIES,
    FLEETCTL,
    HOST,
    REPO,
    RssSampler,
    ServeProcess,
    build_queue_db,
    copy_db,
    db_check,
    have_wrk,
    med,
    proc_cpu_secs,
    proc_status,
    register_agents,
    request,
    run_load,
    thread_cpu,
    thread_cpu_line,
)

DEQUEUE = "/api/v1/tasks/dequeue"
TARGET_RATE, TARGET_P99_MS, TARGET_RSS_MB = 3000, 25.0, 80.0

# --------------------------------------------------------------------------------------------- reference


def serve_reference(db: Path, tokens_file: Path) -> None:
    """The reference server (run as ``bench_claims.py --reference-server DB TOKENS``): prints its port."""
    tokens = json.loads(tokens_file.read_text())  # token -> agent id
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    lock = threading.Lock()
    claims = [0]
    sql = ("UPDATE ref_tasks SET state='assigned', agent=?, attempt=attempt+1, lease=?, updated=? "
           "WHERE id=(SELECT id FROM ref_tasks WHERE state='queued' ORDER BY priority DESC, seq LIMIT 1) "
           "RETURNING task_id, title, body, priority, attempt, lease")  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(6, 1, 1)  # TCP_NODELAY, as fleetctl serve does

        def _reply(self, status: int, body: bytes = b"") -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            json.loads(body or b"{}")
            agent = tokens.get((self.headers.get("Authorization") or "")[7:])
            if agent is None:
                return self._reply(401, b'{"error":{"code":"unauthorized"}}')
            now = time.time()
            with lock:
                row = conn.execute(sql, (agent, now + 300, now)).fetchone()
                if row is not None:
                    claims[0] += 1
            if row is None:
                return self._reply(204)
            doc = {
                "task": {
                    "task_id": row[0],
                    "title": row[1],
                    "body": row[2],
                    "priority": row[3],
                    "agent_id": agent,
                    "state": "assigned",
                },
                "attempt": row[4],
                "lease_expires_at": row[5],
            }
            self._reply(200, json.dumps(doc, separators=(",", ":")).encode())

        def do_GET(self) -> None:  # /stats
            self._reply(200, json.dumps({"claims": claims[0]}).encode())

        def log_message(self, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 256
        daemon_threads = True

        def handle_error(self, request, client_address) -> None:
            pass  # the load generator hangs up at the end of its run

    server = Server((HOST, 0), Handler)
    print(f"port={server.server_address[1]}", flush=True)
    server.serve_forever()


def make_reference_db(queue_db: Path, dest: Path) -> None:
    """The minimal table: the same tasks (ids, titles, bodies, priorities, order) and a partial index."""
    conn = sqlite3.connect(dest)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(f"""
        CREATE TABLE ref_tasks (id INTEGER PRIMARY KEY, task_id TEXT NOT NULL UNIQUE, seq INTEGER NOT NULL,
            state TEXT NOT NULL, priority INTEGER NOT NULL, title TEXT, body TEXT, agent TEXT,
            attempt INTEGER NOT NULL DEFAULT 0, lease REAL, updated REAL);
        CREATE INDEX ref_claim ON ref_tasks(priority DESC, seq) WHERE state = 'queued';
        ATTACH '{queue_db}' AS q;
        INSERT INTO ref_tasks (task_id, seq, state, priority, title, body)
            SELECT task_id, seq, state, priority, title, body FROM q.tasks ORDER BY seq;
    """)  # fmt: skip
    conn.commit()
    conn.close()


# --------------------------------------------------------------------------------------------- runs


def warm_up(port: int, tokens: list[str], n: int = 2) -> int:
    """``n`` sequential dequeues per agent (opens the server's reader connections); the 200s seen."""
    ok = 0
    for token in tokens:
        for _ in range(n):
            status, _ = request(port, "POST", DEQUEUE, token, {})
            ok += status == 200
    return ok


def metric(port: int, name: str, labels: str = "") -> float:
    """One sample of serve's /metrics (0 when absent)."""
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def settled(read, tries: int = 20, pause: float = 0.1) -> float:
    """``read()`` once two reads in a row agree (claims the load generator gave up on at its end may still
    be answered just after it); at most ``tries`` reads."""
    last = read()
    for _ in range(tries):
        time.sleep(pause)
        now = read()
        if now == last:
            break
        last = now
    return last


def run_fleetctl(queue_db: Path, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-claims-") as tmp:
        work = Path(tmp)
        db = copy_db(queue_db, work / "fleet.db")
        serve = ServeProcess(work, db).start()
        try:
            agents = register_agents(serve.port, args.agents, capabilities=CAPABILITIES, max_concurrency=1000)
            tokens = [t for _, t in agents]
            warm = warm_up(serve.port, tokens)
            cpu0, threads0 = proc_cpu_secs(serve.pid), thread_cpu(serve.pid)
            with RssSampler(serve.pid) as rss:
                load = run_load(args.loadgen, serve.port, DEQUEUE, tokens, args.seconds, **args.load_kw)
            cpu, threads = proc_cpu_secs(serve.pid) - cpu0, thread_cpu_line(threads0, thread_cpu(serve.pid),
                                                                            max(1, load.ok))  # fmt: skip
            status = proc_status(serve.pid)
            served_200 = settled(lambda: metric(serve.port, "fleetctl_http_requests_total",
                                                '{method="POST",status="200"}'))  # fmt: skip
        finally:
            code = serve.stop()
        problems = serve.log_problems()
        check_ok, check_out = db_check(work, serve.config_path)
        proof = verify(db, load.task_ids, int(served_200))
    return {"load": load, "warm_ok": warm, "served_200": int(served_200), "cpu": cpu, "threads": threads,
            "rss_peak_kb": rss.peak_kb,
            "hwm_kb": status.get("VmHWM", 0), "rss_after_kb": status.get("VmRSS", 0),
            "thread_count": status.get("Threads", 0), "exit": code, "log_problems": problems, "check_ok": check_ok,
            "check_out": check_out, "proof": proof}  # fmt: skip


def verify(db: Path, client_ids: list[str], served_200: int) -> dict:
    """Zero double claims, read from the database after serve has stopped."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    q = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
    assigned = q("SELECT count(*) FROM tasks WHERE state='assigned'")
    events = q("SELECT count(*) FROM events WHERE type='task.assigned'")
    distinct = q("SELECT count(DISTINCT task_id) FROM events WHERE type='task.assigned'")
    twice = q("SELECT count(*) FROM (SELECT task_id FROM events WHERE type='task.assigned' "
              "GROUP BY task_id HAVING count(*) > 1)")  # fmt: skip
    not_first = q("SELECT count(*) FROM tasks WHERE state='assigned' AND attempt != 1")
    attempts = q("SELECT count(*) FROM attempts")
    matched = q("SELECT count(*) FROM tasks t WHERE state='assigned' AND 1 = (SELECT count(*) FROM events e "
                "WHERE e.task_id=t.task_id AND e.type='task.assigned')")  # fmt: skip
    in_db = set()
    if client_ids:
        conn.execute("CREATE TEMP TABLE got (task_id TEXT)")
        conn.executemany("INSERT INTO got VALUES (?)", [(i,) for i in client_ids])
        in_db = {r[0] for r in conn.execute("SELECT g.task_id FROM got g JOIN tasks t ON t.task_id=g.task_id "
                                            "WHERE t.state='assigned'")}  # fmt: skip
    conn.close()
    clients_distinct = len(set(client_ids)) == len(client_ids)
    ok = (
        twice == 0
        and not_first == 0
        and assigned == events == distinct == attempts == matched == served_200
        and clients_distinct
        and len(in_db) == len(set(client_ids))
        and len(client_ids) <= served_200
    )
    return {"ok": ok, "assigned": assigned, "events": events, "twice": twice, "not_first": not_first,
            "attempts": attempts, "matched": matched, "served_200": served_200, "client_200": len(client_ids),
            "clients_distinct": clients_distinct, "client_ids_in_db": len(in_db)}  # fmt: skip


def run_reference(queue_db: Path, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-claims-ref-") as tmp:
        work = Path(tmp)
        db = work / "ref.db"
        make_reference_db(queue_db, db)
        tokens = {f"ref-token-{i:02d}-{os.urandom(8).hex()}": f"agent-{i:02d}" for i in range(args.agents)}
        tokens_file = work / "tokens.json"
        tokens_file.write_text(json.dumps(tokens))
        proc = subprocess.Popen([PYTHON, __file__, "--reference-server", str(db), str(tokens_file)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            port = int(proc.stdout.readline().strip().split("=")[1])
            warm_up(port, list(tokens))
            cpu0 = proc_cpu_secs(proc.pid)
            with RssSampler(proc.pid) as rss:
                load = run_load(args.loadgen, port, DEQUEUE, list(tokens), args.seconds, **args.load_kw)
            cpu = proc_cpu_secs(proc.pid) - cpu0
            status = proc_status(proc.pid)
            claims = request(port, "GET", "/stats")[1]["claims"]
        finally:
            proc.terminate()
            proc.wait(10)
        conn = sqlite3.connect(db)
        assigned = conn.execute("SELECT count(*) FROM ref_tasks WHERE state='assigned'").fetchone()[0]
        conn.close()
    ok = assigned == claims and len(set(load.task_ids)) == len(load.task_ids) <= claims
    return {"load": load, "cpu": cpu, "rss_peak_kb": rss.peak_kb, "hwm_kb": status.get("VmHWM", 0), "ok": ok,
            "rss_after_kb": status.get("VmRSS", 0), "assigned": assigned, "served_200": claims}  # fmt: skip


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--agents", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=60_000)
    ap.add_argument("--rounds", type=int, default=1, help="alternate reference and fleetctl runs; medians")
    ap.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    ap.add_argument("--procs", type=int, default=2, help="processes of the Python load generator")
    ap.add_argument("--reference-server", nargs=2, metavar=("DB", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reference_server:
        serve_reference(Path(args.reference_server[0]), Path(args.reference_server[1]))
        return
    if args.loadgen == "auto":
        args.loadgen = "wrk" if have_wrk() else "python"
    args.load_kw = {"procs": args.procs} if args.loadgen == "python" else {}

    header(f"pull API claims: {args.agents} agents, {args.seconds:g} s, {args.tasks:,} queued tasks")
    print(f"   serve: {' '.join(FLEETCTL)} with {REPO} first on PYTHONPATH", flush=True)
    t0 = time.perf_counter()
    queue_db = build_queue_db(args.tasks)
    print(f"   queue db: {queue_db.name} ({os.path.getsize(queue_db) / 2**20:.0f} MiB, "
          f"ready in {time.perf_counter() - t0:.1f} s); load generator: {args.loadgen}"
          + ("" if have_wrk() else " (wrk not installed: apt-get install wrk)"))  # fmt: skip

    refs, runs = [], []
    for i in range(args.rounds):
        order = (("reference", run_reference), ("fleetctl", run_fleetctl))
        for name, fn in order if i % 2 == 0 else order[::-1]:
            r = fn(queue_db, args)
            (refs if name == "reference" else runs).append(r)
            n = r["load"].ok
            extra = (f"cpu {r['cpu'] / max(1, n) * 1e6:.0f} us/claim, RSS peak {r['rss_peak_kb'] / 1024:.1f} MB, "
                     f"VmHWM {r['hwm_kb'] / 1024:.1f} MB, VmRSS after {r['rss_after_kb'] / 1024:.1f} MB")  # fmt: skip
            print(f"   round {i + 1} {name:<9} {r['load'].line()}\n{'':<20}{extra}", flush=True)
            if name == "fleetctl":
                print(f"{'':<20}cpu by thread, user+sys us/claim: {r['threads']}", flush=True)
                p = r["proof"]
                print(f"{'':<20}proof: {p['assigned']} tasks assigned, {p['events']} task.assigned events "
                      f"({p['twice']} tasks with more than one, {p['not_first']} past attempt 1), {p['attempts']} "
                      f"attempts, server answered {p['served_200']} x 200, clients received {p['client_200']} "
                      f"(distinct: {p['clients_distinct']}, all assigned in the db: "
                      f"{p['client_ids_in_db'] == p['client_200']}); db check: {r['check_out']}; serve exit "
                      f"{r['exit']}, {len(r['log_problems'])} internal errors logged", flush=True)  # fmt: skip

    rate = med([r["load"].per_sec() for r in runs])
    p50 = med([r["load"].p50_ms for r in runs])
    p99 = med([r["load"].p99_ms for r in runs])
    ref_rate = med([r["load"].per_sec() for r in refs])
    ref_p50 = med([r["load"].p50_ms for r in refs])
    ref_p99 = med([r["load"].p99_ms for r in refs])
    rss_mb = max(max(r["rss_peak_kb"], r["hwm_kb"]) for r in runs) / 1024
    ref_rss = max(r["hwm_kb"] for r in refs) / 1024
    cpu_us = med([r["cpu"] / max(1, r["load"].ok) * 1e6 for r in runs])
    ref_cpu_us = med([r["cpu"] / max(1, r["load"].ok) * 1e6 for r in refs])
    proof_ok = all(r["proof"]["ok"] and r["check_ok"] and r["exit"] == 0 and not r["log_problems"] for r in runs)
    ref_ok = all(r["ok"] for r in refs)

    print(f"\n{'':<26}{'claims/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/claim':>13} {'peak RSS MB':>12}")
    print(f"{'fleetctl serve':<26}{rate:>10.0f} {p50:>8.2f} {p99:>8.2f} {cpu_us:>13.0f} {rss_mb:>12.1f}")
    print(f"{'reference (stdlib, 1 stmt)':<26}{ref_rate:>10.0f} {ref_p50:>8.2f} {ref_p99:>8.2f} {ref_cpu_us:>13.0f} "
          f"{ref_rss:>12.1f}")  # fmt: skip
    print(f"{'ratio fleetctl/reference':<26}{rate / ref_rate:>9.2f}x {p50 / ref_p50:>7.2f}x {p99 / ref_p99:>7.2f}x "
          f"{cpu_us / ref_cpu_us:>12.2f}x {rss_mb / ref_rss:>11.2f}x")  # fmt: skip
    print(f"   medians of {args.rounds} round(s); reference claims checked: {ref_ok}")
    print()
    result("claims: throughput", f"{rate:.0f} claims/s ({rate / ref_rate:.2f}x reference {ref_rate:.0f}/s)",
           f">= {TARGET_RATE:,}/s", verdict(rate >= TARGET_RATE))  # fmt: skip
    result("claims: p99 latency", f"{p99:.1f} ms (p50 {p50:.1f}; reference p99 {ref_p99:.1f})",
           f"<= {TARGET_P99_MS:g} ms", verdict(p99 <= TARGET_P99_MS))  # fmt: skip
    total = sum(r["proof"]["assigned"] for r in runs)
    result("claims: double claims", f"0 in {total:,} claims, db check ok" if proof_ok else "PROOF FAILED (see above)",
           "0", verdict(proof_ok))  # fmt: skip
    result("claims: serve RSS", f"{rss_mb:.1f} MB peak ({rss_mb / ref_rss:.2f}x reference {ref_rss:.1f} MB)",
           f"<= {TARGET_RSS_MB:g} MB", verdict(rss_mb <= TARGET_RSS_MB))  # fmt: skip


if __name__ == "__main__":
    main()
