"""The executor interface: what dispatch, sweep and the pull agent need from "somewhere runs attempts".

An executor starts one attempt detached in its workspace (``launch``), later looks at how it is doing
(``probe``), stops it (``kill``) and, once the attempt is settled and old, removes its workspace
(``remove``); ``close`` releases what it holds (an SSH connection; nothing for
the local executor) and may be called any number of times. The workspace directory is the only state
shared between the process that launched a run and the ones that probe or kill it later, so any process
(a later ``sweep-timeouts``, a restarted pull agent) can pick a run up by its workspace path alone.

Every implementation passes ``tests/test_executor_contract.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

DEFAULT_OUTPUT_CAP_BYTES = 1048576
"""How much of a run's stdout and of its stderr is kept (``orchestrator.output_cap_bytes``' default)."""

DEFAULT_KILL_GRACE_SECS = 3.0
"""Between SIGTERM and SIGKILL of a run's process group."""

PROMPT_MODES = ("stdin", "file", "arg")
"""How the command gets its prompt: on stdin, as the path of ``.fleet/prompt.md``, or as its last argument."""


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one attempt.

    ``env`` is the run's whole environment (build it with ``run_env``: a whitelist plus the ``FLEET_*``
    variables); nothing of the launching process's own environment is added to it.
    """

    task_id: str
    attempt: int
    workspace: str
    command: tuple[str, ...]
    prompt: str
    prompt_mode: str  # stdin | file | arg
    env: Mapping[str, str]
    output_cap_bytes: int = DEFAULT_OUTPUT_CAP_BYTES
    report_end: bool = True
    """Whether the run wrapper reports the end of the run itself (``task run-ended`` / ``POST …/run-ended``);
    a pull agent, which waits for its runs and hands in their receipts, launches with False."""


@dataclass(frozen=True)
class RunStatus:
    """What a probe found in a workspace.

    ``exists``: the workspace has a ``.fleet/`` directory; ``pid``: the wrapper recorded its pid (= its
    process group); ``alive``: that wrapper still runs (not a zombie, and still ours: a reused pid is not
    alive); ``exit_code``: the command's exit status, once the wrapper recorded it.
    """

    exists: bool
    pid: int | None = None
    alive: bool = False
    exit_code: int | None = None
    stderr_tail: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        """The run finished and its exit status is known."""
        return self.exit_code is not None

    @property
    def vanished(self) -> bool:
        """Started once, now neither running nor ended (killed from outside, host rebooted)."""
        return self.pid is not None and not self.alive and self.exit_code is None


class Executor(Protocol):
    """Runs attempts on one host. Errors talking to the host are ``RemoteError``."""

    def launch(self, spec: LaunchSpec) -> int:
        """Start the run detached; its pid once the wrapper confirmed the start.

        ``RemoteError`` (code ``launch_failed``) if it could not be started; a command that the wrapper
        started but the shell could not run is recorded as exit status 127 (or 126) instead.
        """
        ...

    def probe(self, workspace: str) -> RunStatus:
        """Look at a run's workspace (a missing workspace is ``RunStatus(exists=False)``)."""
        ...

    def kill(self, workspace: str, grace_secs: float = DEFAULT_KILL_GRACE_SECS) -> bool:
        """Stop the run's whole process group (TERM, then KILL after ``grace_secs``).

        True if a live run was signalled (it is gone when this returns); False if there was nothing of
        ours to stop (no run, already ended, vanished, or its pid now belongs to another process).
        """
        ...

    def remove(self, workspace: str) -> bool:
        """Remove a run's workspace directory, then its task directory if that became empty.

        True if the workspace is gone (removed now, or not there at all); False if a member of the run's
        process group still lives (nothing is removed). ``RemoteError`` (code ``remove_failed``) for a path
        that is not a fleetctl workspace (refused, nothing removed) or a removal that failed part-way.
        """
        ...

    def close(self) -> None:
        """Release the executor's resources; idempotent."""
        ...
