"""Executors run an attempt detached on a host and let later passes probe or kill it, and remove its
workspace once it is settled and old (SPEC §8).

One interface (``base.Executor``: ``launch``, ``probe``, ``kill``, ``remove``, ``close``) over a workspace
directory ``{work_dir}/{task_id}/{attempt}``:

- ``base``: ``LaunchSpec``, ``RunStatus`` and the ``Executor`` protocol;
- ``workspace``: the workspace layout, the POSIX-sh run wrapper and the probe, kill and remove scripts
  that run in the workspace, and the run's environment (``run_env``, ``INHERITED_ENV``, ``fleet_env``);
- ``local``: ``LocalExecutor``, which runs those scripts by subprocess on this machine. The pull agent
  (``fleetctl agent run``) launches, caps and kills its commands through it as well;
- ``ssh``: ``SshExecutor``, which runs the same scripts over one SSH connection per host (fabric and
  paramiko are imported inside its functions; it is not re-exported here).

Every executor passes the contract suite in ``tests/test_executor_contract.py``. Only the standard
library is imported here.
"""

from __future__ import annotations

from fleetctl.executors.base import (
    DEFAULT_KILL_GRACE_SECS,
    DEFAULT_OUTPUT_CAP_BYTES,
    PROMPT_MODES,
    Executor,
    LaunchSpec,
    RunStatus,
)
from fleetctl.executors.local import LocalExecutor
from fleetctl.executors.workspace import (
    INHERITED_ENV,
    KILL_SCRIPT,
    META,
    PROBE_SCRIPT,
    REMOVE_SCRIPT,
    RUN_WRAPPER,
    fleet_env,
    python_bin_dir,
    read_exit_status,
    run_env,
    workspace_path,
)

__all__ = [
    "DEFAULT_KILL_GRACE_SECS",
    "DEFAULT_OUTPUT_CAP_BYTES",
    "INHERITED_ENV",
    "KILL_SCRIPT",
    "META",
    "PROBE_SCRIPT",
    "PROMPT_MODES",
    "REMOVE_SCRIPT",
    "RUN_WRAPPER",
    "Executor",
    "LaunchSpec",
    "LocalExecutor",
    "RunStatus",
    "fleet_env",
    "python_bin_dir",
    "read_exit_status",
    "run_env",
    "workspace_path",
]
