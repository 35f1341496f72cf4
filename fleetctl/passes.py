"""The one-shot passes that systemd timers fire: ``dispatch`` and ``sweep-timeouts`` (SPEC §8).

Both are safe to overlap: each takes a non-blocking ``flock`` pass lock (released by the kernel even on
``kill -9``), and every write is a guarded transition, so even two passes that both got past the lock
could not assign a task twice or exceed an agent's ``max_concurrency`` — the conditional claim is the
real guard. Every decision is an event with its reason, and one ``key=value`` log line on stderr.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from fleetctl import services
from fleetctl.config import Config, HostConfig
from fleetctl.errors import ConfigError, FleetError, HostUnreachable, RemoteError
from fleetctl.log import log, quiet  # noqa: F401  (quiet: the demo silences the passes)
from fleetctl.matching import AgentSlot, QueuedTask, plan
from fleetctl.states import AgentMode, AgentStatus, FailureReason
from fleetctl.store import Store

if TYPE_CHECKING:
    from fleetctl.executors import Executor


# The executor, the prompt and secrets are imported where a launch or a sweep needs them: a dispatch
# pass with nothing to do is what a timer runs every few seconds (SPEC §11 start-up target).
@contextmanager
def pass_lock(db_path: Path, name: str) -> Iterator[bool]:
    """A non-blocking exclusive lock beside the database; yields False if another pass holds it."""
    path = Path(str(db_path) + f".{name}.lock")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


ExecutorFactory = Callable[[HostConfig], "Executor"]
T = TypeVar("T")


def default_executor(host: HostConfig) -> Executor:
    """The executor for a host: local subprocess, or SSH."""
    if host.is_local:
        from fleetctl.executors import LocalExecutor

        return LocalExecutor()
    from fleetctl.executors.ssh import SshExecutor  # only when an SSH host is used (fabric is slow to import)

    return SshExecutor(host)


class _PassExecutors:
    """The executors of one pass: one per host, made on first use by ``factory``, all closed by ``close``."""

    def __init__(self, factory: ExecutorFactory):
        self.factory = factory
        self.by_host: dict[str, Executor] = {}

    def __call__(self, host: HostConfig) -> Executor:
        if host.host_id not in self.by_host:
            self.by_host[host.host_id] = self.factory(host)
        return self.by_host[host.host_id]

    def close(self) -> None:
        for host_id, executor in self.by_host.items():
            try:
                executor.close()
            except Exception as exc:  # closing must not turn a finished pass into a failure
                log("executor.close_failed", host=host_id, error=f"{type(exc).__name__}: {exc}")


def _closing_executors(pass_fn: Callable[..., T]) -> Callable[..., T]:
    """Give a pass one executor per host through its ``executor_for`` and close them all when it ends (finally)."""

    @functools.wraps(pass_fn)
    def run(store: Store, cfg: Config, *, executor_for: ExecutorFactory = default_executor, **kwargs) -> T:
        executors = _PassExecutors(executor_for)
        try:
            return pass_fn(store, cfg, executor_for=executors, **kwargs)
        finally:
            executors.close()

    return run


# ---------------------------------------------------------------------------------------------- dispatch


@dataclass
class DispatchReport:
    """What one dispatch pass did."""

    skipped: str | None = None
    planned: list[dict] = field(default_factory=list)
    launched: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    skipped_down: list[dict] = field(default_factory=list)
    lost_races: int = 0
    queued_ready: int = 0
    outbox: dict | None = None
    budget: dict | None = None  # what a budget holds back: {"why", "blocked", "unblocked"} (None: nothing)

    def to_json(self) -> dict:
        return {"skipped": self.skipped, "planned": self.planned, "launched": self.launched, "failed": self.failed,
                "skipped_down": self.skipped_down, "lost_races": self.lost_races, "queued_ready": self.queued_ready,
                "outbox": self.outbox, "budget": self.budget}  # fmt: skip


@_closing_executors
def dispatch(
    store: Store,
    cfg: Config,
    *,
    dry_run: bool = False,
    limit: int | None = None,
    executor_for: ExecutorFactory = default_executor,
    now: Callable[[], float] = time.time,
) -> DispatchReport:
    """One dispatch pass: plan queued tasks onto online ssh_cli agents, claim each conditionally, launch."""
    report = DispatchReport()
    with pass_lock(store.path, "dispatch") as locked:
        if not locked:
            report.skipped = "another dispatch pass is running"
            log("dispatch.skipped", reason=report.skipped)
            return report
        t0 = now()
        if not dry_run:
            services.sync_config_agents(store, cfg, t0)
            _validate_pending(store, cfg, None, t0)
            _settle_reviews(store, cfg, t0)
            if cfg.budgets.any:
                report.budget = services.mark_blocked(store, cfg, t0)
                if report.budget is not None and (report.budget["blocked"] or report.budget["unblocked"]):
                    log("dispatch.budget", **report.budget)  # said once: when tasks are newly held back or freed
        with store.read():
            down = store.down_hosts()
        for host_id, row in down.items():
            log("host.skipped", host=host_id, reason="down", since=round(row["since"]), error=row["error"])
        usable = {h.host_id for h in cfg.hosts if h.host_id not in down}
        # a dry run registers nothing: it plans on the agents as the config would make them (sync_config_agents)
        pairs, slots = plan_dispatch(store, t0, limit, hosts=usable, configured=cfg if dry_run else None,
                                     limits_cfg=cfg)  # fmt: skip
        report.queued_ready = store.count_ready(t0)
        by_agent = {s.agent_id: s for s in slots}
        specs = {spec.agent_id: (host, spec) for host, spec in cfg.agent_specs()}
        for task_id, agent_id in pairs:
            report.planned.append({"task_id": task_id, "agent_id": agent_id})
            if dry_run:
                continue
            host, spec = specs[agent_id]
            if host.host_id in down:  # it went down earlier in this pass: no more claims for it
                report.skipped_down.append({"task_id": task_id, "agent_id": agent_id, "host_id": host.host_id})
                continue
            slot = by_agent[agent_id]
            agent = {"agent_id": agent_id, "capabilities": slot.capabilities, "max_concurrency": spec.max_concurrency}
            try:
                claim = services.claim_task(store, cfg, agent, task_id=task_id, host_id=host.host_id, now=now())
            except ConfigError as exc:  # the prompt template (config check refuses it first); attempt released
                report.failed.append({"task_id": task_id, "agent_id": agent_id, "ok": False, "error": exc.message})
                log("task.launch_failed", task=task_id, agent=agent_id, error=exc.message)
                continue
            if claim is None:
                report.lost_races += 1
                log("dispatch.lost_race", task=task_id, agent=agent_id)
                continue
            log("task.assigned", task=task_id, agent=agent_id, attempt=claim.attempt, host=host.host_id)
            outcome = launch(store, cfg, host, spec.agent_type, claim, executor_for(host), now)
            (report.launched if outcome.get("ok") else report.failed).append(outcome)
            if outcome.get("host_down"):
                down[host.host_id] = {"since": now(), "error": outcome["error"]}
    if not dry_run:  # after the pass lock: a slow Forgejo never holds up the next dispatch
        report.outbox = flush_outbox(store, cfg, now)
    return report


def _settle_reviews(store: Store, cfg: Config, t: float) -> None:
    """Pending "changes requested" become rework attempts once their comments are read (``services.reviews``),
    and pending ``/fleet`` comment commands are carried out (``services.commands``): before planning, so what
    they queue is dispatched in the same pass. Only with Forgejo's API at hand (and, for commands, with
    ``comment_commands`` on: a timer's pass without them imports nothing more). A failure is logged, never the
    pass's."""
    if not cfg.forgejo.api_ready:
        return
    from fleetctl.services.reviews import settle_pending

    steps = [(settle_pending, "review")]
    if cfg.forgejo.comment_commands:
        from fleetctl.services.commands import process_pending

        steps.append((process_pending, "command"))
    for step, name in steps:
        try:
            step(store, cfg, now=t)
        except FleetError as exc:
            log(f"{name}.pass_failed", error=exc.message)


