"""The built-in example agent: a stand-in for codex-cli or claude-code that the demo and tests run.

It behaves like a real agent under fleetctl: it reads its prompt (file path as its last argument, or
stdin), does real work in its workspace (writes ``NOTES.md`` with an analysis of the task text and a
``result.json``), reports progress and hands in its receipt by shelling out to ``fleetctl task complete``.

Directives in the task body steer it, one per line, so demos and tests can show every path:
``sleep: 1.5`` (work that long), ``fail-attempts: 1`` (exit 3 without a receipt on attempts ≤ 1),
``no-receipt`` (exit 0 without a receipt), ``fail-receipt`` (hand in a failure receipt),
``pr: 12`` (name pull request 12 in the receipt).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

_DIRECTIVE = re.compile(r"^\s*(sleep|fail-attempts|no-receipt|fail-receipt|pr)\s*(?::\s*(\S+))?\s*$", re.M)


def directives(text: str) -> dict[str, str]:
    """The ``name: value`` steering lines of a prompt."""
    return {m.group(1): m.group(2) or "" for m in _DIRECTIVE.finditer(text)}


def fleetctl(*args: str) -> subprocess.CompletedProcess:
    """Run this installation's fleetctl, as an agent would shell out to it."""
    python = os.environ.get("FLEET_PYTHON") or sys.executable
    return subprocess.run([python, "-m", "fleetctl", *args], capture_output=True, text=True, timeout=60)


def analyse(prompt: str) -> dict:
    """Real (if modest) work: word statistics and a digest of the task text."""
    words = re.findall(r"[A-Za-z][A-Za-z'-]+", prompt.lower())
    return {
        "lines": prompt.count("\n") + 1,
        "words": len(words),
        "top_words": Counter(w for w in words if len(w) > 4).most_common(5),
        "sha256": hashlib.sha256(prompt.encode()).hexdigest(),
    }


def main(argv: list[str]) -> int:
    prompt = Path(argv[-1]).read_text() if argv and Path(argv[-1]).is_file() else sys.stdin.read()
    task_id = os.environ.get("FLEET_TASK_ID", "?")
    attempt = int(os.environ.get("FLEET_ATTEMPT", "1"))
    steer = directives(prompt)
    print(f"example agent: task {task_id} attempt {attempt}", flush=True)
    fleetctl("task", "status", task_id, "--message", f"example agent working (attempt {attempt})")
    time.sleep(float(steer.get("sleep") or 0.2))
    if "fail-attempts" in steer and attempt <= int(steer["fail-attempts"] or 1):
        print(f"simulated crash on attempt {attempt}", file=sys.stderr)
        return 3
    stats = analyse(prompt)
    Path("NOTES.md").write_text(
        f"# Notes for {task_id}\n\n{stats['words']} words over {stats['lines']} lines; frequent: "
        + ", ".join(w for w, _ in stats["top_words"])
        + "\n"
    )
    Path("result.json").write_text(json.dumps(stats, indent=2))
    if "no-receipt" in steer:
        return 0
    args = ["task", "complete", task_id, "--summary", f"analysed {stats['words']} words; wrote NOTES.md"]
    if "fail-receipt" in steer:
        args += ["--outcome", "failure", "--summary", "the example agent was told to fail"]
    if steer.get("pr"):
        args += ["--pr", steer["pr"]]
    done = fleetctl(*args)
    print(done.stdout.strip(), done.stderr.strip(), flush=True)
    return 0 if done.returncode == 0 else done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
