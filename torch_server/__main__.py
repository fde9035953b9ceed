"""``python -m torch_server {serve,export}``."""

import sys

from serving.cli import main
from torch_server.framework import FRAMEWORK

if __name__ == "__main__":
    sys.exit(main(FRAMEWORK))
