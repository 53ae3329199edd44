"""Server settings: one frozen object built once from the environment (iipsrv's variable names)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from iipserver.errors import ConfigError

#: Names accepted as aliases of a setting (the name iipsrv's sample config documents).
ALIASES: dict[str, str] = {"MAX_IMAGE_METADATA_CACHE_SIZE": "MAX_METADATA_CACHE_SIZE"}


def _int(name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _float(name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    return value


def _bool(name: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    try:
        return int(text) != 0
    except ValueError:
        raise ConfigError(f"{name} must be 0 or 1, got {raw!r}") from None


def _str(name: str, raw: str) -> str:
    return raw


def _in_range(lo: float, hi: float) -> Callable[[str, float], None]:
    def check(name: str, value: float) -> None:
        if not lo <= value <= hi:
            raise ConfigError(f"{name} must be between {lo:g} and {hi:g}, got {value:g}")

    return check


def _max_cvt(name: str, value: float) -> None:
    if value != -1 and value < 1:
        raise ConfigError(
            f"{name} must be a positive number of pixels or -1 (no limit), got {value:g}"
        )


def _at_least(lo: float) -> Callable[[str, float], None]:
    def check(name: str, value: float) -> None:
        if value < lo:
            raise ConfigError(f"{name} must be at least {lo:g}, got {value:g}")

    return check


def _uri_map(name: str, value: str) -> None:
    if value and "=>" not in value:
        raise ConfigError(f"{name} must look like 'prefix=>protocol', got {value!r}")


def _setting(
    env: str,
    default: Any,
    parse: Callable[[str, str], Any],
    doc: str,
    check: Callable[[str, Any], None] | None = None,
) -> Any:
    return field(default=default, metadata={"env": env, "parse": parse, "doc": doc, "check": check})


@dataclass(frozen=True)
class Settings:
    """Every setting of the server; build it with :meth:`Settings.from_environ`."""

    verbosity: int = _setting("VERBOSITY", 1, _int, "Log level 0 (silent) to 6.", _in_range(0, 10))
    logfile: str = _setting("LOGFILE", "", _str, "Log file path, 'syslog', or empty for stderr.")
    max_image_cache_size: float = _setting(
        "MAX_IMAGE_CACHE_SIZE", 10.0, _float, "Tile cache size in MB (0 disables).", _at_least(0)
    )
    max_metadata_cache_size: int = _setting(
        "MAX_METADATA_CACHE_SIZE",
        1000,
        _int,
        "Images kept in the metadata cache (0 none, -1 no limit).",
        _at_least(-1),
    )
    max_open_files: int = _setting(
        "MAX_OPEN_FILES", 64, _int, "Image files kept open per worker.", _at_least(1)
    )
    filename_pattern: str = _setting(
        "FILENAME_PATTERN", "_pyr_", _str, "Image-sequence name infix."
    )
    jpeg_quality: int = _setting(
        "JPEG_QUALITY", 75, _int, "Default JPEG quality.", _in_range(1, 100)
    )
    png_quality: int = _setting("PNG_QUALITY", 1, _int, "PNG compression level.", _in_range(0, 9))
    webp_quality: int = _setting(
        "WEBP_QUALITY", 50, _int, "WebP quality (-1 lossless).", _in_range(-1, 100)
    )
    max_cvt: int = _setting(
        "MAX_CVT", 5000, _int, "Largest CVT/IIIF output side (-1 no limit).", _max_cvt
    )
    max_layers: int = _setting("MAX_LAYERS", 0, _int, "JPEG2000 quality layers (unused).")
    filesystem_prefix: str = _setting(
        "FILESYSTEM_PREFIX", "", _str, "Prepended to every image path."
    )
    filesystem_suffix: str = _setting(
        "FILESYSTEM_SUFFIX", "", _str, "Appended to every image path."
    )
    watermark: str = _setting("WATERMARK", "", _str, "Watermark TIFF image path.")
    watermark_probability: float = _setting(
        "WATERMARK_PROBABILITY", 1.0, _float, "Chance a tile is watermarked.", _in_range(0, 1)
    )
    watermark_opacity: float = _setting(
        "WATERMARK_OPACITY", 1.0, _float, "Watermark opacity.", _in_range(0, 1)
    )
    watermark_seed: int = _setting(
        "WATERMARK_SEED",
        -1,
        _int,
        "Seed making watermark placement a function of the tile (-1: random, as iipsrv).",
        _at_least(-1),
    )
    memcached_servers: str = _setting(
        "MEMCACHED_SERVERS", "", _str, "Shared cache servers host[:port],... (empty: off)."
    )
    memcached_timeout: int = _setting(
        "MEMCACHED_TIMEOUT", 86400, _int, "Shared cache expiry in seconds.", _at_least(0)
    )
    memcached_prefix: str = _setting(
        "MEMCACHED_PREFIX", "iipserver", _str, "Shared cache key prefix."
    )
    interpolation: int = _setting(
        "INTERPOLATION", 1, _int, "CVT resampling: 0 nearest, 1 bilinear.", _in_range(0, 1)
    )
    cors: str = _setting("CORS", "", _str, "Access-Control-Allow-Origin value (empty: no CORS).")
    base_url: str = _setting("BASE_URL", "", _str, "Public base URL for IIIF ids.")
    cache_control: str = _setting(
        "CACHE_CONTROL", "max-age=86400", _str, "Cache-Control header on successes."
    )
    allow_upscaling: bool = _setting(
        "ALLOW_UPSCALING", True, _bool, "Allow output larger than source."
    )
    uri_map: str = _setting("URI_MAP", "", _str, "Path-style mapping 'prefix=>protocol'.", _uri_map)
    embed_icc: bool = _setting("EMBED_ICC", True, _bool, "Embed ICC profiles in output.")
    codec_passthrough: bool = _setting(
        "CODEC_PASSTHROUGH", True, _bool, "Send stored JPEG tiles without re-encoding."
    )
    iiif_version: int = _setting(
        "IIIF_VERSION", 3, _int, "Default IIIF Image API version.", _in_range(2, 3)
    )
    copyright: str = _setting("COPYRIGHT", "", _str, "Rights statement for metadata and IIIF.")
    status_endpoint: bool = _setting(
        "STATUS_ENDPOINT", False, _bool, "Answer ?STATUS with this worker's cache counters (JSON)."
    )
    max_request_length: int = _setting(
        "MAX_REQUEST_LENGTH", 8192, _int, "Longest request string (query or POST body), bytes.",
        _at_least(64),
    )  # fmt: skip
    max_commands: int = _setting(
        "MAX_COMMANDS", 64, _int, "Most commands in one request.", _at_least(1)
    )
    max_til_tiles: int = _setting(
        "MAX_TIL_TILES", 1024, _int, "Most tiles one TIL request may return.", _at_least(1)
    )
    max_channels: int = _setting(
        "MAX_CHANNELS", 256, _int,
        "Most channels a request may name (MINMAX, CTW rows and columns, VisiOmatic CHAN/MIX).",
        _at_least(1),
    )  # fmt: skip
    max_region_mb: float = _setting(
        "MAX_REGION_MB", 256.0, _float,
        "Memory one region request (CVT, IIIF region, VisiOmatic RGN) may use for pixels, MB.",
        _at_least(1),
    )  # fmt: skip
    max_profile_length: int = _setting(
        "MAX_PROFILE_LENGTH", 100000, _int, "Most points in a profile (PFL).", _at_least(1)
    )
    pyramid_cache_dir: str = _setting(
        "PYRAMID_CACHE_DIR", "", _str,
        "Directory of the reduced levels of FITS images, shared by every worker "
        "(empty: iipserver-pyramids in the system's temporary directory).",
    )  # fmt: skip
    pyramid_cache_mb: float = _setting(
        "PYRAMID_CACHE_MB", 4096.0, _float,
        "Size bound of PYRAMID_CACHE_DIR, MB, least recently used images removed first "
        "(0: no cache, reduced FITS tiles are computed from full resolution).",
        _at_least(0),
    )  # fmt: skip

    @property
    def pyramid_directory(self) -> str:
        """``PYRAMID_CACHE_DIR``, or its default under the system's temporary directory."""
        if self.pyramid_cache_dir:
            return self.pyramid_cache_dir
        import tempfile

        return os.path.join(tempfile.gettempdir(), f"iipserver-pyramids-{os.getuid()}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from an environment mapping (``os.environ`` by default).

        Raises:
            ConfigError: a variable holds a value the server cannot use; the message names it.
        """
        env = dict(os.environ if environ is None else environ)
        for alias, name in ALIASES.items():
            if alias in env and name not in env:
                env[name] = env[alias]
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            if name not in env:
                continue
            raw = env[name]
            if raw.strip() == "" and f.metadata["parse"] is not _str:
                continue  # an empty variable means "use the default", as in iipsrv
            value = f.metadata["parse"](name, raw)
            check = f.metadata["check"]
            if check is not None:
                check(name, value)
            values[f.name] = value
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with some fields changed (for tests and command-line overrides)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> list[tuple[str, str]]:
        """Return (variable, effective value) pairs, for the start-up summary."""
        return [(f.metadata["env"], str(getattr(self, f.name))) for f in dataclasses.fields(self)]


def documented_variables() -> dict[str, str]:
    """Return every environment variable the server reads, with its one-line description."""
    return {f.metadata["env"]: f.metadata["doc"] for f in dataclasses.fields(Settings)}
