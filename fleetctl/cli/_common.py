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


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 agent``, ``2 agents``, ``0 agents`` (``many``: an irregular plural)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def human(value: Any) -> str:
    """A value for people: lists joined with ', ', None as '', dicts as key=value — never a Python repr."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(human(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={human(v)}" for k, v in value.items())
    return str(value)


def output_width() -> int | None:
    """How wide tables may be: $COLUMNS, else the terminal's width; None when piped (never hard-wrapped)."""
    raw = os.environ.get("COLUMNS", "")
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    try:
        if sys.stdout.isatty():
            import shutil

            return shutil.get_terminal_size().columns
    except (AttributeError, ValueError, OSError):
        pass
    return None


_STYLES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34", "magenta": "35",
           "cyan": "36"}  # fmt: skip


def _colour() -> bool:
    try:
        return not os.environ.get("NO_COLOR") and sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def styled(text: str, style: str | None) -> str:
    """``text`` in ``style`` (bold, dim, red, …) on a colour terminal; plain otherwise (NO_COLOR, pipes)."""
    code = _STYLES.get(style or "")
    return f"\x1b[{code}m{text}\x1b[0m" if code and _colour() else text


class Col:
    """A table column. ``kind``: ``id`` (never cut or wrapped), ``text`` (takes what is left, ellipsized),
    ``short`` (one line). ``drop``: when the table is too wide, higher numbers go first (0: never)."""

    __slots__ = ("name", "kind", "drop", "min")

    def __init__(self, name: str, kind: str = "short", drop: int = 0, min: int = 12) -> None:
        self.name, self.kind, self.drop, self.min = name, kind, drop, min


def _ellipsize(text: str, width: int) -> str:
    return text if len(text) <= width else (text[: max(width - 1, 0)] + "…" if width > 0 else "")


def table_lines(columns: Sequence[Col | str], rows: Iterable[Sequence[Any]], width: int | None,
                styles: Callable[[str, str], str | None] | None = None) -> list[str]:  # fmt: skip
    """Aligned lines (header first), no trailing spaces. At ``width``, low-value columns are dropped first,
    then the ``text`` column is ellipsized; ids are never cut. ``width`` None: nothing is cut."""
    cols = [c if isinstance(c, Col) else Col(c) for c in columns]
    cells = [[human(v).replace("\n", " ") for v in row] for row in rows]
    keep = list(range(len(cols)))

    def natural(i: int) -> int:
        return max([len(cols[i].name), *(len(r[i]) for r in cells)])

    def needed(idx: list[int]) -> int:
        total = 2 * (len(idx) - 1)
        for i in idx:
            total += min(natural(i), cols[i].min) if cols[i].kind == "text" else natural(i)
        return total

    if width is not None:
        for i in sorted((i for i in keep if cols[i].drop), key=lambda i: -cols[i].drop):
            if needed(keep) <= width:
                break
            keep.remove(i)
    widths = {i: natural(i) for i in keep}
    if width is not None:
        spare = width - (2 * (len(keep) - 1) + sum(widths.values()))
        for i in keep:
            if spare < 0 and cols[i].kind == "text":
                widths[i] = max(min(natural(i), cols[i].min), widths[i] + spare)
                spare = width - (2 * (len(keep) - 1) + sum(widths.values()))
    out = []
    for r, row in enumerate([[c.name for c in cols], *cells]):
        parts = []
        for n, i in enumerate(keep):
            text = _ellipsize(row[i], widths[i]) if cols[i].kind == "text" else row[i]
            pad = "" if n == len(keep) - 1 else " " * (widths[i] - len(text))
            style = "bold" if r == 0 else (styles(cols[i].name, row[i]) if styles else None)
            parts.append(styled(text, style) + pad)
        out.append("  ".join(parts).rstrip())
    return out


def print_table(title: str | None, columns: Sequence[Col | str], rows: Iterable[Sequence[Any]],
                styles: Callable[[str, str], str | None] | None = None) -> None:  # fmt: skip
    """A table for people on stdout (see ``table_lines``); ``styles(column, cell)`` may colour a cell."""
    lines = table_lines(columns, list(rows), output_width(), styles)
    if title:
        print(styled(title, "bold"))
    sys.stdout.write("\n".join(lines) + "\n")


def print_fields(title: str | None, pairs: Iterable[tuple[str, Any]]) -> None:
    """Key/value lines for ``show`` commands; long values wrap under themselves at the output width."""
    pairs = [(k, human(v)) for k, v in pairs]
    kw = max((len(k) for k, _ in pairs), default=0)
    width = output_width()
    if title:
        print(styled(title, "bold"))
    for key, value in pairs:
        lines = value.splitlines() or [""]
        if width is not None and width - kw - 2 >= 20:
            import textwrap

            lines = [w for line in lines for w in (textwrap.wrap(line, width - kw - 2) or [""])]
        head = styled(key, "bold") + " " * (kw - len(key) + 2)
        print((head + lines[0]).rstrip())
        for line in lines[1:]:
            print((" " * (kw + 2) + line).rstrip())
