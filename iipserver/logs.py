"""Logging set-up from the settings: VERBOSITY → level, LOGFILE → stderr, a file or syslog."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Iterator

from iipserver import __version__
from iipserver.errors import ConfigError
from iipserver.settings import Settings

#: Every logger of the package lives under this one; only it gets handlers.
LOGGER_NAME = "iipserver"

#: Between INFO and WARNING: start-up information, shown from VERBOSITY=1 on.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"
_SYSLOG_FORMAT = "iipserver[%(process)d]: %(levelname)s %(message)s"


def level_for(verbosity: int) -> int:
    """Map iipsrv's VERBOSITY (0–6) to a logging level.

    0 logs nothing, 1 warnings and start-up information, 2 adds per-request information, and 3
    or more adds debugging detail (stage timings).
    """
    if verbosity <= 0:
        return logging.CRITICAL + 10
    if verbosity == 1:
        return NOTICE
    if verbosity == 2:
        return logging.INFO
    return logging.DEBUG


class _SysLogHandler(logging.handlers.SysLogHandler):
    """SysLogHandler that also knows our NOTICE level."""

    priority_map = {**logging.handlers.SysLogHandler.priority_map, "NOTICE": "notice"}


def _syslog_handler() -> logging.Handler:
    address: str | tuple[str, int] = "/dev/log"
    if not os.path.exists("/dev/log"):
        address = ("localhost", 514)
    handler = _SysLogHandler(address=address)
    handler.setFormatter(logging.Formatter(_SYSLOG_FORMAT))
    return handler


def _handler(logfile: str) -> logging.Handler:
    if logfile == "syslog":
        try:
            return _syslog_handler()
        except OSError as exc:
            raise ConfigError(f"LOGFILE=syslog: cannot reach the system logger: {exc}") from None
    if logfile:
        try:
            handler: logging.Handler = logging.FileHandler(logfile, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"LOGFILE: cannot open {logfile!r}: {exc.strerror}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    return handler


def configure_logging(settings: Settings) -> logging.Logger:
    """Give the ``iipserver`` logger one handler chosen by LOGFILE and a level from VERBOSITY.

    Calling it again replaces the previous handler. Other loggers are left alone, and records do
    not propagate to the root logger.

    Raises:
        ConfigError: LOGFILE names a file that cannot be opened, or syslog is unreachable.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.propagate = False
    logger.setLevel(level_for(settings.verbosity))
    if settings.verbosity <= 0:
        logger.addHandler(logging.NullHandler())
    else:
        logger.addHandler(_handler(settings.logfile))
    return logger


def banner(mode: str, address: str, settings: Settings, workers: int) -> str:
    """The one-line start-up banner: mode, address, data root (FILESYSTEM_PREFIX), workers."""
    root = settings.filesystem_prefix or "(FILESYSTEM_PREFIX unset: paths used as given)"
    plural = "" if workers == 1 else "s"
    return (
        f"iipserver {__version__} {mode} server on {address}, data root {root}, "
        f"{workers} worker{plural}"
    )


def log_settings(settings: Settings, what: str = "server") -> None:
    """Log the start-up summary: the version, then every effective setting, one per line."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.isEnabledFor(NOTICE):
        return
    logger.log(NOTICE, "iipserver %s %s starting (pid %d)", __version__, what, os.getpid())
    for name, value in settings.describe():
        logger.log(NOTICE, "  %-26s %s", name, value)


@contextlib.contextmanager
def stage_timer(logger: logging.Logger, stage: str) -> Iterator[None]:
    """Log the wall time of the enclosed block in microseconds at DEBUG (VERBOSITY ≥ 3)."""
    if not logger.isEnabledFor(logging.DEBUG):
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        logger.debug("%s: %d us", stage, round((time.perf_counter() - start) * 1e6))
