"""Run the benchmarks and print a summary table (SPEC §11; figures go to docs/performance.md).

Usage:
    python bench/run.py                  # every bench/bench_*.py
    python bench/run.py startup store    # only these (names without the bench_ prefix)
    python bench/run.py --list

Each benchmark is a separate script run with this interpreter; its full output is streamed as it runs,
and the ``RESULT`` lines it prints (see bench/_common.py) are collected into the table at the end. The
exit status is 1 if any target was missed or a benchmark failed, else 0 — for a person or a job that
wants it; nothing in tests/ runs benchmarks.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def available() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCH_DIR.glob("bench_*.py"))}


def main() -> int:
    ap = argparse.ArgumentParser(description="Run fleetctl's benchmarks and summarise them.")
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args()
    benches = available()
    if args.list:
        for name, path in benches.items():
            doc = path.read_text().split('"""')[1].strip().splitlines()[0]
            print(f"{name:<16} {doc}")
        return 0
    unknown = [n for n in args.names if n not in benches]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(benches)}", file=sys.stderr)
        return 2
    rows: list[tuple[str, str, str, str, str]] = []
    failed = False
    for name in args.names or list(benches):
        print(f"\n######## {name}  ({benches[name].relative_to(BENCH_DIR.parent)})", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(benches[name])], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.startswith("RESULT "):
                parts = [p.strip() for p in line[len("RESULT ") :].split("|")]
                rows.append((name, *parts[:4]))  # type: ignore[arg-type]
        code = proc.wait()
        print(f"######## {name} finished in {time.perf_counter() - t0:.0f} s (exit {code})", flush=True)
        if code != 0:
            failed = True
            rows.append((name, "(benchmark)", f"exited {code}", "-", "ERROR"))

    print("\n== summary")
    header = ("bench", "what", "measured", "target", "verdict")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    failed = failed or any(r[4] in ("FAIL", "ERROR") for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
