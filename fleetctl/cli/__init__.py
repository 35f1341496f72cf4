"""The typer app: one sub-app per command group, one module per group (see STYLE.md)."""

from __future__ import annotations

import typer

from fleetctl.cli import agent, config, db, demo, events, passes, task

app = typer.Typer(
    name="fleetctl",
    help="Run a fleet of AI coding agents from Forgejo issues.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(config.app, name="config")
app.add_typer(task.app, name="task")
app.add_typer(agent.app, name="agent")
app.add_typer(db.app, name="db")
app.command("init")(config.init)
app.command("events")(events.events)
app.command("dispatch")(passes.dispatch)
app.command("sweep-timeouts")(passes.sweep_timeouts)
app.command("demo")(demo.demo)


def main() -> None:
    """Console-script entry point."""
    app()
