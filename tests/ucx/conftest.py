"""Fixtures for the ucx backend tests: peer engines in their own processes.

Every peer runs ``serve_engine.py`` in a fresh interpreter (never a fork of a
process that uses UCX: a forked child's contexts cannot connect) and is
killed when its test or module ends, also on failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tent_async.backends.ucx import _ucxx

HELPER = Path(__file__).with_name("serve_engine.py")
REASON = _ucxx.available()
requires_ucxx = pytest.mark.skipif(REASON is not None, reason=f"ucxx cannot be loaded here: {REASON}")


class PeerProcess:
    """A ucx engine in another process, driven by JSON commands."""

    def __init__(self, config: dict[str, Any]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2] / "src"), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPER), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer process exited early with code {self.proc.wait(10)}")
        hello = json.loads(line)
        self.address: str = hello["address"]
        self.rails: list[str] = hello["rails"]

    def cmd(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("peer process died")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error"))
        return reply

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, OSError, ValueError):
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def spawn_peer() -> Iterator[Any]:
    """Start peer processes for one test; all are stopped (killed if need be) afterwards."""
    if REASON is not None:
        pytest.skip(f"ucxx cannot be loaded here: {REASON}")
    started: list[PeerProcess] = []

    def start(**config: Any) -> PeerProcess:
        peer = PeerProcess(config)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.close()
