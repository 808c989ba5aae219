"""KV-cache shaped batches on the local backend: ``tent-async bench kv``.

Blocks to randomly permuted destinations in a registered pool, as a block
table (``transfer_blocks``) and as view pairs (``transfer_batch``), and the
same with adjacent blocks, against one contiguous transfer of the same bytes
through the same engine and a raw numpy copy (the limit), in one run.  The
"raw scatter" row is the permuted blocks written by one numpy call without
the engine: what scattered writes cost on the machine, before any engine.
Targets: 16,384 x 4 KiB >= 0.5x and 4,096 x 16 KiB >= 0.8x of contiguous;
adjacent blocks >= 0.95x; <= 64 B of bookkeeping per block.

    tent-async bench kv [--shapes 16384x4KiB,4096x16KiB] [--rails 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc

import anyio
import numpy as np
from rich.table import Table

from ..display import console as make_console
from ..display import step_progress
from ..engine import Engine
from ..rails import RailSpec
from ..units import format_rate, format_size, parse_size

PER_BLOCK = 64


# --------------------------------------------------------------------- kv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="16384x4KiB,4096x16KiB", help="COUNTxSIZE block shapes")
    parser.add_argument("--rails", type=int, default=1, help="unpaced local rails (default 1)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions; the median is reported (default 5)")


def _shape(text: str) -> tuple[int, int]:
    count, size = text.split("x", 1)
    return int(count), parse_size(size)


async def _kv_once(kind: str, src: np.ndarray, dst: np.ndarray, block: int, perm: np.ndarray, rails: int) -> float:
    specs = [RailSpec(name=f"copy{i}") for i in range(rails)]
    n = len(perm)
    async with Engine(backend="local", rails=specs) as engine:
        a = engine.register(src, name="pool-a", permission="r")
        b = engine.register(dst, name="pool-b")
        await engine.transfer(a[: 4 << 20], b[: 4 << 20])  # learn the rails
        so = np.arange(n, dtype=np.int64) * block
        do = (perm if kind.endswith("permuted") else np.arange(n)).astype(np.int64) * block
        t0 = time.perf_counter()
        if kind == "contiguous":
            await engine.transfer(a[: n * block], b[: n * block])
        elif kind.startswith("blocks"):
            await engine.transfer_blocks(a, so, b, do, block)
        else:
            pairs = [(a[s : s + block], b[d : d + block]) for s, d in zip(so.tolist(), do.tolist(), strict=True)]
            await engine.transfer_batch(pairs)
        return time.perf_counter() - t0


def _block_bytes(n: int, block: int) -> float:
    """Python memory (tracemalloc) per block of one open block-table transfer."""

    async def main() -> float:
        src = np.zeros(n * block, dtype=np.uint8)
        dst = np.zeros_like(src)
        perm = np.random.default_rng(3).permutation(n).astype(np.int64) * block
        so = np.arange(n, dtype=np.int64) * block
        async with Engine(backend="local", rails=[RailSpec(name="r0", bandwidth="1GB/s")]) as engine:
            a = engine.register(src, name="a", permission="r")
            b = engine.register(dst, name="b")
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            handle = engine.submit_blocks(a, so, b, perm, block)
            after = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            await handle
            return (after - before) / n

    return anyio.run(main)


def run(args: argparse.Namespace) -> int:
    console = make_console()
    kinds = ("contiguous", "blocks, permuted", "pairs, permuted", "blocks, adjacent", "pairs, adjacent")
    results = []
    with step_progress() as progress:
        shapes = [_shape(s) for s in args.shapes.split(",")]
        task = progress.add_task("kv", total=len(shapes) * args.repeat * (len(kinds) + 1))
        for n, block in shapes:
            src = np.random.default_rng(n).integers(0, 256, n * block, dtype=np.uint8)
            dst = np.zeros_like(src)
            perm = np.random.default_rng(7).permutation(n)
            times: dict[str, list[float]] = {k: [] for k in (*kinds, "raw copy", "raw scatter")}
            rows_in, rows_out = src.reshape(n, block), dst.reshape(n, block)
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                np.copyto(dst, src)
                times["raw copy"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                rows_out[perm] = rows_in  # the permuted blocks in one numpy call, no engine: their limit
                times["raw scatter"].append(time.perf_counter() - t0)
                progress.update(task, advance=1)
                for kind in kinds:
                    dst[:] = 0
                    times[kind].append(anyio.run(_kv_once, kind, src, dst, block, perm, args.rails))
                    progress.update(task, advance=1, description=f"{n} x {format_size(block)}: {kind}")
                    expect = src.reshape(n, block)
                    got = dst.reshape(n, block)[perm] if kind.endswith("permuted") else dst.reshape(n, block)
                    if not np.array_equal(expect, got):
                        console.print(f"[red]{kind}: destination differs[/red]")
                        return 1
            med = {k: statistics.median(v) for k, v in times.items()}
            results.append((n, block, med))
    per_block = _block_bytes(40_000, 4096)
    table = Table(title=f"KV blocks on {args.rails} unpaced local rail(s), median of {args.repeat}")
    for col in ("blocks", "what", "throughput", "of contiguous", "of raw copy", "target"):
        table.add_column(col, justify="right")
    verdicts = []
    targets = {4096: 0.5, 16384: 0.8}
    for n, block, med in results:
        total = n * block
        for kind in ("raw copy", "raw scatter", *kinds):
            ratio = med["contiguous"] / med[kind]
            if kind == "blocks, permuted":
                target: float | None = targets.get(block)
            elif kind == "blocks, adjacent":
                target = 0.95
            else:
                target = None
            if target is not None:
                verdicts.append((f"{n} x {format_size(block)} {kind}", ratio, target))
            table.add_row(
                f"{n:,} x {format_size(block)}",
                kind,
                format_rate(total / med[kind]),
                f"{ratio:.2f}",
                f"{med['raw copy'] / med[kind]:.2f}",
                f">= {target}" if target is not None else "",
            )
            print(
                json.dumps(
                    {
                        "bench": "kv",
                        "blocks": n,
                        "block": block,
                        "what": kind,
                        "seconds": med[kind],
                        "of_contiguous": ratio,
                    }
                )
            )
    console.print(table)
    for label, ratio, target in verdicts:
        console.print(
            f"{label}: {ratio:.2f} of contiguous (target >= {target}): {'met' if ratio >= target else 'MISSED'}"
        )
    console.print(
        f"bookkeeping per block (40,000 x 4 KiB block table): {per_block:.1f} B (target <= {PER_BLOCK} B): "
        f"{'met' if per_block <= PER_BLOCK else 'MISSED'}"
    )
    print(json.dumps({"bench": "kv", "bytes_per_block": per_block}))
    return 0