def flush_outbox(store: Store, cfg: Config, now: Callable[[], float] = time.time) -> dict:
    """Flush the outbox at the end of a pass (``fleetctl.outbox.flush``); its report as JSON.

    A failure to flush (the store busy, a bug) is logged and reported, never the pass's failure: the
    rows wait in the outbox for the next pass.
    """
    from fleetctl.outbox import flush  # a pass with nothing to flush should not pay for more imports

    try:
        return flush(store, cfg, now=now).to_json()
    except Exception as exc:
        error = exc.message if isinstance(exc, FleetError) else f"{type(exc).__name__}: {exc}"
        log("outbox.flush_failed", error=error)
        return {"error": error}


def plan_dispatch(
    store: Store,
    ts: float,
    limit: int | None = None,
    hosts: set[str] | None = None,
    configured: Config | None = None,
    limits_cfg: Config | None = None,
) -> tuple[list[tuple[str, str]], list[AgentSlot]]:
    """Read the queue and the ssh_cli agents with free capacity (on ``hosts``, if given; not cooling down), and
    plan (no writes).

    With ``configured``, the agents are those of that config as the next real pass would register them
    (new ones included, removed ones gone, capabilities and limits from the config; a drained one stays
    out): what ``dispatch --dry-run`` shows before any pass has registered them. The fleet's limits of
    ``limits_cfg`` (else ``configured``) are kept as the claims keep them: tasks a budget holds back are left
    out, and a repository at its ``max_active_per_repo`` gets no more (so its tasks never take the slot that
    another repository's task could use).
    """
    with store.read():
        if configured is None:
            agents = store.agents(status=AgentStatus.ONLINE.value, mode=AgentMode.SSH_CLI.value)
        else:
            known = {a["agent_id"]: a for a in store.agents()}
            agents = [
                {"agent_id": spec.agent_id, "capabilities": spec.capabilities, "max_concurrency": spec.max_concurrency,
                 "host_id": host.host_id, **{k: (known.get(spec.agent_id) or {}).get(k)
                                             for k in ("last_assigned_at", "cooldown_until")}}
                for host, spec in configured.agent_specs()
                if (known.get(spec.agent_id) or {}).get("status") != AgentStatus.DRAINING.value
            ]  # fmt: skip
        if hosts is not None:
            agents = [a for a in agents if a["host_id"] in hosts]
        # an agent cooling down after a usage limit takes nothing (the claim refuses it too)
        agents = [a for a in agents if not (a.get("cooldown_until") and a["cooldown_until"] > ts)]
        running = store.running_counts()
        slots = [
            AgentSlot(
                a["agent_id"],
                frozenset(a["capabilities"]),
                a["max_concurrency"],
                running.get(a["agent_id"], 0),
                a["last_assigned_at"] or 0.0,
            )  # fmt: skip
            for a in agents
        ]
        if not any(s.free > 0 for s in slots):
            return [], slots
        cfg = limits_cfg or configured
        held = services.blocking(store, cfg, ts) if cfg is not None else None
        if held is not None and held.fleet:
            return [], slots  # the fleet's day budget is spent: nothing starts
        tasks = [QueuedTask(task_id, tuple(reqs), (repo or "").lower() or None)
                 for task_id, reqs, repo, spent in store.ready_tasks(ts)
                 if held is None or held.why({"repo": repo, "spent_usd": spent}) is None]  # fmt: skip
        room = _repo_room(store, cfg, tasks) if cfg is not None else None
    pairs = plan(tasks, [AgentSlot(s.agent_id, s.capabilities, s.max_concurrency, s.running, s.idle_since)
                         for s in slots], now=ts, room=room)  # fmt: skip
    return (pairs[:limit] if limit is not None else pairs), slots


