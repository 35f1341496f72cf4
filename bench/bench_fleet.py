"""A fleet of long-polling agents on one ``fleetctl serve`` (SPEC §11; issue 12).

Two modes, both against ``fleetctl serve`` as a real subprocess (``--workers`` passed through):

* ``--agents N`` (default 300, 1000, 5000): N pull agents are registered over the API and each holds one
  keep-alive connection in ``POST /api/v1/tasks/dequeue {"wait": 25}``, asking again as soon as it is
  answered (all of it on one asyncio loop in this process, raw HTTP/1.1). Once every agent has been parked
  by the server (``fleetctl_claim_attempts_total`` reached N), for ``--seconds``: a heartbeat every 20 ms
  (each from one of the waiting agents' tokens, on connections of their own) and a task every 250 ms
  (admin ``POST /api/v1/tasks``, on its own connection) that any agent can take; pickup = from the start of
  the creation to the moment an agent has read the 200 with that task. Reported: connections reset or
  closed without an answer, answers other than 200/204, heartbeat and pickup p50/p99, serve's RSS
  (peak), threads and open descriptors (all of serve's processes).
  The same-run reference: the same heartbeats and pickups on the same server with ONE waiting agent,
  measured before the others connect.
* ``--soak SECS --agents N``: N agents cycle dequeue(wait 25) → status → complete, heartbeating every 10 s;
  tasks are created at ``--rate`` per second; serve's RSS and open descriptors are sampled every 5 s. Flat:
  the last third's mean within 10 % of the middle third's.

This process raises its own open-files limit to the hard limit (it holds N sockets, and so does serve,
which inherits it) — say so when you quote the figures.

Targets: no reset; heartbeat and pickup p99 <= 50 ms; RSS <= 250 MB (5,000 agents).

Usage: python bench/bench_fleet.py [--agents 300,1000,5000] [--seconds 20] [--workers 1]
       python bench/bench_fleet.py --soak 300 --agents 1000 [--rate 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import header, result, verdict  # noqa: E402
from _http import ADMIN_TOKEN, HOST, REGISTRATION_TOKEN, ServeProcess, db_check, pct, proc_status  # noqa: E402

TARGET_MS = 50.0
RSS_TARGET_MB = 250.0
CAPS = ["bench"]


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ------------------------------------------------------------------------------------------ raw HTTP


def raw_request(method: str, path: str, token: str, doc: dict | None = None) -> bytes:
    body = b"" if doc is None else json.dumps(doc).encode()
    return (f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    body = await reader.readexactly(int(m.group(1))) if m else b""
    return status, body


class Client:
    """One keep-alive connection."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(self, data: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        self.writer.write(data)
        return await read_response(self.reader)

    async def lost(self, stats: Stats) -> None:
        """The connection was reset or closed without an answer: count it, connect again shortly."""
        stats.resets += 1
        self.close()
        await asyncio.sleep(0.1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Stats:
    def __init__(self) -> None:
        self.resets = 0
        self.odd: dict[int, int] = {}
        self.parked = 0
        self.received: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Future] = {}


async def agent_loop(port: int, token: str, stats: Stats, stop: asyncio.Event, wait: float = 25,
                     first_wait: float | None = None) -> None:  # fmt: skip
    """One agent: dequeue with ``wait`` again and again (the first time with ``first_wait``, so that a fleet
    started at once re-polls spread over time, as a fleet that has run for a while does)."""
    client = Client(port)
    request = raw_request("POST", "/api/v1/tasks/dequeue", token, {"wait": wait})
    first = None if first_wait is None else raw_request("POST", "/api/v1/tasks/dequeue", token, {"wait": first_wait})
    while not stop.is_set():
        try:
            status, body = await client.call(first or request)
            first = None
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            if stop.is_set():
                break
            await client.lost(stats)
            continue
        if status == 200:
            task_id = json.loads(body)["task"]["task_id"]
            now = time.monotonic()
            stats.received[task_id] = now
            fut = stats.waiters.pop(task_id, None)
            if fut is not None and not fut.done():
                fut.set_result(now)
        elif status != 204:
            stats.odd[status] = stats.odd.get(status, 0) + 1
    client.close()


