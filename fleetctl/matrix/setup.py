"""``fleetctl notify test``: check the Matrix setup by sending one message, and say exactly what is wrong.

The steps, each with its own error: the configuration (homeserver, token, room), the homeserver reachable
and the token accepted (``whoami``), the room (an alias resolved), the bot joined to it, the message sent.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from fleetctl.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from fleetctl.config import MatrixConfig
    from fleetctl.store import Store

DEFAULT_TEST_MESSAGE = "fleetctl: test message — notifications reach this room."
MAX_MESSAGE = 4000
"""The longest test message sent (a Matrix event may be 64 KiB; a test needs far less)."""


def check_setup(store: Store, matrix: MatrixConfig, message: str = DEFAULT_TEST_MESSAGE) -> dict:
    """Send ``message`` to the configured room; ``{"user_id", "room_id", "event_id", "homeserver"}``.

    The room is found as the outbox finds it (``fleetctl.matrix.outbox.room_id``: an alias resolved once and
    remembered in ``store``), so the test posts where the notifications go. Raises ``ConfigError`` when
    ``[matrix]`` is incomplete, ``MatrixError`` (a remote failure, exit 5) with a
    one-line reason when the homeserver, the token or the room is not right.
    """
    from fleetctl.matrix.client import MatrixError, client_for
    from fleetctl.matrix.outbox import room_id

    if not message.strip() or len(message) > MAX_MESSAGE:
        raise UsageError(f"the test message must be 1 to {MAX_MESSAGE} characters, not blank", code="invalid_message")
    missing = [k for k in ("homeserver", "room_id", "access_token") if not getattr(matrix, k)]
    if missing:
        how = " (or access_token_file, or FLEET_MATRIX_TOKEN)" if "access_token" in missing else ""
        raise ConfigError(f"[matrix] is not configured: set {', '.join('matrix.' + k for k in missing)}{how}; "
                          "see docs/matrix.md", code="matrix_not_configured")  # fmt: skip
    with client_for(matrix) as client:
        user = client.whoami().get("user_id") or "the bot"
        room = room_id(store, client, matrix)
        if room not in client.joined_rooms():
            raise MatrixError(f"{user} is not in room {matrix.room_id}: invite it to the room and join it as the bot "
                              "(docs/matrix.md)", status=403, errcode="M_FORBIDDEN")  # fmt: skip
        event_id = client.send_message(room, f"fleetctl.test.{secrets.token_hex(8)}", message, _html(message))
    return {"homeserver": matrix.homeserver, "user_id": user, "room_id": room, "event_id": event_id}


def _html(text: str) -> str:
    import html

    return html.escape(text)
