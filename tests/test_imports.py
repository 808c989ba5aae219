"""``import tent_async`` loads the core and the local engine only; backends load when asked for.

Import *time* is not asserted (it depends on the machine); what is asserted is
which modules an import pulls in, checked in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = (
    "msgpack",
    "ucxx",
    "hypothesis",
    "tent_async.backends.ucx",
    "tent_async.backends.sim",
    "prometheus_client",
    "rich",
)


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _loaded(modules: set[str], prefix: str) -> list[str]:
    return sorted(m for m in modules if m == prefix or m.startswith(prefix + "."))


def test_import_does_not_load_backends_or_their_codecs() -> None:
    modules = _modules_after("import tent_async")
    for heavy in HEAVY:
        assert not _loaded(modules, heavy), f"`import tent_async` imported {_loaded(modules, heavy)}"


def test_a_local_engine_does_not_load_the_ucx_backend() -> None:
    code = """
import anyio, tent_async as tent
async def main():
    async with tent.Engine(backend="local") as engine:
        a = engine.register(bytearray(b"x" * 4096))
        b = engine.register(bytearray(4096))
        await engine.transfer(a[:], b[:])
anyio.run(main)
"""
    modules = _modules_after(code)
    assert not _loaded(modules, "tent_async.backends.ucx") and "msgpack" not in modules


def test_peer_is_loaded_on_first_use() -> None:
    code = """
import sys, tent_async as tent
assert "tent_async.backends.ucx.peer" not in sys.modules
from tent_async.backends.ucx.peer import Peer
assert tent.Peer is Peer and "Peer" in tent.__all__
try:
    tent.NoSuchThing
except AttributeError as exc:
    assert "NoSuchThing" in str(exc)
else:
    raise AssertionError("unknown attributes must raise AttributeError")
"""
    assert "tent_async.backends.ucx.peer" in _modules_after(code)
