"""fleetctl: run a fleet of AI coding agents from Forgejo issues.

The package is layered (see docs/architecture.md): a pure core (states, retry, matching, receipts,
config), the store (event-sourced SQLite), services (one function per operation), adapters at the edge
(executors, HTTP clients) and a thin typer CLI in ``fleetctl.cli`` that nothing else imports.
"""

__version__ = "0.1.0"
