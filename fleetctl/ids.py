"""Identifiers: task and agent ids are opaque strings of ``[A-Za-z0-9._-]``.

They end up in file paths (``{work_dir}/{task_id}/{attempt}``), branch names (``fleet/<task-id>``),
environment variables and SQL parameters, so anything else is refused at the edge. The first character
must be a letter or digit, which rules out ``.``, ``..`` and option-like ``-x``.
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


def check_repo(value: str) -> str:
    """Return ``owner/name`` if well-formed, else raise ``UsageError``."""
    if not isinstance(value, str) or not REPO_RE.match(value) or ".." in value:
        raise UsageError(f"invalid repository {value!r}: expected owner/name", code="invalid_repo")
    return value


def new_task_id() -> str:
    """A fresh opaque task id such as ``t-3f9a1c2b7e``."""
    import secrets  # here, not at the top: it loads OpenSSL, which start-up does not need

    return "t-" + secrets.token_hex(5)
