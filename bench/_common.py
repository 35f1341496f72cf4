"""Helpers shared by the benchmark scripts (not a test module; nothing here asserts on time).

Every benchmark measures a *reference* in the same run and reports its figures as a ratio to it, because
the machines are shared and noisy (SPEC §11). Each script ends with ``RESULT`` lines that ``bench/run.py``
collects into its summary table::

    RESULT <name> | <measured> | <target> | PASS|FAIL|info
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
PYTHON = sys.executable


#: Twenty realistic requirement sets shared by the store and planner benchmarks; nobody serves gpu:a100.
REQUIREMENT_SETS = [
    (), ("code:python",), ("code:rust",), ("code:go",), ("docs",), ("code:python", "docs"),
    ("code:typescript",), ("code:python", "gpu"), ("code:rust", "code:python"), ("infra",),
    ("code:java",), ("code:c",), ("code:python", "review"), ("review",), ("code:go", "infra"),
    ("code:typescript", "docs"), ("security",), ("code:python", "security"), ("data",), ("gpu:a100",),
]  # fmt: skip
CAPABILITIES = sorted({c for s in REQUIREMENT_SETS for c in s} - {"gpu:a100"})


def fleetctl_exe() -> list[str]:
    """The installed ``fleetctl`` console script, run by this interpreter's own launcher.

    We resolve the real script beside ``sys.executable`` rather than whatever is first on PATH: on machines
    with pyenv, PATH holds a bash *shim* that adds ~50–100 ms to every start and would hide the product's
    own cost (the reference ``python -c "import typer"`` is likewise run as ``sys.executable``).
    """
    beside = Path(sys.executable).parent / "fleetctl"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("fleetctl")
    if found:
        return [found]
    return [PYTHON, "-m", "fleetctl"]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment whose config search finds nothing (so the embedded default is used) under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        FLEETCTL_HOME=str(home),
        XDG_CONFIG_HOME=str(home / "xdg-config"),
        XDG_DATA_HOME=str(home / "xdg-data"),
        NO_COLOR="1",
    )
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # measure the normal case: bytecode cached
    env.update(extra)
    return env


def run_timed(cmd: Sequence[str], *, env: dict[str, str], cwd: Path, check: bool = True) -> tuple[float, str]:
    """Wall time in seconds of one process run to completion; returns (seconds, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if check and proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return dt, proc.stdout


def run_measured(cmd: Sequence[str], *, env: dict[str, str], cwd: Path) -> tuple[float, float, str]:
    """Wall and CPU (user+sys) seconds of one process run to completion; returns (wall, cpu, stdout).

    CPU time is the steadier figure on a shared machine: waiting for a core counts in wall time only.
    """
    import resource

    def children() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    c0 = children()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    ct = children() - c0
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return dt, ct, proc.stdout


def median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1000


def describe(samples: Sequence[float]) -> str:
    """``median (min–p90, n)`` in milliseconds."""
    s = sorted(samples)
    p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
    return f"median {median_ms(s):7.1f} ms  (min {s[0] * 1000:6.1f}, p90 {p90 * 1000:6.1f}, n={len(s)})"


def machine() -> str:
    """One line naming the machine, for the figures in docs/performance.md."""
    import sqlite3

    return (
        f"python {platform.python_version()} ({platform.python_implementation()}), "
        f"sqlite {sqlite3.sqlite_version}, nproc {os.cpu_count()}, {platform.system()} {platform.release()}, "
        f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


def result(name: str, measured: str, target: str, verdict: str) -> None:
    """One machine-readable line for bench/run.py's summary."""
    print(f"RESULT {name} | {measured} | {target} | {verdict}", flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def header(title: str) -> None:
    print(f"== {title}")
    print(f"   machine: {machine()}")
    print(f"   fleetctl: {' '.join(fleetctl_exe())}")
    sys.stdout.flush()
