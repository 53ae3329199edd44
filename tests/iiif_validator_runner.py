"""Run the official IIIF Image API validator (PyPI ``iiif-validator``) against a server.

The validator's own command, ``iiif-validate.py -s HOST:PORT -p PREFIX -i IDENTIFIER
--version V --level L``, runs every test up to a level and logs PASS/FAIL. This module drives
the same classes (``TestSuite.run_test`` on an ``ImageAPI`` object, as that command does) one
test at a time, so that each test is a separate, reproducible call with a readable outcome:

* the validator picks regions, sizes and junk strings with :mod:`random`; every test is run
  with ``random`` seeded from (seed, version, test), so a failure repeats;
* a failure reads like the validator's (``Expected … for …; Got: …``), plus the last URL asked
  and the status it got.

**Versions.** The validator names its suites ``1.0``, ``1.1``, ``2.0`` and ``3.0``: its ``2.0``
suite is the one for every Image API 2.x server (its ``2.1`` holds only ``region_square``, at
level 3, and its URLs for ``2.1`` lack the format), so Image API 2.1 is validated with ``2.0``.
It sends no ``Accept`` profile: a server answers it in its default version.

**The image.** The tests expect the IIIF test image ``67352ccc-d1b0-11e1-89ae-279075081939``
(``.png``/``.jp2`` on iiif.io; not shipped in the PyPI package): 1000×1000 RGB, a 10×10 grid of
flat 100×100 squares, square (column x, row y) coloured ``ValidationInfo().colorInfo[x][y]``
and nothing else. :func:`validator_image` rebuilds it from that table (identical, pixel for
pixel, to the PNG); :func:`write_validator_image` stores it as a tiled pyramidal TIFF.

Command line, against a server already running::

    python tests/iiif_validator_runner.py --write-image DIR       # the image, for DIR
    python tests/iiif_validator_runner.py http://127.0.0.1:8080/iiif \\
        67352ccc-d1b0-11e1-89ae-279075081939.tif --version 3.0 --level 2
"""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from images import pyramid_levels, write_pyramid


def _import_validator() -> tuple[Any, str]:
    """Import ``iiif_validator.validator``; (module, "") or (None, why not)."""
    try:
        import magic  # noqa: F401  (python-magic: loads libmagic when imported)
    except ImportError:
        # Only the level-3 jp2/pdf tests use it; the rest of the validator does not.
        stub = types.ModuleType("magic")
        stub.__doc__ = "placeholder: python-magic/libmagic missing (iiif_validator_runner)"
        sys.modules["magic"] = stub
    try:
        from iiif_validator import validator
    except ImportError as exc:
        return None, f"iiif-validator cannot be imported ({exc}); pip install iiif-validator"
    return validator, ""


validator, IMPORT_ERROR = _import_validator()

#: The validator's test image identifier, and the file name it is served under here.
IMAGE_STEM = "67352ccc-d1b0-11e1-89ae-279075081939"
IDENTIFIER = f"{IMAGE_STEM}.tif"
#: The validator's suite for each Image API version tested.
SUITES = {"3.0": "3.0", "2.1": "2.0"}
#: Seconds any single request of the validator may take (its own fetches use 5).
REQUEST_TIMEOUT = 10.0


def validator_image() -> np.ndarray:
    """The validator's test image, (1000, 1000, 3) uint8, from its own colour table."""
    colours = np.array(validator.ValidationInfo().colorInfo, dtype=np.uint8)  # [x][y][rgb]
    return np.repeat(np.repeat(colours.transpose(1, 0, 2), 100, axis=0), 100, axis=1)


def write_validator_image(directory: Path, name: str = IDENTIFIER) -> Path:
    """Write the test image as a tiled (256²) pyramidal TIFF, one IFD per level."""
    directory.mkdir(parents=True, exist_ok=True)
    levels = pyramid_levels(validator_image())
    return write_pyramid(directory / name, levels, photometric="rgb")


def select_tests(version: str, max_level: int = 2) -> list[tuple[str, int, str]]:
    """(test, level, label) of the validator's tests for ``version`` up to ``max_level``."""
    suite = validator.TestSuite(validator.ValidationInfo()).list_tests(SUITES[version])
    chosen = [(name, info["level"], info["label"]) for name, info in suite.items()]
    return sorted(t for t in chosen if t[1] <= max_level)


