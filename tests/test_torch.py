"""Torch tensors register through DLPack, in place (skipped where torch is not installed)."""

from __future__ import annotations

import anyio
import pytest

import tent_async as tent

torch = pytest.importorskip("torch")


def test_torch_cpu_tensors_are_registered_in_place() -> None:
    src = torch.arange(1 << 20, dtype=torch.float32)
    dst = torch.zeros(1 << 20, dtype=torch.float32)

    async def main() -> None:
        async with tent.Engine(rails=[tent.RailSpec(name="a"), tent.RailSpec(name="b")]) as engine:
            a = engine.register(src, name="weights")
            b = engine.register(dst)
            assert a.size == 4 << 20
            assert a.kind == "host"
            await engine.transfer(a[4096:], b[4096:])

    anyio.run(main)
    assert torch.equal(dst[1024:], src[1024:])
    assert not dst[:1024].any()


def test_non_contiguous_tensor_is_refused() -> None:
    async def main() -> None:
        async with tent.Engine() as engine:
            with pytest.raises(tent.UnsupportedBufferError, match="non-contiguous"):
                engine.register(torch.zeros(8, 8).t())

    anyio.run(main)
