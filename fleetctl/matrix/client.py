"""The Matrix client: the only code that talks to a homeserver (client-server API v3, httpx, no SDK).

Each call is ONE request: retries, backoff and rate-limit waits belong to the caller (the outbox, which
knows what a retry may repeat). Every path segment (room id, alias, transaction id) is percent-encoded,
so an id cannot reach another path. Errors are ``MatrixError`` (a ``RemoteError``: exit code 5) with
one line for an operator that never contains the token:

=====================  ===========================================================================
answer                 message (``status``, ``errcode``, ``retryable``)
=====================  ===========================================================================
401                    "the homeserver refused the access token (401 M_UNKNOWN_TOKEN): …"
403                    "… (403 M_FORBIDDEN): …" — on a send: the bot is not in the room (or may not post)
404                    "unknown room alias #a:b (404 M_NOT_FOUND)" / "… not found (404 …)"
429                    "rate limited by the homeserver: wait 4.2s (429 M_LIMIT_EXCEEDED)", ``retry_after``
5xx                    "the homeserver failed (502): …", retryable
no answer              "cannot reach the homeserver at URL: …" (``status`` None), retryable
=====================  ===========================================================================

Responses are read in a bounded way (``MAX_RESPONSE_BYTES``); an answer that is not the JSON shape a call
expects is a ``MatrixError`` too.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

from fleetctl.errors import ConfigError, RemoteError

if TYPE_CHECKING:
    from fleetctl.config import MatrixConfig

API = "/_matrix/client/v3"
PATHS = (
    ("GET", API + "/account/whoami"),
    ("GET", API + "/directory/room/{roomAlias}"),
    ("GET", API + "/joined_rooms"),
    ("PUT", API + "/rooms/{roomId}/send/{eventType}/{txnId}"),
)
"""Every (method, path template) the client calls: all in the Matrix client-server API spec (v1.x)."""

MAX_RESPONSE_BYTES = 1024 * 1024
"""A homeserver's answer larger than this is refused."""


class MatrixError(RemoteError):
    """The homeserver failed, refused or could not be reached."""

    code = "matrix_error"

    def __init__(self, message: str, *, status: int | None = None, errcode: str | None = None,
                 retry_after: float | None = None, retryable: bool = False) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.errcode, self.retry_after, self.retryable = status, errcode, retry_after, retryable


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _seg(value: str) -> str:
    return quote(str(value), safe="")


