"""How an application describes a rail: :class:`RailSpec`.

A rail is one way bytes can travel: a local copy engine, a NIC, an NVLink, a
shared-memory channel.  Applications may list rails explicitly or let the
backend discover them.  The numbers on a spec are *hints* that seed the
scheduler's estimates; telemetry replaces them with what the rail really does.
For the ``local`` backend the bandwidth is also enforced (the copy is paced to
it), so heterogeneous rails can be demonstrated without a network.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Any

import attrs

from .errors import ConfigError
from .units import parse_bandwidth, parse_duration

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]+$")


class Tier(enum.IntEnum):
    """Topology distance between a rail and the memory it serves.

    The scheduler multiplies a rail's expected finish time by
    ``SchedulerConfig.tier_penalty[tier]``, so that among equally fast rails
    the closer one wins.
    """

    SAME_SWITCH = 0  # same PCIe switch as the buffer (or NVLink to it)
    SAME_NUMA = 1  # same NUMA node, different switch
    CROSS_NUMA = 2  # the traffic crosses the inter-socket link


def _check_name(_inst: Any, _attr: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigError(f"rail name must be a non-empty string of letters, digits, '_.:-'; got {value!r}")


def _optional_bandwidth(value: Any) -> float | None:
    return None if value is None else parse_bandwidth(value)


def _tier(value: Any) -> Tier:
    try:
        return Tier[value.upper()] if isinstance(value, str) else Tier(value)
    except (KeyError, ValueError):
        raise ConfigError(f"unknown tier {value!r}; use one of {[t.name.lower() for t in Tier]}") from None


def _options(value: Mapping[str, Any] | None) -> dict[str, str]:
    if value is not None and not isinstance(value, Mapping):
        raise ConfigError(f"rail options must be a mapping of setting -> value, got {type(value).__name__}")
    return {str(k): str(v) for k, v in (value or {}).items()}


@attrs.frozen(kw_only=True)
class RailSpec:
    """One rail of an engine.

    ``name``
        Unique within the engine; appears in telemetry and results.
    ``bandwidth``
        Nominal rate: bytes/s or a string such as ``"2GB/s"``, ``"400Gb/s"``,
        ``"800mbit"``.  ``None`` lets the backend pick (the local backend then
        copies unthrottled).
    ``latency``
        Per-slice start-up cost hint, seconds or ``"5us"``.
    ``backend``
        Which backend carries it; ``None`` means the engine's backend.
    ``device``
        Backend-specific device: a NIC name for UCX (``"eth0"``), ``"shm"``,
        ``"cuda:0"``.
    ``tier``
        Topology distance, a :class:`Tier` or its name.
    ``options``
        Backend-specific settings (for UCX, extra ``UCX_*`` variables for this
        rail's context).  One is understood by every backend:
        ``{"standby_for": "other"}`` makes this rail a standby for rail
        ``other``: for a rail that shares ``other``'s capacity, it leaves a
        transfer's bytes to ``other`` while ``other`` is healthy and carries
        as soon as it is not (see :class:`~tent_async.core.RailInfo`).  Over UCX, discovered TCP rails to
        a peer on the same host stand by for shared memory this way.
    """

    name: str = attrs.field(validator=_check_name)
    bandwidth: float | None = attrs.field(default=None, converter=_optional_bandwidth)
    latency: float = attrs.field(default=5e-6, converter=parse_duration)
    backend: str | None = None
    device: str | None = None
    tier: Tier = attrs.field(default=Tier.SAME_SWITCH, converter=_tier)
    options: Mapping[str, str] = attrs.field(factory=dict, converter=_options)
