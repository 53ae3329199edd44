"""The FITS benchmark runs end to end (``bench/fits.py --smoke``); no figure is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("astropy")


@pytest.mark.slow
def test_fits_benchmark_smoke(tmp_path: Path) -> None:
    out, results = tmp_path / "fits.json", tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nhand-written text\n")
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fits.py"), "--smoke", "--data", str(tmp_path),
         "--json", str(out), "--results", str(results)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    cases = doc["first_tile"]["cases"]
    assert set(cases) >= {"lowest level", "full resolution", "OBJ"}
    for case in cases.values():
        assert len(case["seconds"]) == 1 and 0 < case["median"] < 60
    assert cases["lowest level"]["cached_median"] < cases["lowest level"]["median"] + 1
    assert set(doc["converter"]) == {"none", "deflate", "zstd"}
    for conv in doc["converter"].values():
        assert conv["mpixel_per_s"] > 0 and conv["output_mb"] > 0
    text = results.read_text()
    assert "hand-written text" in text
    assert text.count("<!-- bench/fits.py: begin generated section -->") == 1
    assert "| --compression zstd |" in text
    assert list(tmp_path.glob("*.tif")) == []
