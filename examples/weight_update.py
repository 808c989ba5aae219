"""RL weight update over the ucx backend: a trainer pushes its weights to several rollout workers.

This process is the *trainer*; it starts ``--workers`` rollout workers, each in a fresh
interpreter with a listening ucx engine and a registered buffer for the weights.  The
trainer's weights are real tensors of mixed sizes (a transformer's tensors: embedding,
per-layer attention and MLP matrices, norms), views into one registered flat buffer as a
training framework's flat parameter buffer is, and grouped into buckets.  The tensors are
torch tensors where torch is installed, else numpy arrays; ``--tensors cupy`` puts them in
GPU memory as cupy arrays, only when asked for: that path has not run on a GPU yet.  The
flat buffer is registered as it is, through DLPack or ``__cuda_array_interface__``, with
no copy.  Each bucket goes
to every worker as **one** ``transfer_batch`` (one pair per tensor), all workers
concurrently; the last bucket carries ``notify="update <n> done"``.  Each worker, on that
notification, rebuilds its tensors from its buffer and compares them with the trainer's.

    python examples/weight_update.py [--workers 2] [--layers 8] [--hidden 1024] [--bucket 64MiB]
                                     [--tensors auto|numpy|torch|cupy]

Output: per-worker update time and the total (the slowest worker's), and whether every
worker's weights are equal to the trainer's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np


def tensor_shapes(layers: int, hidden: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """A Llama-like model's tensors: mixed sizes, from norms (hidden) to the embedding (vocab x hidden)."""
    inter = hidden * 7 // 2 // 128 * 128
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed", (vocab, hidden))]
    for i in range(layers):
        shapes += [
            (f"l{i}.attn_norm", (hidden,)),
            (f"l{i}.qkv", (hidden * 3 // 2, hidden)),
            (f"l{i}.o", (hidden, hidden)),
            (f"l{i}.mlp_norm", (hidden,)),
            (f"l{i}.gate_up", (2 * inter, hidden)),
            (f"l{i}.down", (hidden, inter)),
        ]
    return [*shapes, ("norm", (hidden,)), ("lm_head", (vocab, hidden))]


def layout(shapes: list[tuple[str, tuple[int, ...]]]) -> tuple[list[tuple[str, int, int]], int]:
    """(name, byte offset, byte length) of each float32 tensor in the flat buffer, 4 KiB aligned."""
    out = []
    pos = 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * 4
        out.append((name, pos, n))
        pos += (n + 4095) // 4096 * 4096
    return out, pos


def weights(shapes: list[tuple[str, tuple[int, ...]]], step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes}


# ------------------------------------------------------------- tensors

TENSOR_LIBS = ("numpy", "torch", "cupy")


def tensor_lib(choice: str) -> str:
    """The tensor library to hold the weights: ``auto`` picks torch, else numpy.

    cupy only when asked for: its GPU path has not run on a GPU yet, so a machine that
    happens to have cupy and a GPU should not take it silently.
    """
    import importlib

    if choice == "numpy":
        return choice
    if choice not in ("auto", *TENSOR_LIBS):
        raise SystemExit(f"--tensors must be auto, {', '.join(TENSOR_LIBS)}; got {choice!r}")
    for lib in ("torch",) if choice == "auto" else (choice,):
        try:
            mod = importlib.import_module(lib)
            if lib == "cupy" and mod.cuda.runtime.getDeviceCount() < 1:
                raise ImportError("no CUDA device")
        except Exception as e:  # cupy without a GPU raises CUDA errors, not ImportError
            if choice != "auto":
                raise SystemExit(f"--tensors {choice}: {lib} is not usable here ({e}); try --tensors numpy") from e
            continue
        return lib
    return "numpy"


def zeros(lib: str, size: int) -> Any:
    """A flat uint8 buffer of ``size`` bytes in ``lib`` (host memory for torch, GPU memory for cupy)."""
    if lib == "torch":
        import torch

        return torch.zeros(size, dtype=torch.uint8)
    if lib == "cupy":
        import cupy

        return cupy.zeros(size, dtype=cupy.uint8)
    return np.zeros(size, dtype=np.uint8)


def view(lib: str, flat: Any, off: int, n: int, shape: tuple[int, ...]) -> Any:
    """The float32 tensor at bytes ``[off, off + n)`` of ``flat``: a view, as a framework's parameter is."""
    part = flat[off : off + n]
    if lib == "torch":
        import torch

        return part.view(torch.float32).view(shape)
    return part.view(np.float32).reshape(shape)  # numpy and cupy share the dtype objects


def assign(lib: str, tensor: Any, value: np.ndarray) -> None:
    """Write ``value`` (host numpy) into ``tensor`` in place."""
    if lib == "torch":
        import torch

        tensor.copy_(torch.from_numpy(value))
    elif lib == "cupy":
        import cupy

        tensor[...] = cupy.asarray(value)
    else:
        tensor[...] = value


def equal(lib: str, tensor: Any, value: np.ndarray) -> bool:
    if lib == "torch":
        import torch

        return bool(torch.equal(tensor, torch.from_numpy(value)))
    if lib == "cupy":
        import cupy

        return bool(cupy.array_equal(tensor, cupy.asarray(value)))
    return bool(np.array_equal(tensor, value))


def engine_options(config: dict[str, Any]) -> dict[str, Any]:
    """``--deadline-floor``: a loaded host (a shared CI machine) is slower than its loopback rail;
    a longer floor keeps a late thread hop from being taken for a failing rail.  Given as a
    mapping, it changes only that field of the backend's default config (a whole
    ``SchedulerConfig`` would also drop the ucx backend's 4 ms slices and windows)."""
    floor = config.get("deadline_floor")
    return {"config": {"deadline_floor": floor}} if floor else {}


def rails(names: str) -> list[Any]:
    from tent_async.rails import RailSpec

    return [RailSpec(name=n, device="shm" if n == "shm" else "lo") for n in names.split(",")]


# ------------------------------------------------------------------ worker


async def worker(config: dict[str, Any]) -> None:
    import tent_async as tent

    shapes = [(n, tuple(s)) for n, s in config["shapes"]]
    places, size = layout(shapes)
    lib = config["tensors"]
    buf = zeros(lib, size)
    tensors = [view(lib, buf, off, n, shape) for (_nm, off, n), (_nm2, shape) in zip(places, shapes, strict=True)]
    name = f"rollout-{config['index']}"
    async with tent.Engine(backend="ucx", name=name, listen="127.0.0.1:0", rails=rails(config["rails"])) as engine:
        engine.register(buf, name="weights")
        print(json.dumps({"address": engine.address}), flush=True)
        async for note in engine.notifications():
            step = int(note.message.split()[1])
            expected = weights(shapes, step)
            same = all(equal(lib, t, expected[nm]) for (nm, _off, _n), t in zip(places, tensors, strict=True))
            print(json.dumps({"step": step, "equal": same}), flush=True)
            if note.message.endswith("last"):
                return


# ----------------------------------------------------------------- trainer


def start_worker(config: dict[str, Any]) -> subprocess.Popen[str]:
    """A rollout worker in a fresh interpreter (a forked UCX process cannot connect)."""
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", json.dumps(config)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )


async def trainer(args: argparse.Namespace) -> dict[str, Any]:
    import tent_async as tent
    from tent_async.units import parse_size

    shapes = tensor_shapes(args.layers, args.hidden, args.vocab)
    places, size = layout(shapes)
    lib = args.tensors
    bucket_bytes = parse_size(args.bucket)
    buckets: list[list[tuple[str, int, int]]] = [[]]
    filled = 0
    for place in places:  # tensors in order, a new bucket when this one is full
        if buckets[-1] and filled + place[2] > bucket_bytes:
            buckets.append([])
            filled = 0
        buckets[-1].append(place)
        filled += place[2]
    procs = [
        start_worker({"index": i, "shapes": shapes, "rails": args.rails, "tensors": lib}) for i in range(args.workers)
    ]  # fmt: skip
    loop = asyncio.get_running_loop()

    async def read(proc: subprocess.Popen[str]) -> dict[str, Any]:
        assert proc.stdout is not None
        while True:
            line = await loop.run_in_executor(None, proc.stdout.readline)
            if not line:
                raise RuntimeError(f"worker exited with {proc.wait()}")
            if line.startswith("{"):
                out: dict[str, Any] = json.loads(line)
                return out

    try:
        addresses = [(await read(p))["address"] for p in procs]
        flat = zeros(lib, size)  # the flat parameter buffer; each tensor is a view into it
        params = [view(lib, flat, off, n, shape) for (_nm, off, n), (_nm2, shape) in zip(places, shapes, strict=True)]
        async with tent.Engine(
            backend="ucx", name="trainer", rails=rails(args.rails), **engine_options(vars(args))
        ) as engine:
            local = engine.register(flat, name="weights", permission="r")
            remotes = []
            for i, address in enumerate(addresses):
                peer = await engine.connect(address, expect_name=f"rollout-{i}")
                remotes.append(await peer.segment("weights"))
            times: dict[int, float] = {}
            equal: list[bool] = []
            for step in range(1, args.steps + 1):
                for param, value in zip(params, weights(shapes, step).values(), strict=True):
                    assign(lib, param, value)  # the optimizer's new weights, in place
                t0 = time.perf_counter()

                async def push(remote: Any, index: int, step: int = step, t0: float = t0) -> None:
                    for k, bucket in enumerate(buckets):
                        last = k == len(buckets) - 1
                        note = f"update {step} {'last' if last and step == args.steps else 'done'}" if last else None
                        pairs = [(local[off : off + n], remote[off : off + n]) for _name, off, n in bucket]
                        await engine.transfer_batch(pairs, notify=note)
                    times[index] = time.perf_counter() - t0

                times.clear()
                await asyncio.gather(*(push(r, i) for i, r in enumerate(remotes)))
                equal = [bool((await read(p))["equal"]) for p in procs]
            return {
                "library": lib,
                "workers": args.workers,
                "bytes": size,
                "tensors": len(places),
                "buckets": len(buckets),
                "per_worker_s": [times[i] for i in range(len(procs))],
                "update_s": max(times.values()),
                "equal": equal,
            }
    finally:
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bucket", default="64MiB")
    parser.add_argument("--steps", type=int, default=2, help="weight updates, each with new weights")
    parser.add_argument("--rails", default="shm", help="comma-separated: shm, tcp (loopback)")
    parser.add_argument("--deadline-floor", default=None, help="SchedulerConfig.deadline_floor, e.g. 500ms")
    parser.add_argument(
        "--tensors",
        default="auto",
        help="auto (torch if installed, else numpy), numpy, torch or cupy (GPU memory; not yet run on a GPU)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        asyncio.run(worker(json.loads(args.worker)))
        return 0
    args.tensors = tensor_lib(args.tensors)
    r = asyncio.run(trainer(args))
    if args.json:
        print(json.dumps(r))
    else:
        print(
            f"{r['tensors']} {r['library']} tensors, {r['bytes'] / 2**20:.1f} MiB in {r['buckets']} buckets "
            f"-> {r['workers']} workers"
        )
        for i, s in enumerate(r["per_worker_s"]):
            print(f"  worker {i}: {s * 1e3:.1f} ms ({r['bytes'] / s / 1e9:.2f} GB/s)")
        print(f"update time (slowest worker): {r['update_s'] * 1e3:.1f} ms; weights equal: {r['equal']}")
    return 0 if all(r["equal"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
