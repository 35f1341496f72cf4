"""A faithful fake Forgejo (v11): a real HTTP server on 127.0.0.1 with in-memory state.

Built from ``shared/forgejo/swagger.v1.json`` (paths, response definitions) and ``API-NOTES.md`` (the
behaviours the swagger does not tell). What it copies from real Forgejo:

- auth: ``Authorization: token X`` (lowercase ``token``) or ``Bearer X`` (any case); no token -> 401
  "token is required" (except public GETs of a repository); an unknown token -> 401 on every path; token
  scopes (``read:issue``, ``write:repository``, ``all`` …) -> 403 when missing;
- issues and pull requests share one number sequence per repository; ``GET …/issues`` lists both unless
  ``type=issues``; ``labels=a,b`` needs *all* the named labels, unknown names are dropped and if none
  exist no filter applies; ``page``/``limit`` (default 30, max 50 silently), ``X-Total-Count``, ``Link``;
- ``PATCH …/issues/{n}`` answers 201; label bodies take names or ids (mixing is 400, unknown names
  dropped); removing an unknown label id is 422; label colours are normalised (``#rgb`` -> ``rrggbb``) and
  duplicate label names are allowed; exclusive ``scope/name`` labels replace their scope's others;
- ``GET …/pulls/{n}`` is 404 for a plain issue; ``…/pulls/{base}/{head}`` (head may hold ``/``) matches
  in any state; ``POST …/pulls`` is 409 while an open PR for the same head and base exists;
- webhooks: every state change (from the test side or through the API) produces the deliveries Forgejo
  would send, byte-shaped like Forgejo's stored payload (2-space indent, no trailing newline, ``<>&``
  escaped, keys in the Go struct order) with all the delivery and signature headers.

Not modelled: push/create/delete events, organisations, forks, milestones, assignees, reactions.

Test knobs: ``fail_next``, ``hang_next``, ``down``/``up``; ``requests`` logs
``(method, swagger template, status)`` of every API request served; ``deliveries`` holds every webhook
``(headers, body)``.

Example::

    fake = FakeForgejo().start()
    fake.add_repo("acme/widgets")
    n = fake.open_issue("acme/widgets", "Fix it", labels=["agent-task"])
    client = ForgejoClient(fake.url, fake.bot_token)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

BOT = "fleet-bot"
HUMAN = "alice"
VERSION = "11.0.1+gitea-1.22.0"
_ZERO_TIME = "0001-01-01T00:00:00Z"
_REF_RE = re.compile(r"\b(?:close[sd]?|fix(?:e[sd])?|resolve[sd]?)\s+#(\d+)\b", re.IGNORECASE)
_COLOR_RE = re.compile(r"^#?(?:[0-9a-fA-F]{6}|[0-9a-fA-F]{3})$")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha() -> str:
    return secrets.token_hex(20)


def forgejo_json(doc: Any) -> bytes:
    """``doc`` as Forgejo stores a webhook payload: 2-space indent, no trailing newline, ``<>&`` escaped."""
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return text.encode()


class ApiError(Exception):
    """An API answer other than success, raised by a handler."""

    def __init__(self, status: int, message: str = "", *, not_found: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.not_found = not_found


@dataclass
class User:
    id: int
    login: str
    full_name: str
    created: str
    scopes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # token -> scopes


@dataclass
class Label:
    id: int
    name: str
    color: str
    description: str = ""
    exclusive: bool = False
    is_archived: bool = False


@dataclass
class Comment:
    id: int
    number: int
    user: str
    body: str
    created_at: str
    updated_at: str


@dataclass
class Issue:
    id: int
    number: int
    user: str
    title: str
    body: str
    created_at: str
    updated_at: str
    labels: list[int] = field(default_factory=list)
    state: str = "open"
    closed_at: str | None = None
    comments: list[int] = field(default_factory=list)
    # pull request fields (is_pull only)
    is_pull: bool = False
    pr_id: int = 0
    head: str = ""
    base: str = ""
    head_sha: str = ""
    base_sha: str = ""
    merge_base: str = ""
    mergeable: bool = False
    merged: bool = False
    merged_at: str | None = None
    merge_sha: str | None = None
    merged_by: str | None = None
    reviews: list[dict] = field(default_factory=list)  # {id, state, body, user, commit_id, dismissed, comments, at}


@dataclass
class Repo:
    id: int
    owner: str
    name: str
    default_branch: str
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    issues: dict[int, Issue] = field(default_factory=dict)
    labels: dict[int, Label] = field(default_factory=dict)
    next_number: int = 1

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


# (method, swagger template, handler name); matched in order, so /merge comes before /{base}/{head}
_ROUTES = [
    ("GET", "/user", "h_user"),
    ("GET", "/version", "h_version"),
    ("GET", "/repos/{owner}/{repo}", "h_repo"),
    ("GET", "/repos/{owner}/{repo}/issues", "h_list_issues"),
    ("POST", "/repos/{owner}/{repo}/issues", "h_create_issue"),
    ("GET", "/repos/{owner}/{repo}/issues/{index}", "h_get_issue"),
    ("PATCH", "/repos/{owner}/{repo}/issues/{index}", "h_edit_issue"),
    ("GET", "/repos/{owner}/{repo}/issues/{index}/comments", "h_list_comments"),
    ("POST", "/repos/{owner}/{repo}/issues/{index}/comments", "h_create_comment"),
    ("GET", "/repos/{owner}/{repo}/issues/{index}/labels", "h_issue_labels"),
    ("POST", "/repos/{owner}/{repo}/issues/{index}/labels", "h_add_labels"),
    ("PUT", "/repos/{owner}/{repo}/issues/{index}/labels", "h_replace_labels"),
    ("DELETE", "/repos/{owner}/{repo}/issues/{index}/labels", "h_clear_labels"),
    ("DELETE", "/repos/{owner}/{repo}/issues/{index}/labels/{id}", "h_remove_label"),
    ("GET", "/repos/{owner}/{repo}/labels", "h_list_labels"),
    ("POST", "/repos/{owner}/{repo}/labels", "h_create_label"),
    ("GET", "/repos/{owner}/{repo}/pulls", "h_list_pulls"),
    ("POST", "/repos/{owner}/{repo}/pulls", "h_create_pull"),
    ("GET", "/repos/{owner}/{repo}/pulls/{index}/merge", "h_is_merged"),
    ("GET", "/repos/{owner}/{repo}/collaborators/{collaborator}/permission", "h_permission"),
    ("GET", "/repos/{owner}/{repo}/pulls/{index}/reviews", "h_list_reviews"),
    ("GET", "/repos/{owner}/{repo}/pulls/{index}/reviews/{id}/comments", "h_review_comments"),
    ("GET", "/repos/{owner}/{repo}/pulls/{index}", "h_get_pull"),
    ("GET", "/repos/{owner}/{repo}/pulls/{base}/{head}", "h_pull_by_branch"),
    ("GET", "/repos/{owner}/{repo}/branches/{branch}", "h_branch"),
    ("GET", "/repos/{owner}/{repo}/hooks", "h_list_hooks"),
]
ROUTE_TEMPLATES = [(m, t) for m, t, _ in _ROUTES]
"""Every ``(method, swagger template)`` the fake serves."""


def _emits(method):  # noqa: ANN001, ANN201
    """A test-side operation: its webhook deliveries are sent after the state lock is released."""

    def wrapper(self, *args, **kwargs):  # noqa: ANN001, ANN202
        try:
            return method(self, *args, **kwargs)
        finally:
            self._flush()

    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper


def _compile(template: str) -> re.Pattern[str]:
    def group(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "head":
            return r"(?P<head>.+)"
        if name in ("index", "id"):
            return rf"(?P<{name}>[0-9]+)"
        return rf"(?P<{name}>[^/]+)"

    return re.compile("^/api/v1" + re.sub(r"\{(\w+)\}", group, template) + "$")


_COMPILED = [(m, t, _compile(t), h) for m, t, h in _ROUTES]


def _scope_for(template: str) -> str:
    return "issue" if template.startswith("/repos/{owner}/{repo}/issues") or "/labels" in template else "repository"


class FakeForgejo:
    """The fake server and its state. ``start()`` it, ``stop()`` it; all public methods are thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._ids: dict[str, int] = {}
        self.users: dict[str, User] = {}
        self.tokens: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.repos: dict[str, Repo] = {}
        self.comments_by_id: dict[int, tuple[str, Comment]] = {}
        self.requests: list[tuple[str, str | None, int]] = []
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self._outbox: list[tuple[dict[str, str], bytes]] = []
        self._path = ""
        self.delivery_results: list[tuple[int | None, float]] = []
        self.permissions: dict[tuple[str, str], str] = {}
        self.hook_url: str | None = None
        self.repo_hooks: dict[str, list[dict]] = {}  # what GET /repos/{o}/{r}/hooks lists (add_hook)
        self.hook_secret = ""
        self._fail: list[tuple[int, float | str | None]] = []
        self._hang: list[float] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.bot_token = self.add_user(BOT, full_name="Fleet Bot")
        self.alice_token = self.add_user(HUMAN, full_name="Alice Example")
        self.add_user("acme", full_name="ACME Corp")

    # ------------------------------------------------------------------ server lifecycle

    @property
    def url(self) -> str:
        """The root URL (``http://127.0.0.1:PORT``); the API is under ``/api/v1``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeForgejo:
        """Listen on 127.0.0.1 (a free port the first time, the same port after ``down()``)."""
        fake = self

        class Handler(_Handler):
            pass

        Handler.fake = fake
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler, bind_and_activate=False)
        server.daemon_threads = True
        server.block_on_close = False
        server.allow_reuse_address = True
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.server_bind()
        server.server_activate()
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (in-flight handler threads are daemons and die with the test process)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def down(self) -> None:
        """Refuse connections: close the listening socket (state is kept)."""
        self.stop()

    def up(self) -> None:
        """Listen again on the same port after ``down()``."""
        self.start()

    def fail_next(self, n: int, status: int = 500, retry_after: float | str | None = None) -> None:
        """The next ``n`` API requests answer ``status`` (with ``Retry-After`` if given), doing nothing."""
        with self.lock:
            self._fail += [(status, retry_after)] * n

    def hang_next(self, n: int, secs: float) -> None:
        """The next ``n`` API requests sleep ``secs`` before they are handled."""
        with self.lock:
            self._hang += [secs] * n

    def set_hook(self, url: str | None, secret: str = "") -> None:
        """Where deliveries are POSTed (None: only recorded in ``deliveries``) and the HMAC secret."""
        self.hook_url, self.hook_secret = url, secret

    # ------------------------------------------------------------------ state set-up

    def _next(self, kind: str, start: int = 1) -> int:
        self._ids[kind] = self._ids.get(kind, start - 1) + 1
        return self._ids[kind]

    def add_user(self, login: str, token: str | None = None, *, full_name: str = "",
                 scopes: tuple[str, ...] = ("all",)) -> str:  # fmt: skip
        """Create a user (if new) with a token (given or random) of ``scopes``; the token."""
        with self.lock:
            if login not in self.users:
                self.users[login] = User(self._next("user"), login, full_name or login.title(), _now())
            token = token or secrets.token_hex(20)
            self.tokens[token] = (login, tuple(scopes))
            return token

    def add_repo(self, full_name: str, default_branch: str = "main") -> Repo:
        """Create ``owner/name`` with its default branch at a random SHA."""
        owner, name = full_name.split("/")
        with self.lock:
            if owner not in self.users:
                self.add_user(owner)
            repo = Repo(self._next("repo", 7), owner, name, default_branch, _now())
            repo.branches[default_branch] = _sha()
            self.repos[full_name] = repo
            return repo

    def _repo(self, full_name: str) -> Repo:
        try:
            return self.repos[full_name]
        except KeyError:
            raise ApiError(404, not_found=True) from None

    def _issue(self, repo: Repo, number: int) -> Issue:
        try:
            return repo.issues[int(number)]
        except (KeyError, ValueError):
            raise ApiError(404, not_found=True) from None

    def label_id(self, repo: str, name: str) -> int:
        """The id of the (first) repository label called ``name``; created grey if there is none."""
        with self.lock:
            r = self.repos[repo]
            for label in r.labels.values():
                if label.name == name:
                    return label.id
            return self._create_label(r, name, "ededed").id

    def _create_label(self, repo: Repo, name: str, color: str, description: str = "",
                      exclusive: bool = False) -> Label:  # fmt: skip
        if not _COLOR_RE.match(color or ""):
            raise ApiError(422, f'Color: "{color}" is not a valid color')
        color = color.lstrip("#").lower()
        if len(color) == 3:
            color = "".join(c * 2 for c in color)
        label = Label(self._next("label", 21), name, color, description, exclusive)
        repo.labels[label.id] = label
        return label

    # ------------------------------------------------------------------ test-side helpers

    def issue(self, repo: str, n: int) -> dict:
        """Issue (or PR) ``n`` as the API renders it."""
        with self.lock:
            r = self.repos[repo]
            return self.issue_json(r, r.issues[n])

    def comments(self, repo: str, n: int) -> list[dict]:
        """The comments of issue ``n`` as the API renders them."""
        with self.lock:
            r = self.repos[repo]
            return [self.comment_json(r, r.issues[n], self.comments_by_id[c][1]) for c in r.issues[n].comments]

    def labels_of(self, repo: str, n: int) -> list[str]:
        """The label names of issue ``n``."""
        with self.lock:
            r = self.repos[repo]
            return [r.labels[i].name for i in r.issues[n].labels]

    # ------------------------------------------------------------------ test-side operations (with webhooks)

    @_emits
    def open_issue(self, repo: str, title: str, body: str = "", labels: tuple[str, ...] | list[str] = (),
                   user: str = HUMAN) -> int:  # fmt: skip
        """Open an issue (labels created if missing): ``issues/opened`` then, with labels, ``label_updated``."""
        with self.lock:
            r = self.repos[repo]
            ids = [self.label_id(repo, name) for name in labels]
            return self._open_issue(r, title, body, ids, user).number

    def _open_issue(self, r: Repo, title: str, body: str, label_ids: list[int], user: str) -> Issue:
        now = _now()
        issue = Issue(self._next("issue", 101), r.next_number, user, title, body, now, now)
        r.next_number += 1
        r.issues[issue.number] = issue
        self._set_labels(r, issue, label_ids)
        self._issue_hook(r, issue, "issues", "opened", user)
        if label_ids:
            self._issue_hook(r, issue, "issue_label", "label_updated", user)
        return issue

    @_emits
    def set_labels(self, repo: str, n: int, names: list[str] | tuple[str, ...], user: str = HUMAN) -> None:
        """Replace issue ``n``'s labels (created if missing): ``label_updated`` with the full new set."""
        with self.lock:
            r = self.repos[repo]
            ids = [self.label_id(repo, name) for name in names]
            issue = r.issues[n]
            self._set_labels(r, issue, ids, replace=True)
            self._label_hook(r, issue, "label_updated", user)

    @_emits
    def clear_labels(self, repo: str, n: int, user: str = HUMAN) -> None:
        """Remove every label of issue ``n``: ``label_cleared``."""
        with self.lock:
            r = self.repos[repo]
            issue = r.issues[n]
            self._set_labels(r, issue, [], replace=True)
            self._label_hook(r, issue, "label_cleared", user)

    @_emits
    def edit_issue(self, repo: str, n: int, *, title: str | None = None, body: str | None = None,
                   user: str = HUMAN) -> None:  # fmt: skip
        """Change the title and/or body: ``issues/edited`` (or ``pull_request/edited``) with ``changes``."""
        with self.lock:
            r = self.repos[repo]
            self._edit(r, r.issues[n], title, body, user)

    def _edit(self, r: Repo, issue: Issue, title: str | None, body: str | None, user: str) -> None:
        changes: dict[str, Any] = {}
        if title is not None and title != issue.title:
            changes["title"] = {"from": issue.title}
            issue.title = title
        if body is not None and body != issue.body:
            changes["body"] = {"from": issue.body}
            issue.body = body
        if not changes:
            return
        issue.updated_at = _now()
        if issue.is_pull:
            self._pull_hook(r, issue, "pull_request", "edited", user, changes=changes)
        else:
            self._issue_hook(r, issue, "issues", "edited", user, changes=changes)

    @_emits
    def close_issue(self, repo: str, n: int, user: str = HUMAN, commit_id: str = "") -> None:
        """Close issue ``n``: ``issues/closed`` (``commit_id`` set when a commit or merge closed it)."""
        with self.lock:
            r = self.repos[repo]
            self._set_state(r, r.issues[n], "closed", user, commit_id)

    @_emits
    def reopen_issue(self, repo: str, n: int, user: str = HUMAN) -> None:
        """Reopen issue ``n``: ``issues/reopened``."""
        with self.lock:
            r = self.repos[repo]
            self._set_state(r, r.issues[n], "open", user)

    def _set_state(self, r: Repo, issue: Issue, state: str, user: str, commit_id: str = "") -> None:
        if issue.state == state:
            return
        now = _now()
        issue.state, issue.updated_at = state, now
        issue.closed_at = now if state == "closed" else None
        action = "closed" if state == "closed" else "reopened"
        if issue.is_pull:
            self._pull_hook(r, issue, "pull_request", action, user)
        else:
            self._issue_hook(r, issue, "issues", action, user, commit_id=commit_id)

    @_emits
    def comment(self, repo: str, n: int, body: str, user: str = HUMAN) -> int:
        """Comment on issue or PR ``n``: ``issue_comment/created`` (``pull_request_comment`` on a PR); the id."""
        with self.lock:
            r = self.repos[repo]
            return self._comment(r, r.issues[n], body, user).id

    def _comment(self, r: Repo, issue: Issue, body: str, user: str) -> Comment:
        now = _now()
        c = Comment(self._next("comment", 301), issue.number, user, body, now, now)
        issue.comments.append(c.id)
        issue.updated_at = now
        self.comments_by_id[c.id] = (r.full_name, c)
        payload = {"action": "created", "issue": self.issue_json(r, issue, hook=True)}
        if issue.is_pull:
            payload["pull_request"] = self.pull_json(r, issue, hook=True)
        payload |= {"comment": self.comment_json(r, issue, c, hook=True), "repository": self.repo_json(r, hook=True),
                    "sender": self.user_json(user, hook=True), "is_pull": issue.is_pull}  # fmt: skip
        self._deliver("issue_comment", "pull_request_comment" if issue.is_pull else "issue_comment", payload)
        return c

    @_emits
    def push_branch(self, repo: str, branch: str, sha: str | None = None) -> str:
        """Point ``branch`` at ``sha`` (random if None); an open PR from it gets ``synchronized``. The SHA."""
        with self.lock:
            return self._push_branch(self.repos[repo], branch, sha or _sha())

    def _push_branch(self, r: Repo, branch: str, sha: str) -> str:
        r.branches[branch] = sha
        for issue in r.issues.values():
            if issue.is_pull and issue.state == "open" and issue.head == branch and issue.head_sha != sha:
                issue.head_sha, issue.updated_at, issue.mergeable = sha, _now(), False
                self._pull_hook(r, issue, "pull_request_sync", "synchronized", BOT)
                issue.mergeable = True
        return sha

    @_emits
    def open_pull(self, repo: str, head: str, base: str = "main", title: str = "", body: str = "",
                  user: str = BOT) -> int:  # fmt: skip
        """Open a PR from ``head`` (pushed first if it does not exist): ``pull_request/opened``; its number."""
        with self.lock:
            r = self.repos[repo]
            if head not in r.branches:
                self._push_branch(r, head, _sha())
            return self._open_pull(r, head, base, title or f"Merge {head}", body, user).number

    def _open_pull(self, r: Repo, head: str, base: str, title: str, body: str, user: str) -> Issue:
        if head not in r.branches or base not in r.branches:
            raise ApiError(404, not_found=True)
        for other in r.issues.values():
            if other.is_pull and other.state == "open" and other.head == head and other.base == base:
                raise ApiError(409, f"pull request already exists for these targets [id: {other.pr_id}, issue_id: "
                                    f"{other.id}, head_repo_id: {r.id}, base_repo_id: {r.id}, head_branch: {head}, "
                                    f"base_branch: {base}]")  # fmt: skip
        now = _now()
        issue = Issue(self._next("issue", 101), r.next_number, user, title, body, now, now, is_pull=True)
        issue.pr_id, issue.head, issue.base = self._next("pull", 55), head, base
        issue.head_sha, issue.base_sha = r.branches[head], r.branches[base]
        issue.merge_base = r.branches[base]
        r.next_number += 1
        r.issues[issue.number] = issue
        self._pull_hook(r, issue, "pull_request", "opened", user)
        issue.mergeable = True  # the conflict check has run
        return issue

    @_emits
    def merge_pull(self, repo: str, n: int, user: str = HUMAN) -> str:
        """Merge PR ``n``: ``pull_request/closed`` with ``merged: true``, then ``issues/closed`` (with the
        merge SHA as ``commit_id``) for each ``Closes/Fixes/Resolves #N`` in its title or body. The merge SHA."""
        with self.lock:
            r = self.repos[repo]
            pr = r.issues[n]
            assert pr.is_pull and pr.state == "open", f"#{n} is not an open pull request"
            now, sha = _now(), _sha()
            pr.merged, pr.merged_at, pr.merge_sha, pr.merged_by = True, now, sha, user
            pr.state, pr.closed_at, pr.updated_at = "closed", now, now
            r.branches[pr.base] = sha
            self._pull_hook(r, pr, "pull_request", "closed", user)
            for ref in dict.fromkeys(int(m) for m in _REF_RE.findall(f"{pr.title}\n{pr.body}")):
                target = r.issues.get(ref)
                if target is not None and not target.is_pull and target.state == "open":
                    self._set_state(r, target, "closed", user, commit_id=sha)
            return sha

    @_emits
    def close_pull(self, repo: str, n: int, user: str = HUMAN) -> None:
        """Close PR ``n`` without merging: ``pull_request/closed`` with ``merged: false``."""
        with self.lock:
            r = self.repos[repo]
            self._set_state(r, r.issues[n], "closed", user)

    @_emits
    def review(self, repo: str, n: int, state: str = "APPROVED", body: str = "", user: str = HUMAN,
               comments: list[tuple[str, int, str]] = (), hook: bool = True) -> int:  # fmt: skip
        """Review PR ``n`` (``APPROVED``, ``REQUEST_CHANGES`` or ``COMMENT``) on its head commit, with inline
        ``comments`` (path, line in the new file — negative: on a removed line, its number in the old file, as
        Forgejo stores it —, text): the ``pull_request_review_*`` event (unless ``hook`` is
        False: a delivery Forgejo never made). The review's id."""
        kinds = {"APPROVED": ("pull_request_approved", "pull_request_review_approved"),
                 "REQUEST_CHANGES": ("pull_request_rejected", "pull_request_review_rejected"),
                 "COMMENT": ("pull_request_comment", "pull_request_review_comment")}  # fmt: skip
        event, event_type = kinds[state]
        with self.lock:
            r = self.repos[repo]
            pr = r.issues[n]
            pr.updated_at = _now()
            review_id = self._next("review")
            pr.reviews.append({"id": review_id, "state": state, "body": body, "user": user, "commit_id": pr.head_sha,
                               "dismissed": False, "at": pr.updated_at,
                               "comments": [{"id": self._next("review_comment"), "path": path, "line": line,
                                             "body": text} for path, line, text in comments]})  # fmt: skip
            if hook:
                self._pull_hook(r, pr, event_type, "reviewed", user, event=event,
                                review={"type": event_type, "content": body}, requested_reviewer=user)  # fmt: skip
            return review_id

    def _review_json(self, r: Repo, pr: Issue, rv: dict) -> dict:
        html = self._html(r, pr)
        return {
            "id": rv["id"], "user": self.user_json(rv["user"]), "team": None, "state": rv["state"], "body": rv["body"],
            "commit_id": rv["commit_id"], "stale": rv["commit_id"] != pr.head_sha, "official": True,
            "dismissed": rv["dismissed"], "comments_count": len(rv["comments"]), "submitted_at": rv["at"],
            "updated_at": rv["at"], "html_url": f"{html}#issuecomment-{rv['id']}", "pull_request_url": html,
        }  # fmt: skip

    def _review_comment_json(self, r: Repo, pr: Issue, rv: dict, c: dict) -> dict:
        html = self._html(r, pr)
        return {
            "id": c["id"], "body": c["body"], "user": self.user_json(rv["user"]), "resolver": None,
            "pull_request_review_id": rv["id"], "created_at": rv["at"], "updated_at": rv["at"], "path": c["path"],
            "commit_id": rv["commit_id"], "original_commit_id": rv["commit_id"], "diff_hunk": "@@ -1 +1 @@",
            "position": max(c["line"], 0), "original_position": max(-c["line"], 0), "html_url": f"{html}/files#issuecomment-{c['id']}",
            "pull_request_url": html,
        }  # fmt: skip

    # ------------------------------------------------------------------ labels (shared by API and test side)

    def _set_labels(self, r: Repo, issue: Issue, ids: list[int], *, replace: bool = False) -> None:
        current = [] if replace else list(issue.labels)
        for label_id in ids:
            label = r.labels[label_id]
            if label.exclusive and "/" in label.name:
                scope = label.name.rsplit("/", 1)[0] + "/"
                current = [i for i in current if not r.labels[i].name.startswith(scope) or not r.labels[i].exclusive]
            if label_id not in current:
                current.append(label_id)
        issue.labels = sorted(current, key=lambda i: (r.labels[i].name, i))
        issue.updated_at = _now()

    def _label_hook(self, r: Repo, issue: Issue, action: str, user: str) -> None:
        if issue.is_pull:
            self._pull_hook(r, issue, "pull_request_label", action, user)
        else:
            self._issue_hook(r, issue, "issue_label", action, user)

    # ------------------------------------------------------------------ rendering (Go struct field order)

    def user_json(self, login: str, *, hook: bool = False) -> dict:
        u = self.users[login]
        host = urlsplit(self.url).hostname
        return {
            "id": u.id, "login": u.login, "login_name": "", "source_id": 0, "full_name": u.full_name,
            "email": f"{u.login}@noreply.{host}" if hook else f"{u.login}@example.com",
            "avatar_url": f"{self.url}/avatars/{hashlib.md5(u.login.encode()).hexdigest()}",
            "html_url": f"{self.url}/{u.login}", "language": "", "is_admin": False, "last_login": _ZERO_TIME,
            "created": u.created, "restricted": False, "active": not hook, "prohibit_login": False,
            "location": "", "pronouns": "", "website": "", "description": "", "visibility": "public",
            "followers_count": 0, "following_count": 0, "starred_repos_count": 0, "username": u.login,
        }  # fmt: skip

    def repo_json(self, r: Repo, *, hook: bool = False) -> dict:
        api, html = f"{self.url}/api/v1/repos/{r.full_name}", f"{self.url}/{r.full_name}"
        host = urlsplit(self.url).netloc
        open_issues = sum(1 for i in r.issues.values() if not i.is_pull and i.state == "open")
        open_pulls = sum(1 for i in r.issues.values() if i.is_pull and i.state == "open")
        return {
            "id": r.id, "owner": self.user_json(r.owner, hook=hook), "name": r.name, "full_name": r.full_name,
            "description": "", "empty": False, "private": False, "fork": False, "template": False, "parent": None,
            "mirror": False, "size": 0, "language": "", "languages_url": f"{api}/languages", "html_url": html,
            "url": api, "link": "", "ssh_url": f"ssh://git@{host}/{r.full_name}.git", "clone_url": f"{html}.git",
            "original_url": "", "website": "", "stars_count": 0, "forks_count": 0, "watchers_count": 0,
            "open_issues_count": open_issues, "open_pr_counter": open_pulls, "release_counter": 0,
            "default_branch": r.default_branch, "archived": False, "created_at": r.created_at,
            "updated_at": r.created_at, "archived_at": "1970-01-01T00:00:00Z",
            "permissions": {"admin": True, "push": True, "pull": True}, "has_issues": True,
            "internal_tracker": {"enable_time_tracker": True, "allow_only_contributors_to_track_time": True,
                                 "enable_issue_dependencies": True},
            "has_wiki": True, "wiki_branch": r.default_branch, "globally_editable_wiki": False,
            "has_pull_requests": True, "has_projects": True, "has_releases": True, "has_packages": True,
            "has_actions": False, "ignore_whitespace_conflicts": False, "allow_merge_commits": True,
            "allow_rebase": True, "allow_rebase_explicit": True, "allow_squash_merge": True,
            "allow_fast_forward_only_merge": True, "allow_rebase_update": True,
            "default_delete_branch_after_merge": False, "default_merge_style": "merge",
            "default_allow_maintainer_edit": False, "default_update_style": "merge", "avatar_url": "",
            "internal": False, "mirror_interval": "", "object_format_name": "sha1", "mirror_updated": _ZERO_TIME,
            "repo_transfer": None, "topics": [],
        }  # fmt: skip

    def label_json(self, r: Repo, label: Label) -> dict:
        return {"id": label.id, "name": label.name, "exclusive": label.exclusive, "is_archived": label.is_archived,
                "color": label.color, "description": label.description,
                "url": f"{self.url}/api/v1/repos/{r.full_name}/labels/{label.id}"}  # fmt: skip

    def _html(self, r: Repo, issue: Issue) -> str:
        return f"{self.url}/{r.full_name}/{'pulls' if issue.is_pull else 'issues'}/{issue.number}"

    def issue_json(self, r: Repo, issue: Issue, *, hook: bool = False) -> dict:
        pull = None
        if issue.is_pull:
            pull = {"merged": issue.merged, "merged_at": issue.merged_at, "draft": False,
                    "html_url": self._html(r, issue)}  # fmt: skip
        return {
            "id": issue.id, "url": f"{self.url}/api/v1/repos/{r.full_name}/issues/{issue.number}",
            "html_url": self._html(r, issue), "number": issue.number, "user": self.user_json(issue.user, hook=hook),
            "original_author": "", "original_author_id": 0, "title": issue.title, "body": issue.body, "ref": "",
            "assets": [], "labels": [self.label_json(r, r.labels[i]) for i in issue.labels], "milestone": None,
            "assignee": None, "assignees": None, "state": issue.state, "is_locked": False,
            "comments": len(issue.comments), "created_at": issue.created_at, "updated_at": issue.updated_at,
            "closed_at": issue.closed_at, "due_date": None, "pull_request": pull,
            "repository": {"id": r.id, "name": r.name, "owner": r.owner, "full_name": r.full_name}, "pin_order": 0,
        }  # fmt: skip

    def _branch_info(self, r: Repo, ref: str, sha: str, hook: bool) -> dict:
        return {"label": ref, "ref": ref, "sha": sha, "repo_id": r.id, "repo": self.repo_json(r, hook=hook)}

    def pull_json(self, r: Repo, pr: Issue, *, hook: bool = False) -> dict:
        html = self._html(r, pr)
        head = self._branch_info(r, pr.head, pr.head_sha, hook)
        if pr.head not in r.branches:  # the head branch was deleted
            head["ref"] = f"refs/pull/{pr.number}/head"
        return {
            "id": pr.pr_id, "url": html, "number": pr.number, "user": self.user_json(pr.user, hook=hook),
            "title": pr.title, "body": pr.body, "labels": [self.label_json(r, r.labels[i]) for i in pr.labels],
            "milestone": None, "assignee": None, "assignees": None, "requested_reviewers": [],
            "requested_reviewers_teams": [], "state": pr.state, "draft": False, "is_locked": False,
            "comments": len(pr.comments), "review_comments": 0, "additions": 0, "deletions": 0, "changed_files": 0,
            "html_url": html, "diff_url": f"{html}.diff", "patch_url": f"{html}.patch", "mergeable": pr.mergeable,
            "merged": pr.merged, "merged_at": pr.merged_at, "merge_commit_sha": pr.merge_sha,
            "merged_by": self.user_json(pr.merged_by, hook=hook) if pr.merged_by else None,
            "allow_maintainer_edit": False, "base": self._branch_info(r, pr.base, pr.base_sha, hook), "head": head,
            "merge_base": pr.merge_base, "due_date": None, "created_at": pr.created_at, "updated_at": pr.updated_at,
            "closed_at": pr.closed_at, "pin_order": 0, "flow": 0,
        }  # fmt: skip

    def comment_json(self, r: Repo, issue: Issue, c: Comment, *, hook: bool = False) -> dict:
        html = self._html(r, issue)
        return {
            "id": c.id, "html_url": f"{html}#issuecomment-{c.id}", "pull_request_url": html if issue.is_pull else "",
            "issue_url": "" if issue.is_pull else html, "user": self.user_json(c.user, hook=hook),
            "original_author": "", "original_author_id": 0, "body": c.body, "assets": [],
            "created_at": c.created_at, "updated_at": c.updated_at,
        }  # fmt: skip

    def branch_json(self, r: Repo, name: str) -> dict:
        sha = r.branches[name]
        author = {"name": "Fleet Bot", "email": "fleet-bot@example.com", "username": BOT}
        return {
            "name": name,
            "commit": {"id": sha, "message": f"update {name}\n", "url": f"{self.url}/{r.full_name}/commit/{sha}",
                       "author": author, "committer": author,
                       "verification": {"verified": False, "reason": "gpg.error.not_signed_commit", "signature": "",
                                        "signer": None, "payload": ""},
                       "timestamp": _now(), "added": None, "removed": None, "modified": None},
            "protected": False, "required_approvals": 0, "enable_status_check": False, "status_check_contexts": [],
            "user_can_push": True, "user_can_merge": True, "effective_branch_protection_name": "",
        }  # fmt: skip

    # ------------------------------------------------------------------ webhooks

    def _issue_hook(self, r: Repo, issue: Issue, event_type: str, action: str, user: str, *,
                    changes: dict | None = None, commit_id: str = "") -> None:  # fmt: skip
        payload: dict[str, Any] = {"action": action, "number": issue.number}
        if changes:
            payload["changes"] = changes
        payload |= {"issue": self.issue_json(r, issue, hook=True), "repository": self.repo_json(r, hook=True),
                    "sender": self.user_json(user, hook=True), "commit_id": commit_id}  # fmt: skip
        self._deliver("issues", event_type, payload)

    def _pull_hook(self, r: Repo, pr: Issue, event_type: str, action: str, user: str, *, event: str = "pull_request",
                   changes: dict | None = None, review: dict | None = None,
                   requested_reviewer: str | None = None) -> None:  # fmt: skip
        payload: dict[str, Any] = {"action": action, "number": pr.number}
        if changes:
            payload["changes"] = changes
        payload |= {
            "pull_request": self.pull_json(r, pr, hook=True),
            "requested_reviewer": self.user_json(requested_reviewer, hook=True) if requested_reviewer else None,
            "repository": self.repo_json(r, hook=True), "sender": self.user_json(user, hook=True),
            "commit_id": "", "review": review,
        }  # fmt: skip
        self._deliver(event, event_type, payload)

    def _deliver(self, event: str, event_type: str, payload: dict) -> None:
        body = forgejo_json(payload)
        key = self.hook_secret.encode()
        sig256 = hmac.new(key, body, hashlib.sha256).hexdigest() if self.hook_secret else ""
        sig1 = hmac.new(key, body, hashlib.sha1).hexdigest() if self.hook_secret else ""
        delivery = str(uuid.uuid4())
        headers = {"Content-Type": "application/json"}
        for prefix in ("Forgejo", "Gitea", "Gogs", "GitHub"):
            headers[f"X-{prefix}-Delivery"] = delivery
            headers[f"X-{prefix}-Event"] = event
            headers[f"X-{prefix}-Event-Type"] = event_type
        for prefix in ("Forgejo", "Gitea", "Gogs"):
            headers[f"X-{prefix}-Signature"] = sig256
        headers["X-Hub-Signature-256"] = f"sha256={sig256}"
        headers["X-Hub-Signature"] = f"sha1={sig1}"
        self.deliveries.append((headers, body))
        self._outbox.append((headers, body))

    def _flush(self) -> None:
        """POST the pending deliveries (outside the state lock: the receiver may call the API back)."""
        while True:
            with self.lock:
                if not self._outbox:
                    return
                headers, body = self._outbox.pop(0)
                url = self.hook_url
            if url:
                self._post_hook(url, headers, body)

    def _post_hook(self, url: str, headers: dict[str, str], body: bytes) -> None:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:  # Forgejo's DELIVER_TIMEOUT
                resp.read()
                status: int | None = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError):
            status = None  # not retried, like Forgejo
        self.delivery_results.append((status, time.monotonic() - started))

    # ------------------------------------------------------------------ the API

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], Any]:
        """Serve one API request: ``(status, extra headers, JSON document or None)``."""
        parts = urlsplit(raw_path)
        template, handler, args = None, None, {}
        path_matched = False
        for m, t, rx, h in _COMPILED:
            found = rx.match(parts.path)
            if found:
                path_matched = True
                if m == method:
                    template, handler = t, getattr(self, h)
                    args = {k: unquote(v) for k, v in found.groupdict().items()}
                    break
        status, extra, doc = self._dispatch(method, template, handler, args, parts, headers, body, path_matched)
        with self.lock:
            self.requests.append((method, template, status))
        self._flush()
        return status, extra, doc

    def _dispatch(self, method, template, handler, args, parts, headers, body, path_matched):  # noqa: ANN001
        path, query = parts.path, parts.query
        with self.lock:
            hang = self._hang.pop(0) if self._hang else 0
            fail = self._fail.pop(0) if self._fail else None
        if hang:
            time.sleep(hang)
        if fail is not None:
            status, retry_after = fail
            extra = {} if retry_after is None else {"Retry-After": str(retry_after)}
            return status, extra, {"message": "", "url": self._swagger_url()}
        try:
            login = self._auth(headers, template, method)
            if handler is None:
                raise ApiError(405 if path_matched else 404, not_found=not path_matched)
            doc = None
            if body:
                try:
                    doc = json.loads(body)
                except ValueError:
                    raise ApiError(422, "invalid JSON body") from None
            query_args = {k: v for k, v in parse_qs(query, keep_blank_values=True).items()}
            with self.lock:
                self._path = path
                return handler(login=login, query=query_args, body=doc, **args)
        except ApiError as exc:
            if exc.not_found:
                return exc.status, {}, {"errors": [], "message": "The target couldn't be found.",
                                        "url": self._swagger_url()}  # fmt: skip
            return exc.status, {}, {"message": exc.message, "url": self._swagger_url()}

    def _swagger_url(self) -> str:
        return f"{self.url}/api/swagger"

    def _auth(self, headers: Any, template: str | None, method: str) -> str | None:
        value = headers.get("Authorization") or ""
        token = None
        if value.startswith("token "):
            token = value[len("token ") :].strip()
        elif value[:7].lower() == "bearer ":
            token = value[7:].strip()
        if token is None:
            if method == "GET" and template not in (None, "/user"):
                return None  # public repositories are readable without a token
            raise ApiError(401, "token is required")
        with self.lock:
            entry = self.tokens.get(token)
        if entry is None:
            raise ApiError(401, "user does not exist [uid: 0, name: ]")
        login, scopes = entry
        if template and template.startswith("/repos/") and "all" not in scopes:
            need = _scope_for(template)
            ok = {f"write:{need}"} if method != "GET" else {f"read:{need}", f"write:{need}"}
            if not ok & set(scopes):
                wanted = f"write:{need}" if method != "GET" else f"read:{need}"
                raise ApiError(403, f"token does not have at least one of required scope(s): [{wanted}]")
        return login

    def _writer(self, login: str | None) -> str:
        if login is None:
            raise ApiError(401, "token is required")
        return login

    @staticmethod
    def _q(query: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
        values = query.get(name)
        return values[0] if values else default

    def _paged(self, query: dict[str, list[str]], items: list, render) -> tuple[int, dict[str, str], list]:  # noqa: ANN001
        try:
            page = max(1, int(self._q(query, "page", "1") or 1))
            limit = int(self._q(query, "limit", "30") or 30)
        except ValueError:
            raise ApiError(422, "page and limit must be integers") from None
        limit = 30 if limit <= 0 else min(limit, 50)
        total = len(items)
        chunk = items[(page - 1) * limit : page * limit]
        last = max(1, -(-total // limit))
        u = f"{self.url}{self._path}?"
        links = []
        if page < last:
            links += [f'<{u}page={page + 1}&limit={limit}>; rel="next"', f'<{u}page={last}&limit={limit}>; rel="last"']
        if page > 1:
            links += [f'<{u}page=1&limit={limit}>; rel="first"', f'<{u}page={page - 1}&limit={limit}>; rel="prev"']
        extra = {"X-Total-Count": str(total)}
        if links:
            extra["Link"] = ",".join(links)
        return 200, extra, [render(i) for i in chunk]

    # --- handlers: each takes (login, query, body, **path args) and returns (status, headers, doc)

    def h_user(self, login, query, body):  # noqa: ANN001
        return 200, {}, self.user_json(login)

    def h_version(self, login, query, body):  # noqa: ANN001
        return 200, {}, {"version": VERSION}

    def h_repo(self, login, query, body, owner, repo):  # noqa: ANN001
        return 200, {}, self.repo_json(self._repo(f"{owner}/{repo}"))

    def h_list_issues(self, login, query, body, owner, repo):  # noqa: ANN001
        r = self._repo(f"{owner}/{repo}")
        state = self._q(query, "state", "open") or "open"
        kind = self._q(query, "type")
        names = [n for n in (self._q(query, "labels", "") or "").split(",") if n]
        wanted = [label.id for label in r.labels.values() if label.name in names]
        since = self._q(query, "since")
        since_dt = datetime.fromisoformat(since) if since else None
        items = []
        for issue in sorted(r.issues.values(), key=lambda i: i.number, reverse=True):
            if state != "all" and issue.state != state:
                continue
            if (kind == "issues" and issue.is_pull) or (kind == "pulls" and not issue.is_pull):
                continue
            if wanted and not all(i in issue.labels for i in wanted):
                continue
            if since_dt and datetime.fromisoformat(issue.updated_at) < since_dt:
                continue
            items.append(issue)
        return self._paged(query, items, lambda i: self.issue_json(r, i))

    def h_create_issue(self, login, query, body, owner, repo):  # noqa: ANN001
        user = self._writer(login)
        r = self._repo(f"{owner}/{repo}")
        if not isinstance(body, dict) or not isinstance(body.get("title"), str) or not body["title"].strip():
            raise ApiError(422, "[Title]: Required")
        ids = [i for i in body.get("labels") or [] if isinstance(i, int) and i in r.labels]
        issue = self._open_issue(r, body["title"], body.get("body") or "", ids, user)
        return 201, {}, self.issue_json(r, issue)

    def h_get_issue(self, login, query, body, owner, repo, index):  # noqa: ANN001
        r = self._repo(f"{owner}/{repo}")
        return 200, {}, self.issue_json(r, self._issue(r, index))

    def h_edit_issue(self, login, query, body, owner, repo, index):  # noqa: ANN001
        user = self._writer(login)
        r = self._repo(f"{owner}/{repo}")
        issue = self._issue(r, index)
        body = body if isinstance(body, dict) else {}
        self._edit(r, issue, body.get("title"), body.get("body"), user)
        if body.get("state") in ("open", "closed"):
            self._set_state(r, issue, body["state"], user)
        return 201, {}, self.issue_json(r, issue)

    def h_list_comments(self, login, query, body, owner, repo, index):  # noqa: ANN001
        r = self._repo(f"{owner}/{repo}")
        issue = self._issue(r, index)
        return 200, {}, [self.comment_json(r, issue, self.comments_by_id[c][1]) for c in issue.comments]

    def h_create_comment(self, login, query, body, owner, repo, index):  # noqa: ANN001
        user = self._writer(login)
        r = self._repo(f"{owner}/{repo}")
        issue = self._issue(r, index)
        if not isinstance(body, dict) or not isinstance(body.get("body"), str):
            raise ApiError(422, "[Body]: Required")
        c = self._comment(r, issue, body["body"], user)
        return 201, {}, self.comment_json(r, issue, c)

    def h_issue_labels(self, login, query, body, owner, repo, index):  # noqa: ANN001
        r = self._repo(f"{owner}/{repo}")
        issue = self._issue(r, index)
        return 200, {}, [self.label_json(r, r.labels[i]) for i in issue.labels]

    def _label_body(self, r: Repo, body: Any) -> list[int]:
        values = body.get("labels") if isinstance(body, dict) else None
        if not isinstance(values, list):
            raise ApiError(422, "[Labels]: Required")
        kinds = {type(v) for v in values}
        if len(kinds) > 1 or not kinds <= {int, str}:
            raise ApiError(400, "a label list must be all names or all ids")
        if kinds == {str}:
            return [label.id for label in r.labels.values() if label.name in values]
        unknown = [v for v in values if v not in r.labels]
        if unknown:
            raise ApiError(422, f"label does not exist [label_id: {unknown[0]}]")
        return values

    def _labels_changed(self, login, owner, repo, index, body, replace: bool):  # noqa: ANN001
        user = self._writer(login)
        r = self._repo(f"{owner}/{repo}")
        issue = self._issue(r, index)
        self._set_labels(r, issue, self._label_body(r, body), replace=replace)
        self._label_hook(r, issue, "label_updated", user)
        return 200, {}, [self.label_json(r, r.labels[i]) for i in issue.labels]

    def h_add_labels(self, login, query, body, owner, repo, index):  # noqa: ANN001
        return self._labels_changed(login, owner, repo, index, body, replace=False)

    def h_replace_labels(self, login, query, body, owner, repo, index):  # noqa: ANN001
        return self._labels_changed(login, owner, repo, index, body, replace=True)

    def h_clear_labels(self, login, query, body, owner, repo, index):  # noqa: ANN001
        user = self._writer(login)
        r = self._repo(f"{owner}/{repo}")
        issue = self._issue(r, index)
        self._set_labels(r, issue, [], replace=True)
        self._label_hook(r, issue, "label_cleared", user)
        return 204, {}, None

    def h_remove_label(self, login, query, body, owner, repo, index, id):  # noqa: ANN001, A002
        user = self._writer(login)
        r = self._repo(f"{owner}/{repo}")
        issue = self._issue(r, index)
        label_id = int(id)
        if label_id not in r.labels:
            raise ApiError(422, f"label does not exist [label_id: {label_id}]")
        if label_id in issue.labels:
            issue.labels.remove(label_id)
            issue.updated_at = _now()
            self._label_hook(r, issue, "label_updated", user)
        return 204, {}, None

    def h_list_labels(self, login, query, body, owner, repo):  # noqa: ANN001
        r = self._repo(f"{owner}/{repo}")
        items = sorted(r.labels.values(), key=lambda label: (label.name, label.id))
        return self._paged(query, items, lambda label: self.label_json(r, label))

    def h_create_label(self, login, query, body, owner, repo):  # noqa: ANN001
        self._writer(login)
        r = self._repo(f"{owner}/{repo}")
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
            raise ApiError(422, "[Name]: Required")
        if not isinstance(body.get("color"), str):
            raise ApiError(422, "[Color]: Required")
        label = self._create_label(r, body["name"], body["color"], body.get("description") or "",
                                   bool(body.get("exclusive")))  # fmt: skip
        return 201, {}, self.label_json(r, label)

    def h_list_pulls(self, login, query, body, owner, repo):  # noqa: ANN001
        r = self._repo(f"{owner}/{repo}")
        state = self._q(query, "state", "open") or "open"
        items = [i for i in sorted(r.issues.values(), key=lambda i: i.number, reverse=True)
                 if i.is_pull and (state == "all" or i.state == state)]  # fmt: skip
        return self._paged(query, items, lambda i: self.pull_json(r, i))

    def h_create_pull(self, login, query, body, owner, repo):  # noqa: ANN001
        user = self._writer(login)
        r = self._repo(f"{owner}/{repo}")
        if not isinstance(body, dict) or not body.get("head") or not body.get("base"):
            raise ApiError(422, "[Head]: Required")
        pr = self._open_pull(r, body["head"], body["base"], body.get("title") or body["head"], body.get("body") or "",
                             user)  # fmt: skip
        return 201, {}, self.pull_json(r, pr)

    def h_is_merged(self, login, query, body, owner, repo, index):  # noqa: ANN001
        r = self._repo(f"{owner}/{repo}")
        pr = self._issue(r, index)
        if not pr.is_pull or not pr.merged:
            raise ApiError(404, not_found=True)
        return 204, {}, None

    def h_get_pull(self, login, query, body, owner, repo, index):  # noqa: ANN001
        r = self._repo(f"{owner}/{repo}")
        pr = self._issue(r, index)
        if not pr.is_pull:
            raise ApiError(404, not_found=True)
        return 200, {}, self.pull_json(r, pr)

    def set_permission(self, repo: str, login: str, permission: str) -> None:
        """``login``'s access to ``repo`` as Forgejo computes it: none, read, write, admin or owner (default read;
        the repository's owner is owner)."""
        with self.lock:
            self.permissions[(repo, login)] = permission

    def add_hook(self, repo: str, url: str, *, active: bool = True,
                 events: tuple[str, ...] = ("issues", "issue_label", "pull_request", "pull_request_sync")) -> None:  # fmt: skip
        """A webhook configured on ``repo`` as a person would in its settings (listed to repository admins)."""
        with self.lock:
            hooks = self.repo_hooks.setdefault(repo, [])
            hooks.append({"id": self._next("hook"), "type": "forgejo", "url": url, "active": active,
                          "branch_filter": "", "authorization_header": "", "content_type": "json",
                          "config": {"url": url, "content_type": "json", "http_method": "post"},
                          "events": list(events), "metadata": None, "created_at": _now(), "updated_at": _now()})  # fmt: skip

    def h_list_hooks(self, login, query, body, owner, repo):  # noqa: ANN001
        # As Forgejo's reqAdmin(): only an owner or an admin collaborator sees the repository's webhooks.
        r = self._repo(f"{owner}/{repo}")
        if self._permission(r, login) not in ("admin", "owner"):
            raise ApiError(403, "user should be an owner or a collaborator with admin write of a repository")
        return self._paged(query, list(self.repo_hooks.get(r.full_name, [])), lambda h: h)

    def _permission(self, r: Repo, login: str) -> str:
        return self.permissions.get((r.full_name, login), "owner" if login == r.owner else "read")

    def h_permission(self, login, query, body, owner, repo, collaborator):  # noqa: ANN001
        # As Forgejo's GetRepoPermissions: 404 for an unknown user; 403 unless the asker is the user asked about
        # or an admin of the repository (or of the site: the fake has none); role_name is the permission again.
        r = self._repo(f"{owner}/{repo}")
        if collaborator not in self.users:
            raise ApiError(404, not_found=True)
        if login != collaborator and self._permission(r, login) not in ("admin", "owner"):
            raise ApiError(403, "Only admins can query all permissions, repo admins can query all repo permissions, "
                                "collaborators can query only their own")  # fmt: skip
        perm = self._permission(r, collaborator)
        return 200, {}, {"permission": perm, "role_name": perm, "user": self.user_json(collaborator)}

    def h_list_reviews(self, login, query, body, owner, repo, index):  # noqa: ANN001
        r = self._repo(f"{owner}/{repo}")
        pr = self._issue(r, index)
        if not pr.is_pull:
            raise ApiError(404, not_found=True)
        return self._paged(query, pr.reviews, lambda rv: self._review_json(r, pr, rv))

    def h_review_comments(self, login, query, body, owner, repo, index, id):  # noqa: ANN001, A002
        r = self._repo(f"{owner}/{repo}")
        pr = self._issue(r, index)
        review = next((rv for rv in pr.reviews if str(rv["id"]) == str(id)), None) if pr.is_pull else None
        if review is None:
            raise ApiError(404, not_found=True)
        return 200, {}, [self._review_comment_json(r, pr, review, c) for c in review["comments"]]

    def h_pull_by_branch(self, login, query, body, owner, repo, base, head):  # noqa: ANN001
        r = self._repo(f"{owner}/{repo}")
        for pr in r.issues.values():
            if pr.is_pull and pr.base == base and pr.head == head:
                return 200, {}, self.pull_json(r, pr)
        raise ApiError(404, not_found=True)

    def h_branch(self, login, query, body, owner, repo, branch):  # noqa: ANN001
        r = self._repo(f"{owner}/{repo}")
        if branch not in r.branches:
            raise ApiError(404, not_found=True)
        return 200, {}, self.branch_json(r, branch)


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.0 (one request per connection), so ``down()`` really refuses every later request."""

    fake: FakeForgejo
    server_version = "FakeForgejo"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if not self.path.startswith("/api/v1/"):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status, extra, doc = self.fake.handle(self.command, self.path, self.headers, body)
        data = b"" if doc is None else json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            self.send_response(status)
            for key, value in extra.items():
                self.send_header(key, value)
            if doc is not None:
                self.send_header("Content-Type", "application/json;charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)
        except OSError:
            pass  # the client gave up (a timeout test)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve
