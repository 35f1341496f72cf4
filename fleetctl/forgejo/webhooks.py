"""Forgejo webhook deliveries: the signature, the headers, and the payload as a typed change (pure).

Nothing here touches the network or the store. ``verify`` checks the HMAC over the raw body bytes, in
constant time, before anything parses them; ``read_delivery`` takes the headers and the verified body and
returns a ``Delivery`` whose ``change`` is what happened (an issue's new state, a pull request's new
state) in the few fields fleetctl acts on. What to *do* about a change is ``fleetctl.forgejo.mapping``'s.

Forgejo's facts (shared/forgejo/API-NOTES.md §1): the signature is lowercase hex HMAC-SHA256 of the body
with the webhook secret, sent without prefix in ``X-Forgejo-Signature`` (and ``X-Gitea-Signature``) and
as ``sha256=<hex>`` in ``X-Hub-Signature-256``; the first of those headers present is the one checked,
so a delivery cannot pass one header's check with another header's value. The event is named twice:
coarse (``X-Forgejo-Event``: ``issues`` for label changes too) and fine (``X-Forgejo-Event-Type``:
``issue_label``); the fine one decides. A label change carries the issue's whole new label set.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleetctl.errors import ExitCode, Unauthorized, UsageError
from fleetctl.ids import ID_RE, REPO_RE
from fleetctl.jsondoc import parse_json_object

SIGNATURE_HEADERS = ("X-Forgejo-Signature", "X-Gitea-Signature", "X-Hub-Signature-256")
"""Where the signature is looked for, in this order; the first one present is the one checked."""
DELIVERY_HEADERS = ("X-Forgejo-Delivery", "X-Gitea-Delivery", "X-Gogs-Delivery", "X-GitHub-Delivery")
EVENT_HEADERS = ("X-Forgejo-Event", "X-Gitea-Event", "X-Gogs-Event", "X-GitHub-Event")
EVENT_TYPE_HEADERS = ("X-Forgejo-Event-Type", "X-Gitea-Event-Type", "X-Gogs-Event-Type", "X-GitHub-Event-Type")

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_EVENT_RE = re.compile(r"[a-z][a-z_]{0,63}\Z")
_MAX_TEXT = 256 * 1024  # what a title or body may carry into a task (services refuse longer ones)

#: Event types whose changes fleetctl acts on, with the actions it knows; anything else is ignored.
HANDLED = {
    "issues": frozenset({"opened", "edited", "closed", "reopened"}),
    "issue_label": frozenset({"label_updated", "label_cleared"}),
    "pull_request": frozenset({"opened", "edited", "closed", "reopened"}),
    "pull_request_sync": frozenset({"synchronized"}),
    "pull_request_review_rejected": frozenset({"reviewed"}),
    "pull_request_review_approved": frozenset({"reviewed"}),
    "issue_comment": frozenset({"created"}),  # only new comments: an edit never runs a command
    "pull_request_comment": frozenset({"created"}),
}
REVIEW_REJECTED, REVIEW_APPROVED = "pull_request_review_rejected", "pull_request_review_approved"
MAX_REVIEW_BODY = 16 * 1024


#: (coarse event, action) → the fine event type Forgejo names in X-Forgejo-Event-Type.
_FINE_TYPE = {
    ("issues", "label_updated"): "issue_label",
    ("issues", "label_cleared"): "issue_label",
    ("pull_request", "synchronized"): "pull_request_sync",
    ("pull_request_rejected", "reviewed"): REVIEW_REJECTED,
    ("pull_request_approved", "reviewed"): REVIEW_APPROVED,
}


class BadSignature(Unauthorized):
    """The delivery's signature is missing or does not match: 401 (exit 6), nothing recorded or changed."""

    exit_code = ExitCode.VALIDATION
    code = "bad_signature"


class BadPayload(UsageError):
    """A signed delivery whose body or headers cannot be read: 400, recorded as rejected."""

    code = "invalid_payload"


def header(headers: Any, name: str) -> str | None:
    """The value of header ``name`` (case-insensitive) in an ``http.client.HTTPMessage`` or a plain dict."""
    value = headers.get(name)
    if value is None and isinstance(headers, Mapping):
        lower = name.lower()
        value = next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == lower), None)
    return value


