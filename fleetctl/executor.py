"""Executors run an attempt detached on a host and let later passes probe or kill it (SPEC §8).

The interface is three calls — ``launch``, ``probe``, ``kill`` — over a workspace directory
``{work_dir}/{task_id}/{attempt}``. The workspace is the only shared state: the run wrapper (a small POSIX
``sh`` script, ``RUN_WRAPPER``) writes its pid (= its process group, as it runs under ``setsid -f``),
capped stdout/stderr, and finally its exit status, so dispatch can exit while the run goes on and a
later ``sweep-timeouts`` (any process) can see how it ended. ``LocalExecutor`` does this by subprocess;
the SSH executor does the same over fabric behind the same interface.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fleetctl.errors import RemoteError

META = ".fleet"  # bookkeeping directory inside a workspace

#: The run wrapper. argv: CAP_BYTES PROMPT_MODE COMMAND... ; cwd: the workspace.
#: Records .fleet/pid, .fleet/stdout.log and .fleet/stderr.log (each capped at CAP_BYTES; the command never
#: sees SIGPIPE), then .fleet/exit_status atomically; finally tells fleetctl the run ended, if it can.
RUN_WRAPPER = r"""#!/bin/sh
# fleetctl run wrapper (generated; see fleetctl/executor.py)
cap="$1"; mode="$2"; shift 2
m=.fleet
echo $$ > "$m/pid.tmp" && mv "$m/pid.tmp" "$m/pid"
date +%s > "$m/started_at"
rm -f "$m/out.fifo" "$m/err.fifo"
mkfifo "$m/out.fifo" "$m/err.fifo" || exit 97
{ head -c "$cap" > "$m/stdout.log"; cat > /dev/null; } < "$m/out.fifo" &
o=$!
{ head -c "$cap" > "$m/stderr.log"; cat > /dev/null; } < "$m/err.fifo" &
e=$!
case "$mode" in
  stdin) "$@" < "$m/prompt.md" > "$m/out.fifo" 2> "$m/err.fifo" ;;
  file)  "$@" "$PWD/$m/prompt.md" < /dev/null > "$m/out.fifo" 2> "$m/err.fifo" ;;
  arg)   "$@" "$(cat "$m/prompt.md")" < /dev/null > "$m/out.fifo" 2> "$m/err.fifo" ;;
  *)     echo "unknown prompt mode $mode" > "$m/err.fifo"; false ;;
esac
code=$?
wait $o $e
rm -f "$m/out.fifo" "$m/err.fifo"
echo "$code" > "$m/exit_status.tmp" && mv "$m/exit_status.tmp" "$m/exit_status"
if [ -n "${FLEET_PYTHON:-}" ]; then
  "$FLEET_PYTHON" -m fleetctl task run-ended "$FLEET_TASK_ID" --attempt "$FLEET_ATTEMPT" --exit-code "$code" \
    >> "$m/report.log" 2>&1 || true
fi
exit "$code"
"""

#: Environment variables a run may inherit from the dispatcher; everything else is dropped, so that no
#: secret of the orchestrator (Forgejo, Matrix, API tokens) ever reaches an agent.
INHERITED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "TERM")


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one attempt."""

    task_id: str
    attempt: int
    workspace: str
    command: tuple[str, ...]
    prompt: str
    prompt_mode: str  # stdin | file | arg
    env: Mapping[str, str]
    output_cap_bytes: int = 1048576


@dataclass(frozen=True)
class RunStatus:
    """What a probe found in a workspace."""

    exists: bool
    pid: int | None = None
    alive: bool = False
    exit_code: int | None = None
    stderr_tail: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.exit_code is not None

    @property
    def vanished(self) -> bool:
        """Started once, now neither running nor ended (killed from outside, host rebooted)."""
        return self.pid is not None and not self.alive and self.exit_code is None


