"""The reference pull agent behind ``fleetctl agent run`` (SPEC §5, §6, §8 item 5).

It registers with a ``fleetctl serve`` (or reuses the credential file it saved last time), then runs
tasks it pulls over HTTP: dequeue (long-poll) → run a command in the task's workspace → hand in a receipt.

Threads, each with its own HTTP client:

- the **heartbeat** thread starts first, as soon as the agent has a working token, so that no setup
  work and no slow command can delay a heartbeat. It heartbeats every ``heartbeat_interval_secs`` (the
  server says how often), which extends the leases of the agent's tasks; the reply lists the runs the
  agent must stop — ``"stop": [{"task_id", "attempt", "reason"}]`` (timed out, cancelled, reassigned,
  lease lost), or on an older server only ``"cancelled": [task ids]`` — and those commands are stopped
  (matching task id and attempt) without a receipt: the attempt is no longer the agent's.
- ``--max-concurrency`` **workers**: each long-polls ``dequeue`` and runs what it claims. A run lives in
  ``{workspace_root}/{task_id}/{attempt}`` and is started, capped and stopped exactly like a dispatched
  one: through ``fleetctl.executors.LocalExecutor`` and its run wrapper (prompt in ``.fleet/prompt.md``,
  stdout/stderr in ``.fleet/stdout.log`` / ``stderr.log``, each capped at ``output_cap_bytes``, exit
  status in ``.fleet/exit_status``; stopping = the kill script: TERM the process group, KILL it after the
  grace period). Its environment is built by ``executors.run_env`` / ``fleet_env`` as for a dispatched
  run: a whitelist of ours (``INHERITED_ENV``) plus the task's ``FLEET_*`` variables — the per-attempt
  ``FLEET_TASK_TOKEN``, never the agent's own token nor the registration token. When the command exits,
  the agent hands in a receipt unless the command already did (``fleetctl task complete`` in remote
  mode): success with the tail of stdout on exit 0, failure with the tail of stderr otherwise. A
  completion that gets no answer (connection error, 503, server restarting) is repeated until it is
  acknowledged — an identical repeat is answered ``200 repeated`` — for at most ``complete_retry_secs``.
- the **main** thread only waits. SIGTERM/SIGINT set a flag: stop dequeuing, let running commands
  finish and hand in their receipts (drain), exit 0. A second signal also stops the running commands
  (their attempts fail with a failure receipt and are retried elsewhere). The agent does not
  deregister: deregistering would fail its attempts, and a stopped agent is marked offline by the sweep
  after missed heartbeats anyway.

A dequeue that is in flight at shutdown may, in a narrow window, claim a task just as the process
exits; that attempt is recovered like any lost agent's (lease expiry / ``agent_lost``, then a retry).
Every action is one ``action=… key=value`` line on stderr; tokens are never logged.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetctl.errors import (
    Conflict,
    ExitCode,
    FleetError,
    Forbidden,
    InvalidTransition,
    NotFound,
    RemoteError,
    Unauthorized,
    UsageError,
    ValidationFailed,
)
from fleetctl.executors import (
    DEFAULT_OUTPUT_CAP_BYTES,
    META,
    LaunchSpec,
    LocalExecutor,
    fleet_env,
    read_exit_status,
    run_env,
    workspace_path,
)
from fleetctl.ids import check_id
from fleetctl.receipts import RATE_LIMITED_EXIT
from fleetctl.remote import REGISTRATION_TOKEN_ENV, Client, Transient, resolve_token

DEFAULT_DEQUEUE_WAIT_SECS = 30.0
"""Long-poll wait of one dequeue (the server's maximum)."""

DEFAULT_HEARTBEAT_SECS = 60.0
"""Heartbeat interval until the server says otherwise."""

DEFAULT_COMPLETE_RETRY_SECS = 600.0
"""How long a completion that gets no answer is repeated before the agent gives up (and logs it)."""

DEFAULT_KILL_GRACE_SECS = 5.0
"""Between SIGTERM and SIGKILL when a command is stopped."""

DEFAULT_AGENT_TYPE = "command"
"""``--type`` of ``agent run`` when none is given."""

STOP_REASONS = ("timeout", "cancelled", "reassigned", "lease_lost")
"""Why the server tells the agent to stop a run (heartbeat reply ``stop[].reason``)."""

PROBE_EVERY_SECS = 1.0
"""How often a waiting worker probes its run for a vanished wrapper (it reads the exit status every 0.1 s)."""

PROMPT_MODES = ("file", "stdin", "arg")
TAIL_BYTES = 4000
CREDENTIALS_VERSION = 1

from fleetctl.log import log  # noqa: E402


@dataclass(frozen=True)
class AgentSettings:
    """Everything ``run_agent`` needs; built from the command line by ``make_settings``."""

    api_url: str
    command: tuple[str, ...]
    agent_id: str
    credentials: Path
    workspace_root: Path
    registration_token: str | None = None
    agent_type: str = DEFAULT_AGENT_TYPE
    capabilities: tuple[str, ...] = ()
    max_concurrency: int = 1
    prompt_mode: str = "file"
    one_job: bool = False
    dequeue_wait: float = DEFAULT_DEQUEUE_WAIT_SECS
    complete_retry_secs: float = DEFAULT_COMPLETE_RETRY_SECS
    kill_grace_secs: float = DEFAULT_KILL_GRACE_SECS
    output_cap_bytes: int = DEFAULT_OUTPUT_CAP_BYTES


def make_settings(
    *,
    command: str,
    shell: bool = False,
    prompt: str = "file",
    one_job: bool = False,
    agent_id: str | None = None,
    agent_type: str = DEFAULT_AGENT_TYPE,
    capabilities: list[str] | tuple[str, ...] = (),
    max_concurrency: int = 1,
    workspace_root: Path | None = None,
    credentials: Path | None = None,
    api_url: str | None = None,
    token: str | None = None,
    load_config: Callable[[], Any] | None = None,
    env: dict[str, str] | None = None,
    output_cap_bytes: int = DEFAULT_OUTPUT_CAP_BYTES,
) -> AgentSettings:
    """Check the options of ``agent run`` and fill in the defaults; ``UsageError`` for bad ones.

    The API URL is ``--api-url``, else ``$FLEET_API_URL``, else the configured ``server.bind:port``; the
    registration token ``--token``, else ``$FLEET_REGISTRATION_TOKEN``, ``$FLEET_API_TOKEN``, else the
    configured ``orchestrator.http_pull_token`` (it is needed only when there is no saved credential).
    """
    from fleetctl.config import data_home

    env = dict(os.environ) if env is None else env
    if prompt not in PROMPT_MODES:
        raise UsageError(f"--prompt must be one of {', '.join(PROMPT_MODES)}, not {prompt!r}")
    if not command.strip():
        raise UsageError("--command must not be empty")
    try:
        # with --shell the prompt (file path or text) arrives as "$1"
        argv = ("sh", "-c", command, "fleet-run") if shell else tuple(shlex.split(command))
    except ValueError as exc:
        raise UsageError(f"--command cannot be split: {exc}") from None
    cfg = None
    url = api_url or env.get("FLEET_API_URL")
    reg_token = resolve_token(token, REGISTRATION_TOKEN_ENV, env)
    if (not url or not reg_token) and load_config is not None:
        cfg = load_config()
    if not url and cfg is not None:
        host = cfg.server.bind if cfg.server.bind not in ("", "0.0.0.0", "::") else "127.0.0.1"
        url = f"http://{'[' + host + ']' if ':' in host else host}:{cfg.server.port}"
    if not url:
        raise UsageError("agent run needs the API URL: --api-url or $FLEET_API_URL")
    if not reg_token and cfg is not None:
        reg_token = cfg.orchestrator.http_pull_token
    saved = _read_credentials(credentials) if credentials is not None else None
    agent_id = agent_id or (saved or {}).get("agent_id") or _host_agent_id()
    check_id(agent_id, "agent id")
    if max_concurrency < 1:
        raise UsageError("--max-concurrency must be at least 1")
    if output_cap_bytes < 1:
        raise UsageError("the output cap must be at least 1 byte")
    home = data_home(env)
    return AgentSettings(
        api_url=url.rstrip("/"), command=argv, agent_id=agent_id, registration_token=reg_token,
        credentials=credentials or home / f"agent-{agent_id}.json",
        workspace_root=(workspace_root or home / "workspaces").absolute(), agent_type=agent_type,
        capabilities=tuple(capabilities), max_concurrency=max_concurrency, prompt_mode=prompt, one_job=one_job,
        output_cap_bytes=output_cap_bytes,
    )  # fmt: skip


def _host_agent_id() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0]) or "agent"
    return name if name[0].isalnum() else f"a{name}"


