"""Who is connected to whom: a node pair with N rails, or a rail-optimised cluster.

A topology turns a frozen description into what the simulator needs: the
links (:class:`~.fabric.SimRail`), which links share flows (components),
the rails each sending node's planner sees, the path of a slice, and the
*available capacity* a run is judged against.

``PairTopology``
    One sender, one receiver, N independent rails.  Each rail is one link and
    its own component.  Available capacity is the sum of the rails' available
    capacities.
``ClusterTopology``
    ``nodes`` nodes with ``rails_per_node`` NICs each, wired rail-optimised as
    in GPU clusters: NIC ``r`` of every node hangs off rail plane ``r``, and
    each plane's spine has limited capacity (oversubscription).  A slice from
    node ``s`` on rail ``r`` to node ``d`` crosses ``s``'s transmit side of
    NIC ``r``, spine ``r`` and ``d``'s receive side of NIC ``r``.  The planes
    are the components.  Available capacity of a plane is, at each instant,
    ``min(sum of transmit, spine, sum of receive)``: all-to-all traffic cannot
    beat its narrowest cut.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ...core import RailInfo
from ...errors import ConfigError
from ...units import parse_bandwidth, parse_duration
from .fabric import FluidFabric, SimRail
from .profiles import INF, PROFILE_TYPES, LinkTimeline, Profile


def _rails(value: Any) -> tuple[SimRail, ...]:
    rails = tuple(value)
    if not rails:
        raise ConfigError("a pair topology needs at least one rail")
    for r in rails:
        if not isinstance(r, SimRail):
            raise ConfigError(f"rails must be SimRail values, got {r!r}")
    names = [r.name for r in rails]
    if len(set(names)) != len(names):
        raise ConfigError(f"rail names must be unique, got {names}")
    return rails


def _min_integral(timelines: Sequence[Sequence[LinkTimeline]], t0: float, t1: float) -> float:
    """Integral over ``[t0, t1]`` of ``min(sum(group) for group in timelines)``."""
    total = 0.0
    t = t0
    flat = [tl for group in timelines for tl in group]
    while t < t1:
        nxt = min(min(tl.next_change(t) for tl in flat), t1)
        total += min(sum(tl.available_at(t) for tl in group) for group in timelines) * (nxt - t)
        t = nxt
    return total


@attrs.frozen(kw_only=True)
class PairTopology:
    """One node pair joined by ``rails`` (node 0 sends, node 1 receives)."""

    rails: tuple[SimRail, ...] = attrs.field(converter=_rails)

    @property
    def rail_names(self) -> list[str]:
        return [r.name for r in self.rails]

    def link_specs(self) -> list[SimRail]:
        return list(self.rails)

    def components(self) -> list[list[int]] | None:
        return None

    def senders(self) -> list[int]:
        return [0]

    def receivers(self, src: int) -> list[int]:
        return [1]

    def rail_infos(self, node: int) -> list[RailInfo]:
        return [RailInfo(name=r.name, bandwidth=r.capacity, latency=r.latency) for r in self.rails]

    def path(self, node: int, rail: int, dst: int) -> tuple[int, ...]:
        return (rail,)

    def nominal_capacity(self) -> float:
        """Sum of nominal link capacities (bytes/s), before any profile."""
        return sum(r.capacity for r in self.rails)

    def capacity(self, fabric: FluidFabric, t0: float, t1: float) -> float:
        """Bytes the rails could have carried for us in ``[t0, t1]``."""
        return sum(fabric.capacity_integral(i, t0, t1) for i in range(len(self.rails)))

    def rail_of_link(self, link: int) -> str:
        return self.rails[link].name


def _plane_profiles(value: Any) -> tuple[tuple[int, tuple[Profile, ...]], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for plane, prof in items:
        prof = (prof,) if isinstance(prof, PROFILE_TYPES) else tuple(prof)
        out.append((int(plane), prof))
    return tuple(sorted(out, key=lambda x: x[0]))


def _opt_bandwidth(value: Any) -> float | None:
    return None if value is None else parse_bandwidth(value)


def _at_least(n: int) -> Any:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: int) -> None:
        if value < n:
            raise ConfigError(f"{attribute.name} must be at least {n}, got {value!r}")

    return check


@attrs.frozen(kw_only=True)
class ClusterTopology:
    """``nodes`` x ``rails_per_node`` NICs on rail planes with spines of limited capacity.

    ``spine_capacity`` is per plane (bytes/s or a string); the default,
    ``spine_ratio`` (0.75) of the plane's NIC capacity, is a 4:3
    oversubscribed spine.  ``spine_profile`` maps a plane to a profile (e.g.
    another tenant's bursts on that plane's spine).
    """

    nodes: int = attrs.field(default=16, validator=_at_least(2))
    rails_per_node: int = attrs.field(default=8, validator=_at_least(1))
    nic_capacity: float = attrs.field(default=25e9, converter=parse_bandwidth)
    latency: float = attrs.field(default=5e-6, converter=parse_duration)
    jitter: float = attrs.field(default=0.0, converter=parse_duration)
    spine_ratio: float = 0.75
    spine_capacity: float | None = attrs.field(default=None, converter=_opt_bandwidth)
    spine_profile: tuple[tuple[int, tuple[Profile, ...]], ...] = attrs.field(default=(), converter=_plane_profiles)

    def __attrs_post_init__(self) -> None:
        if not self.spine_ratio > 0:
            raise ConfigError(f"spine_ratio must be positive, got {self.spine_ratio}")
        for plane, _ in self.spine_profile:
            if not 0 <= plane < self.rails_per_node:
                raise ConfigError(f"spine_profile names plane {plane}, but planes are 0..{self.rails_per_node - 1}")

    @property
    def rail_names(self) -> list[str]:
        return [f"rail{r}" for r in range(self.rails_per_node)]

    @property
    def plane_spine(self) -> float:
        if self.spine_capacity is not None:
            return self.spine_capacity
        return self.spine_ratio * self.nodes * self.nic_capacity

    def _tx(self, node: int, rail: int) -> int:
        return node * self.rails_per_node + rail

    def _rx(self, node: int, rail: int) -> int:
        return (self.nodes + node) * self.rails_per_node + rail

    def _spine(self, rail: int) -> int:
        return 2 * self.nodes * self.rails_per_node + rail

    def link_specs(self) -> list[SimRail]:
        profiles = dict(self.spine_profile)
        specs: list[SimRail] = []
        for side in ("tx", "rx"):
            for n in range(self.nodes):
                for r in range(self.rails_per_node):
                    specs.append(
                        SimRail(
                            name=f"n{n}.{side}{r}",
                            capacity=self.nic_capacity,
                            latency=self.latency if side == "tx" else 0.0,
                            jitter=self.jitter if side == "tx" else 0.0,
                        )
                    )
        for r in range(self.rails_per_node):
            specs.append(SimRail(name=f"spine{r}", capacity=self.plane_spine, latency=0.0, profile=profiles.get(r, ())))
        return specs

    def components(self) -> list[list[int]]:
        return [
            [self._tx(n, r) for n in range(self.nodes)] + [self._rx(n, r) for n in range(self.nodes)] + [self._spine(r)]
            for r in range(self.rails_per_node)
        ]

    def senders(self) -> list[int]:
        return list(range(self.nodes))

    def receivers(self, src: int) -> list[int]:
        return [n for n in range(self.nodes) if n != src]

    def rail_infos(self, node: int) -> list[RailInfo]:
        return [RailInfo(name=name, bandwidth=self.nic_capacity, latency=self.latency) for name in self.rail_names]

    def path(self, node: int, rail: int, dst: int) -> tuple[int, ...]:
        if dst == node:
            raise ValueError(f"node {node} cannot send to itself over the cluster fabric")
        return (self._tx(node, rail), self._spine(rail), self._rx(dst, rail))

    def nominal_capacity(self) -> float:
        return self.rails_per_node * min(self.nodes * self.nic_capacity, self.plane_spine)

    def capacity(self, fabric: FluidFabric, t0: float, t1: float) -> float:
        o = fabric.origin
        total = 0.0
        for r in range(self.rails_per_node):
            tx = [fabric.links[self._tx(n, r)].timeline for n in range(self.nodes)]
            rx = [fabric.links[self._rx(n, r)].timeline for n in range(self.nodes)]
            spine = [fabric.links[self._spine(r)].timeline]
            total += _min_integral([tx, spine, rx], t0 - o, t1 - o)
        return total

    def rail_of_link(self, link: int) -> str:
        return f"rail{link % self.rails_per_node}"


Topology = PairTopology | ClusterTopology

__all__ = ["INF", "ClusterTopology", "PairTopology", "Topology"]
