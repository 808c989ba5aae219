"""Pairing local rails with a peer's rails: only pairs that can reach each other.

* shared memory and CUDA rails pair only with the same kind on the same host
  (same host id: machine, boot and network namespace);
* a loopback TCP rail pairs only with a loopback rail on the same host;
* other TCP rails pair where the peer's address lies in the local rail's
  subnet, or where a rail names its partner explicitly
  (``RailSpec(options={"pair": "peer-rail"})``).

Each local and each remote rail is used at most once (a greedy one-to-one
matching in the order the rails were given), so two NICs facing two NICs make
two rails, not four that share the same wires.

Some pairs share their capacity with a better one (:func:`standby_links`): they
stand by for it, leaving it the bytes while it is healthy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import attrs

from .protocol import RailAd
from .rails import LOOPBACK_IP, RailPlan


@attrs.frozen
class Pair:
    """A local rail and the peer's rail it talks to; ``dial`` is the address to connect to."""

    local: RailPlan
    remote: RailAd
    dial: str

    @property
    def bandwidth(self) -> float:
        return min(self.local.bandwidth, self.remote.bandwidth)

    def rail_name(self, peer: str) -> str:
        """The engine rail's name as users read it: ``decode-0/nic0`` (``decode-0/nic0:eth1`` if names differ)."""
        if self.local.name == self.remote.name:
            return f"{peer}/{self.local.name}"
        return f"{peer}/{self.local.name}:{self.remote.name}"


def _reachable(local: RailPlan, remote: RailAd, same_host: bool) -> str | None:
    """The address to dial for ``remote`` from ``local``, or None if they cannot meet."""
    if local.pair is not None:
        return remote.ip if local.pair == remote.name and local.kind == remote.kind else None
    if local.kind != remote.kind:
        return None
    if local.kind in ("shm", "cuda"):
        return LOOPBACK_IP if same_host else None
    remote_loopback = remote.ip.startswith("127.")
    if local.loopback or remote_loopback:
        return LOOPBACK_IP if (local.loopback and remote_loopback and same_host) else None
    try:
        if ipaddress.IPv4Address(remote.ip) in local.subnet():
            return remote.ip
    except ValueError:
        return None
    return None


def pair_rails(local: Sequence[RailPlan], remote: Sequence[RailAd], same_host: bool) -> list[Pair]:
    """The engine rails for one peer (may be empty: then nothing can reach it)."""
    pairs: list[Pair] = []
    used: set[str] = set()
    for plan in local:
        for ad in remote:
            if ad.name in used:
                continue
            dial = _reachable(plan, ad, same_host)
            if dial is not None:
                pairs.append(Pair(local=plan, remote=ad, dial=dial))
                used.add(ad.name)
                break
    return pairs


def standby_links(pairs: Sequence[Pair], *, same_host: bool, discovered: bool) -> dict[str, str]:
    """Which pairs stand by for which (local rail name -> the local rail it stands by for).

    * A rail whose spec names one (``RailSpec(options={"standby_for": "shm"})``)
      stands by for it, when both reach this peer.
    * Discovered rails (``rails=None``) to a peer on the same host: every TCP
      pair stands by for shared memory.  Both ends of every rail then run on
      the same two processes' event loops, so TCP adds no capacity beside
      shared memory; it takes some (the kernel copies each byte twice, with a
      system call per chunk, where shared memory copies it once), and its
      slices, late behind shared memory's, missed their deadlines and were
      withdrawn (docs/ucx.md, "Rails that share a host").  They stay as
      failover for shared memory.
    """
    names = {p.local.name for p in pairs}
    out = {p.local.name: p.local.standby_for for p in pairs if p.local.standby_for in names}
    if discovered and same_host:
        shm = next((p.local.name for p in pairs if p.local.kind == "shm"), None)
        if shm is not None:
            for p in pairs:
                if p.local.kind == "tcp":
                    out.setdefault(p.local.name, shm)
    return {k: v for k, v in out.items() if v is not None}