def _repo_room(store: Store, cfg: Config, tasks: list[QueuedTask]) -> dict[str, int] | None:
    """How many more tasks each capped repository among ``tasks`` may start (``max_active_per_repo``: its own,
    else the default), or None when no cap is configured."""
    fj = cfg.forgejo
    if fj.max_active_per_repo is None and not any(v.get("max_active_per_repo") for v in fj.repository.values()):
        return None
    active = store.active_by_repo()
    caps = {g: fj.repo_cap(g) for g in {t.group for t in tasks if t.group}}
    return {g: cap - active.get(g, 0) for g, cap in caps.items() if cap is not None}


def launch(store: Store, cfg: Config, host: HostConfig, agent_type: str, claim: services.Claim,
           executor: Executor, now: Callable[[], float]) -> dict:  # fmt: skip
    """Start a claimed attempt; on confirmed start → running, on failure → attempt fails ``launch_failed``."""
    from fleetctl.executors import LaunchSpec, run_env, workspace_path

    orch = cfg.orchestrator
    task, token, prompt = claim.task, claim.token, claim.prompt
    task_id, attempt, agent_id = task["task_id"], task["attempt"], task["agent_id"]
    ws = workspace_path(host.work_dir, task_id, attempt)
    result = {"task_id": task_id, "attempt": attempt, "agent_id": agent_id, "host_id": host.host_id, "workspace": ws}
    try:
        atype = cfg.agent_types.get(agent_type)
        if atype is None:
            raise ConfigError(f"agent type {agent_type!r} is not configured ([agent_types.{agent_type}])")
        # a local run inherits the whitelisted basics of this process; a run on an SSH host gets its login's
        # own HOME, USER, PATH… there (LOGIN_ENV in executors/ssh.py), never this machine's
        env = run_env(os.environ if host.is_local else {}, {**dict(atype.env), **task_env(cfg, task, token, ws, host)},
                      fleetctl_on_path=host.is_local)  # fmt: skip
        spec = LaunchSpec(task_id=task_id, attempt=attempt, workspace=ws, command=tuple(atype.command),
                          prompt=prompt, prompt_mode=atype.prompt, env=env,
                          output_cap_bytes=orch.output_cap_bytes)  # fmt: skip
        pid = executor.launch(spec)
    except FleetError as exc:
        services.fail_attempt(store, orch, task_id, FailureReason.LAUNCH_FAILED, exc.message, attempt=attempt,
                              agent_id=agent_id, now=now())  # fmt: skip
        log("task.launch_failed", task=task_id, attempt=attempt, error=exc.message)
        if isinstance(exc, HostUnreachable):
            if services.mark_host_down(store, host.host_id, exc.message, now=now()):
                log("host.down", host=host.host_id, error=exc.message)
            return {**result, "ok": False, "error": exc.message, "host_down": True}
        return {**result, "ok": False, "error": exc.message}
    try:
        services.start_task(store, task_id, agent_id=agent_id, attempt=attempt, workspace=ws, now=now())
    except FleetError:
        pass  # the run already handed in its receipt (or was cancelled): nothing to mark
    log("task.started", task=task_id, attempt=attempt, pid=pid, workspace=ws)
    return {**result, "ok": True, "pid": pid}