async def register(port: int, n: int, prefix: str, max_concurrency: int = 1000) -> list[tuple[str, str]]:
    sem = asyncio.Semaphore(16)
    out: list[tuple[str, str] | None] = [None] * n

    async def one(i: int, client: Client) -> None:
        agent_id = f"{prefix}-{i:05d}"
        status, body = await client.call(
            raw_request(
                "POST",
                "/api/v1/agents/register",
                REGISTRATION_TOKEN,
                {"agent_id": agent_id, "agent_type": "bench", "capabilities": CAPS, "max_concurrency": max_concurrency},
            )
        )
        if status not in (200, 201):
            raise SystemExit(f"registering {agent_id}: {status} {body[:200]!r}")
        out[i] = (agent_id, json.loads(body)["token"])

    async def worker(ids: list[int]) -> None:
        async with sem:
            client = Client(port)
            for i in ids:
                await one(i, client)
            client.close()

    await asyncio.gather(*(worker(list(range(k, n, 16))) for k in range(16)))
    return [x for x in out if x is not None]


async def claim_attempts(port: int) -> int:
    client = Client(port)
    try:
        status, body = await client.call(raw_request("GET", "/metrics", ADMIN_TOKEN))
    finally:
        client.close()
    m = re.search(rb"^fleetctl_claim_attempts_total (\d+)$", body, re.M)
    return int(m.group(1)) if m else 0


async def measure(port: int, tokens: list[str], stats: Stats, seconds: float) -> tuple[list[float], list[float]]:
    """Heartbeats every 20 ms and a task every 250 ms for ``seconds``: (heartbeat ms, pickup ms)."""
    heartbeats: list[float] = []
    pickups: list[float] = []
    hb_clients = [Client(port) for _ in range(4)]
    admin = Client(port)
    end = time.monotonic() + seconds

    async def heartbeat_loop(k: int) -> None:
        i = k
        while time.monotonic() < end:
            token = tokens[i % len(tokens)]
            i += len(hb_clients)
            t0 = time.monotonic()
            status, _ = await hb_clients[k].call(raw_request("POST", "/api/v1/agents/heartbeat", token, {}))
            if status == 200:
                heartbeats.append((time.monotonic() - t0) * 1000)
            else:
                stats.odd[status] = stats.odd.get(status, 0) + 1
            await asyncio.sleep(0.08)  # 4 loops: one heartbeat every 20 ms

    async def create_loop() -> None:
        n = 0
        loop = asyncio.get_running_loop()
        while time.monotonic() < end:
            n += 1
            t0 = time.monotonic()
            status, body = await admin.call(raw_request("POST", "/api/v1/tasks", ADMIN_TOKEN,
                                                        {"title": f"pickup {n}", "labels": ["agent:bench"]}))  # fmt: skip
            if status != 201:
                raise SystemExit(f"create: {status} {body[:200]!r}")
            task_id = json.loads(body)["task_id"]
            got = stats.received.get(task_id)
            if got is None:
                fut = loop.create_future()
                stats.waiters[task_id] = fut
                try:
                    got = await asyncio.wait_for(fut, 10)
                except TimeoutError:
                    stats.odd[0] = stats.odd.get(0, 0) + 1  # not picked up within 10 s
                    continue
            pickups.append((got - t0) * 1000)
            await asyncio.sleep(0.25)

    await asyncio.gather(create_loop(), *(heartbeat_loop(k) for k in range(len(hb_clients))))
    for c in [*hb_clients, admin]:
        c.close()
    return heartbeats, pickups


def serve_processes(pid: int) -> list[int]:
    """``pid`` and its children (the workers of ``serve --workers``)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return pids


def footprint(pid: int) -> tuple[float, int, int]:
    """(RSS MB, threads, open descriptors) summed over serve's processes."""
    rss = threads = fds = 0
    for p in serve_processes(pid):
        st = proc_status(p)
        rss += st.get("VmRSS", 0)
        threads += st.get("Threads", 0)
        try:
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return rss / 1024, threads, fds


