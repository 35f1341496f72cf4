"""The Forgejo REST client: the only way fleetctl talks to Forgejo (API v1, Forgejo v11).

Every call goes through ``ForgejoClient._call`` with an operation name from ``ROUTES``, which maps it to
the HTTP method and the swagger path template it uses. A test checks statically that each of those
``(method, template)`` pairs exists in Forgejo's own ``swagger.v1.json``, so the client cannot drift
onto an endpoint Forgejo does not have.

Errors are ``ForgejoError`` (a ``RemoteError``: exit code 5) with ``status`` (None for network errors)
and ``retryable``. The messages name the operation and the fix, never the token:

=====================  =====================================================================
answer                 what the caller gets
=====================  =====================================================================
401                    "Forgejo refused the token (401): check forgejo.token"
403                    "the Forgejo token may not do this (403): it needs the repository …"
404                    None from ``get_issue``/``get_pull``/``pull_by_branch``; else an error
422                    Forgejo's own message (and ``remove_label`` treats it as done)
429, 5xx               retried (see below), then a retryable error
timeout, no connection retried (see below), then "cannot reach Forgejo at URL: …"
=====================  =====================================================================

Retries: 429, 502, 503, 504 (and 500 for a GET), connection errors and timeouts are retried up to
``retries`` more times with exponential backoff (``backoff * 2**n``, at most ``max_backoff``), waiting
at least what ``Retry-After`` asks (seconds or an HTTP date, also capped). A POST creates something, so
it is retried only when Forgejo certainly did not process it — 429, 503, or a connection that never
opened — never after a read timeout or another 5xx: the caller's outbox detects duplicates itself.

Responses are read in a bounded way (``MAX_RESPONSE_BYTES``); a body that is not the JSON shape an
operation expects is a ``ForgejoError`` too. httpx is imported inside the class only (ruff TID253).
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

from fleetctl.errors import RemoteError

if TYPE_CHECKING:
    from fleetctl.config import ForgejoConfig

ROUTES: dict[str, tuple[str, str]] = {
    "whoami": ("GET", "/user"),
    "version": ("GET", "/version"),
    "get_repo": ("GET", "/repos/{owner}/{repo}"),
    "get_issue": ("GET", "/repos/{owner}/{repo}/issues/{index}"),
    "list_issues": ("GET", "/repos/{owner}/{repo}/issues"),
    "get_pull": ("GET", "/repos/{owner}/{repo}/pulls/{index}"),
    "pull_by_branch": ("GET", "/repos/{owner}/{repo}/pulls/{base}/{head}"),
    "list_reviews": ("GET", "/repos/{owner}/{repo}/pulls/{index}/reviews"),
    "permission": ("GET", "/repos/{owner}/{repo}/collaborators/{collaborator}/permission"),
    "review_comments": ("GET", "/repos/{owner}/{repo}/pulls/{index}/reviews/{id}/comments"),
    "list_comments": ("GET", "/repos/{owner}/{repo}/issues/{index}/comments"),
    "create_comment": ("POST", "/repos/{owner}/{repo}/issues/{index}/comments"),
    "list_labels": ("GET", "/repos/{owner}/{repo}/labels"),
    "create_label": ("POST", "/repos/{owner}/{repo}/labels"),
    "add_labels": ("POST", "/repos/{owner}/{repo}/issues/{index}/labels"),
    "remove_label": ("DELETE", "/repos/{owner}/{repo}/issues/{index}/labels/{id}"),
    "list_hooks": ("GET", "/repos/{owner}/{repo}/hooks"),
}
"""Operation name -> (HTTP method, path template of swagger.v1.json, relative to ``/api/v1``)."""

API_PREFIX = "/api/v1"
"""Where Forgejo serves its API under the root URL."""

PAGE_LIMIT = 50
"""Forgejo's largest page (bigger ``limit`` values are silently capped, which would break paging)."""

MAX_PAGES = 200
"""A list never reads more pages than this (10,000 items at 50 a page): a bound, not a feature."""

MAX_RESPONSE_BYTES = 10 * 1024 * 1024
"""A response body larger than this is refused (a misbehaving server cannot exhaust memory)."""

