"""The one duration parser (labels ``timeout:``, config ``*_secs``): seconds or units, nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetctl.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "secs"),
    [
        ("0", 0), ("90", 90), ("1.5", 1.5), (" 30m ", 1800), ("90s", 90), ("30m", 1800), ("2h", 7200),
        ("1h30m", 5400), ("1h30m15s", 5415), ("1.5h", 5400), ("1d", 86400), ("1d12h", 129600), ("0.5s", 0.5),
        ("0s", 0),
    ],
)  # fmt: skip
def test_durations(text, secs):
    got = parse_duration(text)
    assert got == secs and type(got) is type(secs)  # an int when whole


@pytest.mark.parametrize(
    "text",
    ["", " ", "m", "-5", "+5", "-5m", "30M", "30 m", "30min", "1m1h", "1h1h", "1e3", ".5h", "5.h", "1_000",
     "inf", "nan", "1h 30m", "0x10", "1" * 10, "٣"],
)  # fmt: skip
def test_not_durations(text):
    assert parse_duration(text) is None


def test_non_strings_are_not_durations():
    assert parse_duration(30) is None  # type: ignore[arg-type]


@given(st.integers(0, 999), st.integers(0, 999), st.integers(0, 999), st.integers(0, 999))
def test_units_add_up(d, h, m, s):
    assert parse_duration(f"{d}d{h}h{m}m{s}s") == d * 86400 + h * 3600 + m * 60 + s
