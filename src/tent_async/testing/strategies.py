"""Hypothesis strategies for property tests of code that uses tent_async.

* :func:`rail_specs` draws a rail set: unique names, speeds spread over a range
  (log-uniform, so a 100x spread is as likely as a 2x one), latencies, tiers.
* :func:`workloads` draws concurrent block-table transfers (sizes, scattered or
  adjacent extent lists, priority classes) as a :class:`Workload` value.
* :func:`fault_schedules` draws a :class:`~tent_async.testing.FaultSchedule` over
  given rails: errors, outages, stalls, flapping, degradation and "all but
  one" failures, at times within a horizon.  With ``spare=1`` (the default) at
  least one rail is never touched, so a transfer must still complete
  byte-exact whatever the others do; with ``heal=True`` every touched rail is
  cleared by the end.

Everything drawn is a plain value (``RailSpec``, ``FaultSchedule``), so hypothesis
prints a failing example in full and shrinks it towards fewer rails, fewer and
earlier faults.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
from hypothesis import strategies as st

from ..errors import ConfigError
from ..rails import RailSpec, Tier
from .faults import FaultSchedule, FaultStep

FAULT_KINDS: tuple[str, ...] = ("error", "down", "stall", "flap", "degrade", "all_but_one")
"""Kinds of fault :func:`fault_schedules` draws; each becomes one or more :class:`FaultStep`.

