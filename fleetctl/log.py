"""The one action log: ``action=NAME key=value …`` lines on stderr, one per action, for journald.

Every long-running or one-shot part (the passes, ``serve``, the pull agent) logs through ``log()``.
Values are escaped so that one action is always one line (a value with spaces, quotes, ``=`` or control
characters is written as a double-quoted string with backslash escapes), and secrets are redacted twice
over: a field whose name says it holds a secret (``token``, ``secret``, ``password``, ``authorization``)
is written as ``***``, and any value registered with ``redact()`` (the configured tokens) is replaced
wherever it appears inside another value. ``quiet()`` silences the log for a block (the demo renders
its own view); ``set_quiet()`` for the rest of the process (``--quiet``).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_quiet = False
_secrets: set[str] = set()

SECRET_FIELD_WORDS = ("token", "secret", "password", "authorization", "credential")
"""A field whose name contains one of these is never written, whatever its value."""

_QUOTE = str.maketrans({'"': '\\"', "\\": "\\\\"})
MAX_VALUE = 2000
"""Longer values are cut (with a note of how much was left out): one action, one readable line."""


def log(action: str, **fields: object) -> None:
    """Write one ``action=… key=value …`` line to stderr (fields that are None are left out).

    Example: ``log("task.assigned", task="t1", agent="local.a", attempt=1)``.
    """
    if _quiet:
        return
    line = format_line(action, **fields)
    with _lock:
        try:
            print(line, file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass  # a closed or broken stderr must never take an action down with it


def format_line(action: str, **fields: object) -> str:
    """The line ``log`` writes (without the newline)."""
    parts = [f"action={escape(action)}"]
    for key, value in fields.items():
        if value is None:
            continue
        if any(word in key.lower() for word in SECRET_FIELD_WORDS):
            parts.append(f"{key}=***")
        else:
            parts.append(f"{key}={escape(_redacted(str(value)))}")
    return " ".join(parts)


def escape(text: str) -> str:
    """``text`` as it stands in a log line: bare when it is safe, else double-quoted with escapes."""
    if len(text) > MAX_VALUE:
        text = text[:MAX_VALUE] + f"…(+{len(text) - MAX_VALUE} chars)"
    if text and not any(c in text for c in " \"'=\\") and text.isprintable():
        return text
    if text.isprintable():  # the common case (a sentence): only quotes and backslashes need escaping
        return '"' + text.translate(_QUOTE) + '"'
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif not c.isprintable():
            out.append(f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def redact(*values: str | None) -> None:
    """Never write these values (tokens, secrets) in a log line, wherever they appear."""
    _secrets.update(v for v in values if v and len(v) >= 4)


def _redacted(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def set_quiet(value: bool = True) -> None:
    """Silence (or restore) the log for the rest of the process."""
    global _quiet
    _quiet = value


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the log inside the block."""
    global _quiet
    before, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = before
