"""Slice spraying over heterogeneous rails, eft against round_robin and single.

The demo is part of the package (``tent_async/demo.py``) so that it works from an
installed wheel: ``tent-async demo --size 64MiB``.  This file runs the same code
with the same options, for a checkout (``./dev demo`` calls the package's entry point).

    python examples/spray_demo.py [--size 256MiB] [--policies eft,round_robin,single]
"""

from tent_async.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
