"""Dispatch policies: which rail carries the next slice of a transfer, and how big it is.

All three policies run inside the same planner, with the same slicing
bookkeeping, telemetry, health and failover; only the choice differs, so a
comparison between them changes exactly one thing.

``eft``
    Earliest expected finish.  For every usable rail ``r`` the cost of the
    slice it would get (``s_r``, sized for that rail) is
    ``(lat_r + (inflight_bytes_r + s_r) / bw_r) * penalty_r``.  The slice goes
    to the cheapest rail that has room in its window, provided that rail is
    within ``tie_band`` of the cheapest rail overall; otherwise the slice waits
    (late binding) until a rail frees up, because sending it to a clearly
    worse rail would finish it later.  Exception: a rail too slow to move
    ``min_slice`` in ``target_slice_time`` takes a slice that lands before the
    transfer's water level, and its last slice of a transfer is its share,
    below ``min_slice`` (see :class:`EarliestFinish`).  Small slices may fill a
    rail's byte budget (``RailState.room``; eft only).
``round_robin``
    State-blind striping, the classic baseline (Mooncake TE's and UCX's static
    lane split): slice ``i`` of a transfer goes to rail ``i mod N`` with a fixed
    slice size.  It ignores telemetry entirely; if the next rail in the cycle is
    full, the transfer waits for it.  It still honours rail health, so failed
    rails are skipped.
``single``
    One rail per transfer, chosen once when the transfer first dispatches: the
    eligible rail with the highest nominal bandwidth, ties rotated across
    transfers.  If that rail fails, the transfer is re-bound to another one.

``static``
    A model of the classic engine, Mooncake Transfer Engine (TE), as the
    serving benchmarks' baseline: fixed slices of 64 KiB; each slice is bound
    when it is cut to a NIC drawn at random (or round-robin) from the
    buffer's *preferred set*, the transfer's eligible rails of the lowest
    topology tier (the NICs under the buffer's PCIe switch); no telemetry and
    no late binding; a failed slice is retried on the next rail in a fixed
    order (preferred first, then the rest), but rail health is not
    consulted.  See :class:`StaticSlices` for what exactly is modelled.

A policy returns ``None`` to hold (wait for a rail to free up) or
:data:`NO_RAIL` when no rail could ever take the transfer's next slice.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, ClassVar, Final, Protocol

from .config import SchedulerConfig
from .rail_state import stands_by
from .slicing import nominal_slice

if TYPE_CHECKING:
    from .rail_state import RailState
    from .transfer_state import TransferState


class _NoRail:
    def __repr__(self) -> str:
        return "NO_RAIL"


NO_RAIL: Final = _NoRail()
"""Returned by :meth:`Policy.choose` when no healthy or suspect rail may carry the slice."""

Choice = tuple["RailState", int] | None | _NoRail


class Policy(Protocol):
    """Chooses the rail and slice size for a transfer's next slice."""

    name: ClassVar[str]
    probes_idle_rails: ClassVar[bool]
    byte_window: ClassVar[bool]
    """May small slices fill a rail's byte budget (``RailState.room``)?  Only a
    policy that checks ``room`` itself may say yes."""
    holds_for_all: ClassVar[bool]
    """Does holding one transfer (``None``) mean no transfer of its rail set can go now?
    True for ``eft`` (its rails are busy or a better one frees soon); False for
    policies that wait for one particular rail per transfer."""

    def bind(self, rails: list[RailState], config: SchedulerConfig) -> None:
        """Called once by the planner with its rails and config."""

    def choose(self, transfer: TransferState, now: float) -> Choice:
        """Pick ``(rail, size)`` for the transfer's next slice, ``None`` to hold, or NO_RAIL.

        ``size`` is what the policy would like; the planner cuts it to the
        front pending range (and to one extent for backends without
        scatter-gather), merging a small tail.
        """


def _last_share(rail: RailState, bw: float, queued: int, end: float) -> float:
    """Bytes a slow rail can still take and finish by ``end`` (seconds from now), at the lower
    of its estimated rate and the rate it delivered (RailState.note_delivery)."""
    if 0.0 < rail.delivered < bw:
        bw = rail.delivered
    return bw * (end - rail.lat) - queued


