"""Matrix notifications (SPEC §9): ``messages`` (what is said, pure), ``outbox`` (sending the outbox's
Matrix rows: in order, batched, never twice), ``setup`` (``fleetctl notify test``) and ``client`` (the
client-server API over httpx: the only code that talks to a homeserver). Imported only when used."""
