"""``python -m pyro_efa``: the ``pyro-efa`` command line (see :mod:`pyro_efa.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
