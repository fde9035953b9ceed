"""``python -m client``: the command-line interface (see ``client.cli``)."""

from client.cli import main

raise SystemExit(main())
