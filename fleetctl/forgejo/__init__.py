"""Forgejo integration: the REST client (``client``), webhook deliveries (``webhooks``: signature, headers,
payload → typed change) and the SPEC §7.2 mapping (``mapping``); ``webhooks`` and ``mapping`` are pure.

This package's ``__init__`` is kept empty on purpose so that importing a submodule costs nothing but that
submodule; the client imports httpx only when a ``ForgejoClient`` is built.
"""
