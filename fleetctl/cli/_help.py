"""How help and click's own usage errors read (STYLE: one ``error: …`` line, exit 2, a hint).

Click words a parser error as a four-line block (usage, "Try …", blank, "Error: …"); fleetctl's own
errors are one line. ``install()`` makes click's ``UsageError`` (missing or unknown option, bad value,
unknown command…) print ``error: <message> (try 'fleetctl task create --help')`` on stderr, still exit 2.

Typer 0.29 shows a required argument as ``{task_id}`` in usage lines and ``task_id <str>`` in the
argument list, and option values as ``<str>`` / ``<list[str]>``. ``install()`` makes them read the
classic way: ``TASK_ID`` (its metavar, else its name upper-cased), ``--limit INTEGER``, ``--config PATH``.

Like ``_coerce``, these replace methods of typer's vendored click classes, which only this CLI uses;
if typer's internals move, ``install()`` changes nothing and typer's own wording stays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

_TYPE_NAMES = {str: "TEXT", int: "INTEGER", float: "NUMBER", Path: "PATH", bool: "BOOLEAN"}


def one_line(message: str) -> str:
    """Click's message as one line in fleetctl's voice: lower-case start, no trailing full stop."""
    text = "; ".join(part.strip() for part in message.strip().splitlines() if part.strip()).rstrip(".")
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def usage_error_line(exc: Any) -> str:
    """``error: <message> (try '<command path> --help')`` for a click ``UsageError``."""
    hint = ""
    ctx = getattr(exc, "ctx", None)
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        hint = f" (try '{ctx.command_path} {ctx.help_option_names[0]}')"
    return f"error: {one_line(exc.format_message())}{_allowed(exc)}{hint}"


def _allowed(exc: Any) -> str:
    """``; allowed: 1 to 9223372036854775807`` for a bad value of a bounded integer option, else ''."""
    param = getattr(exc, "param", None)
    lo, hi = getattr(param, "min", None), getattr(param, "max", None)
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f"; allowed: {lo} or more"
    return f"; allowed: {hi} or less" if lo is None else f"; allowed: {lo} to {hi}"


def _argument_name(param: Any) -> str:
    return param.metavar if param.metavar is not None else (param.name or "").upper()


def _option_type(param: Any) -> str:
    if param.metavar is not None:
        return param.metavar
    annotation = param.type_descriptor.annotation
    if get_origin(annotation) is list:
        annotation = get_args(annotation)[0]
    return _TYPE_NAMES.get(annotation, "VALUE")


def install() -> bool:
    """Route click's usage errors and typer's argument/option display through the functions above."""
    try:
        from typer import core
        from typer._click import exceptions
        from typer._click.utils import echo

        usage_error = exceptions.UsageError
        argument, option = core.TyperArgument, core.TyperOption
        argument._usage_display_name  # noqa: B018 - the methods we replace must exist
        argument.display_type_rich  # noqa: B018
        option.display_type_rich  # noqa: B018
    except (ImportError, AttributeError):
        return False
    if getattr(usage_error.show, "_fleetctl", False):
        return True

    def show(self: Any, file: Any = None) -> None:
        echo(usage_error_line(self), file=file if file is not None else exceptions.get_text_stderr())

    def usage_name(self: Any) -> str:
        name = _argument_name(self)
        if self.nargs != 1:
            name += "..."
        return name if self.required else f"[{name}]"

    def rich_name(self: Any) -> str:
        return _argument_name(self) + ("..." if self.nargs != 1 else "")

    show._fleetctl = True  # type: ignore[attr-defined]
    usage_error.show = show  # NoArgsIsHelpError ("no command given" prints the help) keeps its own
    argument._usage_display_name = usage_name
    argument._rich_display_name = rich_name
    argument.display_type_rich = lambda self, ctx: None
    option.display_type_rich = lambda self, ctx: _option_type(self) + ("..." if self.nargs != 1 else "")
    return True
