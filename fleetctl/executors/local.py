"""The local executor: runs attempts on this machine by subprocess (SPEC §8: a host named ``local``).

``launch`` writes ``.fleet/prompt.md`` and ``.fleet/run.sh`` into the workspace and starts the wrapper
with ``setsid -f`` (stdin, stdout and stderr on ``/dev/null``), so the run is in its own session and
process group, is not our child, and outlives the process that launched it (a one-shot ``dispatch``, or
a pull agent that is restarted). It returns once the wrapper has written its pid.

``probe``, ``kill`` and ``remove`` run the workspace module's POSIX scripts with ``sh -c`` and parse what
they print: the same scripts an SSH executor runs on its host, so the two cannot drift apart. That costs
one ``sh`` process per probe (a few milliseconds; the sweep probes each open attempt once per pass), which
is the price of one code path for every host. The pull agent (``fleetctl agent run``) runs its commands through
this executor too, and between probes only reads ``.fleet/exit_status``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fleetctl.errors import RemoteError
from fleetctl.executors.base import DEFAULT_KILL_GRACE_SECS, LaunchSpec, RunStatus
from fleetctl.executors.workspace import (
    META,
    REMOVE_TIMEOUT_SECS,
    STALE_FILES,
    kill_argv,
    launch_problem,
    meta_files,
    parse_kill,
    parse_probe,
    parse_remove,
    probe_argv,
    remove_argv,
    wrapper_argv,
)

DEFAULT_START_TIMEOUT_SECS = 10.0
"""How long ``launch`` waits for the wrapper to record its pid."""

_SCRIPT_TIMEOUT_SECS = 30.0
"""Bound on one probe; a kill gets its grace period on top."""

T = TypeVar("T")


class LocalExecutor:
    """Runs attempts on this machine, detached with ``setsid -f``; see the module docstring."""

    def __init__(self, start_timeout_secs: float = DEFAULT_START_TIMEOUT_SECS):
        self.start_timeout_secs = start_timeout_secs
        self.closed = False

    def launch(self, spec: LaunchSpec) -> int:
        """Start the run detached; its pid once the wrapper has recorded it (else ``RemoteError``)."""
        ws = Path(spec.workspace)
        problem = launch_problem(spec)
        if problem:
            raise RemoteError(f"cannot start a run in {ws}: {problem}", code="launch_failed")
        meta = ws / META
        if (meta / "pid").exists():
            self._clear_previous_run(ws)
        try:
            meta.mkdir(parents=True, exist_ok=True, mode=0o700)
            for name, data in meta_files(spec).items():
                with os.fdopen(os.open(meta / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
                    fh.write(data)
        except OSError as exc:
            raise RemoteError(f"cannot create workspace {ws}: {exc.strerror or exc}", code="launch_failed") from None
        try:
            subprocess.run(wrapper_argv(spec), cwd=ws, env=dict(spec.env), stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                           timeout=self.start_timeout_secs)  # fmt: skip
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise RemoteError(f"cannot start {shlex.join(spec.command)}: {exc}", code="launch_failed") from None
        deadline = time.monotonic() + self.start_timeout_secs
        delay = 0.002
        while True:
            pid = _read_int(meta / "pid")
            if pid is not None:
                return pid
            if time.monotonic() > deadline:
                raise RemoteError(f"the run wrapper in {ws} did not start within {self.start_timeout_secs:g}s",
                                  code="launch_failed")  # fmt: skip
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _clear_previous_run(self, ws: Path) -> None:
        """A workspace used before (a database started afresh reuses task ids): refuse if its run still
        lives, else forget that run's bookkeeping so that its pid and exit status are not taken for ours."""
        previous = self.probe(str(ws))
        if previous.alive:
            raise RemoteError(f"the workspace {ws} already has a live run (pid {previous.pid})", code="launch_failed")
        for name in STALE_FILES:
            try:
                (ws / META / name).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise RemoteError(f"cannot reuse workspace {ws}: {exc.strerror or exc}", code="launch_failed") from None

    def probe(self, workspace: str) -> RunStatus:
        """Run ``PROBE_SCRIPT`` on the workspace and parse its answer."""
        return self._script(probe_argv(workspace), _SCRIPT_TIMEOUT_SECS, "probe", workspace, parse_probe)

    def kill(self, workspace: str, grace_secs: float = DEFAULT_KILL_GRACE_SECS) -> bool:
        """Run ``KILL_SCRIPT`` (TERM the group, KILL it after ``grace_secs``); True if it stopped a run."""
        return self._script(kill_argv(workspace, grace_secs), _SCRIPT_TIMEOUT_SECS + grace_secs, "kill", workspace,
                            lambda out: parse_kill(out)[0])  # fmt: skip

    def remove(self, workspace: str) -> bool:
        """Run ``REMOVE_SCRIPT``: True if the workspace is gone, False if its run still lives (kept)."""
        return self._script(remove_argv(workspace), REMOVE_TIMEOUT_SECS, "remove", workspace, parse_remove)

    def close(self) -> None:
        """Nothing to release (no connection); idempotent."""
        self.closed = True

    @staticmethod
    def _script(argv: list[str], timeout: float, what: str, workspace: str, parse: Callable[[bytes], T]) -> T:
        """Run a workspace script; ``parse`` of its answer, or ``RemoteError`` (code ``{what}_failed``)."""
        # a fixed, minimal environment: the scripts need only sh builtins and a few POSIX tools
        env = {"PATH": os.environ.get("PATH") or os.defpath, "LC_ALL": "C"}
        try:
            done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise RemoteError(f"cannot {what} {workspace}: {exc}", code=f"{what}_failed") from None
        if done.returncode != 0:
            error = done.stderr.decode("utf-8", "replace").strip()[-300:]
            raise RemoteError(f"cannot {what} {workspace}: sh exited {done.returncode}: {error}",
                              code=f"{what}_failed")  # fmt: skip
        try:
            return parse(done.stdout)
        except ValueError as exc:
            raise RemoteError(f"cannot {what} {workspace}: {exc}", code=f"{what}_failed") from None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
