"""The serving examples, small: two processes over the ucx backend on loopback."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_ucxx

EXAMPLES = Path(__file__).parents[2] / "examples"
# The suite runs on a shared 2-core machine: a thread hop there can take longer than the
# default 20 ms deadline floor, and a single shm rail taken for failing fails the transfer.
LOADED = ["--deadline-floor", "1s"]


@requires_ucxx
def test_pd_disagg_delivers_each_requests_kv_to_its_pages() -> None:
    """Decode checks, when the notification arrives, that every block landed byte-exact in its pages."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "pd_disagg.py"), "--model", "tiny", "--requests", "3",
         "--min-tokens", "64", "--max-tokens", "256", "--json", *LOADED],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["request"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["exact"] is True
        pages = r["tokens"] // 16
        assert r["blocks"] == 2 * 4 * pages  # K and V of 4 layers, one block per page each
        assert r["kv_bytes"] == r["blocks"] * 4096
        assert r["ttft_s"] > r["transfer_s"] > 0


def _weight_update(*extra: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "weight_update.py"), "--workers", "2", "--layers", "1", "--hidden", "256",
         "--vocab", "1024", "--bucket", "512KiB", "--steps", "2", "--json", *LOADED, *extra],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    r: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return r


@requires_ucxx
def test_weight_update_leaves_every_worker_with_the_trainers_weights() -> None:
    r = _weight_update("--tensors", "numpy")  # the fallback where neither torch nor cupy is present
    assert r["library"] == "numpy"
    assert r["equal"] == [True, True]  # compared tensor by tensor by each worker, after the second update
    assert isinstance(r["buckets"], int) and r["buckets"] > 1
    assert isinstance(r["per_worker_s"], list) and len(r["per_worker_s"]) == 2
    assert r["update_s"] == max(r["per_worker_s"])


@requires_ucxx
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_weight_update_with_torch_tensors_registered_through_dlpack() -> None:
    """The trainer's parameters and the workers' buffers are torch tensors (views of one flat
    tensor registered in place); the workers compare them with torch.equal."""
    r = _weight_update("--tensors", "torch")
    assert r["library"] == "torch"
    assert r["equal"] == [True, True]


def test_weight_update_auto_never_picks_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--tensors auto`` takes torch, else numpy, even where cupy and a GPU are present:
    the cupy path has not run on a GPU, so it is used only when asked for."""
    import types

    spec = importlib.util.spec_from_file_location("weight_update_example", EXAMPLES / "weight_update.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", fake)  # cupy and one GPU, as far as the example can tell
    has_torch = importlib.util.find_spec("torch") is not None
    assert example.tensor_lib("auto") == ("torch" if has_torch else "numpy")
    monkeypatch.setitem(sys.modules, "torch", None)  # torch absent: import fails
    assert example.tensor_lib("auto") == "numpy"
    assert example.tensor_lib("cupy") == "cupy"  # asked for explicitly


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed")
def test_weight_update_asked_for_cupy_without_it_says_what_to_do() -> None:
    res = subprocess.run(
        [sys.executable, str(EXAMPLES / "weight_update.py"), "--tensors", "cupy"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode != 0
    assert "--tensors cupy: cupy is not usable here" in res.stderr
    assert "--tensors numpy" in res.stderr


def test_pd_disagg_over_veth_where_the_testbed_is_missing_says_what_it_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.machinery

    import tent_async.testbed

    monkeypatch.setattr(tent_async.testbed, "available", lambda: (False, "not root"))
    loader = importlib.machinery.SourceFileLoader("pd_disagg_example", str(EXAMPLES / "pd_disagg.py"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    with pytest.raises(SystemExit, match=r"--veth needs the veth testbed, which is not available here: not root"):
        module.main(["--veth", "800mbit,200mbit", "--model", "tiny"])


@requires_ucxx
def test_hicache_loads_every_prefix_byte_exact_under_offload() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "hicache.py"), "--servers", "2", "--requests", "4", "--concurrency", "2",
         "--prefix-pages", "8", "--json", *LOADED],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert sorted(r["index"] for r in rows) == [0, 1]
    for r in rows:
        assert r["exact"] == [True] * 4  # each load compared with the prefix's content in the serving process
        assert len(r["latencies"]) == 4
