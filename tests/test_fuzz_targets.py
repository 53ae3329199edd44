"""A short run of each atheris target (fuzz/README.md): ten seconds, a fixed seed, exit 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris==3.0.0)")

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


@pytest.mark.parametrize("target", ["fuzz_query.py", "fuzz_tiff.py"])
def test_target_runs_clean(tmp_path, target):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    run = subprocess.run(
        [
            sys.executable,
            str(FUZZ / target),
            "-max_total_time=10",
            "-seed=1",
            "-timeout=20",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert run.returncode == 0, (crashes, run.stderr[-4000:])
    assert not crashes
