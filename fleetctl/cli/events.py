"""``fleetctl events``: the event log."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from fleetctl.cli._common import ConfigOpt, cli_errors, load, open_store


@cli_errors
def events(
    task: Annotated[str | None, typer.Option("--task", help="Only this task's events.")] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent's events.")] = None,
    type_: Annotated[list[str] | None, typer.Option("--type", help="Event type, or prefix like 'task.*'.")] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only newer than this: seconds/minutes/hours ago (30s, 5m, 2h) or ISO time."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="The last N events (0: all).", min=0)] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events until interrupted.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="JSON lines, one event per line.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Print the event log, filtered; --follow tails it.

    Example: fleetctl events --task t-3f9a1c2b7e --type 'task.*' --follow
    """
    import json

    from fleetctl import services
    from fleetctl.cli.render import render_events

    cfg = load(config)
    filters = {"task_id": task, "agent_id": agent, "types": type_ or (), "since": _since(since)}
    with open_store(cfg) as store:
        rows = store.events(**filters, limit=limit or None, newest=True)
        if json_:
            for ev in rows:
                sys.stdout.write(json.dumps(services.event_view(ev)) + "\n")
        else:
            render_events(rows)
        last = rows[-1]["id"] if rows else store.max_event_id()
        while follow:
            sys.stdout.flush()
            time.sleep(0.5)
            for ev in store.events(**filters, after_id=last):
                last = ev["id"]
                if json_:
                    sys.stdout.write(json.dumps(services.event_view(ev)) + "\n")
                else:
                    from fleetctl.cli.render import describe_event

                    print(f"{services.iso(ev['ts'])} {ev['type']:<22} {ev['task_id'] or ev['agent_id'] or ''} "
                          f"{describe_event(ev)}")  # fmt: skip


def _since(value: str | None) -> float | None:
    from datetime import datetime

    from fleetctl.errors import UsageError

    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(value[:-1]) * units[value[-1]]
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise UsageError(f"--since {value!r}: use 30s, 5m, 2h, 1d or an ISO time") from None
