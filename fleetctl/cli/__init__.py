"""The typer app: one sub-app per command group, one module per group (see STYLE.md)."""

from __future__ import annotations

import copy
import gc
import sys
from typing import Annotated

_gc_was_on = gc.isenabled()
gc.disable()  # importing typer and the commands makes ~100k long-lived objects and no garbage: don't rescan

import typer  # noqa: E402

from fleetctl.cli import agent, config, db, demo, doctor, events, notify, outbox, passes, serve, task, usage, webhooks  # noqa: E402
from fleetctl.cli._coerce import install as _install_fast_coercion  # noqa: E402
from fleetctl.cli._common import ConfigOpt, set_root_config  # noqa: E402
from fleetctl.cli._help import install as _install_help  # noqa: E402

_install_fast_coercion()  # keeps pydantic out of start-up: see fleetctl/cli/_coerce.py
_install_help()  # one-line usage errors, TASK_ID-style metavars: see fleetctl/cli/_help.py

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
    config: ConfigOpt = None,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="Write no action log lines (action=…) on stderr; results and errors still print."
        ),
    ] = False,
) -> None:
    """Run a fleet of AI coding agents from labelled Forgejo issues.

    Exit codes: 0 ok, 1 operational error, 2 usage or config error, 3 not found, 4 conflict (invalid
    state change, lease lost), 5 remote failure, 6 validation failed (receipt), 130 interrupted.

    --config goes before the command (fleetctl --config X task list) or after it; a later one wins.
    """
    set_root_config(config)
    if quiet:
        from fleetctl.log import set_quiet

        set_quiet()


app.add_typer(config.app, name="config")
app.add_typer(task.app, name="task")
app.add_typer(agent.app, name="agent")
app.add_typer(db.app, name="db")
app.add_typer(webhooks.app, name="deliveries")
app.add_typer(outbox.app, name="outbox")
app.add_typer(notify.app, name="notify")
app.command("init")(config.init)
app.command("events")(events.events)
app.command("serve")(serve.serve)
app.command("dispatch")(passes.dispatch)
app.command("sweep-timeouts")(passes.sweep_timeouts)
app.command("sync")(passes.sync)
app.command("ingest-webhook")(webhooks.ingest_webhook)
app.command("demo")(demo.demo)
app.command("doctor")(doctor.doctor)
app.command("usage")(usage.usage)


if _gc_was_on:
    gc.enable()


def main() -> None:
    """Console-script entry point."""
    gc.freeze()  # what is loaded by now lives as long as the process: keep the collector off it
    app_for(sys.argv[1:])()


def app_for(argv: list[str], base: typer.Typer = app) -> typer.Typer:
    """``app`` reduced to the command that ``argv`` names, and the groups on its path (start-up cost, SPEC §5).

    Typer builds the parser of every command in an app before it runs one: ~35 ms for all of fleetctl's,
    paid by each ``dispatch`` a timer fires, though a run needs only its own command. Where ``argv`` does
    not name exactly one command or group (no command, an option first, an unknown name), the level is
    kept whole, so help and usage errors read as before. The root's ``--config X`` before the command
    is skipped over.
    """
    if base is app:
        argv = _skip_root_options(argv)
    if not argv or argv[0].startswith("-"):
        return base
    groups = [g for g in base.registered_groups if g.name == argv[0]]
    commands = [c for c in base.registered_commands if c.name == argv[0]]
    if len(groups) + len(commands) != 1:
        return base
    if groups:
        group = copy.copy(groups[0])
        group.typer_instance = app_for(argv[1:], group.typer_instance)
        groups = [group]
    slim = copy.copy(base)
    slim.registered_groups, slim.registered_commands = groups, commands
    return slim


def _skip_root_options(argv: list[str]) -> list[str]:
    """``argv`` without the leading root options: ``--config X`` / ``-c X`` / ``--config=X``, ``--quiet`` / ``-q``."""
    while argv:
        if argv[0] in ("--config", "-c") and len(argv) > 1:
            argv = argv[2:]
        elif argv[0] in ("--quiet", "-q"):
            argv = argv[1:]
        elif argv[0].startswith("--config=") or (argv[0].startswith("-c") and len(argv[0]) > 2):
            argv = argv[1:]
        else:
            break
    return argv
