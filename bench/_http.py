"""Helpers for the HTTP API benchmarks (bench_claims.py, bench_longpoll.py); not a test module.

- ``ServeProcess``: ``fleetctl serve`` as a real subprocess on a free loopback port (like the tests'
  LiveServer), with its RSS and CPU time read from /proc.
- ``build_queue_db``: a database pre-filled with N queued tasks whose ``task.created`` events are
  consistent with the projections (generated through ``fleetctl.projections.apply`` and bulk-inserted,
  the approach of bench_store.py), cached in bench/results/ and copied for each run.
- Two load generators over keep-alive connections, one connection per agent token, each request sent as
  soon as the previous answer is in (closed loop):
    * ``wrk`` (C, epoll; Debian/Ubuntu: ``apt-get install wrk``) with a Lua script giving each thread its
      own token — preferred, because on a 2-core machine the generator competes with the server for CPU
      and wrk needs far less of it;
    * a Python fallback: a few processes, each driving its share of the connections from one
      ``selectors`` loop with pre-encoded requests (used when wrk is missing, or with ``--loadgen python``).
  Both return the same ``LoadResult``: completed requests in the window, statuses, latency percentiles.

Only loopback addresses are ever targeted; every loop is bounded in time.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import selectors
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, RESULTS_DIR, clean_env  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
#: ``python -m fleetctl`` with this checkout first on the path: the benchmark measures the code beside it,
#: whatever an (editable) install elsewhere on the machine points at. Start-up time does not matter here.
FLEETCTL = [PYTHON, "-m", "fleetctl"]


def bench_env(workdir: Path, **extra: str) -> dict[str, str]:
    env = clean_env(workdir, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
REGISTRATION_TOKEN = "bench-registration-token-0123456789"
HOST = "127.0.0.1"

# --------------------------------------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) and Threads of a process, from /proc/PID/status."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def proc_cpu_secs(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return 0.0


#: serve's threads by their name for the kernel (fleetctl/server/pool.py, ``NamedThread``; 15 bytes at most)
THREAD_KINDS = {"fleetctl-writer": "writer", "fleetctl-checkp": "checkpoint", "fleetctl-reques": "request threads"}


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """User and system CPU seconds so far of each kind of a serve process's threads: ``event loop`` (the main
    thread), ``writer``, ``checkpoint``, ``request threads``, ``other``."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, tuple[float, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                head, _, rest = fh.read().rpartition(")")
        except OSError:  # it ended meanwhile
            continue
        comm = head.partition("(")[2]
        kind = "event loop" if tid == str(pid) else THREAD_KINDS.get(comm, "other")
        fields = rest.split()
        user, system = out.get(kind, (0.0, 0.0))
        out[kind] = (user + int(fields[11]) / tick, system + int(fields[12]) / tick)
    return out