_RETRY_STATUS = frozenset({429, 502, 503, 504})
_POST_RETRY_STATUS = frozenset({429, 503})


class ForgejoError(RemoteError):
    """Forgejo failed, refused or could not be reached. ``status`` is None for network errors."""

    code = "forgejo_error"

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False,
                 details: dict | None = None) -> None:  # fmt: skip
        super().__init__(message, details=details)
        self.status = status
        self.retryable = retryable

    @property
    def unreachable(self) -> bool:
        """Forgejo was not reached at all (refused, timed out; no HTTP status): the next request would only wait
        as long again, so a pass stops asking until its next run."""
        return self.status is None and self.retryable


class _Retry(Exception):
    """Internal: a failed try that may be repeated, carrying the error to raise if it is the last."""

    def __init__(self, error: ForgejoError, retry_after: float | None = None, *, post_ok: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after
        self.post_ok = post_ok  # certainly not processed: safe to repeat even a POST


def _segment(value: str | int) -> str:
    return quote(str(value), safe="")


def _split_repo(repo: str) -> tuple[str, str]:
    owner, sep, name = repo.partition("/")
    if not sep or not owner or not name or "/" in name:
        raise ForgejoError(f"a Forgejo repository is written owner/name, not {repo!r}")
    return owner, name


def retry_after_secs(value: str | None, *, now: float | None = None) -> float | None:
    """The delay a ``Retry-After`` header asks for (delta-seconds or an HTTP date), None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _redacted(url: str) -> str:
    """``url`` without user:password@ (a URL in a message must not leak credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class ForgejoClient:
    """Calls of the Forgejo REST API with one token. One instance per thread (it owns an httpx pool).

    Example::

        with ForgejoClient("https://forge.example.org", token) as forgejo:
            for issue in forgejo.list_issues("acme/widgets", labels=["agent-task"], type="issues"):
                print(issue["number"], issue["title"])
    """

    def __init__(self, base_url: str, token: str | None, *, timeout: float = 10.0, connect_timeout: float = 5.0,
                 retries: int = 2, backoff: float = 0.5, max_backoff: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep, transport: Any = None) -> None:  # fmt: skip
        import httpx

        if not base_url.startswith(("http://", "https://")):
            raise ForgejoError(f"the Forgejo URL must start with http:// or https://, not {_redacted(base_url)!r}")
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("retries, backoff and max_backoff must not be negative")
        self.base_url = base_url.rstrip("/")
        self.last_date: str | None = None
        """The ``Date`` header of the last answer (``fleetctl doctor`` compares clocks with it)."""
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._httpx = httpx
        headers = {"Accept": "application/json", "User-Agent": "fleetctl"}
        if token:
            headers["Authorization"] = f"token {token}"
        self._http = httpx.Client(
            base_url=self.base_url + API_PREFIX,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=transport,
            follow_redirects=False,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> ForgejoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def _call(self, op: str, *, path: dict[str, str | int] | None = None, params: dict[str, Any] | None = None,
              body: Any = None, none_on: frozenset[int] = frozenset()) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
        """Run operation ``op`` of ``ROUTES``: ``(status, JSON or None, headers)``; None on a ``none_on`` status.

        ``path`` fills the template's ``{name}`` segments (each percent-quoted; ``head`` keeps its slashes).
        """
        method, template = ROUTES[op]
        values = {}
        for key, value in (path or {}).items():
            values[key] = "/".join(_segment(s) for s in str(value).split("/")) if key == "head" else _segment(value)
        url = template.format(**values)
        what = f"{method} {API_PREFIX}{template}"
        attempt = 0
        while True:
            try:
                return self._once(method, url, what, params, body, none_on)
            except _Retry as retry:
                if attempt >= self.retries or (method == "POST" and not retry.post_ok):
                    raise retry.error from None
                delay = min(self.backoff * 2**attempt, self.max_backoff)
                if retry.retry_after is not None:
                    delay = max(delay, min(retry.retry_after, self.max_backoff))
                self._sleep(delay)
                attempt += 1

    def _once(self, method: str, url: str, what: str, params: dict[str, Any] | None, body: Any,
              none_on: frozenset[int]) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
        httpx = self._httpx
        where = _redacted(self.base_url)
        try:
            with self._http.stream(method, url, params=params, json=body) as resp:
                raw = self._read_bounded(resp, what)
                status, headers = resp.status_code, dict(resp.headers)
                self.last_date = headers.get("date")
        except httpx.TimeoutException as exc:
            # a connect/pool timeout never reached Forgejo: safe to repeat even a POST
            not_sent = isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
            error = ForgejoError(f"cannot reach Forgejo at {where}: {what} timed out ({type(exc).__name__})",
                                 retryable=True)  # fmt: skip
            raise _Retry(error, post_ok=not_sent) from None
        except httpx.TransportError as exc:
            error = ForgejoError(f"cannot reach Forgejo at {where}: {type(exc).__name__}: {exc}", retryable=True)
            raise _Retry(error, post_ok=isinstance(exc, httpx.ConnectError)) from None
        if status in none_on:
            return status, None, headers
        doc = None
        if raw:
            try:
                doc = json.loads(raw)
            except ValueError:
                if status < 300:
                    raise ForgejoError(f"Forgejo answered {what} with a body that is not JSON", status=status) from None
        if status < 300:
            return status, doc, headers
        raise self._error(status, doc, what, method, headers)

    def _read_bounded(self, resp: Any, what: str) -> bytes:
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
            raise ForgejoError(f"Forgejo's answer to {what} is too large ({int(declared)} bytes)",
                               status=resp.status_code)  # fmt: skip
        chunks, size = [], 0
        for chunk in resp.iter_bytes():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise ForgejoError(f"Forgejo's answer to {what} is too large (over {MAX_RESPONSE_BYTES} bytes)",
                                   status=resp.status_code)  # fmt: skip
            chunks.append(chunk)
        return b"".join(chunks)

    def _error(self, status: int, doc: Any, what: str, method: str, headers: dict[str, str]) -> Exception:
        message = doc.get("message") if isinstance(doc, dict) and isinstance(doc.get("message"), str) else ""
        message = message[:500]
        if status == 401:
            return ForgejoError(f"Forgejo refused the token (401): check forgejo.token ({what})", status=status)
        if status == 403:
            return ForgejoError(
                f"the Forgejo token may not do this (403): it needs the repository and issue scopes "
                f"(write:repository, write:issue) and access to the repository ({what}"
                + (f": {message})" if message else ")"),
                status=status,
            )
        if status == 404:
            return ForgejoError(f"not found on Forgejo (404): {what}: check the repository, the number and "
                                f"that the token can see them", status=status)  # fmt: skip
        if status == 422:
            return ForgejoError(f"Forgejo rejected {what} (422): {message or 'validation failed'}", status=status)
        retryable = status == 429 or status >= 500
        error = ForgejoError(f"Forgejo answered {status} to {what}" + (f": {message}" if message else ""),
                             status=status, retryable=retryable)  # fmt: skip
        if status in _RETRY_STATUS or (status == 500 and method == "GET"):
            return _Retry(error, retry_after_secs(headers.get("retry-after")), post_ok=status in _POST_RETRY_STATUS)
        return error

    def _pages(self, op: str, path: dict[str, str | int], params: dict[str, Any], limit: int) -> Iterator[dict]:
        limit = max(1, min(limit, PAGE_LIMIT))
        for page in range(1, MAX_PAGES + 1):
            _, doc, _ = self._call(op, path=path, params={**params, "page": page, "limit": limit})
            items = _expect_list(doc, op)
            yield from items
            if len(items) < limit:
                return

    # ------------------------------------------------------------------ the API

    def whoami(self) -> dict:
        """The token's user (a cheap token check). Example: ``client.whoami()["login"]``."""
        return _expect_dict(self._call("whoami")[1], "whoami")

    def version(self) -> str:
        """Forgejo's version string, e.g. ``"11.0.1+gitea-1.22.0"``."""
        doc = _expect_dict(self._call("version")[1], "version")
        if not isinstance(doc.get("version"), str):
            raise ForgejoError("Forgejo's /version answer has no version string")
        return doc["version"]

    def get_repo(self, repo: str) -> dict:
        """The repository ``owner/name`` (ForgejoError 404 if it does not exist or the token cannot see it)."""
        owner, name = _split_repo(repo)
        return _expect_dict(self._call("get_repo", path={"owner": owner, "repo": name})[1], "get_repo")

    def get_issue(self, repo: str, number: int) -> dict | None:
        """Issue (or PR) ``number`` as an Issue object; None if there is none."""
        owner, name = _split_repo(repo)
        status, doc, _ = self._call("get_issue", path={"owner": owner, "repo": name, "index": int(number)},
                                    none_on=frozenset({404}))  # fmt: skip
        return None if status == 404 else _expect_dict(doc, "get_issue")

    def list_issues(self, repo: str, *, state: str = "open", labels: list[str] | None = None, type: str = "issues",
                    since: str | None = None, limit: int = PAGE_LIMIT) -> Iterator[dict]:  # fmt: skip
        """Every matching issue, newest first, across all pages.

        ``labels`` matches issues having *all* the named labels; names that do not exist are dropped by
        Forgejo, and if none exist no label filter applies at all — make sure the labels exist first.
        ``type="issues"`` leaves pull requests out (``None`` lists both).
        """
        owner, name = _split_repo(repo)
        params: dict[str, Any] = {"state": state}
        if labels:
            params["labels"] = ",".join(labels)
        if type:
            params["type"] = type
        if since:
            params["since"] = since
        return self._pages("list_issues", {"owner": owner, "repo": name}, params, limit)

    def get_pull(self, repo: str, number: int) -> dict | None:
        """Pull request ``number``; None if there is none (a plain issue's number is None too)."""
        owner, name = _split_repo(repo)
        status, doc, _ = self._call("get_pull", path={"owner": owner, "repo": name, "index": int(number)},
                                    none_on=frozenset({404}))  # fmt: skip
        return None if status == 404 else _expect_dict(doc, "get_pull")

    def pull_by_branch(self, repo: str, base: str, head: str) -> dict | None:
        """A pull request from branch ``head`` into ``base``, in any state; None if there is none."""
        owner, name = _split_repo(repo)
        if not base or "/" in base or not head:
            raise ForgejoError(f"pull_by_branch needs a one-segment base branch and a head branch, not {base!r}")
        status, doc, _ = self._call("pull_by_branch", path={"owner": owner, "repo": name, "base": base, "head": head},
                                    none_on=frozenset({404}))  # fmt: skip
        return None if status == 404 else _expect_dict(doc, "pull_by_branch")

    def list_reviews(self, repo: str, number: int) -> list[dict]:
        """The reviews of pull request ``number`` (PullReview objects), oldest first; [] if there is no such PR."""
        owner, name = _split_repo(repo)
        try:
            return list(self._pages("list_reviews", {"owner": owner, "repo": name, "index": int(number)}, {},
                                    PAGE_LIMIT))  # fmt: skip
        except ForgejoError as exc:
            if exc.status == 404:  # as documented: a caller then works without the reviews, never waits for them
                return []
            raise

    def review_comments(self, repo: str, number: int, review_id: int) -> list[dict] | None:
        """The inline comments of review ``review_id`` (PullReviewComment objects: ``path``, ``position`` — the
        line in the new file —, ``body``…); None if the review is gone."""
        owner, name = _split_repo(repo)
        status, doc, _ = self._call("review_comments", path={"owner": owner, "repo": name, "index": int(number),
                                                             "id": int(review_id)}, none_on=frozenset({404}))  # fmt: skip
        return None if status == 404 else _expect_list(doc, "review_comments")

    def permission(self, repo: str, login: str) -> str:
        """``login``'s access to ``repo``: ``none``, ``read``, ``write``, ``admin`` or ``owner`` (``none`` when Forgejo
        does not know the user there: 404)."""
        owner, name = _split_repo(repo)
        status, doc, _ = self._call("permission", path={"owner": owner, "repo": name, "collaborator": login},
                                    none_on=frozenset({404}))  # fmt: skip
        if status == 404:
            return "none"
        value = _expect_dict(doc, "permission").get("permission")
        return value if isinstance(value, str) else "none"

    def list_comments(self, repo: str, number: int) -> list[dict]:
        """The comments of issue or PR ``number``, oldest first."""
        owner, name = _split_repo(repo)
        doc = self._call("list_comments", path={"owner": owner, "repo": name, "index": int(number)})[1]
        return _expect_list(doc, "list_comments")

    def create_comment(self, repo: str, number: int, body: str) -> dict:
        """Comment on issue or PR ``number``; the new Comment (its ``html_url`` ends ``#issuecomment-ID``)."""
        owner, name = _split_repo(repo)
        doc = self._call("create_comment", path={"owner": owner, "repo": name, "index": int(number)},
                         body={"body": body})[1]  # fmt: skip
        return _expect_dict(doc, "create_comment")

    def list_labels(self, repo: str) -> list[dict]:
        """The repository's labels (all pages)."""
        owner, name = _split_repo(repo)
        return list(self._pages("list_labels", {"owner": owner, "repo": name}, {}, PAGE_LIMIT))

    def create_label(self, repo: str, name: str, color: str, description: str = "") -> dict:
        """Create a repository label (Forgejo allows duplicate names: look first). ``color`` like ``#0e8a16``."""
        owner, rname = _split_repo(repo)
        doc = self._call("create_label", path={"owner": owner, "repo": rname},
                         body={"name": name, "color": color, "description": description})[1]  # fmt: skip
        return _expect_dict(doc, "create_label")

    def add_labels(self, repo: str, number: int, label_ids: list[int]) -> list[dict]:
        """Add labels (by id) to issue or PR ``number``; its full label set afterwards."""
        owner, name = _split_repo(repo)
        doc = self._call("add_labels", path={"owner": owner, "repo": name, "index": int(number)},
                         body={"labels": [int(i) for i in label_ids]})[1]  # fmt: skip
        return _expect_list(doc, "add_labels")

    def remove_label(self, repo: str, number: int, label_id: int) -> None:
        """Remove one label (by id) from issue or PR ``number``; a label already gone (404/422) is fine."""
        owner, name = _split_repo(repo)
        self._call("remove_label", path={"owner": owner, "repo": name, "index": int(number), "id": int(label_id)},
                   none_on=frozenset({404, 422}))  # fmt: skip

    def list_hooks(self, repo: str) -> list[dict]:
        """The repository's webhooks (first page). Forgejo shows them to a repository admin only (403 else)."""
        owner, name = _split_repo(repo)
        _, doc, _ = self._call("list_hooks", path={"owner": owner, "repo": name}, params={"limit": PAGE_LIMIT})
        return _expect_list(doc, "list_hooks")


def _expect_dict(doc: Any, op: str) -> dict:
    if not isinstance(doc, dict):
        raise ForgejoError(f"Forgejo's answer to {op} is not a JSON object")
    return doc


def _expect_list(doc: Any, op: str) -> list[dict]:
    if not isinstance(doc, list) or not all(isinstance(item, dict) for item in doc):
        raise ForgejoError(f"Forgejo's answer to {op} is not a JSON list of objects")
    return doc


def client_for(forgejo: ForgejoConfig, **options: Any) -> ForgejoClient:
    """The client of the configured Forgejo (``url``, ``token``, ``timeout_secs``; ``options`` override the
    client's retry settings). ``ConfigError`` when the URL or the token is not set."""
    from fleetctl.errors import ConfigError

    token = forgejo.token if forgejo.url else None  # a token_file is read here, or says why it cannot be
    if not token:
        missing = "forgejo.url" if not forgejo.url else "forgejo.token (token, token_file or FLEET_FORGEJO_TOKEN)"
        raise ConfigError(f"Forgejo's API cannot be used: {missing} is not set", code="forgejo_not_configured")
    options.setdefault("connect_timeout", min(5.0, forgejo.timeout_secs))
    return ForgejoClient(forgejo.url, token, timeout=forgejo.timeout_secs, **options)
