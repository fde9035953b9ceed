"""``python -m loadtest locust [LOCUST OPTIONS]``: Locust on our locustfile, our options in its help.

    python -m loadtest locust --help                    # Locust's options and ours (--model, --load-shape...)
    python -m loadtest locust --host 127.0.0.1:8001 --headless -u 8 -t 30s

Locust answers ``--help`` before it imports any locustfile (``locust.main`` parses ``-f`` and
``--help`` first, then loads the files), so ``locust -f loadtest/locustfile.py --help`` cannot
list the options that the locustfile adds through ``events.init_command_line_parser``
(locustio/locust#2917); they work, unlisted. This command registers them first, by importing
``loadtest.users.locustfile``, then runs Locust's own ``main`` with ``-f loadtest/locustfile.py``
unless ``-f``/``--locustfile`` is given: the same run as ``locust -f loadtest/locustfile.py``,
and a help that lists everything.
"""

from __future__ import annotations

from locust import events  # noqa: F401 - first: gevent monkey-patching, before anything imports ssl

# isort: split
import sys
from collections.abc import Sequence

from locust.main import main as locust_main

from loadtest.servers import ROOT
from loadtest.users import locustfile  # noqa: F401 - registers our options before Locust builds its parser

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"


def names_a_locustfile(argv: Sequence[str]) -> bool:
    """Whether ``argv`` picks its own locustfile (``-f X``, ``-fX``, ``--locustfile[=X]``)."""
    return any(arg == "--locustfile" or arg.startswith(("-f", "--locustfile=")) for arg in argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run Locust with ``argv`` (our locustfile unless it names one); Locust's exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not names_a_locustfile(args):
        args = ["-f", str(LOCUSTFILE), *args]
    sys.argv = ["locust", *args]
    try:
        locust_main()
    except SystemExit as done:  # Locust ends by sys.exit, its help too
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
