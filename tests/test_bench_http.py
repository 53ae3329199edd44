"""The HTTP benchmark harness runs end to end (``bench/http.py --smoke``): no ratio asserted.

It starts nginx with the shipped site in front of ``iipserver fcgi`` and of Debian's iipsrv 1.1,
plays each smoke scenario at concurrency 8 for a second, and writes its JSON and the RESULTS
section; this test checks that every scenario ran on both servers without a wrong answer, that
the two servers agree on the pixels, and that the markdown section is well formed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nginx_site import NGINX

REPO = Path(__file__).resolve().parent.parent
IIPSRV = os.environ.get("IIPSRV_BINARY", "/usr/lib/iipimage-server/iipsrv.fcgi")


@pytest.mark.slow
def test_http_benchmark_smoke(tmp_path: Path) -> None:
    if not NGINX or not os.access(IIPSRV, os.X_OK):
        pytest.skip("nginx and iipsrv 1.1 are needed (scripts/test.sh installs them)")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nkept text\n")
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "http.py"), "--smoke", "--json", str(out),
         "--results", str(results), "--data", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    keys = set(doc["results"])
    assert {"rgb-tiles@c8", "float-minmax-gam@c8", "scaling@c8"} <= keys
    if "memcached-hits@c8" not in keys:
        assert "memcached is not installed" in done.stderr
    for key, per in doc["results"].items():
        servers = [s for s in per if s != "ratio"]
        assert len(servers) == 2, key
        for server in servers:
            assert per[server]["requests"] > 50, (key, server, per[server])
            assert per[server]["errors"] == 0, (key, server, per[server])
            assert per[server]["tiles_per_core_s"] > 0
        assert per["ratio"]["tiles_per_core_s"] > 0
    for name, agreement in doc["agreement"].items():
        assert "problem" not in agreement, (name, agreement)
        if name != "rgb-tiles":  # stored JPEG tiles sent as is vs 1.1's re-encoding
            assert agreement["max_abs_diff"] <= 1, (name, agreement)
    bars = {b["bar"].split(":")[0] for b in doc["bars"]}
    assert "uncached float32 tiles, MINMAX+GAM" in bars
    assert all(isinstance(b["met"], bool) for b in doc["bars"])
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nkept text\n")
    assert text.count("<!-- bench/http.py: begin generated section -->") == 1
    assert "| float-minmax-gam | 8 | **ratio iipserver/iipsrv** |" in text
    section = text.split("<!-- bench/http.py: begin generated section -->")[1]
    assert "| bar | measured | met |" in section


def test_results_section_is_replaced_not_appended(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_http", REPO / "bench" / "http.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_http"] = module
    spec.loader.exec_module(module)
    path = tmp_path / "RESULTS.md"
    path.write_text("# R\n\nbefore\n")
    module.write_section(path, "<!-- b -->", "<!-- e -->", "<!-- b -->\none\n<!-- e -->", "H")
    module.write_section(path, "<!-- b -->", "<!-- e -->", "<!-- b -->\ntwo\n<!-- e -->", "H")
    text = path.read_text()
    assert text == "# R\n\nbefore\n\n## H\n\n<!-- b -->\ntwo\n<!-- e -->\n"
