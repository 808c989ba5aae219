"""The ucx backend on uvloop's event loop, in both processes.

Async servers built on uvicorn run on uvloop when it is installed, and the
backend's default progress modes put each rail's UCX worker on the event loop
itself (``loop.add_reader`` on the worker's descriptor, ``call_soon``,
``call_later``): nothing of that may depend on the standard loop.  Every mode
that runs on the loop moves the same bytes, large and inline, WRITE and READ,
on shared memory and TCP, with the peer on uvloop too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
from test_progress import RAILS, ROUND_CONFIG, _write_read_round, start_server

import tent_async as tent
from conftest import requires_ucxx

uvloop = pytest.importorskip("uvloop")

pytestmark = [pytest.mark.ucx, pytest.mark.anyio, requires_ucxx]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "asyncio", {"loop_factory": uvloop.new_event_loop}


@pytest.mark.parametrize("mode", ["loop", "poll"])
async def test_the_engine_moves_the_same_bytes_on_uvloop(spawn_peer: Any, mode: str) -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)  # this test's own loop
    server = start_server(spawn_peer, mode, uvloop=True)
    rails = [tent.RailSpec(**r) for r in RAILS]
    async with tent.Engine(backend="ucx", name="prefill-0", rails=rails, progress=mode, config=ROUND_CONFIG) as engine:
        assert {r.progress.mode for r in engine.backend.local_rails.values()} == {mode}
        with anyio.fail_after(60):
            peer = await engine.connect(server.address)
            await _write_read_round(engine, peer, server, seed=11)
        assert server.cmd(cmd="loop")["loop"] == "uvloop.Loop"  # the peer ran on uvloop too
        # The two engines proved they share this host (cma.py's verification socket), and the
        # shared-memory rail's large slices were copied directly, on uvloop as on asyncio's loop.
        stats = engine.backend.stats  # type: ignore[attr-defined]
        assert peer.cma_pid is not None, dict(stats)
        assert stats.get("cma_unverified", 0) == 0, dict(stats)
        assert server.cmd(cmd="stats")["stats"].get("cma_slices", 0) > 0  # the server answered WHEREs
