"""Where a claim's CPU goes: each step of ``POST /api/v1/tasks/dequeue`` timed on its own, in-process.

The same code the server runs, step by step, on a copy of the 60,000-task queue database (bench/_http.py),
with 32 registered agents and claims in batches of 32 (what the writer groups under the claims benchmark):

  framing   h11 parsing the request (a fresh ``h11.Connection`` per request, as serve does), the headers
            object, and encoding the response bytes
  routing   ``urlsplit``, the route table, the ``Request`` and its JSON body
  auth      the bearer token: its hash and the principal cache (a hit, as under load)
  claim     ``Store.claim_many`` without its event part: the batch's claims (one time, as the server's
            writer gives them) in one ``UPDATE … FROM … RETURNING``, and the commit (on a connection that
            keeps its journals in memory, as the writer's does)
  events    ``Store._record_claims``: the ``task.assigned`` events, attempts and agent rows of the batch,
            each checked against the reducer
  response  ``services.claimed`` (the prompt rendered, the task token) and the JSON answer

Each figure is CPU microseconds per claim (``time.thread_time``), the median of ``--rounds``. With
``--total US`` (the CPU per claim ``bench_claims.py`` measured for the whole serve process) it prints the
rest: what the hand-offs between the event loop, the request threads and the writer cost.

Usage: python bench/bench_claim_cpu.py [--claims 6400] [--rounds 5] [--total 350]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import header  # noqa: E402
from _http import ADMIN_TOKEN, CAPABILITIES, REGISTRATION_TOKEN, build_queue_db, copy_db  # noqa: E402

BATCH = 32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--claims", type=int, default=6400)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--total", type=float, default=None, help="CPU µs per claim of the whole serve, if measured")
    args = ap.parse_args()

    import h11

    from fleetctl import services
    from fleetctl.config import load_config
    from fleetctl.server.api import Api, Request
    from fleetctl.server.http import MAX_HEADER_BYTES, MAX_REQUEST_LINE, Headers, encode, json_response
    from fleetctl.store import Store

    header("where a claim's CPU goes (in-process, per claim)")
    src = build_queue_db(60_000)
    steps: dict[str, list[float]] = {k: [] for k in ("framing", "routing", "auth", "claim", "events", "response")}
    with tempfile.TemporaryDirectory(prefix="claim-cpu-") as tmp:
        work = Path(tmp)
        db = copy_db(src, work / "fleet.db")
        cfg_path = work / "serve.toml"
        cfg_path.write_text(f'[server]\nadmin_token = "{ADMIN_TOKEN}"\n[orchestrator]\ndb_path = "{db}"\n'
                            f'http_pull_token = "{REGISTRATION_TOKEN}"\nlease_secs = 3600\n')  # fmt: skip
        cfg = load_config(cfg_path)
        api = Api(cfg)
        try:
            reg = Headers()
            reg.add("Authorization", f"Bearer {REGISTRATION_TOKEN}")
            agents = []
            for i in range(BATCH):
                r = api.handle("POST", "/api/v1/agents/register", reg, json.dumps(
                    {"agent_id": f"cpu-{i:02d}", "agent_type": "bench", "capabilities": CAPABILITIES,
                     "max_concurrency": 1000}).encode())  # fmt: skip
                agents.append(json.loads(r.body)["token"])
        finally:
            api.close()
            api.shutdown()
        api = Api(cfg)
        api.writer.close()  # claims below run on a store of our own, timed step by step
        store = Store.open(db)
        store.keep_journals_in_memory()  # as the writer's connection does
        raw = [(f"POST /api/v1/tasks/dequeue HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {t}\r\n"
                "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}").encode() for t in agents]  # fmt: skip
        record = Store._record_claims
        spent_events = [0.0]

        def timed_record(self, won):
            t0 = time.thread_time()
            record(self, won)
            spent_events[0] += time.thread_time() - t0

        Store._record_claims = timed_record
        try:
            for _round in range(args.rounds):
                t = dict.fromkeys(steps, 0.0)
                spent_events[0] = 0.0
                n = 0
                while n < args.claims:
                    batch = []
                    now = time.time()  # the writer gives a batch's claims one time (Writer._run_claims)
                    for k in range(BATCH):
                        data = raw[k]
                        t0 = time.thread_time()
                        conn = h11.Connection(
                            h11.SERVER, max_incomplete_event_size=MAX_REQUEST_LINE + MAX_HEADER_BYTES + 4
                        )
                        conn.receive_data(data)
                        req = conn.next_event()
                        body = b""
                        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                            body += event.data
                        headers = Headers.of(list(req.headers))
                        t1 = time.thread_time()
                        path = req.target.decode()
                        split = urlsplit(path)
                        for _m, regex, _h, _a in api.routes:
                            if regex.match(split.path):
                                break
                        request = Request("POST", split.path, {}, parse_qs(split.query), headers, body or b"{}")
                        request.json()
                        t2 = time.thread_time()
                        p = api.authenticate(headers, "agent")
                        t3 = time.thread_time()
                        token, token_hash = services.new_claim_token()
                        cr = services.claim_request(cfg, p.agent, token_hash, ts=now)
                        cr.agent_token_hash = p.token_hash
                        batch.append((cr, token))
                        t["framing"] += t1 - t0
                        t["routing"] += t2 - t1
                        t["auth"] += t3 - t2
                    t0 = time.thread_time()
                    rows = store.claim_many([cr for cr, _tok in batch])
                    t["claim"] += time.thread_time() - t0
                    for (_cr, token), row in zip(batch, rows, strict=True):
                        t0 = time.thread_time()
                        claim = services.claimed(None, cfg, row, token)
                        out = encode(json_response(200, claim.to_json()), close=False)
                        t["response"] += time.thread_time() - t0
                        t0 = time.thread_time()
                        assert out
                        t["framing"] += time.thread_time() - t0
                    n += BATCH
                t["claim"] -= spent_events[0]
                t["events"] = spent_events[0]
                for k in steps:
                    steps[k].append(t[k] / n * 1e6)
        finally:
            Store._record_claims = record
            store.close()
            api.shutdown()
    total = 0.0
    print(f"  {args.claims} claims x {args.rounds} rounds, batches of {BATCH}; CPU µs per claim (median of rounds):")
    for k, xs in steps.items():
        med = statistics.median(xs)
        total += med
        print(f"    {k:<9} {med:7.1f}   (rounds: {', '.join(f'{x:.1f}' for x in xs)})")
    print(f"    {'sum':<9} {total:7.1f}")
    if args.total:
        print(f"    whole serve, measured by bench_claims.py: {args.total:.1f} -> hand-offs and the rest: "
              f"{args.total - total:.1f} ({(args.total - total) / args.total:.0%})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
