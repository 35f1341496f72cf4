"""The README's two commands work on a fresh machine: run them in a fresh clone and a fresh virtualenv.

This installs from PyPI into a new venv (about a minute); the inner test run is narrowed with
PYTEST_ADDOPTS so that the suite does not run itself recursively.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_commands_in_fresh_clone_and_venv(tmp_path):
    clone, venv = tmp_path / "clone", tmp_path / "venv"
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", f"file://{ROOT}", str(clone)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET", "VIRTUAL_ENV", "PYTHON", "PYTEST"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["FLEETCTL_HOME"] = str(tmp_path / "home")
    demo_cmd, test_cmd = _readme_commands()

    demo = subprocess.run(["sh", "-c", demo_cmd], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert re.search(r"db check .*: ok", demo.stdout), demo.stdout[-3000:]
    assert "completed" in demo.stdout and "requeued" in demo.stdout
    assert not (tmp_path / "home" / "fleet.db").exists(), "the demo must not touch the configured fleet's database"

    env["PYTEST_ADDOPTS"] = "-q -p no:cacheprovider tests/test_docs.py"
    tests = subprocess.run(["sh", "-c", test_cmd], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert re.search(r"\d+ passed", tests.stdout), tests.stdout[-2000:]
