"""The ``tent-async`` command line: demo, benchmarks, telemetry.

``tent-async demo``            slice spraying over heterogeneous local rails
``tent-async watch``           a workload on local rails, with live per-rail telemetry
``tent-async bench NAME ...``  a benchmark (``tent-async bench --help`` lists them)
``tent-async testbed up|down|status|measure``  network-namespace rails shaped with tc (root)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .bench import BENCHMARKS
from .errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tent-async", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo, watch

    demo_parser = sub.add_parser("demo", help="slice spraying over heterogeneous local rails")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=demo.run)

    watch_parser = sub.add_parser("watch", help="run a workload on local rails and watch the rails live")
    watch.add_arguments(watch_parser)
    watch_parser.set_defaults(func=watch.run)
    bench = sub.add_parser("bench", help="run a benchmark (figure beside the physical limit)")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        p = bench_sub.add_parser(name, help=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            p.set_defaults(func=lambda _a, _e=exc, _n=name: _unavailable(_n, _e))
            continue
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    _add_testbed(sub)
    return parser


def _add_testbed(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tent-async testbed``: real shaped rails between two network namespaces (docs/testbed.md)."""
    from . import testbed

    parser = sub.add_parser("testbed", help="network namespaces joined by tbf-shaped veth rails (root)")
    testbed.add_cli_arguments(parser)
    parser.set_defaults(func=testbed.run_cli)


def _unavailable(name: str, exc: ImportError) -> int:
    print(f"benchmark {name!r} is not available: {exc}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:  # a bad option value: say so as argparse does, without a traceback
        parser.exit(2, f"{parser.prog} {args.command}: error: {exc}\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