def task_env(cfg: Config, task: dict, token: str, ws: str, host: HostConfig) -> dict[str, str]:
    """SPEC §8 item 5: what a run needs to know and to report (``executors.fleet_env``, the same variables a
    pull agent's run gets) — never the Forgejo admin token; on a local host also how to reach this database."""
    from fleetctl.executors import fleet_env

    # server.public_url is for runs elsewhere; a local run reports straight into the database (below)
    api_url = os.environ.get("FLEET_API_URL") or (None if host.is_local else cfg.server.public_url)
    env = fleet_env(task, task["attempt"], task["agent_id"], token, ws, api_url=api_url)
    if host.is_local:
        # a local run reports straight into this database with this fleetctl
        env["FLEET_DB_PATH"] = str(cfg.orchestrator.db_path)
        if cfg.path is not None:
            env["FLEET_CONFIG"] = str(cfg.path)
        env["FLEET_PYTHON"] = sys.executable
    return env


# ---------------------------------------------------------------------------------------------- sweep


@dataclass
class SweepReport:
    """What one sweep pass did."""

    skipped: str | None = None
    actions: list[dict] = field(default_factory=list)
    backoff_released: int = 0
    outbox: dict | None = None

    def add(self, action: str, **fields: object) -> None:
        self.actions.append({"action": action, **fields})
        log(action, **fields)

    def to_json(self) -> dict:
        return {"skipped": self.skipped, "actions": self.actions, "backoff_released": self.backoff_released,
                "outbox": self.outbox}  # fmt: skip


