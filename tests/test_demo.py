"""``tent-async demo`` is part of the package, takes options, and prints whole tables into a pipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tent_async.cli import main


def test_demo_runs_from_the_installed_package_into_a_pipe(tmp_path: Path) -> None:
    # From a directory without the source tree, stdout a pipe (not a terminal) and no
    # $COLUMNS: the table must come out whole, not cut to 80 columns.
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run(
        [sys.executable, "-m", "tent_async.cli", "demo", "--size", "2MiB", "--policies", "eft,round_robin"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Moving 2.0 MiB over 3 local rails" in text
    for whole in ("throughput", "of capacity", "fair share", "round_robin", "eft"):
        assert whole in text, f"{whole!r} missing or cut in:\n{text}"
    assert "…" not in text  # nothing truncated


def test_demo_options_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--size", "lots"])
    assert info.value.code == 2
    assert "cannot read 'lots' as a size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--policies", "fastest"])
    assert "unknown policies ['fastest']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--no-such-option"])


def test_the_example_script_takes_the_same_options() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "spray_demo.py"
    out = subprocess.run(
        [sys.executable, str(example), "--size", "1MiB", "--policies", "single"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "Moving 1.0 MiB" in out.stdout and "single" in out.stdout
