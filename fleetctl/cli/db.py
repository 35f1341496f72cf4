"""``fleetctl db …``: store maintenance."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleetctl.cli._common import ConfigOpt, JsonOpt, cli_errors, err, load, plural, print_json

app = typer.Typer(help="Migrate, check and back up the database.", no_args_is_help=True)


@app.command("migrate")
@cli_errors
def db_migrate(
    list_: Annotated[bool, typer.Option("--list", help="List migrations and whether each is applied.")] = False,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Apply pending schema migrations (every command also does this on open).

    Example: fleetctl db migrate --list
    """
    from fleetctl.schema import MIGRATION_NAMES
    from fleetctl.store import Store

    cfg = load(config)
    with Store.open(cfg.orchestrator.db_path, migrate=not list_) as store:
        applied = store.applied_migrations()
    rows = [{"name": n, "applied": n in applied} for n in MIGRATION_NAMES]
    if json_:
        print_json({"database": str(cfg.orchestrator.db_path), "migrations": rows})
    else:
        for r in rows:
            print(f"[{'x' if r['applied'] else ' '}] {r['name']}")


@app.command("check")
@cli_errors
def db_check(json_: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Replay all events into fresh projections, compare with the stored ones, and run integrity_check.

    Exit 0 when everything agrees, 1 otherwise (each difference is printed).

    Example: fleetctl db check
    """
    from fleetctl.store import Store

    cfg = load(config)
    with Store.open(cfg.orchestrator.db_path, create=False) as store:
        report = store.check()
    if json_:
        print_json({"ok": report.ok, "integrity": report.integrity, "problems": report.problems,
                    "events": report.events, "tasks": report.tasks, "agents": report.agents,
                    "attempts": report.attempts})  # fmt: skip
    else:
        for line in report.problems + [i for i in report.integrity if i != "ok"]:
            err(f"problem: {line}")
        verdict = "ok" if report.ok else "FAILED"
        print(f"{verdict}: {plural(report.events, 'event')} replayed; {plural(report.tasks, 'task')}, "
              f"{plural(report.agents, 'agent')}, {plural(report.attempts, 'attempt')} compared")  # fmt: skip
    if not report.ok:
        raise typer.Exit(1)


@app.command("backup")
@cli_errors
def db_backup(
    path: Annotated[Path, typer.Argument(help="New file to write (never overwritten).", show_default=False)],
    config: ConfigOpt = None,
) -> None:
    """Copy the live database with SQLite's online backup API (safe while other processes write).

    Example: fleetctl db backup /var/backups/fleet-$(date +%F).db
    """
    from fleetctl.store import Store

    cfg = load(config)
    with Store.open(cfg.orchestrator.db_path, create=False) as store:
        dest = store.backup(path)
    print(dest)