@_closing_executors
def sweep(
    store: Store,
    cfg: Config,
    *,
    executor_for: ExecutorFactory = default_executor,
    now: Callable[[], float] = time.time,
) -> SweepReport:
    """One sweep: lost agents, hard timeouts, ended or dead runs, expired leases, released backoff, and the
    workspaces of attempts settled longer ago than ``orchestrator.workspace_retention_secs``."""
    report = SweepReport()
    with pass_lock(store.path, "sweep") as locked:
        if not locked:
            report.skipped = "another sweep pass is running"
            log("sweep.skipped", reason=report.skipped)
            return report
        t = now()
        link = services.ForgejoLink(cfg)  # one Forgejo client per pass, made only if a receipt needs it
        hosts = {h.host_id: h for h in cfg.hosts}
        executors: dict[str, Executor] = {}

        def executor(host: HostConfig) -> Executor:
            if host.host_id not in executors:
                executors[host.host_id] = executor_for(host)
            return executors[host.host_id]

        try:
            report.actions += _validate_pending(store, cfg, link, t)
            _settle_reviews(store, cfg, t)
            if cfg.budgets.any:
                services.mark_blocked(store, cfg, t)
            _sweep_agents(store, cfg, report, t)
            down = _check_down_hosts(store, cfg, report, hosts, executor, now)
            for att in store.open_attempts():
                t = now()
                host = hosts.get(att["host_id"]) if att["agent_mode"] == AgentMode.SSH_CLI else None
                if host is not None and host.host_id in down:
                    continue  # its attempts wait (and fail agent_lost past the threshold: _check_down_hosts)
                try:
                    _sweep_attempt(store, cfg, report, att, host, executor(host) if host else None, t, link)
                except HostUnreachable as exc:
                    if services.mark_host_down(store, host.host_id, exc.message, now=now()):
                        report.add("host.down", host=host.host_id, error=exc.message)
                    down.add(host.host_id)
        finally:
            link.close()
        _stop_cancelled_runs(store, cfg, report, {k: v for k, v in hosts.items() if k not in down}, executor, now())
        report.backoff_released = store.count_backoff_released(now())
        _prune_deliveries(store, cfg, report, now())
        _clean_workspaces(store, cfg, report, {k: v for k, v in hosts.items() if k not in down}, executor, now)
    report.outbox = flush_outbox(store, cfg, now)
    return report


def _prune_deliveries(store: Store, cfg: Config, report: SweepReport, t: float) -> None:
    """Forget webhook deliveries past ``forgejo.delivery_retention_secs`` (a bounded batch per pass)."""
    keep = cfg.forgejo.delivery_retention_secs
    if keep and (removed := store.prune_deliveries(t - keep)):
        report.add("deliveries.pruned", removed=removed, older_than_secs=round(keep))


CLEAN_BATCH = 20
"""How many workspaces one sweep pass looks at, at most (each is one ``rm -rf`` of a worktree, or one
refusal). The sweep runs every 30 s, so 20 a pass is 2,400 an hour: far more attempts than a fleet
settles, so a backlog drains (even turning retention on over months of history takes hours, not days),
while one pass stays short: 20 removals of a worktree with its build output take seconds."""

