"""Fakes of the outside systems fleetctl talks to, for tests (STYLE.md §9): real servers, in-memory state."""