async def sample_footprint(pid: int, stop: asyncio.Event, out: list, every: float) -> None:
    while not stop.is_set():
        out.append((time.monotonic(), *footprint(pid)))
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


async def fleet_run(n: int, seconds: float, workers: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        work = Path(tmp)
        serve = ServeProcess(work, work / "fleet.db", extra_args=["--workers", str(workers)]).start()
        ok = True
        try:
            port = serve.port
            agents = await register(port, n, "agent")
            tokens = [t for _a, t in agents]
            stats = Stats()
            stop = asyncio.Event()
            # the reference: one agent waiting
            first = asyncio.create_task(agent_loop(port, tokens[0], stats, stop))
            await wait_until(lambda: claim_attempts(port), 1, 20)
            ref_hb, ref_pick = await measure(port, tokens[:1], stats, min(seconds, 10))
            # the fleet
            started = time.monotonic()
            before = await claim_attempts(port)
            rng = random.Random(12)
            tasks = [first] + [asyncio.create_task(agent_loop(port, t, stats, stop, first_wait=rng.uniform(5, 25)))
                               for t in tokens[1:]]  # fmt: skip
            await wait_until(lambda: claim_attempts(port), before + n - 1, 120)
            parked_in = time.monotonic() - started
            samples: list = []
            sampler_stop = asyncio.Event()
            sampler = asyncio.create_task(sample_footprint(serve.pid, sampler_stop, samples, 2.0))
            lag: list[float] = []
            lagger = asyncio.create_task(loop_lag(lag, sampler_stop))
            hb, pick = await measure(port, tokens, stats, seconds)
            sampler_stop.set()
            await sampler
            await lagger
            lag.sort()
            stop.set()
            code = serve.stop()  # SIGTERM with every agent waiting: each gets its 204 and serve exits 0
            await asyncio.wait(tasks, timeout=30)
            for t in tasks:
                t.cancel()
            hb.sort(), pick.sort(), ref_hb.sort(), ref_pick.sort()
            slow = [f"{x:.0f}" for x in pick if x > TARGET_MS] + [f"hb {x:.0f}" for x in hb if x > TARGET_MS]
            if slow:
                print(f"  over {TARGET_MS:.0f} ms: {', '.join(slow[:20])}")
            peak_rss = max(s[1] for s in samples)
            threads = max(s[2] for s in samples)
            fds = max(s[3] for s in samples)
            print(f"  {n} agents parked in {parked_in:.1f} s; {len(hb)} heartbeats, {len(pick)} pickups measured; "
                  f"serve exit {code} after SIGTERM with {n} waiting")  # fmt: skip
            print(f"  this process's own event loop, late by p50 {pct(lag, 50):.1f} / p99 {pct(lag, 99):.1f} ms "
                  "(part of every figure below)")  # fmt: skip
            print(f"  reference (1 agent): heartbeat p50 {pct(ref_hb, 50):.1f} / p99 {pct(ref_hb, 99):.1f} ms, "
                  f"pickup p50 {pct(ref_pick, 50):.1f} / p99 {pct(ref_pick, 99):.1f} ms")  # fmt: skip
            tag = f"{n} agents" + (f", {workers} workers" if workers > 1 else "")
            resets = stats.resets + sum(stats.odd.values())
            ok &= resets == 0
            result(f"fleet {tag}: resets / odd answers", f"{stats.resets} resets, odd {stats.odd or 'none'}", "0",
                   verdict(resets == 0))  # fmt: skip
            for name, xs, ref in (("heartbeat", hb, ref_hb), ("pickup", pick, ref_pick)):
                p99 = pct(xs, 99)
                ok &= p99 <= TARGET_MS
                result(f"fleet {tag}: {name} p50/p99", f"{pct(xs, 50):.1f} / {p99:.1f} ms (ref 1 agent "
                       f"{pct(ref, 50):.1f} / {pct(ref, 99):.1f} ms; {p99 / max(pct(ref, 99), 0.01):.1f}x)",
                       f"p99 <= {TARGET_MS:.0f} ms", verdict(p99 <= TARGET_MS))  # fmt: skip
            ok &= peak_rss <= RSS_TARGET_MB
            result(f"fleet {tag}: serve RSS / threads / fds", f"{peak_rss:.0f} MB / {threads} / {fds}",
                   f"<= {RSS_TARGET_MB:.0f} MB", verdict(peak_rss <= RSS_TARGET_MB))  # fmt: skip
            ok &= code == 0
            checked, out = db_check(work, serve.config_path)
            ok &= checked
            if not checked:
                print(out)
            if problems := serve.log_problems():
                ok = False
                print("\n".join(problems[:10]))
        finally:
            if serve.proc.poll() is None:
                serve.stop()
            if os.environ.get("BENCH_KEEP_LOG"):
                Path(os.environ["BENCH_KEEP_LOG"]).write_text(serve.log_path.read_text())
    return ok


async def loop_lag(out: list[float], stop: asyncio.Event) -> None:
    """How late this process's event loop wakes a 10 ms sleep: the client's own share of the latencies."""
    while not stop.is_set():
        t0 = time.monotonic()
        await asyncio.sleep(0.01)
        out.append((time.monotonic() - t0 - 0.01) * 1000)


async def wait_until(probe, at_least: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await probe() >= at_least:
            return
        await asyncio.sleep(0.2)
    raise SystemExit(f"not reached within {timeout} s: {at_least}")


async def soak(n: int, seconds: float, rate: float, workers: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="fleet-soak-") as tmp:
        work = Path(tmp)
        serve = ServeProcess(work, work / "fleet.db", extra_args=["--workers", str(workers)]).start()
        try:
            port = serve.port
            agents = await register(port, n, "soak", max_concurrency=1)
            stats = Stats()
            stop = asyncio.Event()
            done = [0]

            async def cycle(token: str, k: int) -> None:
                client = Client(port)
                hb_at = time.monotonic() + (k % 100) / 10
                while not stop.is_set():
                    try:
                        if time.monotonic() >= hb_at:
                            await client.call(raw_request("POST", "/api/v1/agents/heartbeat", token, {}))
                            hb_at = time.monotonic() + 10
                        status, body = await client.call(raw_request("POST", "/api/v1/tasks/dequeue", token,
                                                                     {"wait": 25}))  # fmt: skip
                        if status != 200:
                            if status != 204:
                                stats.odd[status] = stats.odd.get(status, 0) + 1
                            continue
                        doc = json.loads(body)
                        task_id, attempt = doc["task"]["task_id"], doc["attempt"]
                        for path, payload in ((f"/api/v1/tasks/{task_id}/status", {"attempt": attempt,
                                                                                    "status": "running"}),
                                              (f"/api/v1/tasks/{task_id}/complete", {"attempt": attempt,
                                               "outcome": "success", "summary": "soak"})):  # fmt: skip
                            status, _ = await client.call(raw_request("POST", path, token, payload))
                            if status != 200:
                                stats.odd[status] = stats.odd.get(status, 0) + 1
                        done[0] += 1
                    except (ConnectionError, asyncio.IncompleteReadError, OSError):
                        if stop.is_set():
                            break
                        await client.lost(stats)
                client.close()

            async def creator() -> None:
                admin = Client(port)
                n_created = 0
                t0 = time.monotonic()
                while not stop.is_set():
                    n_created += 1
                    await admin.call(raw_request("POST", "/api/v1/tasks", ADMIN_TOKEN,
                                                 {"title": f"soak {n_created}", "labels": ["agent:bench"]}))  # fmt: skip
                    await asyncio.sleep(max(0.0, t0 + n_created / rate - time.monotonic()))
                admin.close()

            tasks = [asyncio.create_task(cycle(t, k)) for k, (_a, t) in enumerate(agents)]
            tasks.append(asyncio.create_task(creator()))
            samples: list = []
            sampler_stop = asyncio.Event()
            sampler = asyncio.create_task(sample_footprint(serve.pid, sampler_stop, samples, 5.0))
            await asyncio.sleep(seconds)
            sampler_stop.set()
            await sampler
            stop.set()
            code = serve.stop()
            await asyncio.wait(tasks, timeout=30)
            for t in tasks:
                t.cancel()
            t_start = samples[0][0]
            print("  t(s)   RSS MB  threads  fds")
            for t, rss, threads, fds in samples[:: max(1, len(samples) // 20)]:
                print(f"  {t - t_start:5.0f}  {rss:7.1f}  {threads:7d}  {fds:5d}")
            third = max(1, len(samples) // 3)
            mid = samples[third : 2 * third] or samples
            last = samples[-third:]

            def mean(rows, i):
                return sum(r[i] for r in rows) / len(rows)

            flat_rss = mean(last, 1) <= mean(mid, 1) * 1.10
            flat_fds = mean(last, 3) <= mean(mid, 3) * 1.10 + 5
            print(f"  {done[0]} cycles completed by {n} agents in {seconds:.0f} s; serve exit {code}")
            result(f"soak {n} agents {seconds:.0f} s: RSS middle→last third",
                   f"{mean(mid, 1):.1f} → {mean(last, 1):.1f} MB", "within 10 %", verdict(flat_rss))  # fmt: skip
            result(f"soak {n} agents {seconds:.0f} s: fds middle→last third",
                   f"{mean(mid, 3):.0f} → {mean(last, 3):.0f}", "within 10 %", verdict(flat_fds))  # fmt: skip
            errors = stats.resets + sum(stats.odd.values())
            result(f"soak {n} agents: resets / odd answers", f"{stats.resets} / {stats.odd or 'none'}", "0",
                   verdict(errors == 0))  # fmt: skip
            checked, out = db_check(work, serve.config_path)
            result("soak: db check", "ok" if checked else out[-300:], "ok", verdict(checked))
            size_and_growth(work / "fleet.db", seconds)
            return flat_rss and flat_fds and errors == 0 and checked and code == 0
        finally:
            if serve.proc.poll() is None:
                serve.stop()


def size_and_growth(db_path: Path, seconds: float) -> None:
    """What the run left in the database: tasks, events per task, bytes per task (after VACUUM)."""
    import sqlite3

    db = sqlite3.connect(db_path)
    try:
        tasks = db.execute("SELECT count(*) FROM tasks").fetchone()[0]
        done = db.execute("SELECT count(*) FROM tasks WHERE state = 'completed'").fetchone()[0]
        events = db.execute("SELECT count(*) FROM events").fetchone()[0]
        db.execute("VACUUM")
    finally:
        db.close()
    size = db_path.stat().st_size
    per_task = size / max(tasks, 1)
    print(f"  database: {tasks} tasks ({done} completed), {events} events ({events / max(tasks, 1):.1f} per task), "
          f"{size / 1e6:.1f} MB after VACUUM: {per_task * 100_000 / 1e6:.0f} MB per 100k tasks; "
          f"{events / seconds * 86400 / 1e6:.1f} M events/day at this rate")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", default=None, help="comma-separated fleet sizes (default 300,1000,5000)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--soak", type=float, default=0.0, help="soak for this many seconds instead")
    ap.add_argument("--rate", type=float, default=20.0, help="tasks created per second in the soak")
    args = ap.parse_args()
    limit = raise_nofile()
    header(f"fleet of long-polling agents (open-files limit raised to {limit})")
    if args.soak:
        n = int(args.agents or 1000)
        return 0 if asyncio.run(soak(n, args.soak, args.rate, args.workers)) else 1
    sizes = [int(x) for x in (args.agents or "300,1000,5000").split(",")]
    ok = True
    for n in sizes:
        ok &= asyncio.run(fleet_run(n, args.seconds, args.workers))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
