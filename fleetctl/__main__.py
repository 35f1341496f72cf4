"""``python -m fleetctl`` runs the same app as the ``fleetctl`` console script."""

from fleetctl.cli import main

main()
