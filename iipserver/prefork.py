"""Pre-forking process supervisor shared by the FastCGI daemon and the standalone HTTP server.

The parent binds one listening socket, forks a fixed pool of workers that all accept on it, and
then only supervises: it replaces a worker that dies, forwards ``SIGHUP`` to every worker (each
empties its caches between requests) and on ``SIGTERM``/``SIGINT`` asks the workers to finish
their current request and exit, killing those still alive after a grace period.

Signals never raise in the parent: handlers set flags and ``signal.set_wakeup_fd`` wakes the
supervising ``select`` (Python retries an interrupted ``select`` when the handler returns, so a
flag alone would not be seen until the next timeout). Each worker also holds the read end of a
"lifeline" pipe whose write end only the parent keeps open: end of file means "stop", whether the
parent closed it on purpose or died.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

#: Signals a worker treats as "finish the current request, then exit".
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: A worker that dies (not a clean exit) within this many seconds of starting delays its
#: replacement, so a worker that crashes at once cannot turn the parent into a fork loop.
QUICK_DEATH = 1.0
MAX_BACKOFF = 10.0

WorkerMain = Callable[[int], int]
"""Run in a freshly forked worker with the lifeline's read end; returns the exit status."""


@dataclass
class _Worker:
    pid: int
    lifeline: int  # write end, held by the parent only
    started: float


def _nonblocking_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while os.read(fd, 4096):
            pass