# ---------------------------------------------------------------------------------------------- credentials


def _read_credentials(path: Path) -> dict | None:
    """The saved ``{"agent_id", "token", "api_url"}``, or None if absent or unusable (logged)."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log("credentials.unreadable", path=path, error=getattr(exc, "strerror", None) or exc)
        return None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in ("agent_id", "token")):
        log("credentials.invalid", path=path)
        return None
    try:
        if path.stat().st_mode & 0o077:
            log("credentials.insecure", path=path, hint="chmod 600")
    except OSError:
        pass
    return doc


def save_credentials(path: Path, agent_id: str, token: str, api_url: str) -> None:
    """Write the credential file atomically with mode 0600 (its directory 0700 when created)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = {"version": CREDENTIALS_VERSION, "agent_id": agent_id, "api_url": api_url, "token": token}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (json.dumps(doc, indent=2) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- the agent


@dataclass
class Run:
    """One attempt this agent is running."""

    task_id: str
    attempt: int
    token: str = field(repr=False, default="")  # the attempt's task token: for its run and its receipt only
    stop: threading.Event = field(default_factory=threading.Event)
    # "shutdown" (a failure receipt follows), or why the server took the attempt away (STOP_REASONS: no receipt)
    stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop.set()


class PullAgent:
    """``fleetctl agent run``: see the module docstring. ``run()`` returns the process exit code."""

    def __init__(self, settings: AgentSettings):
        self.s = settings
        self.token: str | None = None
        self.interval = DEFAULT_HEARTBEAT_SECS
        self.stopping = threading.Event()  # no more dequeues
        self.aborting = threading.Event()  # running commands are stopped too
        self.hb_stop = threading.Event()
        self.lock = threading.Lock()
        self.runs: dict[tuple[str, int], Run] = {}  # by (task id, attempt)
        self.executor = LocalExecutor()  # the same launch / capping / kill code as a dispatched run
        self.signals = 0
        self.exit_code = ExitCode.OK

    # ------------------------------------------------------------------ start-up

    def connect(self) -> None:
        """Get a working agent token: the saved one if the server still takes it, else register anew."""
        s = self.s
        saved = _read_credentials(s.credentials)
        if saved and saved["agent_id"] == s.agent_id and saved.get("api_url", s.api_url) == s.api_url:
            with Client(s.api_url, saved["token"]) as client:
                try:
                    reply = client.heartbeat()
                except Unauthorized:
                    log("agent.credentials_rejected", agent=s.agent_id, path=s.credentials)
                else:
                    self.token = saved["token"]
                    if not self._differs(reply["agent"]):
                        self._heard(reply)
                        log("agent.resumed", agent=s.agent_id, credentials=s.credentials)
                        return
                    if not s.registration_token:
                        self._heard(reply)
                        log("agent.settings_differ", agent=s.agent_id, hint="give a registration token to update")
                        return
        self._register()

    def _differs(self, agent: dict) -> bool:
        s = self.s
        return (agent["agent_type"], sorted(agent["capabilities"]), agent["max_concurrency"]) != (
            s.agent_type, sorted(set(s.capabilities)), s.max_concurrency)  # fmt: skip

    def _register(self) -> None:
        s = self.s
        if not s.registration_token:
            raise UsageError(
                f"agent {s.agent_id} has no usable saved credential ({s.credentials}) and no registration token: "
                "--token, $FLEET_REGISTRATION_TOKEN or $FLEET_API_TOKEN"
            )
        with Client(s.api_url, s.registration_token) as client:
            doc, created = client.register(s.agent_id, agent_type=s.agent_type, capabilities=s.capabilities,
                                           max_concurrency=s.max_concurrency)  # fmt: skip
        self.token = doc["token"]
        try:
            save_credentials(s.credentials, s.agent_id, self.token, s.api_url)
        except OSError as exc:
            raise UsageError(f"cannot save the credential file {s.credentials}: {exc.strerror}") from None
        log("agent.registered" if created else "agent.reregistered", agent=s.agent_id, credentials=s.credentials)
        with Client(s.api_url, self.token) as client:
            self._heard(client.heartbeat())

    def _heard(self, reply: dict) -> None:
        """Take the heartbeat interval from a reply; stop the runs it says are no longer the agent's.

        ``stop: [{"task_id", "attempt", "reason"}]`` names each run (task id and attempt) with why; a
        reply without ``stop`` (an older server) lists only ``cancelled`` task ids: any attempt of those.
        """
        interval = reply.get("heartbeat_interval_secs")
        if isinstance(interval, int | float) and interval > 0:
            self.interval = float(interval)
        for task_id, attempt, reason in stop_requests(reply):
            with self.lock:
                runs = [r for (tid, att), r in self.runs.items() if tid == task_id and attempt in (None, att)]
            for run in runs:
                if not run.stop.is_set():
                    log("task.stop_requested", task=task_id, attempt=run.attempt, reason=reason)
                    run.request_stop(reason)

    # ------------------------------------------------------------------ threads

    def _heartbeats(self) -> None:
        with Client(self.s.api_url, self.token, retry_secs=0) as client:
            wait = self.interval
            while not self.hb_stop.wait(wait):
                try:
                    self._heard(client.heartbeat(retry=False))
                    wait = self.interval
                except Unauthorized as exc:
                    self._fatal("heartbeat", exc)
                    wait = self.interval
                except FleetError as exc:
                    log("heartbeat.failed", error=exc.message)
                    wait = min(self.interval, 1.0)  # try again soon: leases depend on it
                except Exception as exc:  # a bug must not end the heartbeats
                    log("heartbeat.failed", error=f"{type(exc).__name__}: {exc}")
                    wait = min(self.interval, 1.0)

    def _worker(self, n: int) -> None:
        backoff = 0.5
        with Client(self.s.api_url, self.token, retry_secs=0) as client:
            while not self.stopping.is_set():
                try:
                    claim = client.dequeue(self.s.dequeue_wait)
                except (Unauthorized, Forbidden) as exc:
                    self._fatal("dequeue", exc)
                    return
                except FleetError as exc:
                    log("dequeue.failed", worker=n, error=exc.message, retry_in=f"{backoff:g}s")
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                backoff = 0.5
                if claim is None:
                    continue
                self.run_task(claim)
                if self.s.one_job:
                    self.stopping.set()

    def _fatal(self, where: str, exc: FleetError) -> None:
        """The server no longer takes our token (re-registered elsewhere, or the database was reset)."""
        log("agent.token_rejected", where=where, error=exc.message, hint="restart to register again")
        self.exit_code = ExitCode.USAGE
        self.stopping.set()

    # ------------------------------------------------------------------ one task

    def run_task(self, claim: dict) -> None:
        """Run one claimed attempt to its end and settle it."""
        task, attempt = claim["task"], int(claim["attempt"])
        run = Run(task["task_id"], attempt, claim["task_token"])
        with self.lock:
            self.runs[run.task_id, run.attempt] = run
        try:
            with Client(self.s.api_url, run.token, retry_secs=0) as client:
                try:
                    self._run(run, task, claim, client)
                except Exception as exc:  # a bug must not leave the task hanging until its lease expires
                    log(
                        "task.internal_error",
                        task=run.task_id,
                        attempt=run.attempt,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                    self._settle(run, client, _failure(f"agent error: {type(exc).__name__}: {exc}"))
        finally:
            with self.lock:
                self.runs.pop((run.task_id, run.attempt), None)

    def _run(self, run: Run, task: dict, claim: dict, client: Client) -> None:
        s, tid = self.s, run.task_id
        ws = Path(workspace_path(str(s.workspace_root), tid, run.attempt))
        log("task.claimed", task=tid, attempt=run.attempt, workspace=ws)
        deadline = time.monotonic() + 30
        try:
            self._acknowledged("status", lambda: client.status(tid, attempt=run.attempt, status="running"), deadline)
        except (Conflict, InvalidTransition) as exc:  # cancelled or lost before it started
            log("task.not_started", task=tid, attempt=run.attempt, error=exc.message)
            return
        except FleetError as exc:  # not fatal: completing from 'assigned' is allowed
            log("status.failed", task=tid, attempt=run.attempt, error=exc.message)
        try:
            code = self._execute(run, task, ws, claim.get("prompt") or task.get("body") or "")
        except RemoteError as exc:  # the workspace or the wrapper could not be set up
            log("task.launch_failed", task=tid, attempt=run.attempt, error=exc.message)
            self._settle(run, client, _failure(f"cannot start {shlex.join(s.command)}: {exc.message}"))
            return
        if run.stop_reason not in (None, "shutdown"):  # the attempt is no longer ours: no receipt
            log("task.stopped", task=tid, attempt=run.attempt, reason=run.stop_reason, exit=code)
            return
        meta = ws / META
        err = _tail(meta / "stderr.log")
        if run.stop_reason == "shutdown":
            receipt = _failure("stopped: the agent was shutting down" + (f" (exit {code})" if code is not None else ""),
                               err)  # fmt: skip
        elif code is None:
            receipt = _failure("the run ended without an exit status (its process group was killed)", err)
        elif code in (126, 127):  # the shell could not run the command (settle_run reads these codes the same way)
            receipt = _failure(f"cannot start {shlex.join(s.command)} (exit {code})", err)
        elif code == 0:
            receipt = {"outcome": "success", "summary": _tail(meta / "stdout.log", lines=20) or "exit status 0",
                       "artifacts": []}  # fmt: skip
        elif code == RATE_LIMITED_EXIT:  # a usage limit: back to the queue, no retry used; this agent rests
            receipt = _rate_limited(meta, err)
        else:
            receipt = _failure(f"exit status {code}", err)
        self._settle(run, client, receipt)

    def _execute(self, run: Run, task: dict, ws: Path, prompt: str) -> int | None:
        """Launch the command through the run wrapper and wait for its end, stopping it when asked.

        Its exit status; None if it never started (stopped before the launch) or its wrapper vanished.
        ``RemoteError`` if it could not be launched.
        """
        s = self.s
        spec = LaunchSpec(task_id=run.task_id, attempt=run.attempt, workspace=str(ws), command=s.command,
                          prompt=prompt, prompt_mode=s.prompt_mode, env=self.task_env(task, run.attempt, run.token, ws),
                          output_cap_bytes=s.output_cap_bytes, report_end=False)  # fmt: skip
        if run.stop.is_set():
            return None
        pid = self.executor.launch(spec)
        log("task.started", task=run.task_id, attempt=run.attempt, pid=pid)
        code = self._wait(run, str(ws))
        log("task.exited", task=run.task_id, attempt=run.attempt, exit=code)
        return code

    def _wait(self, run: Run, ws: str) -> int | None:
        """Until the run in ``ws`` ends: its exit status, or None if its wrapper is gone without one."""
        killed, kill_at = False, 0.0
        next_probe = time.monotonic() + PROBE_EVERY_SECS
        while True:
            code = read_exit_status(ws)  # a file read: cheap enough to do often
            if code is not None:
                return code
            if run.stop.is_set() and not killed and time.monotonic() >= kill_at:
                try:
                    self.executor.kill(ws, self.s.kill_grace_secs)  # False: it ended or vanished meanwhile
                    killed = True
                except RemoteError as exc:
                    log("task.kill_failed", task=run.task_id, attempt=run.attempt, error=exc.message)
                    kill_at = time.monotonic() + PROBE_EVERY_SECS  # try again a little later
                next_probe = 0.0
            if time.monotonic() >= next_probe:
                try:
                    status = self.executor.probe(ws)
                except RemoteError as exc:
                    log("task.probe_failed", task=run.task_id, attempt=run.attempt, error=exc.message)
                else:
                    if status.ended:
                        return status.exit_code
                    if not status.alive:
                        return None
                next_probe = time.monotonic() + PROBE_EVERY_SECS
            if run.stop.is_set():
                time.sleep(0.1)
            else:
                run.stop.wait(0.1)

    def task_env(self, task: dict, attempt: int, token: str, ws: Path) -> dict[str, str]:
        """SPEC §8 item 5: a whitelist of our environment plus what the run needs to report, and no more."""
        extra = fleet_env(task, attempt, self.s.agent_id, token, str(ws), api_url=self.s.api_url)
        return run_env(os.environ, extra, fleetctl_on_path=True)

    def _settle(self, run: Run, client: Client, receipt: dict) -> None:
        """Hand in ``receipt`` unless the command already handed in one; repeat until acknowledged."""
        tid, attempt = run.task_id, run.attempt
        deadline = time.monotonic() + self.s.complete_retry_secs

        def settle() -> str:
            doc = client.task(tid)
            mine = next((a for a in doc.get("attempts", []) if a["attempt"] == attempt), None)
            if mine is None or mine["receipt"] is not None or mine["outcome"] is not None:
                return f"already:{(mine or {}).get('outcome') or doc['state']}"
            return client.complete(tid, receipt, attempt=attempt)["state"]

        try:
            result = self._acknowledged("complete", settle, deadline, task=tid, attempt=attempt)
        except (Conflict, NotFound) as exc:
            log("complete.lease_lost", task=tid, attempt=attempt, error=exc.message)
        except ValidationFailed as exc:
            log("complete.rejected", task=tid, attempt=attempt, error=exc.message)
        except Transient as exc:
            log("complete.gave_up", task=tid, attempt=attempt, error=exc.message,
                after=f"{self.s.complete_retry_secs:g}s")  # fmt: skip
        except FleetError as exc:
            log("complete.failed", task=tid, attempt=attempt, error=exc.message)
        else:
            if result.startswith("already:"):
                log("complete.by_command", task=tid, attempt=attempt, outcome=result.split(":", 1)[1])
            else:
                log("complete.ok", task=tid, attempt=attempt, outcome=receipt["outcome"], state=result)

    def _acknowledged(self, what: str, call: Callable[[], Any], deadline: float, **fields: object) -> Any:
        """``call()`` repeated through ``Transient`` failures (backoff ≤ 5 s) until ``deadline``."""
        delay = 0.25
        while True:
            try:
                return call()
            except Transient as exc:
                left = deadline - time.monotonic()
                if left <= 0 or self.aborting.is_set():  # out of time, or told twice to stop
                    raise
                log(f"{what}.retry", **fields, error=exc.message, retry_in=f"{min(delay, left):.2g}s")
                time.sleep(min(delay, left))
                delay = min(delay * 2, 5.0)

    # ------------------------------------------------------------------ main

    def on_signal(self, signum: int, frame: object) -> None:
        """First SIGTERM/SIGINT: drain. Second: stop the running commands too. (Only sets flags.)"""
        self.signals += 1
        self.stopping.set()
        if self.signals > 1:
            self.aborting.set()

    def run(self) -> int:
        s = self.s
        self.connect()
        hb = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        hb.start()  # first: nothing below may delay a heartbeat
        log("agent.started", agent=s.agent_id, api=s.api_url, concurrency=s.max_concurrency,
            heartbeat=f"{self.interval:g}s", workspaces=s.workspace_root, one_job=s.one_job or None)  # fmt: skip
        try:
            s.workspace_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise UsageError(f"cannot create the workspace root {s.workspace_root}: {exc.strerror}") from None
        workers = [threading.Thread(target=self._worker, args=(n,), name=f"worker-{n}", daemon=True)
                   for n in range(1 if s.one_job else s.max_concurrency)]  # fmt: skip
        for w in workers:
            w.start()
        announced = aborted = False
        while True:
            if self.stopping.is_set() and not announced:
                announced = True
                log("agent.stopping", running=len(self.runs), reason="signal" if self.signals else "done")
            if self.aborting.is_set() and not aborted:
                aborted = True
                with self.lock:
                    for run in self.runs.values():
                        run.request_stop("shutdown")
            with self.lock:
                busy = bool(self.runs)
            if self.stopping.is_set() and not busy:
                break
            if not any(w.is_alive() for w in workers) and not busy:
                break
            time.sleep(0.1)
        self.hb_stop.set()
        hb.join(timeout=5)
        self.executor.close()
        log("agent.stopped", agent=s.agent_id, exit=int(self.exit_code))
        return int(self.exit_code)


def run_agent(settings: AgentSettings) -> int:
    """Run the pull agent until it is told to stop (or, with ``one_job``, after one task); the exit code.

    Raises ``RemoteError`` (exit 5) if the server cannot be reached at start-up, ``UsageError`` (exit 2)
    for missing or refused credentials.
    """
    agent = PullAgent(settings)
    previous = {sig: signal.signal(sig, agent.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return agent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------- helpers


def stop_requests(reply: dict) -> list[tuple[str, int | None, str]]:
    """The runs a heartbeat reply tells the agent to stop: ``(task_id, attempt or None for any, reason)``.

    ``stop`` when the reply has it (malformed entries are skipped), else the ``cancelled`` task ids.
    """
    stops = reply.get("stop")
    if isinstance(stops, list):
        found = []
        for entry in stops:
            if not isinstance(entry, dict):
                continue
            task_id, attempt, reason = entry.get("task_id"), entry.get("attempt"), entry.get("reason")
            if isinstance(task_id, str) and isinstance(attempt, int) and not isinstance(attempt, bool):
                found.append((task_id, attempt, reason if isinstance(reason, str) and reason else "cancelled"))
        return found
    return [(t, None, "cancelled") for t in reply.get("cancelled") or () if isinstance(t, str)]


def _tail(path: Path, lines: int | None = None, limit: int = TAIL_BYTES) -> str:
    """The end of a log file (at most ``limit`` bytes, or its last ``lines`` lines), as text."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            text = fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:]) if lines else text


def _rate_limited(meta: Path, err: str) -> dict:
    """The receipt of a run that exited 75: ``rate_limited``, with the seconds the command wrote into
    ``.fleet/retry_after`` (whole seconds; anything else is ignored: the fleet's default cooldown applies)."""
    receipt: dict = {"outcome": "rate_limited", "summary": _failure(f"exit status {RATE_LIMITED_EXIT}", err)["summary"],
                     "artifacts": []}  # fmt: skip
    try:
        text = (meta / "retry_after").read_text(encoding="ascii", errors="replace")[:32].strip()
    except OSError:
        text = ""
    if text.isdigit():
        receipt["retry_after_secs"] = int(text)
    return receipt


def _failure(summary: str, log_text: str = "") -> dict:
    """A failure receipt; the tail of stderr goes along as a ``log`` artifact."""
    first = log_text.splitlines()[-1] if log_text else ""
    artifacts = [{"kind": "log", "text": log_text}] if log_text else []
    return {"outcome": "failure", "summary": f"{summary}: {first}" if first else summary, "artifacts": artifacts}
