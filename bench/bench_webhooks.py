"""Signed webhook ingest: 8 clients POST new-issue deliveries for 10 s to `fleetctl serve`, vs a minimal server.

``fleetctl serve`` runs as a real subprocess over a fresh database, with ``[forgejo] url, token,
webhook_secret`` set so its ``POST /api/v1/webhooks/forgejo`` route is on. Every delivery is an
``issues``/``opened`` payload built from ``shared/forgejo/webhooks/issues-opened.json`` (Forgejo's bytes:
2-space indent, no trailing newline, ``<>&`` escaped), each with its own issue number, ``updated_at``, title,
a ``X-Forgejo-Delivery`` UUID and the label ``agent:code:python``, so each one creates one task. The headers
are Forgejo's (``X-Forgejo-*``, ``X-Gitea-*``, ``X-Gogs-*``, ``X-GitHub-*``, ``X-Hub-Signature-256``);
``X-Forgejo-Signature`` is the lowercase hex HMAC-SHA256 of the exact body. All requests are pre-built and
signed before anything is timed and written to one file per connection, which each client walks in order:
no delivery is ever sent twice.

N keep-alive connections (default 8) post back to back for S seconds (closed loop). Load generator:
``wrk`` (one thread per connection; a Lua script reads that connection's pre-built requests and counts
statuses, verdicts and task ids; ``apt-get install wrk``), else a Python multi-process one
(``--loadgen python``). Bounded: S seconds of load, a pool of pre-built requests sized ``--pool-rate`` x S
(a run that exhausts it is reported as invalid, never padded with repeats).

Reported: deliveries/s (200 answers), p50/p90/p99 latency, serve RSS (VmRSS sampled, and VmHWM) and CPU per
delivery, and correctness read from the database after serve has stopped (SIGTERM, exit 0, no internal
error logged): every delivery the server counted is one ``accepted`` row in ``deliveries`` with its body
kept and its task id; those task ids are distinct, each task exists with the delivery's issue number and one
``task.created`` event; no issue has two tasks; the number of tasks equals the server's own count of 200
answers and accepted verdicts (its /metrics, read once the requests in flight at the deadline have
finished) and is at least the 200s the clients counted; every task id a client received is distinct and in
the database; ``fleetctl db check`` says ok.

Reference, in the same run under the same load generator and the same pre-built requests: a minimal stdlib
``ThreadingHTTPServer`` (in this file, its own process) that reads the body, verifies the HMAC
(``hmac.compare_digest``), parses the JSON and inserts one row (delivery id, event, issue number, body) into
one SQLite table (WAL, synchronous=NORMAL, one connection under a lock, autocommit), answering 200 JSON.

Targets (SPEC §11): >= 1,000 deliveries/s, p99 <= 20 ms; and (issue brief) >= 0.5 x the reference.

Usage: python bench/bench_webhooks.py [--seconds 10] [--clients 8] [--rounds 1] [--loadgen auto|wrk|python]
                                      [--procs 2] [--pool-rate 6000] [--py-spy FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import multiprocessing
import re
import selectors
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, header, result, verdict  # noqa: E402
from _http import (  # noqa: E402
    FLEETCTL,
    HOST,
    REPO,
    LoadResult,
    RssSampler,
    ServeProcess,
    db_check,
    have_wrk,
    med,
    pct,
    proc_cpu_secs,
    proc_status,
    request,
)

PATH = "/api/v1/webhooks/forgejo"
TEMPLATE = REPO.parent / "shared" / "forgejo" / "webhooks" / "issues-opened.json"
SECRET = "bench-webhook-secret-0123456789abcdef"
REPO_NAME = "acme/widgets"
LABEL = {"id": 7, "name": "agent:code:python", "exclusive": False, "is_archived": False, "color": "0e8a16",
         "description": "Work for a Python coding agent",
         "url": "https://forgejo.example.com/api/v1/repos/acme/widgets/labels/7"}  # fmt: skip
TARGET_RATE, TARGET_P99_MS, TARGET_RATIO = 1000, 20.0, 0.5
WARM_UP = 16  # sequential deliveries before the timed part (opens the server's connections and code paths)
_NUM, _ID, _TITLE, _UPDATED = 987654321, 987654322, "@@TITLE@@", "@@UPDATED@@"

# --------------------------------------------------------------------------------------------- deliveries


def forgejo_bytes(doc: dict) -> bytes:
    """A payload as Forgejo stores and sends it: 2-space indent, no trailing newline, <>& escaped."""
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def sign(body: bytes) -> str:
    return hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


class Deliveries:
    """Distinct new-issue deliveries from the template: numbers, ids and timestamps vary, the shape does not.

    The template is serialised once with sentinels in the varying places (through ``forgejo_bytes``, which
    reproduces the template's own bytes exactly: checked), and each delivery is that text with the sentinels
    replaced — the same bytes ``forgejo_bytes`` would give for its document, at a fraction of the cost.
    """

    def __init__(self, template: Path):
        raw = template.read_bytes()
        doc = json.loads(raw)
        self.roundtrip = forgejo_bytes(doc) == raw
        doc["number"] = _NUM
        issue = doc["issue"]
        issue.update(id=_ID, number=_NUM, title=_TITLE, labels=[LABEL], updated_at=_UPDATED, created_at=_UPDATED,
                     url=f"https://forgejo.example.com/api/v1/repos/{REPO_NAME}/issues/{_NUM}",
                     html_url=f"https://forgejo.example.com/{REPO_NAME}/issues/{_NUM}")  # fmt: skip
        assert doc["repository"]["full_name"] == REPO_NAME and issue["pull_request"] is None
        self.text = forgejo_bytes(doc).decode()
        self.t0 = datetime(2025, 6, 2, 10, 15, 4, tzinfo=UTC)

    def body(self, i: int) -> bytes:
        number = 1000 + i
        updated = (self.t0 + timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (self.text.replace(str(_NUM), str(number)).replace(str(_ID), str(500_000 + i))
                .replace(_TITLE, f"Add retry to the HTTP client (part {number})")
                .replace(_UPDATED, updated).encode())  # fmt: skip

    @staticmethod
    def headers(body: bytes) -> dict[str, str]:
        """The headers Forgejo sends with an ``issues`` delivery (shared/forgejo/webhooks/index.json)."""
        did, sig = str(uuid.uuid4()), sign(body)
        out = {"Content-Type": "application/json", "User-Agent": "Go-http-client/1.1"}
        for prefix in ("X-Forgejo", "X-Gitea", "X-Gogs", "X-GitHub"):
            out.update({f"{prefix}-Delivery": did, f"{prefix}-Event": "issues", f"{prefix}-Event-Type": "issues"})
        out.update({"X-Forgejo-Signature": sig, "X-Gitea-Signature": sig, "X-Gogs-Signature": sig,
                    "X-Hub-Signature-256": f"sha256={sig}"})  # fmt: skip
        return out

    def raw_request(self, i: int) -> bytes:
        body = self.body(i)
        head = "".join(f"{k}: {v}\r\n" for k, v in self.headers(body).items())
        return (f"POST {PATH} HTTP/1.1\r\nHost: {HOST}\r\n{head}Content-Length: {len(body)}\r\n\r\n").encode() + body


def build_pool(deliveries: Deliveries, folder: Path, clients: int, total: int, first: int) -> list[Path]:
    """``total`` pre-built signed requests, delivery ``first + i`` for connection ``i % clients``; one file per
    connection, each request as ``<length>\\n<bytes>`` (what the Lua script and the Python generator read)."""
    files = [folder / f"conn-{k + 1}.bin" for k in range(clients)]
    handles = [open(f, "wb") for f in files]  # noqa: SIM115 - closed below
    try:
        for i in range(total):
            raw = deliveries.raw_request(first + i)
            handles[i % clients].write(b"%d\n" % len(raw) + raw)
    finally:
        for h in handles:
            h.close()
    return files


def read_pool(path: Path) -> list[bytes]:
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        n = int(data[pos:nl])
        out.append(data[nl + 1 : nl + 1 + n])
        pos = nl + 1 + n
    return out


def send_one(port: int, raw: bytes) -> tuple[int, dict]:
    """One pre-built request on a fresh connection (warm-up), its status and JSON answer."""
    with socket.create_connection((HOST, port), timeout=30) as s:
        s.sendall(raw)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit(f"the server closed the connection during warm-up: {buf[:200]!r}")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(head[9:12]), json.loads(rest[:length])


# --------------------------------------------------------------------------------------------- load


@dataclass
class Load:
    """A ``LoadResult`` plus what only this benchmark counts."""

    result: LoadResult
    verdicts: dict[str, int]
    sent: int
    exhausted: int


_WRK_LUA = r"""
-- one thread per connection; each walks its own file of pre-built signed requests, in order, once
local threads = {}
local next_index = 1

function setup(thread)
  thread:set("index", next_index)
  next_index = next_index + 1
  table.insert(threads, thread)
end

function init(args)
  pool = io.open("%(dir)s/conn-" .. index .. ".bin", "rb")
  statuses, verdicts, ids = {}, {}, {}
  sent, exhausted = 0, 0
  spare = wrk.format("GET", "/healthz")
end

function request()
  local n = pool:read("*l")
  if n == nil then
    exhausted = exhausted + 1  -- the run is reported invalid; never a repeated delivery
    return spare
  end
  sent = sent + 1
  return pool:read(tonumber(n))
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  local v = string.match(body, '"verdict":"([a-z_]*)"')
  if v then verdicts[v] = (verdicts[v] or 0) + 1 end
  if status == 200 then
    local id = string.match(body, '"task_id":"([^"]*)"')
    if id then ids[#ids + 1] = id end
  end
end

function done(summary, latency, requests)
  local out = io.open("%(out)s", "w")
  out:write(string.format('{"requests": %%d, "duration_us": %%d, "p50": %%d, "p90": %%d, "p99": %%d, "max": %%d, ',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max))
  out:write(string.format('"errors": %%d, ', summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout + summary.errors.status))
  local merged, mv, all_ids, nsent, nex = {}, {}, {}, 0, 0
  for _, t in ipairs(threads) do
    for s, n in pairs(t:get("statuses")) do merged[s] = (merged[s] or 0) + n end
    for v, n in pairs(t:get("verdicts")) do mv[v] = (mv[v] or 0) + n end
    for _, id in ipairs(t:get("ids")) do all_ids[#all_ids + 1] = id end
    nsent = nsent + t:get("sent")
    nex = nex + t:get("exhausted")
  end
  out:write(string.format('"sent": %%d, "exhausted": %%d, "statuses": {', nsent, nex))
  local first = true
  for s, n in pairs(merged) do
    if not first then out:write(", ") end
    out:write(string.format('"%%d": %%d', s, n))
    first = false
  end
  out:write('}, "verdicts": {')
  first = true
  for v, n in pairs(mv) do
    if not first then out:write(", ") end
    out:write(string.format('"%%s": %%d', v, n))
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


def run_wrk(port: int, pool_dir: Path, clients: int, seconds: float) -> Load:
    """``wrk -t N -c N`` for ``seconds``: one thread and one keep-alive connection per pool file."""
    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-wrk-") as tmp:
        script, out = Path(tmp) / "webhooks.lua", Path(tmp) / "out.json"
        script.write_text(_WRK_LUA % {"dir": pool_dir, "out": out})
        proc = subprocess.run(["wrk", "-t", str(clients), "-c", str(clients), "-d", f"{seconds:g}s", "--timeout", "10s",
                               "-s", str(script), f"http://{HOST}:{port}{PATH}"],
                              capture_output=True, text=True, timeout=seconds + 60)  # fmt: skip
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"wrk failed ({proc.returncode}): {proc.stderr[-2000:]}")
        doc = json.loads(out.read_text())
    res = LoadResult(
        generator=f"wrk -t{clients} -c{clients}", seconds=doc["duration_us"] / 1e6,
        statuses={int(k): v for k, v in doc["statuses"].items()}, p50_ms=doc["p50"] / 1000, p90_ms=doc["p90"] / 1000,
        p99_ms=doc["p99"] / 1000, max_ms=doc["max"] / 1000, errors=doc["errors"], task_ids=doc["ids"],
    )  # fmt: skip
    return Load(res, doc["verdicts"], doc["sent"], doc["exhausted"])


_VERDICT_RE = re.compile(rb'"verdict":"([a-z_]*)"')
_TASK_RE = re.compile(rb'"task_id":"([^"]*)"')


def _py_worker(port: int, files: list[Path], start_at: float, seconds: float, out) -> None:
    """One load process: its connections driven from one selectors loop, each walking its own requests."""
    sel = selectors.DefaultSelector()
    conns = []
    for f in files:
        s = socket.create_connection((HOST, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        state = {"sock": s, "reqs": read_pool(f), "next": 0, "buf": bytearray(), "sent_at": 0.0}
        conns.append(state)
        sel.register(s, selectors.EVENT_READ, state)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    verdicts: dict[str, int] = {}
    ids: list[str] = []
    errors = sent = exhausted = 0

    def send(c: dict) -> bool:
        nonlocal sent, exhausted
        if c["next"] >= len(c["reqs"]):
            exhausted += 1
            return False
        c["sent_at"] = time.perf_counter()
        c["sock"].setblocking(True)
        c["sock"].sendall(c["reqs"][c["next"]])
        c["sock"].setblocking(False)
        c["next"] += 1
        sent += 1
        return True

    while time.time() < start_at:
        time.sleep(min(0.01, max(0.0, start_at - time.time())))
    t0 = time.perf_counter()
    end = t0 + seconds
    open_conns = 0
    for c in conns:
        if send(c):
            open_conns += 1
        else:
            sel.unregister(c["sock"])
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
            body = bytes(buf[head_end + 4 : head_end + 4 + length])
            if now <= end:
                latencies.append(now - c["sent_at"])
                statuses[status] = statuses.get(status, 0) + 1
                if v := _VERDICT_RE.search(body):
                    verdicts[v.group(1).decode()] = verdicts.get(v.group(1).decode(), 0) + 1
                if status == 200 and (found := _TASK_RE.search(body)):
                    ids.append(found.group(1).decode())
            del buf[: head_end + 4 + length]
            if now >= end or not send(c):
                sel.unregister(c["sock"])
                open_conns -= 1
        if time.perf_counter() > end + 15:  # a request that never answers: give up, bounded
            errors += open_conns
            break
    for c in conns:
        c["sock"].close()
    out.send({"latencies": latencies, "statuses": statuses, "verdicts": verdicts, "ids": ids, "errors": errors,
              "sent": sent, "exhausted": exhausted, "seconds": min(time.perf_counter(), end) - t0})  # fmt: skip
    out.close()


def run_python_load(port: int, pool_files: list[Path], seconds: float, procs: int) -> Load:
    ctx = multiprocessing.get_context("fork")
    start_at = time.time() + 1.0  # each process reads its pool files first
    workers, pipes = [], []
    for k in range(procs):
        recv, send = ctx.Pipe(duplex=False)
        w = ctx.Process(target=_py_worker, args=(port, pool_files[k::procs], start_at, seconds, send))
        w.start()
        send.close()
        workers.append(w)
        pipes.append(recv)
    results = [r.recv() for r in pipes]
    for w in workers:
        w.join(30)
    lat = sorted(x for r in results for x in r["latencies"])
    statuses: dict[int, int] = {}
    verdicts: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in r["verdicts"].items():
            verdicts[k] = verdicts.get(k, 0) + v
    res = LoadResult(
        generator=f"python x{procs} processes, {len(pool_files)} connections",
        seconds=max(r["seconds"] for r in results), statuses=statuses, p50_ms=pct(lat, 50) * 1000,
        p90_ms=pct(lat, 90) * 1000, p99_ms=pct(lat, 99) * 1000, max_ms=(lat[-1] if lat else 0) * 1000,
        errors=sum(r["errors"] for r in results), task_ids=[i for r in results for i in r["ids"]],
    )  # fmt: skip
    return Load(res, verdicts, sum(r["sent"] for r in results), sum(r["exhausted"] for r in results))


def run_load(args, port: int, pool_dir: Path) -> Load:
    if args.loadgen == "wrk":
        return run_wrk(port, pool_dir, args.clients, args.seconds)
    files = [pool_dir / f"conn-{k + 1}.bin" for k in range(args.clients)]
    return run_python_load(port, files, args.seconds, args.procs)


# --------------------------------------------------------------------------------------------- reference


def serve_reference(db: Path, secret: str) -> None:
    """The reference server (run as ``bench_webhooks.py --reference-server DB SECRET``): prints its port."""
    key = secret.encode()
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS ref_deliveries (delivery_id TEXT PRIMARY KEY, received_at REAL NOT NULL, "
                 "event TEXT NOT NULL, number INTEGER, body BLOB NOT NULL)")  # fmt: skip
    lock = threading.Lock()
    count = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as fleetctl serve does

        def _reply(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            presented = self.headers.get("X-Forgejo-Signature") or ""
            if not hmac.compare_digest(presented, hmac.new(key, body, hashlib.sha256).hexdigest()):
                return self._reply(401, b'{"error":{"code":"bad_signature"}}')
            doc = json.loads(body)
            did = self.headers.get("X-Forgejo-Delivery") or ""
            number = (doc.get("issue") or {}).get("number")
            with lock:
                conn.execute("INSERT INTO ref_deliveries VALUES (?, ?, ?, ?, ?)",
                             (did, time.time(), self.headers.get("X-Forgejo-Event-Type") or "", number, body))  # fmt: skip
                count[0] += 1
            self._reply(200, json.dumps({"delivery_id": did, "verdict": "accepted", "task_id": None},
                                        separators=(",", ":")).encode())  # fmt: skip

        def do_GET(self) -> None:  # /stats, and /healthz should a pool run out
            self._reply(200, json.dumps({"deliveries": count[0]}).encode())

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


def run_reference(args, pool_dir: Path, warm: list[bytes]) -> dict:
    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-webhooks-ref-") as tmp:
        db = Path(tmp) / "ref.db"
        proc = subprocess.Popen([PYTHON, __file__, "--reference-server", str(db), SECRET],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            port = int(proc.stdout.readline().strip().split("=")[1])
            warm_ok = sum(send_one(port, raw)[0] == 200 for raw in warm)
            cpu0 = proc_cpu_secs(proc.pid)
            with RssSampler(proc.pid) as rss:
                load = run_load(args, port, pool_dir)
            cpu = proc_cpu_secs(proc.pid) - cpu0
            status = proc_status(proc.pid)
            served, same = -1, 0
            for _ in range(50):  # settle: the requests in flight at the deadline finish (bounded to 5 s)
                now = request(port, "GET", "/stats")[1]["deliveries"]
                same, served = (same + 1 if now == served else 0), now
                if same >= 3:
                    break
                time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(10)
        conn = sqlite3.connect(db)
        rows, distinct = conn.execute("SELECT count(*), count(DISTINCT number) FROM ref_deliveries").fetchone()
        conn.close()
    ok = rows == distinct == served and load.result.ok <= served - warm_ok and load.exhausted == 0
    return {"load": load, "cpu": cpu, "rss_peak_kb": rss.peak_kb, "hwm_kb": status.get("VmHWM", 0), "ok": ok,
            "rows": rows, "served": served}  # fmt: skip


# --------------------------------------------------------------------------------------------- fleetctl


def metrics(port: int) -> dict[str, float]:
    """serve's /metrics samples: name{labels} -> value."""
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def settled_metrics(port: int, key: str = 'fleetctl_webhook_deliveries_total{verdict="accepted"}') -> dict[str, float]:
    """/metrics once the requests in flight when the load stopped have finished (``key`` unchanged over 0.3 s;
    bounded to 5 s): the load generator stops counting at the deadline, the server completes what it had."""
    m, same, deadline = metrics(port), 0, time.monotonic() + 5
    while same < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
        m2 = metrics(port)
        same = same + 1 if m2.get(key) == m.get(key) else 0
        m = m2
    return m


def run_fleetctl(args, pool_dir: Path, warm: list[bytes]) -> dict:
    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-webhooks-") as tmp:
        work = Path(tmp)
        db = work / "fleet.db"
        serve = ServeProcess(work, db)
        text = serve.config_path.read_text()
        serve.config_path.write_text(text + f'[forgejo]\nurl = "http://127.0.0.1:9"\ntoken = "t"\n'
                                            f'webhook_secret = "{SECRET}"\n')  # fmt: skip
        serve.start()
        spy = None
        try:
            warm_answers = [send_one(serve.port, raw) for raw in warm]
            warm_ok = sum(s == 200 and d.get("verdict") == "accepted" for s, d in warm_answers)
            if warm_ok != len(warm):
                raise SystemExit(f"warm-up deliveries were not accepted: {warm_answers[:3]}")
            if args.py_spy:
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(serve.pid), "--duration",
                                        f"{max(1, int(args.seconds) - 1)}", "--rate", "200", "--nonblocking",
                                        "--threads", "--format", "raw", "-o", args.py_spy],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
            cpu0 = proc_cpu_secs(serve.pid)
            with RssSampler(serve.pid) as rss:
                load = run_load(args, serve.port, pool_dir)
            cpu = proc_cpu_secs(serve.pid) - cpu0
            status = proc_status(serve.pid)
            m = settled_metrics(serve.port)
        finally:
            if spy is not None:
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(5)
            code = serve.stop()
        problems = serve.log_problems()
        check_ok, check_out = db_check(work, serve.config_path)
        served_200 = int(m.get('fleetctl_http_requests_total{method="POST",status="200"}', 0))
        accepted = int(m.get('fleetctl_webhook_deliveries_total{verdict="accepted"}', 0))
        proof = verify(db, load, served_200, accepted)
    return {"load": load, "cpu": cpu, "rss_peak_kb": rss.peak_kb, "hwm_kb": status.get("VmHWM", 0),
            "rss_after_kb": status.get("VmRSS", 0), "threads": status.get("Threads", 0), "exit": code,
            "log_problems": problems, "check_ok": check_ok, "check_out": check_out, "proof": proof}  # fmt: skip


def verify(db: Path, load: Load, served_200: int, accepted_metric: int) -> dict:
    """Every 200 created exactly one task, read from the database after serve has stopped."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    q = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
    tasks = q("SELECT count(*) FROM tasks")
    created = q("SELECT count(*) FROM events WHERE type='task.created'")
    deliveries = q("SELECT count(*) FROM deliveries")
    accepted = q(
        "SELECT count(*) FROM deliveries WHERE verdict='accepted' AND body_zlib IS NOT NULL AND task_id IS NOT NULL"
    )
    distinct_tasks = q("SELECT count(DISTINCT task_id) FROM deliveries WHERE verdict='accepted'")
    matched = q("SELECT count(*) FROM deliveries d JOIN tasks t ON t.task_id = d.task_id AND t.repo = d.repo "
                "AND t.issue_number = d.number AND t.state = 'queued' "
                "AND 1 = (SELECT count(*) FROM events e WHERE e.task_id = t.task_id AND e.type = 'task.created')")  # fmt: skip
    dup_issues = q("SELECT count(*) FROM (SELECT repo, issue_number FROM tasks GROUP BY 1, 2 HAVING count(*) > 1)")
    ids = load.result.task_ids
    in_db = 0
    if ids:
        conn.execute("CREATE TEMP TABLE got (task_id TEXT)")
        conn.executemany("INSERT INTO got VALUES (?)", [(i,) for i in ids])
        in_db = q("SELECT count(DISTINCT g.task_id) FROM got g JOIN tasks t ON t.task_id = g.task_id")
    conn.close()
    client_200 = load.result.ok
    clients_distinct = len(set(ids)) == len(ids)
    only_200 = set(load.result.statuses) <= {200} and set(load.verdicts) <= {"accepted"}
    ok = (
        tasks == created == deliveries == accepted == distinct_tasks == matched == served_200 == accepted_metric
        and dup_issues == 0
        and only_200
        and clients_distinct
        and len(ids) == client_200 == in_db
        and client_200 <= served_200
        and load.result.errors == 0
        and load.exhausted == 0
    )  # fmt: skip
    return {"ok": ok, "tasks": tasks, "created": created, "deliveries": deliveries, "accepted": accepted,
            "distinct_tasks": distinct_tasks, "matched": matched, "dup_issues": dup_issues, "served_200": served_200,
            "accepted_metric": accepted_metric, "client_200": client_200, "clients_distinct": clients_distinct,
            "client_ids_in_db": in_db, "only_200": only_200}  # fmt: skip


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1, help="alternate reference and fleetctl runs; medians")
    ap.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    ap.add_argument("--procs", type=int, default=2, help="processes of the Python load generator")
    ap.add_argument(
        "--pool-rate",
        type=int,
        default=6000,
        help="pre-built deliveries per second of load (the pool is this x --seconds)",
    )
    ap.add_argument("--template", type=Path, default=TEMPLATE)
    ap.add_argument("--py-spy", metavar="FILE", help="record the serve process with py-spy (raw/collapsed stacks)")
    ap.add_argument("--reference-server", nargs=2, metavar=("DB", "SECRET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reference_server:
        serve_reference(Path(args.reference_server[0]), args.reference_server[1])
        return
    if args.loadgen == "auto":
        args.loadgen = "wrk" if have_wrk() else "python"
    if args.py_spy and args.rounds != 1:
        raise SystemExit("--py-spy records one round: use --rounds 1")

    header(f"signed webhook ingest: {args.clients} clients, {args.seconds:g} s, new-issue deliveries")
    print(f"   serve: {' '.join(FLEETCTL)} with {REPO} first on PYTHONPATH", flush=True)
    deliveries = Deliveries(args.template)
    total = int(args.pool_rate * args.seconds)
    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-webhooks-pool-") as tmp:
        pool_dir = Path(tmp)
        t0 = time.perf_counter()
        build_pool(deliveries, pool_dir, args.clients, total, WARM_UP)
        warm = [deliveries.raw_request(i) for i in range(WARM_UP)]
        size = sum(f.stat().st_size for f in pool_dir.iterdir())
        print(
            f"   template: {args.template} ({args.template.stat().st_size:,} bytes; re-serialised byte for byte: "
            f"{deliveries.roundtrip}); body {len(deliveries.body(0)):,} bytes, request {len(warm[0]):,} bytes"
        )
        print(f"   pool: {total:,} signed requests pre-built ({size / 2**20:.0f} MiB, {time.perf_counter() - t0:.1f} s), "
              f"{args.clients} files; load generator: {args.loadgen}"
              + ("" if have_wrk() else " (wrk not installed: apt-get install wrk)"), flush=True)  # fmt: skip

        refs, runs = [], []
        for i in range(args.rounds):
            order = (("reference", run_reference), ("fleetctl", run_fleetctl))
            for name, fn in order if i % 2 == 0 else order[::-1]:
                r = fn(args, pool_dir, warm)
                (refs if name == "reference" else runs).append(r)
                load = r["load"]
                n = load.result.ok
                vd = ", ".join(f"{k}: {v}" for k, v in sorted(load.verdicts.items()))
                line = load.result.line().replace("claims/s", "deliveries/s")
                extra = (f"cpu {r['cpu'] / max(1, n) * 1e6:.0f} us/delivery, RSS peak {r['rss_peak_kb'] / 1024:.1f} MB, "
                         f"VmHWM {r['hwm_kb'] / 1024:.1f} MB; sent {load.sent}, verdicts {{{vd}}}, "
                         f"pool exhausted {load.exhausted}")  # fmt: skip
                print(f"   round {i + 1} {name:<9} {line}\n{'':<20}{extra}", flush=True)
                if name == "fleetctl":
                    p = r["proof"]
                    print(f"{'':<20}proof: {p['tasks']} tasks, {p['created']} task.created events, {p['deliveries']} "
                          f"deliveries rows ({p['accepted']} accepted with body and task, {p['distinct_tasks']} "
                          f"distinct tasks, {p['matched']} matching their issue with one task.created), "
                          f"{p['dup_issues']} issues with two tasks; server answered {p['served_200']} x 200 "
                          f"({p['accepted_metric']} accepted), clients received {p['client_200']} (distinct: "
                          f"{p['clients_distinct']}, in the db: {p['client_ids_in_db']}, only 200/accepted: "
                          f"{p['only_200']}); db check: {r['check_out']}; serve exit {r['exit']}, "
                          f"{len(r['log_problems'])} internal errors logged", flush=True)  # fmt: skip
                else:
                    print(f"{'':<20}reference: {r['rows']} rows, server counted {r['served']}; ok: {r['ok']}",
                          flush=True)  # fmt: skip

    rate = med([r["load"].result.per_sec() for r in runs])
    p50 = med([r["load"].result.p50_ms for r in runs])
    p90 = med([r["load"].result.p90_ms for r in runs])
    p99 = med([r["load"].result.p99_ms for r in runs])
    ref_rate = med([r["load"].result.per_sec() for r in refs])
    ref_p50 = med([r["load"].result.p50_ms for r in refs])
    ref_p90 = med([r["load"].result.p90_ms for r in refs])
    ref_p99 = med([r["load"].result.p99_ms for r in refs])
    rss_mb = max(max(r["rss_peak_kb"], r["hwm_kb"]) for r in runs) / 1024
    ref_rss = max(max(r["rss_peak_kb"], r["hwm_kb"]) for r in refs) / 1024
    cpu_us = med([r["cpu"] / max(1, r["load"].result.ok) * 1e6 for r in runs])
    ref_cpu_us = med([r["cpu"] / max(1, r["load"].result.ok) * 1e6 for r in refs])
    proof_ok = all(r["proof"]["ok"] and r["check_ok"] and r["exit"] == 0 and not r["log_problems"] for r in runs)
    ref_ok = all(r["ok"] for r in refs)
    ratio = rate / ref_rate if ref_rate else 0.0

    hdr = (
        f"{'':<28}{'deliveries/s':>12} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'CPU us/dlv':>11} {'peak RSS MB':>12}"
    )
    print(f"\n{hdr}")
    print(f"{'fleetctl serve':<28}{rate:>12.0f} {p50:>8.2f} {p90:>8.2f} {p99:>8.2f} {cpu_us:>11.0f} {rss_mb:>12.1f}")
    print(f"{'reference (stdlib, 1 insert)':<28}{ref_rate:>12.0f} {ref_p50:>8.2f} {ref_p90:>8.2f} {ref_p99:>8.2f} "
          f"{ref_cpu_us:>11.0f} {ref_rss:>12.1f}")  # fmt: skip
    print(f"{'ratio fleetctl/reference':<28}{ratio:>11.2f}x {p50 / ref_p50:>7.2f}x {p90 / ref_p90:>7.2f}x "
          f"{p99 / ref_p99:>7.2f}x {cpu_us / ref_cpu_us:>10.2f}x {rss_mb / ref_rss:>11.2f}x")  # fmt: skip
    print(f"   medians of {args.rounds} round(s); reference checked: {ref_ok}")
    print()
    result("webhooks: throughput", f"{rate:.0f} deliveries/s (reference {ref_rate:.0f}/s)", f">= {TARGET_RATE:,}/s",
           verdict(rate >= TARGET_RATE))  # fmt: skip
    result("webhooks: p99 latency", f"{p99:.1f} ms (p50 {p50:.1f}; reference p99 {ref_p99:.1f})",
           f"<= {TARGET_P99_MS:g} ms", verdict(p99 <= TARGET_P99_MS))  # fmt: skip
    result("webhooks: vs reference", f"{ratio:.2f}x ({rate:.0f} / {ref_rate:.0f} deliveries/s)",
           f">= {TARGET_RATIO:g}x", verdict(ratio >= TARGET_RATIO))  # fmt: skip
    total_tasks = sum(r["proof"]["tasks"] for r in runs)
    result("webhooks: one task per 200", f"{total_tasks:,} tasks, 0 duplicates, db check ok" if proof_ok
           else "PROOF FAILED (see above)", "exactly one", verdict(proof_ok and ref_ok))  # fmt: skip
    result("webhooks: serve RSS", f"{rss_mb:.1f} MB peak ({rss_mb / ref_rss:.2f}x reference {ref_rss:.1f} MB)", "-",
           "info")  # fmt: skip


if __name__ == "__main__":
    main()