def sign(secret: str, body: bytes) -> str:
    """Lowercase hex HMAC-SHA256 of ``body`` with ``secret``: what Forgejo sends in ``X-Forgejo-Signature``."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, headers: Any) -> None:
    """Raise ``BadSignature`` unless the first signature header present carries HMAC-SHA256(secret, body).

    Only lowercase hex is Forgejo's format: an uppercase digest, a ``sha256=`` prefix in the Forgejo
    header, or a missing prefix in ``X-Hub-Signature-256`` is refused like a wrong one. The comparison
    is constant-time.
    """
    if not secret:
        raise BadSignature("webhooks are refused: no webhook secret is configured", code="webhook_disabled")
    for name in SIGNATURE_HEADERS:
        value = header(headers, name)
        if value is None:
            continue
        presented = value.strip()
        if name == "X-Hub-Signature-256":
            if not presented.startswith("sha256="):
                raise BadSignature(f"{name} must be sha256=<hex>")
            presented = presented[len("sha256=") :]
        if not _HEX64.match(presented):
            raise BadSignature(f"{name} is not a lowercase hex HMAC-SHA256")
        if not hmac.compare_digest(presented, sign(secret, body)):
            raise BadSignature(f"{name} does not match the body (check forgejo.webhook_secret)")
        return
    raise BadSignature("no signature header (X-Forgejo-Signature, X-Gitea-Signature or X-Hub-Signature-256)")


def parse_header_block(raw: bytes) -> dict[str, str]:
    """Headers from a file: a JSON object of names to strings, or ``Name: value`` lines (as Forgejo's delivery
    page and ``curl -D`` show them; a first ``POST …``/``HTTP/…`` line and blank lines are skipped)."""
    text = raw.decode("utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        doc = parse_json_object(raw, "the headers file")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
            raise UsageError("the headers file must map header names to strings", code="invalid_headers")
        return dict(doc)
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or (n == 1 and re.match(r"^(POST|GET|HTTP/)", line)):
            continue
        name, colon, value = line.partition(":")
        if not colon or not re.fullmatch(r"[A-Za-z0-9-]{1,100}", name.strip()):
            raise UsageError(f"the headers file, line {n}: expected 'Name: value'", code="invalid_headers")
        out[name.strip()] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------- changes


@dataclass(frozen=True)
class Issue:
    """An issue as a delivery shows it (after the change)."""

    number: int
    title: str
    body: str
    labels: tuple[str, ...]
    state: str  # open | closed
    html_url: str | None = None
    updated_at: str | None = None


@dataclass(frozen=True)
class Pull:
    """A pull request as a delivery shows it (after the change)."""

    number: int
    title: str
    body: str
    head_branch: str  # head.label: the branch name, even after the branch was deleted
    head_sha: str | None
    state: str  # open | closed
    merged: bool
    html_url: str | None = None
    updated_at: str | None = None
    merge_commit_sha: str | None = None
    head_repo: str | None = None  # head.repo.full_name: another repository for a pull request from a fork

    def from_fork(self, repo: str) -> bool:
        """Whether the head branch lives in another repository than ``repo`` (a fork's ``fleet/…`` is not ours)."""
        return bool(self.head_repo) and self.head_repo.lower() != repo.lower()

    def link(self, repo: str) -> dict:
        """The task's ``pull_request`` record of this pull request."""
        out = {"repo": repo, "number": self.number, "url": self.html_url, "head": self.head_branch,
               "head_sha": self.head_sha, "state": self.state, "merged": self.merged}  # fmt: skip
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class Comment:
    """A new comment on an issue or pull request (``number``): who wrote what."""

    id: int
    number: int
    body: str
    is_pull: bool


@dataclass(frozen=True)
class Change:
    """What one delivery says happened: an issue's or a pull request's new state, or something ignored."""

    event_type: str
    action: str
    repo: str | None = None
    sender: str | None = None
    issue: Issue | None = None
    pull: Pull | None = None
    commit_id: str = ""  # set on issues/closed when a commit or a merged PR closed the issue
    ignored: str | None = None  # why fleetctl does nothing with this delivery, when it does nothing
    review: str | None = None  # a review's body (pull_request_review_rejected/approved), by ``sender``
    review_id: int | None = None  # the review's id, when known (sync reads it; a webhook does not carry it)
    comment: Comment | None = None  # a new comment on ``number`` (issue_comment / pull_request_comment)

    @property
    def number(self) -> int | None:
        if self.comment is not None:
            return self.comment.number
        item = self.issue or self.pull
        return item.number if item else None

    @property
    def updated_ts(self) -> float | None:
        """When Forgejo says the issue or pull request last changed (its ``updated_at``), as epoch seconds."""
        if self.comment is not None:
            return None  # a comment is never stale: it is a command, not a state
        item = self.issue or self.pull
        if item is None or not item.updated_at:
            return None
        try:
            return datetime.fromisoformat(item.updated_at).timestamp()
        except ValueError:
            return None

    def semantic_key(self) -> str | None:
        """A digest of what changed (not of who sent it or when): a re-sent copy of the same change — Forgejo's
        "Replay" makes a new delivery id with an identical body — has the same key."""
        if self.comment is not None:  # one comment is one change, whatever the issue's state
            return hashlib.sha256(f"comment\0{(self.repo or '').lower()}\0{self.comment.id}".encode()).hexdigest()
        item = self.issue or self.pull
        if item is None or not item.updated_at:
            return None
        parts = [
            self.event_type,
            self.action,
            (self.repo or "").lower(),
            str(item.number),
            item.updated_at,
            item.state,
            item.title,
            item.body,
        ]  # updated_at has whole seconds: two edits may share one
        if self.issue:
            parts += sorted(self.issue.labels)
        if self.pull:
            parts += [str(self.pull.merged), self.pull.head_sha or "", self.pull.head_branch, self.pull.head_repo or ""]
        if self.review is not None:  # two reviews of one pull request state are two changes
            parts += [self.sender or "", self.review]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class Delivery:
    """A delivery's identity and its change."""

    delivery_id: str
    event: str
    event_type: str
    action: str
    change: Change


def read_headers(headers: Any) -> tuple[str, str, str]:
    """``(delivery id, event, event type)`` from a delivery's headers; ``BadPayload`` when unusable."""
    delivery_id = next((v.strip() for n in DELIVERY_HEADERS if (v := header(headers, n))), "")
    if not delivery_id:
        raise BadPayload("no X-Forgejo-Delivery header: a delivery needs its id", code="missing_delivery")
    if not ID_RE.match(delivery_id):
        raise BadPayload("X-Forgejo-Delivery must be 1-128 characters of A-Z a-z 0-9 . _ -", code="invalid_delivery")
    event = next((v.strip() for n in EVENT_HEADERS if (v := header(headers, n))), "")
    event_type = next((v.strip() for n in EVENT_TYPE_HEADERS if (v := header(headers, n))), "") or event
    for name, value in (("X-Forgejo-Event", event), ("X-Forgejo-Event-Type", event_type)):
        if not _EVENT_RE.match(value):
            raise BadPayload(f"{name} is missing or not an event name", code="invalid_event")
    return delivery_id, event, event_type


def read_delivery(headers: Any, body: bytes) -> Delivery:
    """The delivery in ``headers`` + ``body`` (whose signature was verified). ``BadPayload`` when the body
    is not JSON, or a handled event lacks what it needs; an unknown event or action is a ``Change`` with
    ``ignored`` set, never an error (Forgejo adds events over time)."""
    delivery_id, event, event_type = read_headers(headers)
    try:
        payload = parse_json_object(body, "the webhook body")
    except UsageError as exc:
        raise BadPayload(exc.message, code=exc.code) from None
    action = payload.get("action") if isinstance(payload.get("action"), str) else ""
    change = to_change(event_type, action[:64], payload)
    return Delivery(delivery_id, event, event_type, action[:64], change)


def to_change(event_type: str, action: str, payload: dict) -> Change:
    """A payload as a ``Change`` (see ``read_delivery``)."""
    repo, sender = _repo(payload), _login(payload.get("sender"))
    # without X-Forgejo-Event-Type (an older Gitea, a relay that kept only X-Forgejo-Event) the action tells
    event_type = _FINE_TYPE.get((event_type, action), event_type)
    if action not in HANDLED.get(event_type, ()):
        what = f"{event_type}/{action}" if action else event_type
        return Change(event_type, action, repo, sender, ignored=f"fleetctl does not act on {what}")
    if repo is None:
        raise BadPayload("the payload has no repository.full_name of the form owner/name")
    if event_type in ("issue_comment", "pull_request_comment"):
        raw, issue = payload.get("comment"), payload.get("issue")
        if not isinstance(raw, dict) or not isinstance(issue, dict):
            raise BadPayload(f"an {event_type} payload needs comment and issue objects")
        cid, number, body = raw.get("id"), issue.get("number"), raw.get("body")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (cid, number)):
            raise BadPayload(f"an {event_type} payload needs a comment id and an issue number")
        is_pull = payload.get("is_pull") is True or issue.get("pull_request") is not None
        comment = Comment(cid, number, body if isinstance(body, str) else "", is_pull)
        return Change(event_type, action, repo, sender, comment=comment)
    if event_type in ("issues", "issue_label"):
        raw = payload.get("issue")
        if not isinstance(raw, dict):
            raise BadPayload(f"an {event_type} payload needs an issue object")
        if raw.get("pull_request") is not None:
            return Change(event_type, action, repo, sender, ignored="a pull request is never a task")
        commit = payload.get("commit_id")
        return Change(event_type, action, repo, sender, issue=issue_from(raw), commit_id=commit if isinstance(commit, str)
                      else "")  # fmt: skip
    raw = payload.get("pull_request")
    if not isinstance(raw, dict):
        raise BadPayload(f"a {event_type} payload needs a pull_request object")
    review = None
    if event_type in (REVIEW_REJECTED, REVIEW_APPROVED):
        raw_review = payload.get("review")
        content = raw_review.get("content") if isinstance(raw_review, dict) else None
        review = content[:MAX_REVIEW_BODY] if isinstance(content, str) else ""
    return Change(event_type, action, repo, sender, pull=pull_from(raw), review=review)


