"""Shared fixtures. Every test runs in its own directory with its own fleetctl home (STYLE.md §10)."""

from __future__ import annotations

import pytest

_FLEET_ENV = (
    "FLEET_CONFIG",
    "FLEET_DB_PATH",
    "FLEET_API_URL",
    "FLEET_API_TOKEN",
    "FLEET_FORGEJO_TOKEN",
    "FLEET_WEBHOOK_SECRET",
    "FLEET_MATRIX_TOKEN",
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """FLEETCTL_HOME and the cwd in tmp_path; no FLEET_* settings and no user config leak in."""
    monkeypatch.setenv("FLEETCTL_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    for name in _FLEET_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
