"""``fleetctl demo``: the main job end to end on the embedded default, in a throwaway directory.

It creates a handful of tasks with different requirements, lets the real ``dispatch`` and
``sweep-timeouts`` passes run them on local example agents (real detached processes that do real work
in per-task workspaces and hand in receipts with ``fleetctl task complete``), and returns the timeline.
One task fails its first attempt and is retried; one has no capable agent and is cancelled at the end;
one exits without a receipt and, with no retries left, fails. The demo never reads a configured fleet:
its database, workspaces and config live in its own directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from fleetctl import passes, services
from fleetctl.config import AgentSpec, Config, embedded_default
from fleetctl.states import TERMINAL, TaskState
from fleetctl.store import Store

DEMO_TASKS = (
    ("Summarise the onboarding guide", ["agent:docs"], "Read docs/onboarding.md and write a summary.\nsleep: 0.6"),
    ("Fix the flaky date parser", ["agent:code:python", "bug"],
     "The parser fails on leap days; fix it and add a test.\nfail-attempts: 1\nsleep: 0.4"),
    ("Refactor the config loader", ["agent:code:python", "priority:5"],
     "Split validation from parsing.\nsleep: 1.0"),
    ("Port the CLI to Rust", ["agent:code:rust"], "Nobody here speaks Rust: no agent will take this."),
    ("Draft the release notes", ["agent:docs", "retries:0"],
     "Collect merged changes.\nno-receipt\nsleep: 0.3"),
    ("Review the test suite", ["agent:review"], "Look for tests that assert nothing.\nsleep: 0.8"),
)  # fmt: skip


@dataclass
class DemoResult:
    """What the demo did, for rendering."""

    directory: Path
    tasks: list[dict]
    events: list[dict]
    check_ok: bool
    check_problems: list[str]
    seconds: float
    passes: int


def demo_config(directory: Path) -> Config:
    """The embedded default, pointed at ``directory``, with two local example agents and quick retries."""
    cfg = embedded_default({"FLEETCTL_HOME": str(directory)})
    host = cfg.hosts[0]
    agents = (
        AgentSpec(agent_type="example", agent_id="local.coder", max_concurrency=2,
                  capabilities=("code:python", "docs")),
        AgentSpec(agent_type="example", agent_id="local.reviewer", max_concurrency=1,
                  capabilities=("docs", "review")),
    )  # fmt: skip
    orch = replace(cfg.orchestrator, db_path=directory / "fleet.db", retry_backoff_secs=0.5,
                   retry_backoff_max_secs=1.0, task_timeout_secs=60, lease_secs=60)  # fmt: skip
    return replace(cfg, orchestrator=orch, hosts=(replace(host, work_dir=str(directory / "workspace"),
                                                          agents=agents),))  # fmt: skip


def run_demo(
    directory: Path,
    *,
    on_tick: Callable[[list[dict]], None] = lambda tasks: None,
    timeout_secs: float = 60.0,
    tick_secs: float = 0.25,
) -> DemoResult:
    """Run the demo in ``directory`` (which must be empty or not exist) and return its result."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(directory)
    start = time.monotonic()
    rounds = 0
    with Store.open(cfg.orchestrator.db_path) as store, passes.quiet():
        for title, labels, body in DEMO_TASKS:
            services.create_task(store, cfg.orchestrator, title=title, body=body, labels=labels)
        while time.monotonic() - start < timeout_secs:
            passes.dispatch(store, cfg)
            passes.sweep(store, cfg)
            rounds += 1
            tasks = store.tasks()
            on_tick(tasks)
            if _settled(tasks):
                break
            time.sleep(tick_secs)
        for task in store.tasks(states=(TaskState.QUEUED.value,)):
            services.cancel_task(store, task["task_id"], "demo over: no capable agent took it")
        tasks = store.tasks()
        on_tick(tasks)
        report = store.check()
        events = store.events()
    return DemoResult(directory, tasks, events, report.ok, report.problems, time.monotonic() - start, rounds)


def _settled(tasks: list[dict]) -> bool:
    """Everything is terminal, or only tasks that no agent can take are left."""
    for t in tasks:
        if t["state"] in TERMINAL:
            continue
        if t["state"] == TaskState.QUEUED and "code:rust" in t["requirements"]:
            continue
        return False
    return True