@dataclass
class Outcome:
    """What one validator test made of the server."""

    test: str
    version: str
    passed: bool
    message: str = ""
    warning: bool = False
    urls: list[str] = field(default_factory=list)
    checks: list[Any] = field(default_factory=list)

    def report(self) -> str:
        """A multi-line account: verdict, message, every URL asked."""
        head = f"{self.version} {self.test}: {'PASS' if self.passed else 'FAIL'}"
        lines = [head + (" (a validator warning)" if self.warning else "")]
        if self.message:
            lines.append(f"  {self.message}")
        lines.extend(f"  GET {url}" for url in self.urls)
        return "\n".join(lines)


@contextlib.contextmanager
def _default_timeout(seconds: float) -> Iterator[None]:
    # Some tests call urlopen without a timeout; never let a stuck server hang the run.
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def _where(api: Any) -> str:
    if not api.last_url:
        return ""
    return f" [last request {api.last_url} -> {api.last_status}]"


def run_test(
    base_url: str, identifier: str, version: str, test: str, seed: str = "iipserver"
) -> Outcome:
    """Run validator test ``test`` of Image API ``version`` against ``base_url``/``identifier``.

    ``base_url`` is the IIIF prefix: ``http://127.0.0.1:8080/iiif`` (path style) or
    ``http://127.0.0.1:8080/iip?IIIF=`` (query style: URLs ``…?IIIF=/<identifier>/…``); ``seed`` seeds
    :mod:`random` for this test (an empty seed leaves it unseeded).
    """
    parts = urlsplit(base_url)
    prefix = parts.path.strip("/") + (f"?{parts.query}" if parts.query else "")
    api = validator.ImageAPI(
        identifier,
        parts.netloc,
        prefix,
        parts.scheme or "http",
        "",
        SUITES[version],
        debug=False,
    )
    suite = validator.TestSuite(validator.ValidationInfo())
    if seed:
        random.seed(f"{seed}/{version}/{test}")
    outcome = Outcome(test, version, passed=False, urls=api.urls, checks=api.tests)
    try:
        with _default_timeout(REQUEST_TIMEOUT):
            suite.run_test(test, api)
    except Exception as exc:  # the validator's own bugs and network errors
        outcome.message = f"{type(exc).__name__}: {exc}{_where(api)}"
        return outcome
    error = api.exception
    if error is None:
        outcome.passed = True
        return outcome
    outcome.warning = bool(error.warning)
    status = f" [last request {error.url} -> {error.status}]" if error.url else _where(api)
    outcome.message = f"{error}{status}"
    return outcome


def main(argv: list[str] | None = None) -> int:
    """Command line: run a level's tests against a running server, or write the image."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_url", nargs="?", help="IIIF prefix, e.g. http://127.0.0.1:8080/iiif")
    parser.add_argument("identifier", nargs="?", default=IDENTIFIER)
    parser.add_argument("--version", choices=sorted(SUITES), default="3.0")
    parser.add_argument("--level", type=int, default=2)
    parser.add_argument("--test", action="append", help="only this test (repeatable)")
    parser.add_argument("--seed", default="iipserver", help="'' for unseeded random choices")
    parser.add_argument("--write-image", type=Path, metavar="DIR", help=f"write {IDENTIFIER}")
    args = parser.parse_args(argv)
    if IMPORT_ERROR:
        parser.error(IMPORT_ERROR)
    if args.write_image:
        print(write_validator_image(args.write_image))
        if not args.base_url:
            return 0
    if not args.base_url:
        parser.error("base_url is required unless --write-image is given")
    failed = 0
    for test, _level, _label in select_tests(args.version, args.level):
        if args.test and test not in args.test:
            continue
        outcome = run_test(args.base_url, args.identifier, args.version, test, args.seed)
        failed += not outcome.passed
        print(outcome.report())
    print(f"{failed} failed")
    return min(failed, 99)


if __name__ == "__main__":
    sys.exit(main())
