"""Start-up of the commands that timers and agents run every few seconds (SPEC §11, first row).

Measures, interleaved round by round after a warm-up, the median wall time of:

  (a) ``python -c "import typer"``                      — the reference
  (b) ``fleetctl dispatch`` with nothing to do            — target ≤ 1.5 × (a)
  (c) ``fleetctl task complete ID`` of an assigned task   — target ≤ 1.5 × (a)
  (c2) the same, while another process holds the database open (as ``fleetctl serve`` does) — information:
       then closing is not the last connection and skips the WAL checkpoint and removal that (c) pays
  (d) ``fleetctl task list --state queued --json``        — for information
  (e), (f) ``python -c pass`` and ``python -S -c pass``   — context: the interpreter's own floor, with and
       without ``site`` (whose .pth files — an editable install's finder, a certificate bundle — cost
       every Python process on some machines tens of milliseconds, the reference included)

on the embedded default configuration (FLEETCTL_HOME in a temporary directory, one configured local
agent), over a migrated database. For (c) every run completes a different task, created and claimed in
advance through the Python API by an http_pull agent, as an agent would (FLEET_AGENT_ID, FLEET_ATTEMPT).
The queue holds 20 tasks that no agent can serve, so dispatch reads a real queue and still has nothing
to do. Wall time decides; CPU time (user+sys of the child) is printed beside it, being the steadier
figure on a shared machine. Then ``python -X importtime`` of dispatch prints the ten largest cumulative
imports and which heavy modules (pydantic, rich, httpx, …) got loaded at all.

Usage: python bench/bench_startup.py [--runs N] [--warmup N]
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    PYTHON,
    clean_env,
    describe,
    fleetctl_exe,
    header,
    median_ms,
    result,
    run_measured,
    run_timed,
    verdict,
)

TARGET_RATIO = 1.5
HEAVY = ("pydantic", "rich", "httpx", "fabric", "paramiko", "sqlite_utils", "tomlkit", "http.server")


def setup(home: Path, n_tasks: int) -> list[tuple[str, str, int]]:
    """Migrate the db (via a first dispatch), then create and claim ``n_tasks`` for a pull agent."""
    env = clean_env(home)
    run_timed(fleetctl_exe() + ["dispatch"], env=env, cwd=home)  # creates + migrates, registers local.example

    from fleetctl import services
    from fleetctl.config import OrchestratorConfig
    from fleetctl.store import Store

    orch = OrchestratorConfig()
    claimed = []
    with Store.open(home / "fleet.db") as store:
        services.register_agent(store, "bench.puller", agent_type="bench", capabilities=["bench"],
                                max_concurrency=1000, mode="http_pull")  # fmt: skip
        for i in range(20):  # a queue no configured agent can serve
            services.create_task(store, orch, title=f"needs a gpu {i}", labels=["agent:gpu"])
        for i in range(n_tasks):
            t = services.create_task(store, orch, title=f"bench task {i}", labels=["agent:bench"])
            row = store.claim(agent_id="bench.puller", capabilities=["bench"], max_concurrency=1000,
                              lease_secs=86400, ts=time.time(), task_id=t["task_id"])  # fmt: skip
            assert row is not None, "claim failed"
            claimed.append((row["task_id"], row["agent_id"], row["attempt"]))
    return claimed


@contextlib.contextmanager
def holder(db: Path):
    """Another process with the database open and idle for the duration (what a running serve does)."""
    code = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('SELECT 1 FROM tasks LIMIT 1').fetchall(); "
        "print('ready', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen([PYTHON, "-c", code, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


def importtime(home: Path, argv: list[str], top: int = 10) -> None:
    """Print the ``top`` cumulative imports of one run, and which heavy modules it loaded."""
    proc = subprocess.run([PYTHON, "-X", "importtime", *fleetctl_exe(), *argv], env=clean_env(home), cwd=home,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    rows = []  # (cumulative µs, self µs, indented module name)
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cum_us, name = line[len("import time:") :].split("|", 2)
        rows.append((int(cum_us), int(self_us), name.rstrip()))
    rows.sort(reverse=True)
    names = {r[2].strip() for r in rows}
    print(f"\n-- python -X importtime fleetctl {' '.join(argv)}: {len(rows)} modules; top {top} by cumulative time")
    print(f"   {'cumulative':>10}  {'self':>8}  module")
    for cum, self_, name in rows[:top]:
        print(f"   {cum / 1000:8.1f}ms  {self_ / 1000:6.1f}ms  {name.strip()}")
    loaded = [m for m in HEAVY if m in names]
    print(f"   heavy modules loaded: {', '.join(loaded) if loaded else 'none'}  (watched: {', '.join(HEAVY)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    header("start-up: fleetctl dispatch / task complete vs python -c 'import typer'")
    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-startup-") as tmp:
        home = Path(tmp)
        tasks = setup(home, 2 * (args.runs + args.warmup))
        env = clean_env(home)
        fc = fleetctl_exe()
        cases = {
            "a: python -c 'import typer'": lambda i: [PYTHON, "-c", "import typer"],
            "b: fleetctl dispatch": lambda i: fc + ["dispatch"],
            "c: fleetctl task complete": lambda i: fc + ["task", "complete", tasks[2 * i][0], "--summary", "bench"],
            "c2: task complete, db held open": lambda i: fc + ["task", "complete", tasks[2 * i + 1][0], "--summary",
                                                             "bench"],
            "d: fleetctl task list --state queued --json": lambda i: fc + ["task", "list", "--state", "queued",
                                                                          "--json"],
            "e: python -c pass (interpreter + site)": lambda i: [PYTHON, "-c", "pass"],
            "f: python -S -c pass (bare interpreter)": lambda i: [PYTHON, "-S", "-c", "pass"],
        }  # fmt: skip
        wall: dict[str, list[float]] = {k: [] for k in cases}
        cpu: dict[str, list[float]] = {k: [] for k in cases}
        names = list(cases)
        for i in range(args.warmup + args.runs):
            order = names[i % len(names) :] + names[: i % len(names)]  # rotate: no case always runs first
            for name in order:
                run_env = env
                if name.startswith("c"):
                    t = tasks[2 * i + (name.startswith("c2"))]
                    run_env = {**env, "FLEET_AGENT_ID": t[1], "FLEET_ATTEMPT": str(t[2])}
                with holder(home / "fleet.db") if name.startswith("c2") else contextlib.nullcontext():
                    dt, ct, out = run_measured(cases[name](i), env=run_env, cwd=home)
                if name.startswith("c") and "completed" not in out:
                    raise SystemExit(f"task complete did not complete: {out!r}")
                if i >= args.warmup:
                    wall[name].append(dt)
                    cpu[name].append(ct)

        ref, ref_cpu = median_ms(wall[names[0]]), median_ms(cpu[names[0]])
        print(f"\n{'case':<44} {'wall time':<51} ratio   CPU (user+sys) median, ratio")
        for name in names:
            m, c = median_ms(wall[name]), median_ms(cpu[name])
            print(f"{name:<44} {describe(wall[name])}  {m / ref:5.2f}x   {c:6.1f} ms  {c / ref_cpu:5.2f}x")
        print("   c2: another process holds the database open (as 'fleetctl serve' does), so closing is not the")
        print("       last connection and skips the WAL checkpoint and removal that (c) pays on close")

        importtime(home, ["dispatch"])

        print()
        for key, label in (("b", "startup dispatch"), ("c", "startup task complete")):
            name = next(n for n in names if n.startswith(key + ":"))
            ratio = median_ms(wall[name]) / ref
            result(label, f"{median_ms(wall[name]):.0f} ms = {ratio:.2f}x import typer ({ref:.0f} ms); "
                   f"CPU {median_ms(cpu[name]) / ref_cpu:.2f}x", f"<= {TARGET_RATIO}x", verdict(ratio <= TARGET_RATIO))  # fmt: skip
        for name, label in (
            (names[3], "startup task complete, db held open (info)"),
            (names[4], "startup task list (info)"),
        ):
            result(label, f"{median_ms(wall[name]):.0f} ms = {median_ms(wall[name]) / ref:.2f}x", "-", "info")


if __name__ == "__main__":
    main()
