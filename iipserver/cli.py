"""Command line: ``iipserver fcgi`` (FastCGI daemon) and ``iipserver serve`` (standalone HTTP)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType

from iipserver import __version__, prefork
from iipserver.errors import ConfigError
from iipserver.logs import configure_logging
from iipserver.settings import Settings

#: Exit status for a configuration or usage error (as argparse uses).
EXIT_CONFIG = 2
#: Exit status when the server cannot start for another reason (socket in use, …).
EXIT_FAILURE = 1

_COMMANDS = ("fcgi", "serve", "convert")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _non_negative(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0–65535, got {text!r}")
    return value


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"expected an octal mode such as 0660, got {text!r}")
    return value


def _bind(text: str) -> tuple[str, int] | str:
    try:
        return prefork.parse_bind(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _default_workers() -> int:
    return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``iipserver`` command."""
    parser = argparse.ArgumentParser(
        prog="iipserver",
        description="IIPImage-compatible image server. Settings come from iipsrv's environment "
        "variables (VERBOSITY, LOGFILE, FILESYSTEM_PREFIX, JPEG_QUALITY, …).",
    )
    parser.add_argument("--version", action="version", version=f"iipserver {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    fcgi = commands.add_parser(
        "fcgi",
        help="FastCGI daemon for nginx/Apache (the default command)",
        description="Run the FastCGI daemon: a fixed pool of pre-forked workers. SIGHUP empties "
        "every worker's caches; SIGTERM/SIGINT stop it cleanly.",
    )
    fcgi.add_argument(
        "--bind",
        type=_bind,
        metavar="HOST:PORT|unix:PATH",
        help="address to listen on; without it, descriptor 0 must be a listening socket "
        "(as a FastCGI process manager such as spawn-fcgi or mod_fcgid passes it)",
    )
    fcgi.add_argument(
        "--workers",
        type=_positive,
        default=_default_workers(),
        metavar="N",
        help="worker processes (default: number of CPUs, %(default)s)",
    )
    fcgi.add_argument(
        "--socket-mode",
        type=_mode,
        default=0o660,
        metavar="MODE",
        help="permissions of a Unix socket, octal (default 0660)",
    )
    fcgi.add_argument(
        "--max-requests",
        type=_non_negative,
        default=0,
        metavar="N",
        help="replace a worker after N requests (default 0: never)",
    )
    fcgi.add_argument(
        "--backlog",
        type=_positive,
        default=socket.SOMAXCONN,
        metavar="N",
        help="listen queue length (default %(default)s)",
    )
    fcgi.add_argument(
        "--engine",
        choices=("iipserver", "flup"),
        default="iipserver",
        help="FastCGI record layer: iipserver's own (default, ~3x less CPU per request) or flup's",
    )

    serve = commands.add_parser(
        "serve",
        help="standalone HTTP server with a viewer page (no web server needed)",
        description="Serve IIP (at /fcgi-bin/iipsrv.fcgi, /iipsrv, /iip, /api), IIIF (/iiif/…) "
        "and a viewer page (/) over HTTP. Without DATA_DIR a demo image set is generated and "
        "served.",
    )
    serve.add_argument(
        "data_dir",
        nargs="?",
        metavar="DATA_DIR",
        help="directory of images (becomes FILESYSTEM_PREFIX)",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default %(default)s)"
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=8080,
        help="TCP port (default %(default)s; 0 picks a free one)",
    )
    serve.add_argument(
        "--workers",
        type=_positive,
        default=_default_workers(),
        metavar="N",
        help="worker processes (default: number of CPUs, %(default)s)",
    )
    serve.add_argument(
        "--backlog",
        type=_positive,
        default=socket.SOMAXCONN,
        metavar="N",
        help="listen queue length (default %(default)s)",
    )
    convert = commands.add_parser(
        "convert",
        help="convert a FITS image to a tiled pyramidal BigTIFF that iipsrv serves",
        description="Convert a FITS image (IN.fits, or IN.fits[EXTNAME] / IN.fits[N] for one "
        "HDU) to a tiled pyramidal float32 BigTIFF: reduced levels, SMin/SMaxSampleValue per "
        "band, the FITS header in ImageDescription. Streams: memory stays bounded.",
    )
    convert.add_argument("input", metavar="IN", help="FITS file, optionally with [HDU]")
    convert.add_argument("output", metavar="OUT", help="TIFF file to write (replaced if present)")
    convert.add_argument(
        "--compression",
        choices=("none", "deflate", "zstd"),
        default="none",
        help="tile compression (default %(default)s; deflate and zstd use the floating-point "
        "predictor)",
    )
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _normalise(argv: Sequence[str]) -> list[str]:
    """``iipserver --bind …`` (no command, as iipsrv is run) means ``iipserver fcgi --bind …``."""
    args = list(argv)
    if not args:
        return ["fcgi"]
    if args[0] not in _COMMANDS and args[0] not in ("-h", "--help", "--version"):
        return ["fcgi", *args]
    return args


def _stop_during_start_up(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _run(args: argparse.Namespace) -> int:
    if args.command == "convert":
        import warnings

        from iipserver import convert
        from iipserver.errors import IIPServerError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # astropy's notes on odd files: ours suffice
                return convert.run(args.input, args.output, args.compression, args.quiet)
        except IIPServerError as exc:
            print(f"iipserver: cannot convert {args.input}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        except OSError as exc:
            print(
                f"iipserver: cannot convert {args.input}: {args.output}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return EXIT_FAILURE
    settings = Settings.from_environ(os.environ)
    configure_logging(settings)
    if args.command == "serve":
        from iipserver import serve

        return serve.run(
            settings,
            serve.Options(
                host=args.host,
                port=args.port,
                workers=args.workers,
                data_dir=args.data_dir,
                backlog=args.backlog,
            ),
        )
    from iipserver import fcgi

    return fcgi.run(
        settings,
        fcgi.Options(
            bind=args.bind,
            workers=args.workers,
            socket_mode=args.socket_mode,
            max_requests=args.max_requests,
            backlog=args.backlog,
            engine=args.engine,
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iipserver`` console script; returns the exit status.

    A configuration error prints ``iipserver: <message>`` and returns 2, without a traceback;
    SIGTERM or SIGINT, during start-up or while serving, ends with status 0.
    """
    args = build_parser().parse_args(_normalise(sys.argv[1:] if argv is None else argv))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_during_start_up)
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"iipserver: {exc.message or exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"iipserver: cannot start:{where} {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 0
