"""A raw ucxx client that skips the tent_async handshake (test helper, run as a script).

    python tests/ucx/ucx_attacker.py sockaddr PORT MODE SIZE COUNT
    python tests/ucx/ucx_attacker.py forged   PORT MODE SIZE COUNT

``sockaddr`` dials ``127.0.0.1:PORT`` the standard way (``UCXEndpoint.create``,
UCX's connection manager), as one would dial a UCX listener.  ``forged`` builds
a worker address for the UCX tcp transport port ``PORT`` without ever having
been told the target's address: its own address with its own tcp port replaced
by ``PORT`` and a random worker id (UCX 1.21's address layout; prints
``{"skip": ...}`` where that layout is not found).

MODE is ``am`` (one active message), ``stream``, ``tag`` (tagged, UCX's default
thresholds: large messages wait at the sender until a receive matches) or
``eager`` (tagged, forced eager: the bytes are pushed to the target at once).
COUNT messages of SIZE bytes each, 0.5 s apart; or ``flood``: COUNT tagged
messages of SIZE bytes as fast as the wire takes them.  Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import struct
import sys
import threading
import time

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
os.environ.setdefault("UCX_LOG_LEVEL", "error")

import numpy as np
import ucxx  # noqa: F401  (sets UCX_* defaults)
import ucxx._lib.libucxx as L
from procnet import listening_ports  # this directory: the script runs as a file
from ucxx._lib.arr import Array
from ucxx._lib_async.notifier_thread import _notifierThread


async def main(how: str, port: int, mode: str, size: int, count: int) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    config = {"TLS": "tcp", "NET_DEVICES": "lo"}
    if mode == "eager":
        config["RNDV_THRESH"] = "inf"
    features = (L.Feature.TAG, L.Feature.WAKEUP, L.Feature.AM, L.Feature.STREAM)
    ctx = L.UCXContext(config, feature_flags=features)
    worker = L.UCXWorker(ctx, enable_delayed_submission=False, enable_python_future=True)
    worker.start_progress_thread(polling_mode=False, epoll_timeout=1)
    notifier = threading.Thread(target=_notifierThread, args=(loop, worker, queue.Queue()), daemon=True)
    notifier.start()
    if how == "sockaddr":
        ep = L.UCXEndpoint.create(worker, "127.0.0.1", port, True)
    else:
        mine = bytes(worker.address.tobytes())
        own = [p for p in listening_ports() if mine.count(struct.pack("!H", p)) == 1]
        if len(own) != 1 or mine[:1] != b"\x20":
            return {"skip": f"unknown UCX worker address layout ({mine.hex()}, own ports {listening_ports()})"}
        forged = mine.replace(struct.pack("!H", own[0]), struct.pack("!H", port))
        forged = forged[:1] + os.urandom(8) + forged[9:]  # another worker id: not our own worker
        ep = worker.create_endpoint_from_worker_address(L.UCXAddress.create_from_buffer(forged), True)
    payload = np.ones(size, dtype=np.uint8)
    requests = []
    if mode == "flood":  # COUNT small tagged messages as fast as they go (at most 1024 unfinished)
        t0 = time.monotonic()
        pending: list[object] = []
        for i in range(count):
            pending.append(ep.tag_send(Array(payload), L.UCXXTag(0x5EED0000 + (i & 0xFFFF))))
            if len(pending) >= 1024:
                while pending and pending[0].completed:  # type: ignore[attr-defined]
                    pending.pop(0)
                if len(pending) >= 1024:
                    await asyncio.sleep(0.0005)
                    pending = [r for r in pending if not r.completed]  # type: ignore[attr-defined]
        while pending and time.monotonic() - t0 < 60:
            await asyncio.sleep(0.01)
            pending = [r for r in pending if not r.completed]  # type: ignore[attr-defined]
        return {"sent": count, "unfinished": len(pending), "flood_seconds": round(time.monotonic() - t0, 2)}
    for i in range(count):
        if mode == "am":
            requests.append(ep.am_send(Array(payload)))
        elif mode == "stream":
            requests.append(ep.stream_send(Array(payload)))
        else:
            requests.append(ep.tag_send(Array(payload), L.UCXXTag(0x5EED0000 + i)))
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)
    done = sum(1 for r in requests if r.completed)
    errors = []
    for r in requests:
        if r.completed:
            try:
                r.check_error()
            except Exception as exc:
                errors.append(type(exc).__name__)
    return {"sent": count, "completed": done, "errors": errors, "alive": bool(ep.alive)}


if __name__ == "__main__":
    how, port, mode, size, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    t0 = time.monotonic()
    result = asyncio.run(main(how, port, mode, size, count))
    result["seconds"] = round(time.monotonic() - t0, 2)
    print(json.dumps(result), flush=True)
    os._exit(0)  # no orderly UCX teardown: an attacker does not bother either
