"""The scenarios of the simulated-fabric benchmark (issue 3), full size or scaled down.

``scale`` multiplies every flow size and time span (horizons, burst
lengths, fault times) but not link speeds, so a scaled-down scenario is the
same experiment, shorter; the tests run them at a few percent.

Choices the issue leaves open, stated here once:

* rails are 400 Gb/s (50 GB/s) NICs with 5 us base latency unless the issue
  says otherwise; the cluster uses 200 Gb/s NICs to keep the event count of
  an all-to-all run within a benchmark's patience;
* "80% background load in random bursts": a cross-tenant on/off source
  taking 80% of the rail while on, on and off periods exponential with a
  mean of 20 ms each (50% duty cycle);
* "mixed": KV blocks at 70% of the available capacity from 16 tenants, plus
  one 1 GiB elephant every 50 ms, on the congested fabric of scenario 3
  (multi-tenant rails are where tail latency suffers);
* "cluster": 16 nodes x 8 rails, each rail plane's spine at 75% of the
  plane's NIC capacity (4:3 oversubscribed), two planes' spines carrying
  bursts of another tenant, all-to-all KV blocks at 60% of the available
  capacity.

Scheduler knobs differing from :class:`SchedulerConfig`'s defaults are set
in :data:`FAST_RAILS` and explained in ``config_note``.
"""

from __future__ import annotations

from ...core import SchedulerConfig
from .fabric import SimRail
from .profiles import Bursts, Degrade
from .runner import Scenario
from .topology import ClusterTopology, PairTopology
from .workloads import Elephants, KVBlocks, Periodic

GiB = 1024**3

FAST_RAILS = SchedulerConfig()
FAST_RAILS_NOTE = "defaults"

SCENARIO_NAMES = ("homogeneous", "heterogeneous", "congested", "degraded", "mixed", "cluster")


def _rails(n: int, capacity: str = "400Gb/s", **kwargs: object) -> tuple[SimRail, ...]:
    return tuple(SimRail(name=f"nic{i}", capacity=capacity, **kwargs) for i in range(n))  # type: ignore[arg-type]


def _size(n: float, scale: float) -> int:
    return max(1 << 20, int(n * scale) // 4096 * 4096)


def homogeneous(scale: float = 1.0, seed: int = 1) -> Scenario:
    return Scenario(
        name="homogeneous",
        description="4 x 400 Gb/s rails, one 4 GiB flow",
        topology=PairTopology(rails=_rails(4)),
        workloads=(Elephants(size=_size(4 * GiB, scale), count=1),),
        horizon=0.0,
        config=FAST_RAILS,
        config_note=FAST_RAILS_NOTE,
        seed=seed,
    )


def heterogeneous(scale: float = 1.0, seed: int = 1) -> Scenario:
    rails = tuple(
        SimRail(name=f"nic{i}-{speed}", capacity=f"{speed}Gb/s") for i, speed in enumerate((400, 200, 100, 25))
    )
    return Scenario(
        name="heterogeneous",
        description="rails of 400, 200, 100 and 25 Gb/s, one 4 GiB flow",
        topology=PairTopology(rails=rails),
        workloads=(Elephants(size=_size(4 * GiB, scale), count=1),),
        horizon=0.0,
        config=FAST_RAILS,
        config_note=FAST_RAILS_NOTE,
        seed=seed,
    )


def _bursty(scale: float) -> Bursts:
    return Bursts(load=0.8, mean_on=0.02 * scale, mean_off=0.02 * scale)


def congested(scale: float = 1.0, seed: int = 1) -> Scenario:
    burst = _bursty(scale)
    rails = tuple(SimRail(name=f"nic{i}", capacity="400Gb/s", profile=(burst,) if i < 2 else ()) for i in range(8))
    return Scenario(
        name="congested",
        description="8 x 400 Gb/s, two rails carrying 80% background load in random bursts; "
        "4 GiB elephants back to back (2 outstanding) for 0.5 s",
        topology=PairTopology(rails=rails),
        workloads=(Elephants(size=_size(4 * GiB, scale), concurrency=2),),
        horizon=0.5 * scale,
        config=FAST_RAILS,
        config_note=FAST_RAILS_NOTE,
        seed=seed,
    )


def degraded(scale: float = 1.0, seed: int = 1) -> Scenario:
    rails = tuple(
        SimRail(name=f"nic{i}", capacity="400Gb/s", profile=(Degrade(at=0.2 * scale, factor=0.05),) if i == 0 else ())
        for i in range(8)
    )
    return Scenario(
        name="degraded",
        description="8 x 400 Gb/s, one rail drops to 5% at t=0.2 s; "
        "4 GiB elephants back to back (2 outstanding) for 0.4 s",
        topology=PairTopology(rails=rails),
        workloads=(Elephants(size=_size(4 * GiB, scale), concurrency=2),),
        horizon=0.4 * scale,
        config=FAST_RAILS,
        config_note=FAST_RAILS_NOTE,
        seed=seed,
    )


def mixed(scale: float = 1.0, seed: int = 1) -> Scenario:
    burst = _bursty(scale)
    rails = tuple(SimRail(name=f"nic{i}", capacity="400Gb/s", profile=(burst,) if i < 2 else ()) for i in range(8))
    return Scenario(
        name="mixed",
        description="fabric of 'congested'; KV blocks (2-64 MiB) at 70% load from 16 tenants "
        "plus a 1 GiB elephant every 50 ms, for 0.5 s; latency of the KV blocks",
        topology=PairTopology(rails=rails),
        workloads=(
            KVBlocks(load=0.7, tenants=16),
            Periodic(size=_size(GiB, scale), period=0.05 * scale),
        ),
        horizon=0.5 * scale,
        latency_kind="kv",
        config=FAST_RAILS,
        config_note=FAST_RAILS_NOTE,
        seed=seed,
    )


def cluster(scale: float = 1.0, seed: int = 1) -> Scenario:
    burst = _bursty(scale)
    topo = ClusterTopology(nodes=16, rails_per_node=8, nic_capacity="200Gb/s", spine_profile={0: burst, 1: burst})
    return Scenario(
        name="cluster",
        description="16 nodes x 8 rails of 200 Gb/s, rail planes with 4:3 oversubscribed spines, two spines "
        "with bursty background; all-to-all KV blocks at 60% load for 0.1 s",
        topology=topo,
        workloads=(KVBlocks(load=0.6, tenants=16),),
        horizon=0.1 * scale,
        latency_kind="kv",
        config=FAST_RAILS,
        config_note=FAST_RAILS_NOTE,
        seed=seed,
    )


BUILDERS = {
    "homogeneous": homogeneous,
    "heterogeneous": heterogeneous,
    "congested": congested,
    "degraded": degraded,
    "mixed": mixed,
    "cluster": cluster,
}


def scenario(name: str, scale: float = 1.0, seed: int = 1) -> Scenario:
    """The benchmark scenario called ``name`` (see :data:`SCENARIO_NAMES`)."""
    try:
        build = BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; choose from {list(SCENARIO_NAMES)}") from None
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return build(scale, seed)
