"""The official IIIF Image API validator (PyPI ``iiif-validator``) against ``iipserver serve``.

Every validator test of compliance levels 0, 1 and 2 is one pytest case, for Image API 3.0
(the default) and 2.1 (``IIIF_VERSION=2``: the validator sends no ``Accept`` profile, so each
version gets its own server), and for both request styles: path (``/iiif/<id>/…``) and query
(``/iip?IIIF=/<id>/…``). The served image is the validator's own test image, rebuilt from its
colour table as a tiled pyramidal TIFF (see ``iiif_validator_runner``).

The validator draws regions, sizes and junk strings at random; each case seeds :mod:`random`
from its name, so failures repeat. ``IIIF_VALIDATOR_SEED=<text>`` picks other draws
(``IIIF_VALIDATOR_SEED=`` leaves them unseeded). A failure shows the validator's own message,
the URL and status that failed, and every URL the test asked for.

The servers run with ``CORS=*``: the validator's level-1 ``cors`` test wants
``Access-Control-Allow-Origin: *`` on info.json, and iipserver (like iipsrv) sends CORS headers
only when ``CORS`` is configured.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import iiif_validator_runner as runner
import pytest
from processes import children

if runner.IMPORT_ERROR:
    pytest.skip(runner.IMPORT_ERROR, allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
MAX_LEVEL = 2
START_TIMEOUT = 20.0
SEED = os.environ.get("IIIF_VALIDATOR_SEED", "iipserver")
#: Request styles: the IIIF base URL after ``http://127.0.0.1:<port>``.
STYLES = {"path": "/iiif", "query": "/iip?IIIF="}
#: IIIF_VERSION of the server for each Image API version validated.
SERVER_VERSION = {"3.0": "3", "2.1": "2"}

#: (version, validator test) -> why it cannot pass. Each is an explicit, strict xfail: fixing
#: the cause makes the case fail until its entry is removed. Record each in docs/decisions.md.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _cases() -> list[pytest.param]:
    cases = []
    for version in runner.SUITES:
        for test, level, _label in runner.select_tests(version, MAX_LEVEL):
            reason = KNOWN_FAILURES.get((version, test))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            for style in STYLES:
                cases.append(
                    pytest.param(
                        version,
                        style,
                        test,
                        id=f"{version}-{style}-L{level}-{test}",
                        marks=marks,
                    )
                )
    return cases


class _Serve:
    """``python -m iipserver serve`` on a kernel-picked port, output in files."""

    def __init__(self, data_dir: Path, workdir: Path, iiif_version: str) -> None:
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "VIRTUAL_ENV", "TMPDIR")
        env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("PYENV")}
        pythonpath = [str(REPO), os.environ.get("PYTHONPATH", "")]
        env.update(
            PYTHONPATH=os.pathsep.join(p for p in pythonpath if p),
            IIPSERVER_CLIENT_FETCH="0",
            IIIF_VERSION=iiif_version,
            CORS="*",
            VERBOSITY="1",
            OMP_NUM_THREADS="1",
        )
        workdir.mkdir(parents=True, exist_ok=True)
        self.stdout = workdir / "stdout.txt"
        self.stderr = workdir / "stderr.txt"
        argv = ["serve", "--host", "127.0.0.1", "--port", "0", "--workers", "1", str(data_dir)]
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iipserver", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=workdir,
            )
        self.origin = self._wait_for_banner()

    def _wait_for_banner(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for word in self.stdout.read_text(errors="replace").split():
                if word.startswith("http://127.0.0.1:"):
                    return word.rstrip(",/")
            if self.proc.poll() is not None:
                self.kill()
                raise AssertionError(
                    f"iipserver serve exited with {self.proc.returncode}:\n"
                    + self.stderr.read_text(errors="replace")[-4000:]
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"iipserver serve printed no URL in {START_TIMEOUT} s")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the server and its workers."""
        pids = children(self.proc.pid) if self.proc.poll() is None else set()
        for pid in [self.proc.pid, *pids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding only the validator's test image."""
    data = tmp_path_factory.mktemp("iiif-validator") / "data"
    runner.write_validator_image(data)
    return data


@pytest.fixture(scope="module")
def iiif_origin(
    image_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], str]]:
    """``origin(version)``: the ``http://127.0.0.1:<port>`` of a server of that default version.

    Servers start on first use, one per version, and are killed when the module is done.
    """
    servers: dict[str, _Serve] = {}

    def origin(version: str) -> str:
        if version not in servers:
            workdir = tmp_path_factory.mktemp(f"serve-iiif{SERVER_VERSION[version]}")
            servers[version] = _Serve(image_dir, workdir, SERVER_VERSION[version])
        return servers[version].origin

    yield origin
    for server in servers.values():
        server.kill()


def test_validator_image_pyramid(image_dir: Path) -> None:
    """The served file is the validator's image: 10×10 flat squares, tiled, three levels."""
    import tifffile

    image = runner.validator_image()
    colours = runner.validator.ValidationInfo().colorInfo
    assert image.shape == (1000, 1000, 3)
    assert tuple(image[250, 750]) == tuple(colours[7][2])  # column 7, row 2
    with tifffile.TiffFile(image_dir / runner.IDENTIFIER) as tif:
        shapes = [page.shape for page in tif.pages]
        assert shapes == [(1000, 1000, 3), (500, 500, 3), (250, 250, 3)]
        assert all(page.is_tiled and page.tile == (256, 256) for page in tif.pages)
        assert [page.subfiletype for page in tif.pages] == [0, 1, 1]
        assert (tif.pages[0].asarray() == image).all()


@pytest.mark.parametrize(("version", "style", "test"), _cases())
def test_validator(iiif_origin: Callable[[str], str], version: str, style: str, test: str) -> None:
    """One validator test against the server of ``version``, in request ``style``."""
    base = iiif_origin(version) + STYLES[style]
    outcome = runner.run_test(base, runner.IDENTIFIER, version, test, SEED)
    if not outcome.passed:
        pytest.fail(outcome.report(), pytrace=False)