def thread_cpu_line(before: dict, after: dict, n: int) -> str:
    """``kind user+sys`` in µs per claim (``n`` claims) for each kind of thread that used any CPU."""
    parts = []
    for kind in ("event loop", "writer", "checkpoint", "request threads", "other"):
        u0, s0 = before.get(kind, (0.0, 0.0))
        u1, s1 = after.get(kind, (0.0, 0.0))
        if (u1 - u0) + (s1 - s0) > 0:
            parts.append(f"{kind} {(u1 - u0) / n * 1e6:.0f}+{(s1 - s0) / n * 1e6:.0f}")
    return ", ".join(parts)


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds on a thread; ``peak_kb`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = proc_status(self.pid).get("VmRSS")
            if rss:
                self.samples.append(rss)

    @property
    def peak_kb(self) -> int:
        return max(self.samples, default=0)


# --------------------------------------------------------------------------------------------- serve


class ServeProcess:
    """``fleetctl serve`` on a free loopback port over ``db_path``; ``stop()`` sends SIGTERM."""

    def __init__(self, workdir: Path, db_path: Path, *, lease_secs: float = 3600, extra_env: dict | None = None,
                 extra_args: list[str] | None = None):  # fmt: skip
        self.dir = workdir
        self.extra_args = extra_args or []
        self.db_path = db_path
        self.config_path = workdir / "serve.toml"
        self.config_path.write_text(
            f'[server]\nadmin_token = "{ADMIN_TOKEN}"\n[orchestrator]\ndb_path = "{db_path}"\n'
            f'http_pull_token = "{REGISTRATION_TOKEN}"\nlease_secs = {lease_secs}\nheartbeat_interval_secs = 600\n'
        )
        os.chmod(self.config_path, 0o600)
        self.log_path = workdir / "serve.log"
        self.env = bench_env(workdir, **(extra_env or {}))
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> ServeProcess:
        log = open(self.log_path, "a")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [*FLEETCTL, "serve", "--config", str(self.config_path), "--port", "0", *self.extra_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=self.env, cwd=self.dir,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = re.findall(r"action=serve.listening bind=\S+ port=(\d+)", self.log_path.read_text())
            if found:
                self.port = int(found[-1])
                return self
            if self.proc.poll() is not None:
                raise SystemExit(f"fleetctl serve exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.02)
        self.proc.kill()
        raise SystemExit("fleetctl serve did not start within 30 s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int:
        """SIGTERM, wait; the exit code (the serve log is checked for internal errors by the caller)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                return -9
        return self.proc.returncode

    def log_problems(self) -> list[str]:
        text = self.log_path.read_text()
        return [line for line in text.splitlines() if "internal_error" in line or "Traceback" in line]


def request(port: int, method: str, path: str, token: str | None = None, body: object = None,
            timeout: float = 40.0) -> tuple[int, dict | None]:  # fmt: skip
    """One HTTP request on a fresh connection (setup and sampling, not the measured load)."""
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def register_agents(port: int, n: int, *, capabilities: list[str], max_concurrency: int,
                    prefix: str = "bench-agent") -> list[tuple[str, str]]:  # fmt: skip
    """Register ``n`` pull agents over the API; [(agent_id, token)]."""
    out = []
    for i in range(n):
        agent_id = f"{prefix}-{i:02d}"
        status, doc = request(port, "POST", "/api/v1/agents/register", REGISTRATION_TOKEN,
                              {"agent_id": agent_id, "agent_type": "bench", "capabilities": capabilities,
                               "max_concurrency": max_concurrency})  # fmt: skip
        if status not in (200, 201) or not doc:
            raise SystemExit(f"registering {agent_id} failed: {status} {doc}")
        out.append((agent_id, doc["token"]))
    return out


def db_check(workdir: Path, config_path: Path) -> tuple[bool, str]:
    """``fleetctl db check`` on the serve config's database: (ok, its output)."""
    proc = subprocess.run([*FLEETCTL, "db", "check", "--config", str(config_path)], env=bench_env(workdir),
                          cwd=workdir, capture_output=True, text=True)  # fmt: skip
    out = (proc.stdout + proc.stderr).strip()
    return proc.returncode == 0 and out.startswith("ok"), out


# --------------------------------------------------------------------------------------------- the queue

#: Bump when build_queue_db changes what it writes: the cached database is rebuilt.
QUEUE_GENERATOR_VERSION = "q2"
QUEUE_T0 = 1_760_000_000.0
REQUIREMENT_SETS = [(), ("code:python",), ("docs",), ("code:python", "docs"), ("code:rust",)]
CAPABILITIES = ["code:python", "code:rust", "docs"]  # every benchmark agent can serve every task


def queue_cache_path(n_tasks: int) -> Path:
    import fleetctl
    from fleetctl.schema import MIGRATION_NAMES

    key = f"{QUEUE_GENERATOR_VERSION}|{fleetctl.__version__}|{'+'.join(MIGRATION_NAMES)}|{n_tasks}"
    return RESULTS_DIR / f"queue-{n_tasks}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.db"


def build_queue_db(n_tasks: int) -> Path:
    """A migrated database holding ``n_tasks`` queued tasks and their ``task.created`` events (cached).

    Task ids are random like ``fleetctl.ids.new_task_id``'s (so index inserts land on random pages, as in
    production); priorities 0/1/5 and requirements vary, and every benchmark agent can serve every task.
    """
    path = queue_cache_path(n_tasks)
    if path.exists():
        return path
    import random

    from fleetctl.projections import JSON_COLUMNS, TASK_COLUMNS, Projections, apply
    from fleetctl.store import Store

    rng = random.Random(11)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".building")
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    store = Store.open(tmp)  # the real schema, every index
    conn = store.conn
    first_id = (conn.execute("SELECT max(id) FROM events").fetchone()[0] or 0) + 1
    p = Projections()
    events = []
    for i in range(n_tasks):
        reqs = list(rng.choice(REQUIREMENT_SETS))
        prio = rng.choices([0, 1, 5], [80, 15, 5])[0]
        labels = [f"agent:{r}" for r in reqs] + ([f"priority:{prio}"] if prio else []) + ["bug"]
        data = {"title": f"Fix issue {i}: {rng.choice(['flaky test', 'parser crash', 'docs typo', 'slow query'])}",
                "body": "Steps to reproduce:\n" + "x" * rng.randint(50, 400), "labels": labels,
                "requirements": reqs, "priority": prio, "repo": None, "issue_number": None, "max_attempts": 3,
                "timeout_secs": None}  # fmt: skip
        ev = {"id": first_id + i, "ts": QUEUE_T0 + i * 0.01, "type": "task.created",
              "task_id": f"t-{rng.getrandbits(40):010x}", "agent_id": None, "attempt": None, "data": data}  # fmt: skip
        apply(p, ev)
        events.append((ev["id"], ev["ts"], ev["type"], ev["task_id"], None, None,
                       json.dumps(data, sort_keys=True, separators=(",", ":"))))  # fmt: skip
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO events (id, ts, type, task_id, agent_id, attempt, data) VALUES (?,?,?,?,?,?,?)",
                     events)  # fmt: skip
    rows = [[json.dumps(r[c], sort_keys=True, separators=(",", ":")) if c in JSON_COLUMNS and r[c] is not None
             else r[c] for c in TASK_COLUMNS] for r in p.tasks.values()]  # fmt: skip
    conn.executemany(f"INSERT INTO tasks ({', '.join(TASK_COLUMNS)}) VALUES ({', '.join('?' * len(TASK_COLUMNS))})",
                     rows)  # fmt: skip
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    tmp.rename(path)
    for suffix in ("-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    return path


def copy_db(src: Path, dest: Path) -> Path:
    shutil.copyfile(src, dest)
    os.chmod(dest, 0o600)
    return dest


# --------------------------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    """What a load generator saw in its measurement window."""

    generator: str
    seconds: float
    statuses: dict[int, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int = 0
    task_ids: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    def per_sec(self, status: int | None = 200) -> float:
        n = self.requests if status is None else self.statuses.get(status, 0)
        return n / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        st = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        return (f"{self.per_sec():8.0f} claims/s ({self.ok} x 200 in {self.seconds:.1f} s; statuses {{{st}}}; "
                f"errors {self.errors})  latency p50 {self.p50_ms:.2f} ms  p90 {self.p90_ms:.2f} ms  "
                f"p99 {self.p99_ms:.2f} ms  max {self.max_ms:.1f} ms  [{self.generator}]")  # fmt: skip


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


_WRK_LUA = r"""
-- one thread per connection, each with its own agent token; statuses and task ids counted per thread
local tokens = {%(tokens)s}
local next_index = 1
local threads = {}

function setup(thread)
  thread:set("token", tokens[next_index])
  next_index = next_index + 1
  table.insert(threads, thread)
end

function init(args)
  local headers = {}
  headers["Content-Type"] = "application/json"
  headers["Authorization"] = "Bearer " .. token
  req = wrk.format("POST", "%(path)s", headers, "%(body)s")
  statuses = {}
  ids = {}
end

function request()
  return req
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if %(collect)s and status == 200 then
    ids[#ids + 1] = string.match(body, '"task_id":"([^"]*)"')
  end
end

function done(summary, latency, requests)
  local out = io.open("%(out)s", "w")
  out:write(string.format('{"requests": %%d, "duration_us": %%d, "p50": %%d, "p90": %%d, "p99": %%d, "max": %%d, ',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max))
  out:write(string.format('"errors": %%d, "statuses": {', summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout))
  local merged, all_ids, first = {}, {}, true
  for _, t in ipairs(threads) do
    for s, n in pairs(t:get("statuses")) do merged[s] = (merged[s] or 0) + n end
    for _, id in ipairs(t:get("ids")) do all_ids[#all_ids + 1] = id end
  end
  for s, n in pairs(merged) do
    if not first then out:write(", ") end
    out:write(string.format('"%%d": %%d', s, n))
    first = false
  end
  out:write('}, "ids": [')
  for i, id in ipairs(all_ids) do
    if i > 1 then out:write(",") end
    out:write('"' .. id .. '"')
  end
  out:write("]}\n")
  out:close()
end
"""


def run_wrk(port: int, path: str, tokens: list[str], seconds: float, *, body: str = "{}",
            collect_ids: bool = True) -> LoadResult:  # fmt: skip
    """``wrk -t N -c N`` for ``seconds``: one thread and one keep-alive connection per token."""
    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-wrk-") as tmp:
        script, out = Path(tmp) / "claims.lua", Path(tmp) / "out.json"
        quoted = ", ".join(f'"{t}"' for t in tokens)
        script.write_text(_WRK_LUA % {"tokens": quoted, "path": path, "body": body.replace('"', '\\"'),
                                      "collect": "true" if collect_ids else "false", "out": out})  # fmt: skip
        n = len(tokens)
        proc = subprocess.run(["wrk", "-t", str(n), "-c", str(n), "-d", f"{seconds:g}s", "--timeout", "10s",
                               "-s", str(script), f"http://{HOST}:{port}{path}"],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"wrk failed ({proc.returncode}): {proc.stderr[-2000:]}")
        doc = json.loads(out.read_text())
    return LoadResult(
        generator=f"wrk -t{n} -c{n}", seconds=doc["duration_us"] / 1e6,
        statuses={int(k): v for k, v in doc["statuses"].items()}, p50_ms=doc["p50"] / 1000, p90_ms=doc["p90"] / 1000,
        p99_ms=doc["p99"] / 1000, max_ms=doc["max"] / 1000, errors=doc["errors"], task_ids=doc["ids"],
    )  # fmt: skip


def _py_worker(port: int, raw_requests: list[bytes], start_at: float, seconds: float, collect: bool, out) -> None:
    """One load process: keep-alive connections driven from one selectors loop, closed-loop."""
    sel = selectors.DefaultSelector()
    conns = []
    for raw in raw_requests:
        s = socket.create_connection((HOST, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        state = {"sock": s, "req": raw, "buf": bytearray(), "sent_at": 0.0}
        conns.append(state)
        sel.register(s, selectors.EVENT_READ, state)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    ids: list[str] = []
    errors = 0
    while time.time() < start_at:
        time.sleep(min(0.01, max(0.0, start_at - time.time())))
    t0 = time.perf_counter()
    end = t0 + seconds
    for c in conns:
        c["sent_at"] = time.perf_counter()
        c["sock"].sendall(c["req"])
    open_conns = len(conns)
    id_re = re.compile(rb'"task_id":"([^"]*)"')
    while open_conns:
        for key, _ in sel.select(timeout=0.5):
            c = key.data
            try:
                chunk = c["sock"].recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                errors += 1
                sel.unregister(c["sock"])
                open_conns -= 1
                continue
            buf = c["buf"]
            buf += chunk
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                continue
            m = re.search(rb"\r\nContent-Length: *(\d+)", buf[:head_end], re.IGNORECASE)
            length = int(m.group(1)) if m else 0
            if len(buf) < head_end + 4 + length:
                continue
            now = time.perf_counter()
            status = int(buf[9:12])
            if now <= end:
                latencies.append(now - c["sent_at"])
                statuses[status] = statuses.get(status, 0) + 1
                if collect and status == 200:
                    found = id_re.search(buf, head_end)
                    if found:
                        ids.append(found.group(1).decode())
            del buf[: head_end + 4 + length]
            if now < end:
                c["sent_at"] = now
                c["sock"].sendall(c["req"])
            else:
                sel.unregister(c["sock"])
                open_conns -= 1
        if time.perf_counter() > end + 15:  # a request that never answers: give up, bounded
            errors += open_conns
            break
    for c in conns:
        c["sock"].close()
    out.send({"latencies": latencies, "statuses": statuses, "ids": ids, "errors": errors,
              "seconds": min(time.perf_counter(), end) - t0})  # fmt: skip
    out.close()


def run_python_load(port: int, path: str, tokens: list[str], seconds: float, *, body: str = "{}",
                    procs: int = 2, collect_ids: bool = True) -> LoadResult:  # fmt: skip
    """The fallback generator: ``procs`` processes sharing the connections (one per token)."""
    data = body.encode()
    raws = [(f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {t}\r\n"
             f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data
            for t in tokens]  # fmt: skip
    ctx = multiprocessing.get_context("fork")
    start_at = time.time() + 0.3
    workers, pipes = [], []
    for k in range(procs):
        recv, send = ctx.Pipe(duplex=False)
        w = ctx.Process(target=_py_worker, args=(port, raws[k::procs], start_at, seconds, collect_ids, send))
        w.start()
        send.close()
        workers.append(w)
        pipes.append(recv)
    results = [r.recv() for r in pipes]
    for w in workers:
        w.join()
    lat = sorted(x for r in results for x in r["latencies"])
    statuses: dict[int, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return LoadResult(
        generator=f"python x{procs} processes, {len(tokens)} connections", seconds=max(r["seconds"] for r in results),
        statuses=statuses, p50_ms=pct(lat, 50) * 1000, p90_ms=pct(lat, 90) * 1000, p99_ms=pct(lat, 99) * 1000,
        max_ms=(lat[-1] if lat else 0) * 1000, errors=sum(r["errors"] for r in results),
        task_ids=[i for r in results for i in r["ids"]],
    )  # fmt: skip


def run_load(kind: str, port: int, path: str, tokens: list[str], seconds: float, **kw) -> LoadResult:
    if kind == "wrk":
        return run_wrk(port, path, tokens, seconds, **kw)
    return run_python_load(port, path, tokens, seconds, **kw)


def pct(sorted_values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of already sorted values."""
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def sqlite_conn(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn
