"""``python -m gatelab ...`` runs the ``gatelab`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