def _repo(payload: dict) -> str | None:
    repo = payload.get("repository")
    name = repo.get("full_name") if isinstance(repo, dict) else None
    return name if isinstance(name, str) and REPO_RE.match(name) and ".." not in name else None


def _login(user: Any) -> str | None:
    login = user.get("login") if isinstance(user, dict) else None
    return login if isinstance(login, str) and login else None


def _number(raw: dict) -> int:
    n = raw.get("number")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < 2**53:
        raise BadPayload("number must be a positive integer")
    return n


def _text(raw: dict, key: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadPayload(f"{key} must be a string")
    return value.replace("\0", "")[:_MAX_TEXT]


def _opt_str(raw: dict, key: str) -> str | None:
    value = raw.get(key)
    return value if isinstance(value, str) and value else None


def _state(raw: dict) -> str:
    state = raw.get("state")
    if state not in ("open", "closed"):
        raise BadPayload("state must be open or closed")
    return state


def issue_from(raw: dict) -> Issue:
    """An ``Issue`` from an issue object (a delivery's or the API's: they have one shape); ``BadPayload`` if not."""
    labels = raw.get("labels") or []
    if not isinstance(labels, list):
        raise BadPayload("issue.labels must be a list")
    names = []
    for label in labels:
        name = label.get("name") if isinstance(label, dict) else None
        if not isinstance(name, str):
            raise BadPayload("every issue label needs a name")
        names.append(name)
    return Issue(_number(raw), _text(raw, "title"), _text(raw, "body"), tuple(names), _state(raw),
                 _opt_str(raw, "html_url"), _opt_str(raw, "updated_at"))  # fmt: skip


def pull_from(raw: dict) -> Pull:
    """A ``Pull`` from a pull request object (a delivery's or the API's); ``BadPayload`` if it is not one."""
    head = raw.get("head") if isinstance(raw.get("head"), dict) else {}
    branch = _opt_str(head, "label") or _opt_str(head, "ref") or ""
    if branch.startswith("refs/pull/"):
        branch = ""
    head_repo = head.get("repo") if isinstance(head.get("repo"), dict) else {}
    return Pull(_number(raw), _text(raw, "title"), _text(raw, "body"), branch, _opt_str(head, "sha"), _state(raw),
                raw.get("merged") is True, _opt_str(raw, "html_url"), _opt_str(raw, "updated_at"),
                _opt_str(raw, "merge_commit_sha"), _opt_str(head_repo, "full_name"))  # fmt: skip
