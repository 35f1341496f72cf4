"""Identifiers: task and agent ids are opaque strings of ``[A-Za-z0-9._-]``.

They end up in file paths (``{work_dir}/{task_id}/{attempt}``), branch names (``fleet/<task-id>``),
environment variables and SQL parameters, so anything else is refused at the edge. The first character
must be a letter or digit, which rules out ``.``, ``..`` and option-like ``-x``.

A new task id must also make a valid git branch ``fleet/<task-id>`` (``git check-ref-format``): within
``[A-Za-z0-9._-]`` that means no ``..`` and no trailing ``.`` or ``.lock`` (``check_task_id``; proven
against the real git binary in tests/test_ids.py). Lookups keep using ``check_id``, so a task created
before this rule can still be shown, cancelled or retried.
"""

from __future__ import annotations

import re

from fleetctl.errors import UsageError

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
REPO_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}\Z")


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid id, else raise ``UsageError`` naming ``what``."""
    if not isinstance(value, str) or not ID_RE.match(value):
        raise UsageError(
            f"invalid {what} {value!r}: use 1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit",
            code="invalid_id",
        )
    return value


def branch_problem(task_id: str) -> str | None:
    """Why ``fleet/<task_id>`` is not a valid git ref (``git check-ref-format`` rules), or None.

    Only the rules reachable with ``[A-Za-z0-9._-]`` are checked (slashes, spaces, ``@{``, ``~^:?*[\\``
    and control characters are refused by ``ID_RE`` already): no component may start with ``.`` (``ID_RE``
    already requires a letter or digit first), none may contain ``..``, and the ref may end neither with
    ``.`` nor with ``.lock``.
    """
    if ".." in task_id:
        return "it contains '..'"
    if task_id.startswith("."):
        return "it starts with '.'"
    if task_id.endswith("."):
        return "it ends with '.'"
    if task_id.endswith(".lock"):
        return "it ends with '.lock'"
    return None


def check_task_id(value: str) -> str:
    """``check_id`` for a *new* task id, which must also make a valid git branch ``fleet/<task-id>``.

    Raises ``UsageError`` (exit 2 / HTTP 400, code ``invalid_id``) naming the rule broken.

    Example:
        >>> check_task_id("fix-parser-2")
        'fix-parser-2'
    """
    check_id(value, "task id")
    problem = branch_problem(value)
    if problem is not None:
        raise UsageError(
            f"invalid task id {value!r}: git cannot use it in the branch fleet/<task-id> its runs push to "
            f"({problem}; a task id must not contain '..' or end with '.' or '.lock')",
            code="invalid_id",
        )
    return value


def check_repo(value: str) -> str:
    """Return ``owner/name`` if well-formed, else raise ``UsageError``."""
    if not isinstance(value, str) or not REPO_RE.match(value) or ".." in value:
        raise UsageError(f"invalid repository {value!r}: expected owner/name", code="invalid_repo")
    return value


def new_task_id() -> str:
    """A fresh opaque task id such as ``t-3f9a1c2b7e`` (always valid for ``check_task_id``)."""
    import secrets  # here, not at the top: it loads OpenSSL, which start-up does not need

    return "t-" + secrets.token_hex(5)