class EarliestFinish:
    """``eft``: the rail expected to finish the slice first, late-bound, sprayed.

    Slice sizes follow what finishes the *transfer* first: the transfer's
    remaining bytes are water-filled over its usable rails (each rail busy
    until the same instant ``T``, counting what it already has in flight and
    its latency, which includes the backend's stated per-slice cost), and a
    rail's slice is its share, capped at its nominal size (``bw x
    target_slice_time``, or more where a per-slice cost must be amortised:
    :func:`~.slicing.amortized_slice`) and at least ``min_slice``.  So an elephant gets
    nominal slices as before, a 16 MiB transfer on eight fast rails is cut
    into eight shares that finish together, and a 4 KiB one stays whole and
    goes to the rail with the earliest finish including latency.  A rail too
    slow to move ``min_slice`` in ``target_slice_time`` would end a transfer
    up to a whole ``min_slice`` late, or idle as long before its end: its last
    slice is its share below ``min_slice``, down to its tail floor
    (:func:`~.slicing.tail_floor`), cut once at most a ``min_slice`` is left on
    it and planned to land a tie band before the transfer's expected end at
    the lower of its estimated and delivered rates (docs/design.md, "The end
    of a transfer on a slow rail").

    A ``background`` transfer gets slices of ``background_slice`` (1/10) of
    the nominal size, may fill only ``window - 1`` slots of a rail (at least
    one), and takes no rail that carries a slice of a higher class: a
    latency-critical slice that arrives while bulk keeps every rail busy
    finds a free slot at once, and within one short bulk slice has the rail
    to itself.
    """

    name: ClassVar[str] = "eft"
    probes_idle_rails: ClassVar[bool] = True
    byte_window: ClassVar[bool] = True
    holds_for_all: ClassVar[bool] = True

    def __init__(self) -> None:
        self._band = 1.0
        self._max_per_rail = 2
        self._floor = 64 * 1024
        self._align = 4096
        self._bg_fraction = 0.1
        self._tail_merge = 0.5

    def bind(self, rails: list[RailState], config: SchedulerConfig) -> None:
        self._band = 1.0 + config.tie_band
        self._max_per_rail = config.max_attempts_per_rail
        self._floor = config.min_slice
        self._align = config.slice_align
        self._bg_fraction = config.background_slice
        self._tail_merge = config.tail_merge

    def choose(self, transfer: TransferState, now: float) -> Choice:
        history = transfer.pending[0].history
        remaining = transfer.pending_bytes
        max_per_rail = self._max_per_rail
        background = transfer.priority == 2
        cap = self._bg_fraction if background else 1.0
        # Pass 1: usable rails, their effective bandwidth and backlog (bytes they
        # would move before a new slice's bytes: in flight plus latency's worth).
        usable = []
        sum_bw = 0.0
        sum_backlog = 0.0
        slow = fast = False
        for rail in transfer.rails:
            if not rail.dispatchable:
                continue
            if history is not None and history.get(rail.index, 0) >= max_per_rail:
                continue
            if rail.primary is not None and stands_by(rail, transfer.rails, history, max_per_rail):
                continue
            # rail.effective_bandwidth(now), inlined: this loop is the hot path.
            bw = rail.bw
            if rail.inflight:
                elapsed = now - rail.head_posted
                if elapsed > rail.head_expected > 0.0:
                    bw *= rail.head_expected / elapsed
            backlog = rail.inflight_bytes + bw * rail.lat
            usable.append((rail, bw, backlog))
            sum_bw += bw
            sum_backlog += backlog
            if rail.slow:
                slow = True
            else:
                fast = True
        if not usable:
            return NO_RAIL
        level = (remaining + sum_backlog) / sum_bw  # the instant every rail would finish together
        left: dict[RailState, int] | None = None
        end = level
        if slow and fast:
            # A slow rail's last slice is planned against the transfer's expected end, which
            # counts what the slices in flight have left (the level counts them whole, as
            # the fast rails' shares always have: a rail looks busy up to a slice longer).
            # Only beside a fast rail, which takes what the slow ones leave: a transfer on
            # slow rails alone is sliced as before.
            left = {}
            sum_left = float(remaining)
            for rail, bw, backlog in usable:
                queued = rail.inflight_bytes
                if queued and not now - rail.head_posted > rail.head_expected > 0.0:  # overdue: whole
                    # Less what the oldest slice has moved since it started (after its latency,
                    # or when the slice before it finished: a rail serves its slices in order),
                    # at the rate the rail delivered (RailState.note_delivery) if that is lower.
                    since = rail.head_posted + rail.lat
                    if rail.last_completion > since:
                        since = rail.last_completion
                    moved = (rail.delivered if 0.0 < rail.delivered < bw else bw) * (now - since)
                    if moved > 0.0:
                        queued -= int(moved) if moved < rail.head_length else rail.head_length
                left[rail] = queued
                sum_left += backlog - rail.inflight_bytes + queued
            end = sum_left / sum_bw
        floor = self._floor
        align = self._align
        shrink = 1.0 / self._band
        best = float("inf")
        pick: RailState | None = None
        pick_cost = float("inf")
        pick_size = 0
        pick_bw = 1.0
        for rail, bw, backlog in usable:
            nominal = rail.nominal
            if cap < 1.0:
                nominal = max(floor, int(nominal * cap) // align * align)
            share = bw * level - backlog
            if share >= nominal:
                size = nominal
            elif share > floor:
                size = int(share)
                size -= size % align
            else:
                size = floor
            if left is not None and rail.slow and left[rail] <= floor:
                # A rail too slow to move min_slice in target_slice_time: at the transfer's
                # end one min_slice more there ends the transfer up to that slice's time
                # late, one less leaves it idle while the others finish.  Its last slice is
                # its share instead (down to its tail floor), planned to end a tie band
                # before the transfer's expected end, at the lower of its estimated and
                # delivered rates (RailState.note_delivery): it commits more time than the
                # fast rails, which choose again every few milliseconds and take what that
                # leaves, and a late end cannot be made up.  It is cut late, once at most a
                # min_slice is left on the rail: cut at every chance, the estimates' drift
                # would only ever add to it.
                last = _last_share(rail, bw, left[rail], end * shrink)
                if last < size:
                    if last <= rail.tail:
                        continue  # nothing left for it: a min_slice there would end the transfer late
                    size = int(last)
                    size -= size % align
                    if size < remaining and remaining - size < self._tail_merge * size:
                        continue  # the slice would take the rest along (slicing.cut): 1.5x its share
            if size > remaining:
                size = remaining
            cost = (rail.lat + (rail.inflight_bytes + size) / bw) * rail.penalty
            if cost < best:
                best = cost
            inflight = len(rail.inflight)
            if background:
                # Bulk leaves a rail alone while a higher class has a slice on it, and
                # keeps one slot of the window free, so that a latency-critical slice
                # arriving later starts at once and soon has the rail to itself
                # (slices in flight cannot be taken back; short bulk slices drain fast).
                room = inflight == rail.bulk_inflight and inflight < (max(1, rail.window - 1) if rail.window else 0)
            else:
                # Small slices may use the extra slots of a rail that holds little (RailState.room).
                room = inflight < rail.window or (size <= floor and rail.room)
            if cost < pick_cost and room:
                pick, pick_cost, pick_size, pick_bw = rail, cost, size, bw
        if pick is None:
            return None
        # Not within the tie band of the best rail: hold for a better one, unless the
        # pick is a rail too slow to move even min_slice in target_slice_time (a
        # 50 Mbit/s link beside 800 Mbit/s ones, whose every slice looks worse than
        # waiting for a fast rail) and the slice lands before the water level, when
        # the whole transfer could end at best: then it adds capacity without
        # delaying the end, and it still stays out of the tail: it lands a tie band
        # before the transfer's expected end, at the lower of the rail's estimated and
        # delivered rates, as its last slice is planned.  (The band compares costs that
        # count every slice in flight whole, as a slice waits behind them all; counted
        # from what they have left, fast rails looked free sooner and slower ones were
        # held for them: bench sim's heterogeneous run lost 1.1 % to idle rails.)
        if pick_cost > best * self._band and not (
            pick.slow
            and (
                pick_cost <= level
                if left is None
                else _last_share(pick, pick_bw, left[pick], end * shrink) >= pick_size
            )
        ):
            return None
        return pick, pick_size


class RoundRobin:
    """``round_robin``: state-blind striping with a fixed slice size."""

    name: ClassVar[str] = "round_robin"
    probes_idle_rails: ClassVar[bool] = False
    byte_window: ClassVar[bool] = False
    holds_for_all: ClassVar[bool] = False

    def __init__(self) -> None:
        self._fixed = 0
        self._config = SchedulerConfig()
        self._max_per_rail = 2
        self._sizes: dict[tuple[int, ...], int] = {}

    def bind(self, rails: list[RailState], config: SchedulerConfig) -> None:
        self._config = config
        self._max_per_rail = config.max_attempts_per_rail
        self._fixed = config.round_robin_slice

    def slice_size(self, rails: tuple[RailState, ...]) -> int:
        """The fixed slice size for a transfer over ``rails``.

        ``round_robin_slice`` if set, else the median of the rails' slice sizes
        at their *nominal* bandwidth: derived from the configuration only, never
        from telemetry, so the baseline stays state-blind.  Computed when first
        needed, because some backends (ucx) add rails after the planner starts.
        """
        if self._fixed:
            return self._fixed
        key = tuple(r.index for r in rails)
        size = self._sizes.get(key)
        if size is None:
            sizes = sorted(nominal_slice(r.info.bandwidth, self._config) for r in rails)
            size = self._sizes[key] = sizes[len(sizes) // 2]
        return size

    def choose(self, transfer: TransferState, now: float) -> Choice:
        rails = transfer.rails
        n = len(rails)
        rng = transfer.pending[0]
        history = rng.history
        start = transfer.rr_next
        for k in range(n):
            rail = rails[(start + k) % n]
            if not _usable(rail, rails, history, self._max_per_rail):
                continue
            if not rail.has_room():
                return None  # strict striping: wait for the next rail in the cycle
            transfer.rr_next = (start + k + 1) % n
            return rail, self.slice_size(rails)
        return NO_RAIL


class SingleRail:
    """``single``: the whole transfer on one rail, re-bound only if that rail fails."""

    name: ClassVar[str] = "single"
    probes_idle_rails: ClassVar[bool] = False
    byte_window: ClassVar[bool] = False
    holds_for_all: ClassVar[bool] = False

    def __init__(self) -> None:
        self._turn = 0
        self._max_per_rail = 2

    def bind(self, rails: list[RailState], config: SchedulerConfig) -> None:
        self._max_per_rail = config.max_attempts_per_rail

    def choose(self, transfer: TransferState, now: float) -> Choice:
        rng = transfer.pending[0]
        history = rng.history
        rail = transfer.bound
        limit = self._max_per_rail
        if rail is not None and not _usable(rail, transfer.rails, history, limit):
            rail = None
        if rail is None:
            candidates = [r for r in transfer.rails if _usable(r, transfer.rails, history, limit)]
            if not candidates:
                return NO_RAIL
            top = max(r.info.bandwidth for r in candidates)
            fastest = [r for r in candidates if r.info.bandwidth >= top * (1.0 - 1e-9)]
            rail = fastest[self._turn % len(fastest)]
            self._turn += 1
            transfer.bound = rail
        if not rail.has_room():
            return None
        return rail, rail.nominal


class StaticSlices:
    """``static``: the classic engine's dispatch (a model of Mooncake TE), as a baseline.

    What it does, slice by slice:

    * **fixed slices** of ``slice_size`` (64 KiB, Mooncake TE's default
      ``slice_size``), whatever the rail or the transfer;
    * **early, state-blind binding**: a slice's NIC is drawn when the slice is
      cut, at random (``pick="random"``, as TE's ``selectDevice``) or in turn
      (``pick="round_robin"``), from the transfer's *preferred set*: its
      eligible rails of the lowest ``RailInfo.tier`` (a GPU buffer's NICs under
      its own PCIe switch; all rails when every tier is equal).  The slice
      waits for *that* NIC: if it already holds ``depth`` slices the
      transfer holds (other transfers may go meanwhile), as a slice queued on
      a TE worker's NIC queue does;
    * **no telemetry**: bandwidth and latency estimates, in-flight bytes and
      congestion are never read;
    * **retries without rail health**: a slice whose attempt failed for the
      ``n``-th time goes to the rail at position ``n - 1`` of a fixed order,
      the preferred set first, then the other eligible rails (TE's
      ``selectDevice(..., retry_cnt)``), skipping rails it has failed on
      ``max_attempts_per_rail`` times; a suspect rail keeps being drawn like
      any other, and nothing is learned from the failure for other slices.

    Where the model departs from TE, and why:

    * the planner around every policy is the same: a rail the planner has
      *quarantined* (or is probing) is skipped, because the planner never
      posts ordinary slices to a quarantined rail; TE likewise skips a NIC
      whose context went inactive after a device error, so this matters only
      when a rail errors repeatedly;
    * per-slice deadlines are the planner's and apply here too; TE has none
      by default, so where a deadline fires the model is, if anything, a
      stronger baseline than TE;
    * the policy sets every rail's full window to ``depth`` when it is bound
      (the planner offers a group of transfers to its policy only while one of
      its rails has room in its window).  A suspect rail's planner window is
      one, which only decides when the planner asks: if every other rail is
      full it waits rather than asking; once asked, static fills whatever rail
      it drew to ``depth``, a suspect one too (TE has no rail health);
    * ``depth`` (8 slices, 512 KiB) is far below TE's queue-pair depth, to keep
      the simulator's fair-share computation cheap; it is still above the
      bandwidth-delay product of a 400 Gb/s NIC with a 5 us round trip
      (~250 KB), so it does not limit throughput.
    """

    name: ClassVar[str] = "static"
    probes_idle_rails: ClassVar[bool] = False
    byte_window: ClassVar[bool] = False
    holds_for_all: ClassVar[bool] = False

    def __init__(
        self, slice_size: int = 64 * 1024, *, depth: int = 8, pick: str = "random", seed: int | str = 0
    ) -> None:
        if slice_size < 1 or depth < 1:
            raise ValueError(f"slice_size and depth must be positive, got {slice_size} and {depth}")
        if pick not in ("random", "round_robin"):
            raise ValueError(f"pick must be 'random' or 'round_robin', got {pick!r}")
        self.slice_size = slice_size
        self.depth = depth
        self.pick = pick
        self._rng = random.Random(f"static/{seed}")
        self._turn = 0
        self._max_per_rail = 2
        self._orders: dict[tuple[int, ...], tuple[tuple[RailState, ...], int]] = {}

    def bind(self, rails: list[RailState], config: SchedulerConfig) -> None:
        self._max_per_rail = config.max_attempts_per_rail
        for rail in rails:
            self._widen(rail)

    def _widen(self, rail: RailState) -> None:
        """Give ``rail`` a window of ``depth`` slices (the planner asks a policy only while one has room)."""
        if rail.window_full != self.depth:
            rail.window_full = self.depth
            rail.sync_health()

    def order(self, rails: tuple[RailState, ...]) -> tuple[tuple[RailState, ...], int]:
        """The retry order of ``rails`` (preferred set first) and the size of the preferred set."""
        key = tuple(r.index for r in rails)
        found = self._orders.get(key)
        if found is None:
            best = min(r.info.tier for r in rails)
            preferred = tuple(r for r in rails if r.info.tier == best)
            rest = tuple(r for r in rails if r.info.tier != best)
            found = self._orders[key] = (preferred + rest, len(preferred))
        return found

    def choose(self, transfer: TransferState, now: float) -> Choice:
        history = transfer.pending[0].history
        rail = transfer.bound  # the NIC the next slice was bound to when it was cut
        if history is not None or rail is None or not _usable(rail, transfer.rails, None, self._max_per_rail):
            rail = self._draw(transfer, history)
            if rail is None:
                return NO_RAIL
            transfer.bound = rail
        if rail.window_full != self.depth:
            self._widen(rail)  # a rail added after bind() (a backend that pairs rails later)
        if len(rail.inflight) >= self.depth or rail.held:  # no rail health: a suspect rail is filled too
            return None  # bound early: the slice waits for its NIC (also while its peer is busy)
        transfer.bound = None
        return rail, self.slice_size

    def _draw(self, transfer: TransferState, history: dict[int, int] | None) -> RailState | None:
        order, n_pref = self.order(transfer.rails)
        if history is None:
            if self.pick == "random":
                k = self._rng.randrange(n_pref) if n_pref > 1 else 0
            else:
                k = self._turn % n_pref
                self._turn += 1
            rail = order[k]
            if _usable(rail, transfer.rails, None, self._max_per_rail):
                return rail
            start = 0  # the drawn NIC is out of service (or stands by): take the retry order
        else:
            start = (sum(history.values()) - 1) % len(order)
        limit = self._max_per_rail
        for k in range(len(order)):
            rail = order[(start + k) % len(order)]
            if _usable(rail, transfer.rails, history, limit):
                return rail
        return None


def _usable(rail: RailState, rails: tuple[RailState, ...], history: dict[int, int] | None, limit: int) -> bool:
    """May ``rail`` take these bytes now: healthy or suspect, retries left, not standing by (:func:`stands_by`)?"""
    return (
        rail.dispatchable
        and (history is None or history.get(rail.index, 0) < limit)
        and (rail.primary is None or not stands_by(rail, rails, history, limit))
    )


POLICIES: dict[str, type[EarliestFinish] | type[RoundRobin] | type[SingleRail] | type[StaticSlices]] = {
    EarliestFinish.name: EarliestFinish,
    RoundRobin.name: RoundRobin,
    SingleRail.name: SingleRail,
    StaticSlices.name: StaticSlices,
}


def make_policy(policy: str | Policy) -> Policy:
    """A policy instance from its name (``"eft"``, ``"round_robin"``, ``"single"``, ``"static"``) or itself."""
    if isinstance(policy, str):
        try:
            return POLICIES[policy]()
        except KeyError:
            raise ValueError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES)}") from None
    return policy
