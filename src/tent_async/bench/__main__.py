"""``python -m tent_async.bench NAME ...`` is ``tent-async bench NAME ...``."""

import sys

from ..cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
