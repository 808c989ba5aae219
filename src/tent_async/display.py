"""Terminal views of telemetry, with rich.

rich renders tables and live-updating displays in any terminal (and degrades
to plain text in logs and CI), which is what an operator watching a long
transfer wants; the CLI and the benchmarks use these views.
"""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .telemetry import Telemetry
from .units import format_rate, format_size

# Width for output that does not go to a terminal (a pipe, a log file, CI): rich
# would otherwise assume 80 columns and cut table cells ("throughp…").
PLAIN_WIDTH = 240


def console(*, stderr: bool = False) -> Console:
    """A rich console: the terminal's width on a terminal, wide enough for every table elsewhere.

    Rich falls back to 80 columns (or ``$COLUMNS``) when the output is not a
    terminal and squeezes tables to fit.  Tables do not expand to the width,
    so a wide limit costs nothing on narrow output.  ``$COLUMNS`` still wins.
    """
    probe = Console(stderr=stderr)
    if probe.is_terminal or os.environ.get("COLUMNS"):
        return probe
    return Console(stderr=stderr, width=PLAIN_WIDTH)


_HEALTH_STYLE = {"healthy": "green", "suspect": "yellow", "probing": "cyan", "quarantined": "bold red"}


def telemetry_table(snap: Telemetry, title: str | None = None) -> Table:
    """One row per rail: health, learned bandwidth and latency, in flight, delivered, failures."""
    table = Table(
        title=title
        or (
            f"{snap.engine or 'engine'} ({snap.policy}): {snap.open_transfers} open, "
            f"{snap.transfers_done} done, {snap.transfers_failed} failed, {snap.transfers_cancelled} cancelled"
        )
    )
    for col, justify in (
        ("rail", "left"),
        ("health", "left"),
        ("learned bw", "right"),
        ("nominal", "right"),
        ("latency", "right"),
        ("slice", "right"),
        ("in flight", "right"),
        ("delivered", "right"),
        ("errors", "right"),
        ("deadline misses", "right"),
        ("rerouted", "right"),
        ("busy", "right"),
        ("quarantines", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in snap.rails:
        table.add_row(
            r.name,
            Text(r.state, style=_HEALTH_STYLE.get(r.health, "")),
            format_rate(r.bandwidth),
            format_rate(r.nominal_bandwidth),
            f"{r.latency * 1e6:.0f} us",
            format_size(r.slice_size),
            f"{r.inflight_slices} ({format_size(r.inflight_bytes)})",
            format_size(r.bytes_total),
            str(r.errors),
            str(r.deadline_misses),
            str(r.rerouted),
            f"{r.busy_refusals}{' (held)' if r.held else ''}",
            str(r.quarantines),
        )
    return table


def step_progress(disable: bool = False) -> Progress:
    """A progress bar for a benchmark's steps, on stderr and gone when done.

    On stderr so that stdout stays the table and the JSON lines; rich shows it
    only on a terminal.
    """
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=disable,
    )