class MatrixClient:
    """Calls of the client-server API with one access token. One instance per thread (it owns a pool).

    Example::

        with MatrixClient("https://matrix.example.org", token) as matrix:
            matrix.send_message("!abc:example.org", "fleetctl.x.1", "hello", "<b>hello</b>")
    """

    def __init__(self, homeserver: str, access_token: str, *, timeout: float = 10.0, transport: Any = None) -> None:
        import httpx

        from fleetctl import __version__

        if not homeserver.startswith(("http://", "https://")):
            raise ConfigError(f"matrix.homeserver must start with http:// or https://, not {_redacted(homeserver)!r}")
        self.homeserver = homeserver.rstrip("/")
        self._httpx = httpx
        self._http = httpx.Client(
            base_url=self.homeserver,
            headers={
                "Authorization": f"Bearer {access_token}",
                "Accept": "application/json",
                "User-Agent": f"fleetctl/{__version__}",
            },  # fmt: skip
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            transport=transport,
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MatrixClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calls

    def whoami(self) -> dict:
        """``{"user_id": …, "device_id": …}`` of the token (a check that it is accepted)."""
        doc = self._request("GET", f"{API}/account/whoami", what="checking the access token")
        if not isinstance(doc.get("user_id"), str):
            raise MatrixError("the homeserver's whoami answer has no user_id")
        return doc

    def resolve_room(self, room: str) -> str:
        """A room id as it is; an alias (``#name:server``) as the room id it names."""
        if not room.startswith("#"):
            return room
        doc = self._request("GET", f"{API}/directory/room/{_seg(room)}", what=f"resolving {room}",
                            not_found=f"unknown room alias {room}")  # fmt: skip
        if not isinstance(doc.get("room_id"), str) or not doc["room_id"].startswith("!"):
            raise MatrixError(f"the homeserver's answer for {room} has no room_id")
        return doc["room_id"]

    def joined_rooms(self) -> list[str]:
        """The ids of the rooms the token's user has joined."""
        doc = self._request("GET", f"{API}/joined_rooms", what="listing the bot's rooms")
        rooms = doc.get("joined_rooms")
        if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
            raise MatrixError("the homeserver's joined_rooms answer is not a list of room ids")
        return rooms

    def send_message(self, room_id: str, txn_id: str, body: str, html: str | None = None) -> str:
        """Send an ``m.text`` message (and its HTML) to ``room_id``; its event id. The same ``txn_id`` (with the
        same token) is one message, however often it is sent."""
        content: dict[str, Any] = {"msgtype": "m.text", "body": body}
        if html is not None:
            content.update(format="org.matrix.custom.html", formatted_body=html)
        doc = self._request("PUT", f"{API}/rooms/{_seg(room_id)}/send/m.room.message/{_seg(txn_id)}", json_body=content,
                            what=f"sending to {room_id}", forbidden=f"cannot post in {room_id}: the bot is not in "
                            "the room or may not post there")  # fmt: skip
        if not isinstance(doc.get("event_id"), str):
            raise MatrixError("the homeserver's answer to a send has no event_id")
        return doc["event_id"]

    # ------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, *, what: str, json_body: Any = None, not_found: str | None = None,
                 forbidden: str | None = None) -> dict:  # fmt: skip
        httpx = self._httpx
        try:
            with self._http.stream(method, path, json=json_body) as response:
                raw = b""
                for chunk in response.iter_bytes():
                    raw += chunk
                    if len(raw) > MAX_RESPONSE_BYTES:
                        raise MatrixError(f"the homeserver's answer while {what} is larger than "
                                          f"{MAX_RESPONSE_BYTES} bytes", status=response.status_code)  # fmt: skip
        except httpx.TimeoutException:
            raise MatrixError(f"cannot reach the homeserver at {_redacted(self.homeserver)}: no answer in time "
                              f"while {what}", retryable=True) from None  # fmt: skip
        except httpx.HTTPError as exc:
            reason = str(exc).split("\n", 1)[0] or type(exc).__name__
            raise MatrixError(f"cannot reach the homeserver at {_redacted(self.homeserver)}: {reason}",
                              retryable=True) from None  # fmt: skip
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = None
        status = response.status_code
        if 200 <= status < 300:
            if not isinstance(doc, dict):
                raise MatrixError(f"the homeserver's answer while {what} is not a JSON object", status=status)
            return doc
        raise self._error(status, doc if isinstance(doc, dict) else {}, response.headers, what, not_found, forbidden)

    @staticmethod
    def _error(status: int, doc: dict, headers: Any, what: str, not_found: str | None,
               forbidden: str | None) -> MatrixError:  # fmt: skip
        errcode = doc.get("errcode") if isinstance(doc.get("errcode"), str) else None
        said = " ".join(str(doc.get("error") or "").split())[:200]
        tag = f"{status} {errcode}" if errcode else str(status)
        tail = f": {said}" if said else ""
        if status == 401:
            return MatrixError(f"the homeserver refused the access token ({tag}){tail}", status=status, errcode=errcode)
        if status == 403:
            head = forbidden or f"the homeserver forbids {what}"
            return MatrixError(f"{head} ({tag}){tail}", status=status, errcode=errcode)
        if status == 404:
            head = not_found or f"not found while {what}"
            return MatrixError(f"{head} ({tag}){tail}", status=status, errcode=errcode)
        if status == 429:
            wait = _retry_after(doc, headers)
            shown = f"wait {wait:.1f}s" if wait is not None else "wait"
            return MatrixError(f"rate limited by the homeserver: {shown} ({tag})", status=status, errcode=errcode,
                               retry_after=wait, retryable=True)  # fmt: skip
        if status >= 500:
            return MatrixError(f"the homeserver failed while {what} ({tag}){tail}", status=status, errcode=errcode,
                               retryable=True)  # fmt: skip
        return MatrixError(f"the homeserver refused {what} ({tag}){tail}", status=status, errcode=errcode)


def _retry_after(doc: dict, headers: Any) -> float | None:
    """Seconds to wait: the body's ``retry_after_ms``, else the ``Retry-After`` header (seconds)."""
    ms = doc.get("retry_after_ms")
    if isinstance(ms, int | float) and not isinstance(ms, bool) and ms >= 0:
        return min(float(ms) / 1000.0, 86400.0)
    try:
        return min(max(0.0, float(headers.get("retry-after", ""))), 86400.0)
    except ValueError:
        return None


def client_for(matrix: MatrixConfig, *, timeout: float | None = None) -> MatrixClient:
    """A client for ``[matrix]``; ``ConfigError`` when the homeserver or the token is missing."""
    if not matrix.homeserver or not matrix.access_token:
        raise ConfigError("[matrix] needs homeserver and access_token (or access_token_file, FLEET_MATRIX_TOKEN)")
    return MatrixClient(matrix.homeserver, matrix.access_token, timeout=timeout or matrix.timeout_secs)
