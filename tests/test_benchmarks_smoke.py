"""Keeps the benchmarks from rotting: the cheapest one (graceful handover between
``greenleader run`` processes on the file store) in its quick mode, through the one command."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_handover_benchmark_on_the_file_store(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "benchmarks", "handover", "--quick", "--kinds", "file", "--trials", "3",
            "--no-plots", "--out", str(tmp_path)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"benchmark failed:\n{done.stdout}\n{done.stderr}"
    assert "Graceful handover" in done.stdout, done.stdout
    runs = json.loads((tmp_path / "results.json").read_text())["sections"]["handover"]["data"]["file"]
    assert [run["label"] for run in runs] == ["greenleader run", "greenleader library"]
    for run in runs:
        assert run["summary"]["n"] == 3, run
        assert run["errors"] == [], run["errors"]
        assert 0 < run["summary"]["max"] < 5, run["samples"]
