"""Child processes that we started ourselves, plus waiting and port helpers.

Every process is stopped through its own ``Popen`` handle, i.e. by the PID we got when we
started it. Nothing here signals process groups or looks processes up by name, so it can never
hit a process that belongs to someone else.
"""

import errno
import logging
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# How far back from the end of a log file tail_log() reads; enough for a few hundred lines.
_TAIL_BYTES = 64 * 1024

# On Windows a new process group plays the role of start_new_session for Ctrl-C.
_NEW_PROCESS_GROUP = subprocess.CREATE_NEW_PROCESS_GROUP if sys.platform == "win32" else 0


class StartupError(RuntimeError):
    """A process could not be started, exited early, or did not become ready in time."""


class PortInUseError(StartupError):
    """A fixed port that a service wanted is already taken."""

    def __init__(self, host: str, port: int, wanted_by: str) -> None:
        super().__init__(host, port, wanted_by)
        self.host = host
        self.port = port
        self.wanted_by = wanted_by

    def __str__(self) -> str:
        return f"port {self.port} on {self.host} is already in use (wanted by {self.wanted_by})"


class ManagedProcess:
    """One child process that we start and stop; stdout and stderr are appended to ``log_path``.

    ``env`` holds variables added on top of the launcher's own environment.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        log_path: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self.argv = [os.fspath(arg) for arg in argv]
        self.env = dict(env or {})
        self.cwd = Path(cwd) if cwd is not None else None
        self.log_path = Path(log_path)
        self._popen: subprocess.Popen[bytes] | None = None
        # Where this run's output starts in a log file that earlier runs may share.
        self._log_offset = 0

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, returncode={self.returncode})"

    def __enter__(self) -> "ManagedProcess":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the process; raises :class:`StartupError` if the executable cannot be run."""
        if self._popen is not None:
            raise RuntimeError(f"{self.name} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            # A header line separates runs (and retries) that append to the same file.
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- {stamp} starting {self.name}: {shlex.join(self.argv)}\n".encode())
            log.flush()
            try:
                self._popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **self.env},
                    cwd=self.cwd,
                    # Own session: Ctrl-C in a terminal reaches only the launcher, which then
                    # stops the children in order instead of all of them dying at once.
                    start_new_session=True,
                    creationflags=_NEW_PROCESS_GROUP,
                )
            except OSError as exc:
                raise StartupError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        # The child keeps its own copy of the log descriptor, so closing ours loses nothing.
        logger.info("started %s (pid %d), log %s", self.name, self._popen.pid, self.log_path)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; returns the exit code.

        Safe to call more than once and on a process that already exited. Returns ``None`` if
        the process was never started.
        """
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            logger.info("stopping %s (pid %d)", self.name, popen.pid)
            # Popen signals exactly its own PID and only while that PID is not yet reaped, so a
            # recycled PID can never be hit.
            popen.terminate()
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s (pid %d) still running %.1fs after SIGTERM; killing it",
                    self.name,
                    popen.pid,
                    timeout,
                )
                popen.kill()
                popen.wait()
        return popen.returncode

    def send_signal(self, signum: int) -> None:
        """Send `signum` (SIGKILL, SIGSTOP, SIGCONT, ...) to the process; a no-op once it
        has exited. Through the Popen handle, so never to a recycled PID."""
        if self._popen is not None and self._popen.poll() is None:
            self._popen.send_signal(signum)

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit code once the process has exited (negative signal number if killed)."""
        return self._popen.poll() if self._popen is not None else None

    def tail_log(self, n: int = 40) -> str:
        """The last ``n`` lines this run wrote to its log (for error messages)."""
        try:
            with self.log_path.open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(self._log_offset, size - _TAIL_BYTES))
                data = log.read()
        except FileNotFoundError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-n:])


def _log_excerpt(process: ManagedProcess) -> str:
    tail = process.tail_log()
    if not tail:
        return f" (log {process.log_path} is empty)"
    indented = "\n".join(f"    {line}" for line in tail.splitlines())
    return f"\nlast lines of {process.log_path}:\n{indented}"


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.02,
    what: str,
    process: ManagedProcess | None = None,
) -> None:
    """Poll ``predicate`` until it returns true; raise :class:`StartupError` at the deadline.

    With ``process`` given, fail as soon as that process exits, with its log tail in the error,
    instead of waiting for the deadline. ``what`` completes "waiting for ...".
    """
    deadline = time.monotonic() + timeout
    while True:
        ready = predicate()
        # Checked after the predicate: if our process died, a "ready" answer came from someone
        # else (e.g. another server that grabbed the same port).
        if process is not None and not process.alive:
            raise StartupError(
                f"{process.name} exited with code {process.returncode} while waiting for {what}"
                + _log_excerpt(process)
            )
        if ready:
            return
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout:.1f}s waiting for {what}"
            raise StartupError(message + (_log_excerpt(process) if process is not None else ""))
        time.sleep(interval)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def port_in_use(host: str, port: int) -> bool:
    """True if a server could not bind ``host:port`` right now."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        if os.name == "posix":
            # Servers bind with SO_REUSEADDR, so a port with connections lingering in TIME_WAIT
            # is free for them; binding still fails if something is listening.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now; another process may still take it before we bind it."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def can_connect(host: str, port: int, timeout: float = 0.25) -> bool:
    """True if a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