CLEAN_BUDGET_SECS = 60.0
"""Once the cleanup of one pass has taken this long it starts no more removals (the next pass goes on
where it stopped): a host that hangs, or an enormous tree, holds a pass up by at most this plus one
removal's timeout, inside the sweep unit's ``TimeoutStartSec``."""

CLEAN_CURSOR = "workspace_cleanup_cursor"
"""``meta`` key: the ``[ended_at, task_id, attempt]`` of the last workspace the cleanup looked at."""


def _clean_workspaces(store: Store, cfg: Config, report: SweepReport, hosts: dict[str, HostConfig],
                      executor: Callable[[HostConfig], Executor], now: Callable[[], float]) -> None:  # fmt: skip
    """Remove the workspaces of attempts settled more than ``orchestrator.workspace_retention_secs`` ago (0
    keeps them all), oldest first, at most ``CLEAN_BATCH`` a pass, on ``hosts`` (configured and up: the
    attempts of pull agents have no host and are not ours to clean). A workspace whose run still lives is
    kept (``remove`` refuses) and looked at again next round; an unreachable host is marked down."""
    keep = cfg.orchestrator.workspace_retention_secs
    if not keep or not hosts:
        return
    deadline = time.monotonic() + CLEAN_BUDGET_SECS
    last = None
    for row in _cleanup_batch(store, now() - keep, sorted(hosts)):
        if time.monotonic() > deadline:
            log("workspace.cleanup_paused", why=f"{CLEAN_BUDGET_SECS:g}s spent in this pass")
            break
        last = row
        host = hosts.get(row["host_id"])
        if host is not None and not _clean_workspace(store, report, row, host, executor(host), now):
            hosts = {k: v for k, v in hosts.items() if k != host.host_id}  # down: not again in this pass
    if last is not None:
        store.set_meta(CLEAN_CURSOR, json.dumps([last["ended_at"], last["task_id"], last["attempt"]]))


def _clean_workspace(store: Store, report: SweepReport, row: dict, host: HostConfig, executor: Executor,
                     now: Callable[[], float]) -> bool:  # fmt: skip
    """Remove one settled attempt's workspace and record it; False if its host turned out to be unreachable."""
    task_id, attempt, ws = row["task_id"], row["attempt"], row["workspace"]
    ids = {"task": task_id, "attempt": attempt, "host": host.host_id}
    # the executor proves the path is a workspace; this keeps out the path of another attempt
    if Path(ws).name != str(attempt) or Path(ws).parent.name != task_id:
        log("workspace.remove_failed", **ids, error=f"{ws} is not this attempt's {{work_dir}}/{{task_id}}/{{attempt}}")
        return True
    try:
        gone = executor.remove(ws)
    except HostUnreachable as exc:
        if services.mark_host_down(store, host.host_id, exc.message, now=now()):
            report.add("host.down", host=host.host_id, error=exc.message)
        return False
    except RemoteError as exc:
        log("workspace.remove_failed", **ids, error=exc.message)
        return True
    if not gone:
        log("workspace.kept", **ids, why="its run is still alive")
    elif services.workspace_cleaned(store, task_id, attempt, now=now()):
        report.add("workspace.cleaned", **ids, workspace=ws)
    return True


