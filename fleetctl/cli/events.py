"""``fleetctl events``: the event log."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from fleetctl.cli._common import MAX_LIMIT, ConfigOpt, cli_errors, load, open_store

#: Events that change no state: what agents report while they work (informational).
INFORMATIONAL_EVENT_TYPES = frozenset({"task.progress", "command.reply"})


def known_event_types() -> list[str]:
    """Every event type there is: the projections' stateful types plus the informational ones, sorted.

    The one list ``events --type`` checks against (tests/test_cli_output.py proves every type the
    services emit is in it).
    """
    from fleetctl.projections import STATEFUL_EVENT_TYPES

    return sorted(STATEFUL_EVENT_TYPES | INFORMATIONAL_EVENT_TYPES)


def check_types(types: list[str]) -> list[str]:
    """``--type`` values: a known type, or a prefix of known ones (``task.*`` or ``task.``); else UsageError."""
    from fleetctl.errors import UsageError

    known = known_event_types()
    for t in types:
        prefix = t.rstrip("*") if t.endswith((".*", ".")) else None
        if (prefix is None and t not in known) or (prefix is not None and not any(k.startswith(prefix) for k in known)):
            raise UsageError(
                f"unknown event type {t!r}; known types: {', '.join(known)} (or a prefix: task.*, agent.*)"
            )
    return types


@cli_errors
def events(
    task: Annotated[str | None, typer.Option("--task", help="Only this task's events.")] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent's events.")] = None,
    type_: Annotated[
        list[str] | None, typer.Option("--type", help="Event type, or prefix like 'task.*'; repeatable.")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only newer than this: seconds/minutes/hours ago (30s, 5m, 2h) or ISO time."),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", help="The last N events (0: all).", min=0, max=MAX_LIMIT, metavar="N")
    ] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events until interrupted.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="JSON lines, one event per line.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Print the event log, filtered; --follow tails it (in the same format).

    Example: fleetctl events --task t-3f9a1c2b7e --type 'task.*' --follow
    """
    import json

    from fleetctl import services
    from fleetctl.cli.render import print_event, print_event_header

    types = check_types(type_ or [])
    cfg = load(config)
    filters = {"task_id": task, "agent_id": agent, "types": types, "since": _since(since)}

    def show(ev: dict) -> None:
        view = services.event_view(ev)
        sys.stdout.write(json.dumps(view) + "\n") if json_ else print_event(view)

    with open_store(cfg) as store:
        rows = store.events(**filters, limit=limit or None, newest=True)
        if not json_:
            print_event_header()
        for ev in rows:
            show(ev)
        last = rows[-1]["id"] if rows else store.max_event_id()
        while follow:
            sys.stdout.flush()
            time.sleep(0.5)
            for ev in store.events(**filters, after_id=last):
                last = ev["id"]
                show(ev)


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
