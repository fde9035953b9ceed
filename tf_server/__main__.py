"""``python -m tf_server {serve,export}``."""

import sys

from serving.cli import main
from tf_server.framework import FRAMEWORK

if __name__ == "__main__":
    sys.exit(main(FRAMEWORK))
