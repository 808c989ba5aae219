"""examples/pd_disagg.py over the veth testbed: KV delivered byte-exact over real shaped rails.

Skipped, with the reason, where the testbed (root, network namespaces, veth, tbf) or the
ucx backend is not available, as the other testbed tests are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tent_async.bench import ucx_veth as V
from tent_async.testbed import available

ok, why = available()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.ucx,
    pytest.mark.skipif(not ok, reason=f"veth testbed unavailable: {why}"),
    pytest.mark.skipif(not V.engine_available()[0], reason=V.engine_available()[1] or "ucx backend unavailable"),
]

EXAMPLE = Path(__file__).parents[2] / "examples" / "pd_disagg.py"


def test_pd_disagg_over_two_shaped_rails_delivers_kv_byte_exact_on_both() -> None:
    # 2K-4K tokens of the tiny model: 4-8 MiB of KV per request.  At 128-256 tokens (0.5 MiB,
    # two 256 KiB slices) the fast rail took every byte and the slow one was never tried.
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--veth", "400mbit,100mbit", "--model", "tiny", "--requests", "3",
         "--min-tokens", "2048", "--max-tokens", "4096", "--json", "--deadline-floor", "1s"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["request"] for r in rows] == [0, 1, 2]
    assert all(r["exact"] is True for r in rows)  # checked by decode when its notification arrived
    per_rail: dict[str, int] = {}
    for r in rows:
        for name, n in r["bytes_per_rail"].items():
            rail = name.rsplit("/", 1)[-1].split(":")[0]
            per_rail[rail] = per_rail.get(rail, 0) + n
    assert set(per_rail) == {"r400", "r100"}, per_rail
    assert all(n > 0 for n in per_rail.values()), per_rail  # both rails carried bytes
    assert sum(per_rail.values()) == sum(r["kv_bytes"] for r in rows)