class Supervisor:
    """Keep ``workers`` forked processes running ``worker_main`` until told to stop.

    Args:
        worker_main: called in each worker right after the fork with the lifeline's read end;
            it installs its own signal handlers and returns the worker's exit status.
        workers: size of the fixed pool (at least 1).
        grace: seconds a stopping worker gets to finish its request before ``SIGKILL``.
    """

    def __init__(self, worker_main: WorkerMain, workers: int, *, grace: float = 10.0) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.worker_main = worker_main
        self.size = workers
        self.grace = grace
        self.workers: dict[int, _Worker] = {}
        self._stop_requests = 0
        self._hup = False
        self._backoff = 0.0
        self._next_spawn = 0.0
        self._wake_r = self._wake_w = -1

    # -- signal handlers: set flags only ----------------------------------------------------

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop_requests += 1

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._hup = True

    def _on_chld(self, signum: int, frame: FrameType | None) -> None:
        pass  # the wakeup fd does the work

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        self._wake_r, self._wake_w = _nonblocking_pipe()
        handlers: dict[int, Callable[[int, FrameType | None], None]] = {
            signal.SIGTERM: self._on_stop,
            signal.SIGINT: self._on_stop,
            signal.SIGHUP: self._on_hup,
            signal.SIGCHLD: self._on_chld,
        }
        saved = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            yield
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _wait(self, timeout: float) -> None:
        with contextlib.suppress(InterruptedError):
            select.select([self._wake_r], [], [], max(0.0, timeout))
        _drain(self._wake_r)

    # -- workers ----------------------------------------------------------------------------

    def _spawn(self) -> None:
        lifeline_r, lifeline_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # worker
            os.close(lifeline_w)
            self._become_worker(lifeline_r)
        os.close(lifeline_r)
        self.workers[pid] = _Worker(pid, lifeline_w, time.monotonic())
        logger.debug("worker %d started", pid)

    def _become_worker(self, lifeline: int) -> None:
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            os.close(self._wake_r)
            os.close(self._wake_w)
            for other in self.workers.values():  # other workers' lifelines must end with the parent
                os.close(other.lifeline)
            self.workers = {}
            status = self.worker_main(lifeline)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            logger.critical("worker %d failed", os.getpid(), exc_info=True)
            status = 1
        finally:
            logging.shutdown()
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)

    def _reap(self) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            os.close(worker.lifeline)
            code = os.waitstatus_to_exitcode(status)
            if self._stop_requests:
                logger.debug("worker %d exited (%d)", pid, code)
                continue
            quick = time.monotonic() - worker.started < QUICK_DEATH
            if code == 0:
                logger.info("worker %d retired; starting a new one", pid)
            else:
                how = f"signal {-code}" if code < 0 else f"status {code}"
                logger.warning("worker %d died (%s); starting a new one", pid, how)
            if code != 0 and quick:
                self._backoff = min(MAX_BACKOFF, max(QUICK_DEATH, 2 * self._backoff))
                self._next_spawn = time.monotonic() + self._backoff
            elif not quick:
                self._backoff = 0.0

    def _fill(self) -> float | None:
        """Start missing workers; return seconds until a delayed start is due, if any."""
        while len(self.workers) < self.size:
            delay = self._next_spawn - time.monotonic()
            if delay > 0:
                return delay
            self._spawn()
        return None

    def _forward_hup(self) -> None:
        self._hup = False
        logger.info("SIGHUP: clearing the caches of %d workers", len(self.workers))
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    def _shutdown(self) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while self.workers and self._stop_requests < 2:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wait(min(remaining, 0.2))
            self._reap()
        for pid in list(self.workers):
            logger.warning("worker %d did not stop in time; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid, worker in list(self.workers.items()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            os.close(worker.lifeline)
        self.workers = {}

    def run(self) -> int:
        """Supervise the pool until ``SIGTERM``/``SIGINT``; return 0 after a clean stop."""
        with self._signals():
            while not self._stop_requests:
                due = self._fill()
                if self._stop_requests:
                    break
                self._wait(1.0 if due is None else min(due, 1.0))
                if self._hup and not self._stop_requests:
                    self._forward_hup()
                self._reap()
            logger.info("stopping %d workers", len(self.workers))
            self._shutdown()
        return 0


def worker_signals(on_stop: Callable[[], None], on_hup: Callable[[], None]) -> int:
    """Install a worker's handlers and a notification pipe; return the pipe's read end.

    Each handler runs its callback (which must only set flags) and then writes a byte to the
    pipe, so whatever waits on the read end, the main thread or a control thread, wakes up and
    sees the flag. (``signal.set_wakeup_fd`` would not do for a control thread: it writes from
    the C-level handler, before the Python handler has set the flag.)
    """
    wake_r, wake_w = _nonblocking_pipe()

    def notify(callback: Callable[[], None]) -> Callable[[int, FrameType | None], None]:
        def handler(signum: int, frame: FrameType | None) -> None:
            callback()
            with contextlib.suppress(BlockingIOError):
                os.write(wake_w, b"\0")

        return handler

    for sig in STOP_SIGNALS:
        signal.signal(sig, notify(on_stop))
    signal.signal(signal.SIGHUP, notify(on_hup))
    return wake_r


def drain(fd: int) -> None:
    """Read and discard everything waiting on a non-blocking pipe."""
    _drain(fd)


# -- listening sockets ----------------------------------------------------------------------


def accept(sock: socket.socket) -> tuple[socket.socket, Any] | None:
    """Accept a connection on the non-blocking listening ``sock``; None when there is none
    after all (another worker took it) or the process is briefly out of descriptors or memory.

    Raises:
        OSError: any other failure of ``accept``.
    """
    try:
        return sock.accept()
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return None
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            logger.error("accept failed: %s", exc)
            time.sleep(0.1)
            return None
        raise


def clear_caches(app: Any) -> None:
    """Empty ``app``'s caches (SIGHUP), logging the outcome; never raises."""
    try:
        app.clear_caches()
    except Exception:
        logger.exception("clearing the caches failed")
    else:
        logger.info("caches cleared (SIGHUP)")


class WorkerFlags:
    """What a worker's signal handlers set — flags only, as a handler may interrupt the
    application anywhere — and the SIGHUP action, taken at a safe point between requests."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.stopping = False
        self.hup_pending = False

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: finish the request in progress, then exit."""
        self.stopping = True

    def request_hup(self) -> None:
        """SIGHUP: empty the caches at the next safe point."""
        self.hup_pending = True

    def apply_hup(self) -> None:
        """Empty the application's caches if a SIGHUP arrived; call only outside a request."""
        while self.hup_pending:
            self.hup_pending = False
            clear_caches(self.app)


def parse_bind(text: str) -> tuple[str, int] | str:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT`` or ``unix:PATH`` into a socket address.

    Raises:
        ValueError: the text is neither form; the message says what is expected.
    """
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError(f"{text!r}: expected unix:PATH")
        return os.path.abspath(path)
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT or unix:PATH")
    return host, int(port_text)


def format_address(address: tuple[str, int] | str) -> str:
    """Format an address from :func:`parse_bind` (or ``getsockname``) for the banner."""
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_tcp(host: str, port: int, backlog: int) -> socket.socket:
    """Bind and listen on a TCP address (``SO_REUSEADDR``; IPv6 when the host has a colon)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "exists and is not a socket; refusing to replace it", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: a leftover of a previous run
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another server is listening on this socket", path)


@dataclass
class Listener:
    """A bound, listening socket and what the banner and the clean-up need to know about it."""

    sock: socket.socket
    address: tuple[str, int] | str
    """The bound address: ``(host, port)`` with the real port, or a Unix socket path."""
    _inode: int = -1

    def close(self) -> None:
        """Close the socket; unlink a Unix socket file if it is still the one we created."""
        self.sock.close()
        if isinstance(self.address, str) and self._inode >= 0:
            with contextlib.suppress(OSError):
                if os.stat(self.address).st_ino == self._inode:
                    os.unlink(self.address)


def listen_unix(path: str, mode: int, backlog: int) -> Listener:
    """Bind and listen on a Unix socket with permissions ``mode``, replacing a stale socket."""
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
        inode = os.stat(path).st_ino
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return Listener(sock, path, inode)


def listen(address: tuple[str, int] | str, backlog: int, mode: int = 0o660) -> Listener:
    """Open a listener on an address from :func:`parse_bind` (TCP port 0 picks a free port)."""
    if isinstance(address, str):
        return listen_unix(address, mode, backlog)
    sock = listen_tcp(address[0], address[1], backlog)
    name = sock.getsockname()
    return Listener(sock, (address[0], int(name[1])))
