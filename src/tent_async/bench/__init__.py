"""Benchmarks: each prints its figure beside the physical limit, measured in the same run.

Every benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> int``
and is reachable as ``tent-async bench NAME`` (or ``python -m tent_async.bench NAME``).
Results and the commands that produced them are recorded in ``docs/benchmarks.md``.
"""

from __future__ import annotations

BENCHMARKS: dict[str, tuple[str, str]] = {
    "local": ("tent_async.bench.local", "engine vs raw numpy copy on the local backend"),
    "core": ("tent_async.bench.core", "per-slice dispatch cost of the sans-IO core"),
    "sim": ("tent_async.bench.sim", "simulated fabric scenarios: eft vs round_robin vs single"),
    "failover": ("tent_async.bench.failover", "recovery time after rail faults on the simulated fabric"),
    "flows": ("tent_async.bench.flows", "thousands of concurrent transfer() calls vs one batch, local rails"),
    "kv": ("tent_async.bench.kv", "scattered KV-cache blocks vs one contiguous transfer, local rails"),
    "spray": ("tent_async.bench.spray", "one medium transfer alone on the simulated fabric vs its limit"),
    "priority": ("tent_async.bench.priority", "high-priority latency under background bulk, simulated fabric"),
    "serving": (
        "tent_async.bench.serving",
        "LLM serving: PD, HiCache, weight update, micro; eft vs static vs round_robin",
    ),
    "ucx": ("tent_async.bench.ucx", "raw ucxx vs the engine, and the veth testbed"),
    "veth": ("tent_async.bench.ucx_veth", "raw ucxx and UCX multi-rail on the veth testbed (root)"),
}