class Executor(Protocol):
    """Runs attempts on one host."""

    def launch(self, spec: LaunchSpec) -> int:
        """Start the run detached; return its pid once the wrapper confirmed the start (else RemoteError)."""

    def probe(self, workspace: str) -> RunStatus:
        """Look at a run's workspace."""

    def kill(self, workspace: str, grace_secs: float = 3.0) -> bool:
        """Stop the run's whole process group (TERM, then KILL); True if something was signalled."""


def workspace_path(work_dir: str, task_id: str, attempt: int) -> str:
    """``{work_dir}/{task_id}/{attempt}`` (ids are validated, so this never escapes ``work_dir``)."""
    return str(Path(work_dir) / task_id / str(attempt))


def run_env(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a run: a whitelist of ``base`` plus ``extra``."""
    env = {k: base[k] for k in INHERITED_ENV if k in base}
    env.update(extra)
    return env


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class LocalExecutor:
    """Runs attempts on this machine by subprocess, detached with ``setsid -f``."""

    def __init__(self, start_timeout_secs: float = 10.0):
        self.start_timeout_secs = start_timeout_secs

    def launch(self, spec: LaunchSpec) -> int:
        ws = Path(spec.workspace)
        meta = ws / META
        try:
            meta.mkdir(parents=True, exist_ok=True, mode=0o700)
            (meta / "prompt.md").write_text(spec.prompt)
            (meta / "run.sh").write_text(RUN_WRAPPER)
        except OSError as exc:
            raise RemoteError(f"cannot create workspace {ws}: {exc.strerror}", code="launch_failed") from None
        argv = ["setsid", "-f", "sh", str(meta / "run.sh"), str(spec.output_cap_bytes), spec.prompt_mode,
                *spec.command]  # fmt: skip
        try:
            subprocess.run(argv, cwd=ws, env=dict(spec.env), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=True, timeout=self.start_timeout_secs)  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            raise RemoteError(f"cannot start {shlex.join(spec.command)}: {exc}", code="launch_failed") from None
        deadline = time.monotonic() + self.start_timeout_secs
        while time.monotonic() < deadline:
            pid = _read_int(meta / "pid")
            if pid is not None:
                return pid
            time.sleep(0.01)
        raise RemoteError(f"the run wrapper in {ws} did not start within {self.start_timeout_secs:.0f}s",
                          code="launch_failed")  # fmt: skip

    def probe(self, workspace: str) -> RunStatus:
        meta = Path(workspace) / META
        if not meta.is_dir():
            return RunStatus(exists=False)
        pid = _read_int(meta / "pid")
        code = _read_int(meta / "exit_status")
        alive = pid is not None and code is None and _pid_alive(pid)
        return RunStatus(exists=True, pid=pid, alive=alive, exit_code=code, stderr_tail=_tail(meta / "stderr.log"))

    def kill(self, workspace: str, grace_secs: float = 3.0) -> bool:
        status = self.probe(workspace)
        if status.pid is None or status.ended or not _leader_is_ours(status.pid, workspace):
            return False
        try:
            os.killpg(status.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return False
        deadline = time.monotonic() + grace_secs
        while time.monotonic() < deadline and _group_alive(status.pid):
            time.sleep(0.05)
        if _group_alive(status.pid):
            try:
                os.killpg(status.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return True


def _leader_is_ours(pid: int, workspace: str) -> bool:
    """Guard against pid reuse: a live group leader must still be our wrapper (cwd = the workspace).
    A dead leader's pgid cannot be reused while members of its group live, so those are ours."""
    try:
        return os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(workspace)
    except FileNotFoundError:
        return True  # the leader is gone; what is left of its group is ours
    except OSError:
        return True  # no /proc or no permission: fall back to trusting the pid file


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # signal 0 succeeds for zombies too; look for a live member of the group
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        except (OSError, IndexError, ValueError):
            continue
    return False


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def python_bin_dir() -> str:
    """The directory of the running interpreter (and so of the ``fleetctl`` script in a venv)."""
    return str(Path(sys.executable).parent)