def _cleanup_batch(store: Store, ended_before: float, host_ids: list[str]) -> list[dict]:
    """The next ``CLEAN_BATCH`` workspaces to clean: on from where the last pass stopped (``CLEAN_CURSOR``),
    oldest first, wrapping around to the oldest at the end. Workspaces that stay (a run still alive, a
    refusal) are looked at once a round and never hold up the ones behind them."""
    try:
        ended_at, task_id, attempt = json.loads(store.meta(CLEAN_CURSOR) or "")
        after: tuple | None = (float(ended_at), str(task_id), int(attempt))
    except (ValueError, TypeError):  # none yet (or not one of ours): from the oldest
        after = None
    rows = store.workspaces_to_clean(ended_before, CLEAN_BATCH, hosts=host_ids, after=after)
    if len(rows) < CLEAN_BATCH and after is not None:  # the end of a round: on from the oldest
        seen = {(r["task_id"], r["attempt"]) for r in rows}
        rows += [r for r in store.workspaces_to_clean(ended_before, CLEAN_BATCH - len(rows), hosts=host_ids)
                 if (r["task_id"], r["attempt"]) not in seen]  # fmt: skip
    return rows


def _check_down_hosts(store: Store, cfg: Config, report: SweepReport, hosts: dict[str, HostConfig],
                      executor: Callable[[HostConfig], Executor], now: Callable[[], float]) -> set[str]:  # fmt: skip
    """Try each host marked down once (one login, bounded by its ``connect_timeout_secs``): up again → event;
    still down past the heartbeat threshold → its open attempts fail ``agent_lost``. The hosts still down."""
    still_down = set()
    for host_id, row in store.down_hosts().items():
        host = hosts.get(host_id)
        if host is None:  # no longer configured: nothing to reach; its attempts go by leases (started: timeouts)
            continue
        try:
            executor(host).check()
        except RemoteError as exc:
            still_down.add(host_id)
            log("host.still_down", host=host_id, error=exc.message)
            for lost in services.lose_attempts_of_down_host(store, cfg.orchestrator, host_id, row, now=now()):
                report.add("task.agent_lost", **lost, host=host_id)
            continue
        if services.mark_host_up(store, host_id, now=now()):
            report.add("host.up", host=host_id, down_secs=round(now() - row["since"]))
    return still_down


def _stop_cancelled_runs(store: Store, cfg: Config, report: SweepReport, hosts: dict[str, HostConfig],
                         executor: Callable[[HostConfig], Executor], t: float) -> None:  # fmt: skip
    """Kill the runs of attempts that were cancelled, or lost with their host, while running on a host
    (their process may live on)."""
    orch = cfg.orchestrator
    longest = max([orch.task_timeout_secs, *(a.timeout_secs or 0 for a in cfg.agent_types.values())])
    window = 2 * longest + orch.heartbeat_interval_secs * orch.heartbeat_timeout_threshold
    for run in store.runs_to_stop_since(t - window):
        task_id, attempt, agent_id, host_id, ws = (run[k] for k in ("task_id", "attempt", "agent_id", "host_id",
                                                                    "workspace"))  # fmt: skip
        host = hosts.get(host_id)
        if host is None:
            continue
        why = "cancelled" if run["outcome"] == "cancelled" else run["failure_reason"]
        try:
            if executor(host).kill(ws):
                report.add("task.run_killed", task=task_id, attempt=attempt, agent=agent_id, why=why)
        except HostUnreachable as exc:
            log("task.kill_failed", task=task_id, attempt=attempt, error=exc.message)
            hosts = {k: v for k, v in hosts.items() if k != host_id}  # not again in this pass
        except RemoteError as exc:
            log("task.kill_failed", task=task_id, attempt=attempt, error=exc.message)


def _validate_pending(store: Store, cfg: Config, link: services.ForgejoLink | None, t: float) -> list[dict]:
    """Pending receipts validated now that a pass runs (SPEC §7.4); a failure here never fails the pass."""
    try:
        return services.validate_pending(store, cfg, link, now=t)
    except FleetError as exc:
        log("receipts.pending_failed", error=exc.message)
        return []


def _sweep_agents(store: Store, cfg: Config, report: SweepReport, t: float) -> None:
    orch = cfg.orchestrator
    limit = orch.heartbeat_interval_secs * orch.heartbeat_timeout_threshold
    for agent in store.agents(status=AgentStatus.ONLINE.value, mode=AgentMode.HTTP_PULL.value):
        seen = agent["last_heartbeat_at"] or agent["registered_at"]
        if t - seen > limit:
            services.set_agent_status(store, orch, agent["agent_id"], AgentStatus.OFFLINE,
                                      f"no heartbeat for {t - seen:.0f}s", now=t)  # fmt: skip
            report.add("agent.offline", agent=agent["agent_id"], silent_secs=round(t - seen))


