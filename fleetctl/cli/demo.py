"""``fleetctl demo``: watch the fleet do its job on the embedded default, in a throwaway directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from fleetctl.cli._common import JsonOpt, cli_errors, print_json, stderr_console, stdout_console
from fleetctl.errors import UsageError


@cli_errors
def demo(
    dir_: Annotated[
        Path | None,
        typer.Option("--dir", help="Run in this (new or empty) directory and keep it; default: a temporary one."),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Run the main job end to end on local example agents and print the timeline.

    Creates tasks with different requirements, dispatches them with the real passes to two local
    example agents (detached processes that hand in receipts with `fleetctl task complete`), retries a
    failed attempt, cancels what no agent can take, then checks the store. Never touches a configured
    fleet's database.

    Example: fleetctl demo --dir ./fleet-demo
    """
    from fleetctl import services
    from fleetctl.demo import run_demo

    if dir_ is not None and dir_.exists() and (not dir_.is_dir() or any(dir_.iterdir())):
        raise UsageError(f"--dir {dir_} must be a new or empty directory")
    keep = dir_ is not None
    directory = dir_.absolute() if keep else Path(tempfile.mkdtemp(prefix="fleetctl-demo-"))
    try:
        if json_:
            result = run_demo(directory)
        else:
            result = _run_live(directory)
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
    if json_:
        print_json({
            "directory": str(directory) if keep else None, "check_ok": result.check_ok, "seconds": round(result.seconds, 2),
            "tasks": [services.task_view(t) for t in result.tasks],
            "events": [services.event_view(e) for e in result.events],
        })  # fmt: skip
    else:
        _render_result(result, keep)
    if not result.check_ok:
        raise typer.Exit(1)


def _short_names(tasks: list[dict]) -> dict[str, str]:
    return {t["task_id"]: f"T{i}" for i, t in enumerate(sorted(tasks, key=lambda t: t["seq"]), 1)}


def _task_table(tasks: list[dict]):
    from rich.table import Table

    from fleetctl.cli.render import styled_state

    names = _short_names(tasks)
    table = Table(title="fleet", header_style="bold", box=None, pad_edge=False)
    for col in ("", "title", "needs", "state", "try", "agent"):
        table.add_column(col, no_wrap=col != "title")
    for t in sorted(tasks, key=lambda t: t["seq"]):
        table.add_row(names[t["task_id"]], t["title"], ", ".join(t["requirements"]), styled_state(t["state"]),
                      f"{t['attempt']}/{t['max_attempts']}", t["agent_id"] or "")  # fmt: skip
    return table


def _run_live(directory: Path):
    from rich.live import Live

    from fleetctl.demo import demo_config, run_demo

    console = stdout_console()
    stderr_console().print(f"[dim]demo directory: {directory}[/dim]")
    agents = "; ".join(f"{a.agent_id} ({', '.join(a.capabilities)}; {a.max_concurrency} at a time)"
                       for _, a in demo_config(directory).agent_specs())  # fmt: skip
    console.print(f"local example agents: {agents}")
    with Live(_task_table([]), console=console, refresh_per_second=8, transient=False) as live:
        return run_demo(directory, on_tick=lambda tasks: live.update(_task_table(tasks)))


def _render_result(result, keep: bool) -> None:
    from rich.table import Table

    from fleetctl.cli.render import describe_event

    console = stdout_console()
    console.print()
    names = _short_names(result.tasks)
    start = result.events[0]["ts"] if result.events else 0
    timeline = Table(title="timeline", header_style="bold", box=None, pad_edge=False)
    for col in ("t+s", "", "event", "detail"):
        timeline.add_column(col, no_wrap=col != "detail")
    for ev in result.events:
        if ev["type"] in ("task.progress", "agent.registered"):
            continue
        detail = describe_event(ev, short=True)
        if ev["type"] == "task.assigned" or ev["type"] == "task.started":
            detail = f"{ev['agent_id']} (attempt {ev['attempt']})"
        timeline.add_row(f"{ev['ts'] - start:5.1f}", names.get(ev["task_id"] or "", ev["agent_id"] or ""),
                         ev["type"].split(".", 1)[1], detail)  # fmt: skip
    console.print(timeline)
    states: dict[str, int] = {}
    for t in result.tasks:
        states[t["state"]] = states.get(t["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    verdict = "[green]ok[/green]" if result.check_ok else "[red]FAILED[/red]: " + "; ".join(result.check_problems[:3])
    console.print(
        f"{len(result.tasks)} tasks in {result.seconds:.1f}s ({result.passes} dispatch+sweep passes): {summary}"
    )
    console.print("T2 crashed once and was retried; T4 needs code:rust, which no agent has; T5 exited without a "
                  "receipt and had no retries left (label retries:0).")  # fmt: skip
    console.print(f"db check (replay {len(result.events)} events, compare projections): {verdict}")
    if keep:
        console.print(
            f"kept in {result.directory}; look around with: FLEET_DB_PATH={result.directory}/fleet.db fleetctl task list"
        )
