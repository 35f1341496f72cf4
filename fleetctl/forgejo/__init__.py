"""Forgejo integration: the REST client (``fleetctl.forgejo.client``) and, later, webhook parsing.

This package's ``__init__`` is kept empty on purpose so that importing a submodule costs nothing but that
submodule; the client imports httpx only when a ``ForgejoClient`` is built.
"""
