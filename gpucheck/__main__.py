"""``python -m gpucheck {prepare,run}``.

prepare   download the wheels the check carries to its host into .whl/ (standard library and pip:
          runs on any machine with network, before the check's own packages are installed)
run       the GPU check (``run --help``); scripts/gpu_check.sh installs .whl/ first
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "prepare" and not rest:
        from gpucheck.wheels import prepare

        return prepare()
    if command == "run":
        from gpucheck.cli import main as run

        return run(rest)
    print(__doc__, file=sys.stderr)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