def _sweep_attempt(store: Store, cfg: Config, report: SweepReport, att: dict, host: HostConfig | None,
                   executor: Executor | None, t: float, link: services.ForgejoLink | None = None) -> None:  # fmt: skip
    from fleetctl.executors import workspace_path

    if att.get("receipt_pending"):  # it handed in a receipt that waits for Forgejo: no timeout, no lease expiry
        return
    orch = cfg.orchestrator
    task = {"task_id": att["task_id"], "attempt": att["attempt"], "agent_id": att["agent_id"]}
    ids = {"task": att["task_id"], "attempt": att["attempt"], "agent": att["agent_id"]}
    atype = cfg.agent_types.get(att.get("agent_type") or "")
    timeout = att["timeout_secs"] or (atype.timeout_secs if atype else None) or orch.task_timeout_secs
    ws = att["workspace"] or (workspace_path(host.work_dir, att["task_id"], att["attempt"]) if host else None)
    if t - att["attempt_started_at"] > timeout:
        killed = False
        if executor is not None and ws:
            try:
                killed = executor.kill(ws)
            except HostUnreachable:
                raise  # the host is marked down; the attempt waits for it (agent_lost past the threshold)
            except RemoteError as exc:
                log("task.kill_failed", **ids, error=exc.message)
        if services.expire_or_time_out(store, orch, task, FailureReason.TIMEOUT,
                                       f"over the {timeout:.0f}s timeout" + ("; run killed" if killed else ""), now=t):  # fmt: skip
            report.add("task.timeout", **ids, killed=killed)
        return
    if executor is None or host is None:  # a pull agent's attempt: only its lease matters
        if att["agent_mode"] == AgentMode.SSH_CLI and att["task_state"] == "running":
            return  # its host left the config: nothing renews an SSH run's lease; it reports, or times out
        if att["lease_expires_at"] is not None and t > att["lease_expires_at"]:
            if services.expire_or_time_out(store, orch, task, FailureReason.AGENT_LOST, "lease expired", now=t):
                report.add("task.lease_expired", **ids)
        return
    try:
        status = executor.probe(ws)
    except HostUnreachable:
        raise  # the host is marked down by the caller
    except RemoteError as exc:
        log("task.probe_failed", **ids, host=host.host_id, error=exc.message)
        return
    if status.ended:
        settled = services.settle_ended_run(store, cfg, att["task_id"], att["attempt"], status.exit_code,
                                            status.stderr_tail[-500:], link=link, now=t,
                                            retry_after=status.extra.get("retry_after"))  # fmt: skip
        if settled:
            report.add("task.run_ended", **ids, exit_code=status.exit_code, state=settled["state"])
    elif status.vanished:
        if services.expire_or_time_out(store, orch, task, FailureReason.AGENT_ERROR,
                                       f"the run (pid {status.pid}) is gone without an exit status", now=t):  # fmt: skip
            report.add("task.run_vanished", **ids, pid=status.pid)
    elif att["task_state"] == "assigned":
        if status.alive:  # launched, but the dispatch that launched it died before saying so
            try:
                services.start_task(store, att["task_id"], agent_id=att["agent_id"], attempt=att["attempt"],
                                    workspace=ws, now=t)  # fmt: skip
                report.add("task.started", **ids, pid=status.pid)
            except FleetError:
                pass
        elif att["lease_expires_at"] is not None and t > att["lease_expires_at"]:
            if services.expire_or_time_out(store, orch, task, FailureReason.LAUNCH_FAILED,
                                           "assigned but never started", now=t):  # fmt: skip
                report.add("task.launch_failed", **ids)