``error``/``down``/``stall``: one rail fails that way at a time ``t`` (and is cleared later
with ``heal``); ``flap``: one rail goes down and comes back several times; ``degrade``: one
rail slows to a fraction of its speed; ``all_but_one``: every rail but one goes down at
``t`` (never the spare ones)."""


def _log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ConfigError(f"a range must satisfy 0 < low <= high, got ({lo!r}, {hi!r})")
    if lo == hi:
        return st.just(lo)
    a, b = math.log(lo), math.log(hi)
    return st.floats(min_value=a, max_value=b).map(lambda x: min(hi, max(lo, math.exp(x))))


@st.composite
def rail_specs(
    draw: st.DrawFn,
    *,
    min_rails: int = 1,
    max_rails: int = 4,
    bandwidth: tuple[float, float] = (100e6, 10e9),
    latency: tuple[float, float] = (1e-6, 1e-3),
    tiers: Sequence[Tier | str] = tuple(Tier),
    prefix: str = "r",
) -> list[RailSpec]:
    """A list of ``RailSpec`` named ``r0``, ``r1``, ...: speeds in ``bandwidth`` (bytes/s),
    latencies in ``latency`` (seconds), each tier one of ``tiers``."""
    if not 1 <= min_rails <= max_rails:
        raise ConfigError(f"need 1 <= min_rails <= max_rails, got {min_rails}, {max_rails}")
    if not tiers:
        raise ConfigError("tiers must not be empty")
    n = draw(st.integers(min_value=min_rails, max_value=max_rails))
    speeds = _log_uniform(*bandwidth)
    latencies = _log_uniform(*latency)
    tier_values = st.sampled_from(list(tiers))
    return [
        RailSpec(
            name=f"{prefix}{i}",
            bandwidth=draw(speeds),
            latency=draw(latencies),
            tier=draw(tier_values),
        )
        for i in range(n)
    ]


def _steps_for(
    draw: st.DrawFn, kind: str, rail: str, victims: Sequence[str], t: float, horizon: float, heal: bool
) -> list[FaultStep]:
    room = max(horizon - t, 0.0)
    if kind in ("error", "down", "stall"):
        steps = [FaultStep(t, rail, kind)]  # type: ignore[arg-type]
        if heal:
            steps.append(FaultStep(t + draw(st.floats(0.0, room)), rail, "clear"))
        return steps
    if kind == "degrade":
        fraction = draw(st.floats(min_value=0.01, max_value=1.0, exclude_min=False))
        steps = [FaultStep(t, rail, "slow", fraction)]
        if heal:
            steps.append(FaultStep(t + draw(st.floats(0.0, room)), rail, "clear"))
        return steps
    if kind == "flap":
        flaps = draw(st.integers(min_value=2, max_value=4))
        period = room / (2 * flaps) if room > 0 else 0.0
        steps = []
        for i in range(flaps):
            steps.append(FaultStep(t + 2 * i * period, rail, "down"))
            steps.append(FaultStep(t + (2 * i + 1) * period, rail, "clear"))
        return steps  # a flap always ends cleared
    if kind == "all_but_one":
        survivor = draw(st.sampled_from(list(victims)))
        downed = [r for r in victims if r != survivor]
        steps = [FaultStep(t, r, "down") for r in downed]
        if heal:
            back = t + draw(st.floats(0.0, room))
            steps.extend(FaultStep(back, r, "clear") for r in downed)
        return steps
    raise ConfigError(f"unknown fault kind {kind!r}; use some of {FAULT_KINDS}")


@st.composite
def fault_schedules(
    draw: st.DrawFn,
    rails: Sequence[str] | Sequence[RailSpec],
    *,
    horizon: float = 1.0,
    max_faults: int = 4,
    kinds: Sequence[str] = FAULT_KINDS,
    spare: int = 1,
    heal: bool = False,
) -> FaultSchedule:
    """A :class:`FaultSchedule` over ``rails`` (names or specs) with up to ``max_faults`` faults.

    Faults start at times in ``[0, horizon]`` seconds.  ``spare`` rails (the
    first ones, ``rails[:spare]``) are never touched, so with ``spare >= 1``
    there is always a healthy rail; ``spare=0`` allows every rail to fail.
    ``heal=True`` clears every fault by ``horizon``.
    """
    names = [r.name if isinstance(r, RailSpec) else str(r) for r in rails]
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"rails must be unique and not empty, got {names}")
    if not 0 <= spare <= len(names):
        raise ConfigError(f"spare must be between 0 and the number of rails ({len(names)}), got {spare}")
    if not (math.isfinite(horizon) and horizon >= 0):
        raise ConfigError(f"horizon must be finite and not negative, got {horizon!r}")
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown or not kinds:
        raise ConfigError(f"unknown fault kinds {unknown or list(kinds)}; use some of {FAULT_KINDS}")
    victims = names[spare:]
    if not victims:
        return FaultSchedule(())
    allowed = [k for k in kinds if k != "all_but_one" or len(victims) >= 2]
    if not allowed:
        return FaultSchedule(())
    steps: list[FaultStep] = []
    for _ in range(draw(st.integers(min_value=0, max_value=max_faults))):
        kind = draw(st.sampled_from(allowed))
        rail = draw(st.sampled_from(victims))
        t = draw(st.floats(min_value=0.0, max_value=horizon))
        steps.extend(_steps_for(draw, kind, rail, victims, t, horizon, heal))
    if heal:
        # Overlapping faults on one rail may leave a later fault after an earlier fault's clear;
        # a final clear at the horizon heals every touched rail.
        schedule = FaultSchedule(steps)
        steps.extend(FaultStep(horizon, r, "clear") for r in sorted(schedule.rails) if not _cleared(schedule, r))
    return FaultSchedule(steps)


def _cleared(schedule: FaultSchedule, rail: str) -> bool:
    last = schedule.state_at(math.inf).get(rail)
    return last is None or last.action == "clear"


__all__ = ["FAULT_KINDS", "fault_schedules", "rail_specs"]


@attrs.frozen
class BlockTransfer:
    """One transfer of a drawn workload: ``blocks`` of ``block`` bytes from a source pool to a
    destination pool, at block indices ``src_blocks`` and ``dst_blocks``; ``priority`` its class.

    ``src_offsets()``/``dst_offsets()`` give byte offsets for ``engine.transfer_blocks``.
    """

    block: int
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]
    priority: str = "normal"

    @property
    def nbytes(self) -> int:
        return self.block * len(self.src_blocks)

    def src_offsets(self) -> list[int]:
        return [b * self.block for b in self.src_blocks]

    def dst_offsets(self) -> list[int]:
        return [b * self.block for b in self.dst_blocks]


@attrs.frozen
class Workload:
    """Transfers meant to run concurrently, over pools of ``pool_blocks`` blocks of ``block`` bytes.

    Destination blocks are distinct across all transfers (so every byte of the
    destination pool has one expected value); sources may repeat.
    """

    block: int
    pool_blocks: int
    transfers: tuple[BlockTransfer, ...]

    @property
    def pool_bytes(self) -> int:
        return self.block * self.pool_blocks


@st.composite
def workloads(
    draw: st.DrawFn,
    *,
    max_transfers: int = 6,
    max_blocks: int = 64,
    block_sizes: Sequence[int] = (4096, 16384, 65536),
    priorities: Sequence[str] = ("high", "normal", "background"),
) -> Workload:
    """Draw concurrent block-table transfers: sizes, scattered or adjacent extent lists, classes.

    Each transfer's destination blocks are a run (adjacent, they coalesce) or a
    random pick of the pool (scattered); sources likewise.  Shrinks towards
    fewer, smaller, adjacent transfers.
    """
    if max_transfers < 1 or max_blocks < 1 or not block_sizes:
        raise ConfigError("workloads needs max_transfers >= 1, max_blocks >= 1 and at least one block size")
    block = draw(st.sampled_from(list(block_sizes)))
    counts = draw(st.lists(st.integers(1, max_blocks), min_size=1, max_size=max_transfers))
    pool = sum(counts)
    transfers = []
    used = 0
    for n in counts:
        # Each transfer owns the destination blocks [used, used + n): in order (adjacent,
        # they coalesce) or shuffled (scattered); never another transfer's blocks.
        adjacent = draw(st.booleans())
        order = range(n) if adjacent else draw(st.permutations(range(n)))
        dst = tuple(used + k for k in order)
        used += n
        src = (
            tuple(draw(st.lists(st.integers(0, pool - 1), min_size=n, max_size=n)))
            if draw(st.booleans())
            else (tuple(range(n)))
        )
        transfers.append(BlockTransfer(block, src, dst, draw(st.sampled_from(list(priorities)))))
    return Workload(block, pool, tuple(transfers))
