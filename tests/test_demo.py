"""``fleetctl demo`` end to end, as the README's first command runs it."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys


def test_the_demo_retries_with_its_own_backoff_whichever_process_settles_the_run(tmp_path):
    """The crashed run is settled by the run wrapper's own ``fleetctl task run-ended`` process, which loads
    the embedded default (30 s backoff): the retry must still wait the demo's 0.5–1 s (it waited 18–31 s)."""
    out = subprocess.run([sys.executable, "-m", "fleetctl", "demo", "--dir", str(tmp_path / "d"), "--json"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    assert {t["state"] for t in doc["tasks"]} == {"completed", "failed", "cancelled"}
    with sqlite3.connect(tmp_path / "d" / "fleet.db") as conn:
        requeues = [json.loads(d) | {"ts": ts} for ts, d in
                    conn.execute("SELECT ts, data FROM events WHERE type = 'task.requeued'")]  # fmt: skip
    assert requeues, "the demo's crashing task was not re-queued"
    for ev in requeues:
        assert ev["not_before"] - ev["ts"] <= 1.0 + 1e-6, ev  # the demo's retry_backoff_max_secs
