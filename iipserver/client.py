"""The VisiOmatic 3 web client: fetched from PyPI and npm into a cache directory, never vendored.

The client is the static bundle inside the ``visiomatic`` wheel (``visiomatic/client/{dist,css,
images}``, MIT) and needs Leaflet's CSS from the npm package ``leaflet`` (BSD-2). Both are
downloaded once, at first start of ``iipserver serve`` or by ``iipserver fetch-client``, into
``$XDG_CACHE_HOME/iipserver/client`` (or ``IIPSERVER_CLIENT_DIR``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

VISIOMATIC_VERSION = "3.0.7"
LEAFLET_VERSION = "1.9.4"
_NPM_REGISTRY = "https://registry.npmjs.org"
_MARKER = "visiomatic.js"


def client_dir(environ: dict[str, str] | None = None) -> Path:
    """Where the client assets live (``IIPSERVER_CLIENT_DIR`` or the user cache)."""
    env = os.environ if environ is None else environ
    if env.get("IIPSERVER_CLIENT_DIR"):
        return Path(env["IIPSERVER_CLIENT_DIR"])
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "iipserver" / "client"


def installed(directory: Path) -> bool:
    """True when both the VisiOmatic bundle and Leaflet's CSS are present."""
    return (directory / "v3" / "dist" / _MARKER).is_file() and (
        directory / "v3" / "leaflet" / "leaflet.css"
    ).is_file()


def _wheel(work: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         f"visiomatic=={VISIOMATIC_VERSION}", "-d", str(work)],
        check=True, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wheels = sorted(work.glob("visiomatic-*.whl"))
    if not wheels:
        raise RuntimeError("pip did not download the visiomatic wheel")
    return wheels[0]


def _leaflet_tarball(work: Path) -> bytes:
    npm = shutil.which("npm")
    if npm:
        try:
            out = subprocess.run(
                [npm, "pack", f"leaflet@{LEAFLET_VERSION}", "--silent"],
                check=True, timeout=300, cwd=work, capture_output=True, text=True,
            )  # fmt: skip
            name = out.stdout.strip().splitlines()[-1]
            return (work / name).read_bytes()
        except (subprocess.SubprocessError, OSError, IndexError) as exc:
            log.warning("npm pack leaflet failed (%s); trying the registry directly", exc)
    url = f"{_NPM_REGISTRY}/leaflet/-/leaflet-{LEAFLET_VERSION}.tgz"
    with urllib.request.urlopen(url, timeout=120) as reply:
        return bytes(reply.read())


def fetch(directory: Path) -> Path:
    """Download the client into ``directory`` (atomically) and return ``directory``.

    Raises:
        RuntimeError, OSError, subprocess.SubprocessError: the registries are unreachable.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
        work = Path(tmp)
        staging = work / "client"
        with zipfile.ZipFile(_wheel(work)) as wheel:
            for member in wheel.namelist():
                parts = member.split("/")
                if (
                    len(parts) > 3
                    and parts[:2] == ["visiomatic", "client"]
                    and parts[2] in ("dist", "css", "images")
                    and not member.endswith("/")
                ):
                    target = staging / "v3" / Path(*parts[2:])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(wheel.read(member))
        with tarfile.open(fileobj=io.BytesIO(_leaflet_tarball(work)), mode="r:gz") as tar:
            for entry in tar.getmembers():
                name = entry.name
                if (
                    entry.isfile()
                    and name.startswith("package/dist/")
                    and (name.endswith(".css") or "/images/" in name)
                ):
                    data = tar.extractfile(entry)
                    if data is None:
                        continue
                    target = staging / "v3" / "leaflet" / Path(name[len("package/dist/") :])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data.read())
        (staging / "VERSIONS.json").write_text(
            json.dumps({"visiomatic": VISIOMATIC_VERSION, "leaflet": LEAFLET_VERSION})
        )
        if not installed(staging):
            raise RuntimeError("the downloaded packages lack the expected client files")
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    return directory


def ensure(directory: Path | None = None) -> Path | None:
    """Return the client directory, fetching it if needed; None if it cannot be obtained."""
    directory = directory or client_dir()
    if installed(directory):
        return directory
    try:
        log.warning("fetching the VisiOmatic %s client into %s", VISIOMATIC_VERSION, directory)
        return fetch(directory)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("VisiOmatic client not available (%s); serving the built-in viewer", exc)
        return None
