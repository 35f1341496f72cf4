"""Durations: plain seconds or a number with units (``90s``, ``30m``, ``2h``, ``1h30m``, ``1d``).

One parser for every place that takes seconds: the ``timeout:`` label (fleetctl.matching) and the
config's ``*_secs`` keys (fleetctl.config). Pure and stdlib-only, so it costs nothing at start-up.
"""

from __future__ import annotations

import re

_NUM = r"[0-9]{1,9}(?:\.[0-9]{1,9})?"
_DURATION_RE = re.compile(rf"^(?:({_NUM})d)?(?:({_NUM})h)?(?:({_NUM})m)?(?:({_NUM})s)?\Z")
_SECONDS_RE = re.compile(rf"^{_NUM}\Z")
_UNITS = (86400, 3600, 60, 1)

DURATION_HINT = "seconds (900) or a duration with units (90s, 30m, 2h, 1h30m)"
"""What a duration looks like, for error messages."""


def parse_duration(text: str) -> int | float | None:
    """Seconds in ``text`` (an int when whole), or None when it is not a duration.

    Accepted: plain seconds (``900``, ``1.5``) or units in the order d, h, m, s, each at most once
    (``90s``, ``30m``, ``2h``, ``1h30m``, ``1.5h``, ``1d12h``). Lower-case units, no sign, no spaces
    inside; surrounding whitespace is ignored. Never negative.

    Example:
        >>> parse_duration("1h30m"), parse_duration("90"), parse_duration("30 min")
        (5400, 90, None)
    """
    if not isinstance(text, str):
        return None
    text = text.strip()
    if _SECONDS_RE.match(text):
        total = float(text)
    else:
        m = _DURATION_RE.match(text)
        if not text or m is None:
            return None
        total = sum(float(part) * unit for part, unit in zip(m.groups(), _UNITS, strict=True) if part)
    return int(total) if total.is_integer() else total
