"""Shared CLI plumbing: options, error-to-exit-code handling, output helpers.

Only ``fleetctl.cli`` imports typer; rich is imported lazily inside the renderers so that the commands
timers run every few seconds (``dispatch``, ``sweep-timeouts``, ``task complete``) start fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from fleetctl.errors import ExitCode, FleetError

INT64_MAX = 2**63 - 1
"""The largest integer the store (SQLite) and the API take: the bound of ids, cursors and numbers."""
MAX_LIMIT = 1_000_000
"""The largest ``--limit``."""

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        metavar="PATH",
        help="Config file, on any command (else $FLEET_CONFIG, ./config.toml, $XDG_CONFIG_HOME/fleetctl/config.toml, "
        "/etc/fleetctl/config.toml, then the embedded default).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")]
ApiUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--api-url", help="Talk to this fleetctl serve instead of the local database; default $FLEET_API_URL."
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="Bearer token for the API (prefer the environment: $FLEET_TASK_TOKEN, $FLEET_AGENT_TOKEN, "
        "$FLEET_API_TOKEN; for register and run $FLEET_REGISTRATION_TOKEN, $FLEET_API_TOKEN).",
        show_default=False,
    ),
]


_root_config: Path | None = None  # ``fleetctl --config X <command>``: set by the root callback


def set_root_config(path: Path | None) -> None:
    """Remember the ``--config`` given before the command (the root callback runs before every command)."""
    global _root_config
    _root_config = path


def config_path(explicit: Path | None) -> Path | None:
    """The config file to use: ``--config`` after the command, else the one before it, else None (search)."""
    return explicit if explicit is not None else _root_config


def load(config_path_: Path | None):
    """Load the configuration named by ``--config`` (or found by the search order)."""
    from fleetctl.config import load_config

    cfg = load_config(config_path(config_path_))
    for warning in cfg.warnings:
        err(f"warning: {warning}")
    return cfg


def open_store(cfg):
    """Open (and migrate) the store the configuration names."""
    from fleetctl.store import Store

    return Store.open(cfg.orchestrator.db_path)


def err(message: str) -> None:
    """A message for people, on stderr."""
    print(message, file=sys.stderr)


def cli_errors(func: Callable) -> Callable:
    """Turn domain errors into ``error: …`` on stderr and the documented exit code; never a traceback.

    ``FLEETCTL_DEBUG=1`` re-raises unexpected errors with their traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FleetError as exc:
            err(f"error: {exc.message}")
            raise typer.Exit(int(exc.exit_code)) from None
        except KeyboardInterrupt:
            err("interrupted")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except BrokenPipeError:
            raise typer.Exit(0) from None
        except Exception as exc:  # the last line of defence: one message, no traceback
            if os.environ.get("FLEETCTL_DEBUG"):
                raise
            err(f"error: unexpected {type(exc).__name__}: {exc} (set FLEETCTL_DEBUG=1 for a traceback)")
            raise typer.Exit(int(ExitCode.ERROR)) from None

    return wrapper


def print_json(doc: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")


def _plain() -> dict[str, Any]:
    """NO_COLOR: no escape sequences at all (rich's own no_color still emits bold and dim)."""
    return {"color_system": None} if os.environ.get("NO_COLOR") else {}


def stdout_console():
    from rich.console import Console

    return Console(no_color=bool(os.environ.get("NO_COLOR")) or None, highlight=False, **_plain())


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")) or None, highlight=False, **_plain())


def print_table(
    title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], wrap: Sequence[str] = ("TITLE", "DETAIL")
) -> None:
    """A rich table for people on stdout; only the ``wrap`` columns fold, the others stay on one line."""
    from rich.table import Table

    table = Table(title=title, show_lines=False, header_style="bold", box=None, pad_edge=False)
    for col in columns:
        table.add_column(col, overflow="fold", no_wrap=col not in wrap)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    stdout_console().print(table)


def print_fields(title: str | None, pairs: Iterable[tuple[str, Any]]) -> None:
    """A two-column key/value table for ``show`` commands."""
    from rich.table import Table

    table = Table(title=title, show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for k, v in pairs:
        table.add_row(k, "" if v is None else str(v))
    stdout_console().print(table)
