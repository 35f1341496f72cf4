"""Receipts (SPEC §7.4): what an agent hands in when it finishes, checked for shape here.

Validation against Forgejo (does the pull request exist and point at the issue?) lives with the Forgejo
adapter; this module only normalises the document and refuses malformed ones, purely.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from fleetctl.errors import UsageError
from fleetctl.ids import check_repo

OUTCOMES = ("success", "failure", "rate_limited")
RATE_LIMITED_EXIT = 75
"""The exit status (``EX_TEMPFAIL``) by which an ssh_cli run says it hit a usage limit; it may write the seconds to
wait into ``.fleet/retry_after`` in its workspace."""
MAX_RETRY_AFTER = 7 * 86400
"""A usage limit's wait is cut to this (a week): an agent saying "next month" is asked again in a week."""
USAGE_FIELDS = {"input_tokens": int, "output_tokens": int, "cost_usd": float}
MAX_TOKENS = 10**15
MAX_COST = 1e9
_PR_URL = re.compile(r"^https?://[^\s]+/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)/pulls?/(\d+)/?\Z")
MAX_SUMMARY = 64 * 1024
MAX_LOG = 256 * 1024


@dataclass(frozen=True)
class Receipt:
    """A normalised receipt."""

    outcome: str
    summary: str
    artifacts: tuple[dict, ...]
    retry_after_secs: float | None = None  # with outcome rate_limited: how long the agent should rest
    usage: dict | None = None  # the attempt's totals so far: input_tokens, output_tokens, cost_usd

    def to_json(self) -> dict:
        out = {"outcome": self.outcome, "summary": self.summary, "artifacts": list(self.artifacts)}
        if self.retry_after_secs is not None:
            out["retry_after_secs"] = self.retry_after_secs
        if self.usage is not None:
            out["usage"] = self.usage
        return out

    def pull_requests(self) -> list[dict]:
        return [a for a in self.artifacts if a["kind"] == "pull_request"]


def _bad(msg: str) -> UsageError:
    return UsageError(f"invalid receipt: {msg}", code="invalid_receipt")


def _artifact(item: Any, i: int) -> dict:
    if not isinstance(item, dict):
        raise _bad(f"artifacts[{i}] must be an object")
    kind = item.get("kind")
    if kind == "pull_request":
        if "url" in item and "number" not in item:
            url = item["url"]
            if not isinstance(url, str) or not _PR_URL.match(url):
                raise _bad(f"artifacts[{i}].url is not a pull request URL")
            m = _PR_URL.match(url)
            return {"kind": kind, "url": url, "repo": f"{m.group(1)}/{m.group(2)}", "number": int(m.group(3))}
        number = item.get("number")
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise _bad(f"artifacts[{i}].number must be a positive integer")
        out: dict = {"kind": kind, "number": number}
        if item.get("repo") is not None:
            if not isinstance(item["repo"], str):
                raise _bad(f"artifacts[{i}].repo must be owner/name")
            out["repo"] = check_repo(item["repo"])
        return out
    if kind == "branch":
        name = item.get("name")
        if not isinstance(name, str) or not name or len(name) > 255 or any(c in name for c in "\0\n\r"):
            raise _bad(f"artifacts[{i}].name must be a branch name")
        return {"kind": kind, "name": name}
    if kind == "commit":
        sha = item.get("sha")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-fA-F]{7,64}", sha):
            raise _bad(f"artifacts[{i}].sha must be a hex commit id")
        return {"kind": kind, "sha": sha.lower()}
    if kind == "log":
        text = item.get("text")
        if not isinstance(text, str):
            raise _bad(f"artifacts[{i}].text must be a string")
        return {"kind": kind, "text": text[:MAX_LOG]}
    raise _bad(f"artifacts[{i}].kind must be pull_request, branch, commit or log")


def parse_retry_after(value: Any, what: str = "retry_after_secs") -> float | None:
    """A usage limit's wait in seconds (a number ≥ 0, cut to ``MAX_RETRY_AFTER``), or None when absent;
    ``UsageError`` (code ``invalid_field``) otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise UsageError(f"{what} must be a number of seconds >= 0", code="invalid_field")
    return float(min(value, MAX_RETRY_AFTER))


def parse_usage(value: Any) -> dict | None:
    """An attempt's usage: ``{"input_tokens": N, "output_tokens": N, "cost_usd": X}``, each optional, whole
    numbers of tokens and dollars ≥ 0; None when absent; ``UsageError`` (code ``invalid_field``) otherwise."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UsageError("usage must be an object with input_tokens, output_tokens and cost_usd", code="invalid_field")
    out: dict[str, Any] = {}
    for key, item in value.items():
        kind = USAGE_FIELDS.get(key)
        if kind is None:
            raise UsageError(f"usage has an unknown field {key!r} (input_tokens, output_tokens, cost_usd)",
                             code="invalid_field")  # fmt: skip
        if item is None:
            continue
        if kind is int:
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= MAX_TOKENS:
                raise UsageError(f"usage.{key} must be a whole number >= 0", code="invalid_field")
            out[key] = item
        else:
            ok = not isinstance(item, bool) and isinstance(item, int | float) and math.isfinite(item)
            if not ok or not 0 <= item <= MAX_COST:
                raise UsageError(f"usage.{key} must be a number of dollars >= 0", code="invalid_field")
            out[key] = float(item)
    return out


def parse_receipt(doc: Any) -> Receipt:
    """Check and normalise a receipt document; raise ``UsageError`` (code ``invalid_receipt``)."""
    if not isinstance(doc, dict):
        raise _bad("expected a JSON object")
    outcome = doc.get("outcome", "success")
    if outcome not in OUTCOMES:
        raise _bad("outcome must be 'success', 'failure' or 'rate_limited'")
    try:
        retry_after = parse_retry_after(doc.get("retry_after_secs"))
        usage = parse_usage(doc.get("usage"))
    except UsageError as exc:
        raise _bad(exc.message) from None
    if retry_after is not None and outcome != "rate_limited":
        raise _bad("retry_after_secs goes with outcome 'rate_limited'")
    summary = doc.get("summary", "")
    if summary is None:
        summary = ""
    if not isinstance(summary, str):
        raise _bad("summary must be a string")
    artifacts = doc.get("artifacts", [])
    if not isinstance(artifacts, list):
        raise _bad("artifacts must be a list")
    if len(artifacts) > 100:
        raise _bad("at most 100 artifacts")
    return Receipt(outcome, summary[:MAX_SUMMARY], tuple(_artifact(a, i) for i, a in enumerate(artifacts)),
                   retry_after, usage)  # fmt: skip
