"""The typer app: one sub-app per command group, one module per group (see STYLE.md)."""

from __future__ import annotations

from typing import Annotated

import typer

from fleetctl.cli import agent, config, db, demo, events, passes, task
from fleetctl.cli._coerce import install as _install_fast_coercion

_install_fast_coercion()  # keeps pydantic out of start-up: see fleetctl/cli/_coerce.py

app = typer.Typer(
    name="fleetctl",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from fleetctl import __version__

        print(f"fleetctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Run a fleet of AI coding agents from Forgejo issues.

    Exit codes: 0 ok, 1 operational error, 2 usage or config error, 3 not found, 4 conflict (invalid
    state change, lease lost), 5 remote failure, 6 validation failed (receipt), 130 interrupted.
    """


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
