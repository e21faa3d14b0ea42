"""Startup checks of the host: what the configuration names must be usable here.

Each failure is one ``StartupError`` line that names the key, the thing on this
host and the fix (common/errors.py); the command line prints it and exits 2.
The checks run before anything is started, so that nothing is half up when
one fails; the places that really bind or open translate their own errors too.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import zmq

from common.config import Config
from common.errors import StartupError


def check_run(config: Config, config_path: str, control_dir: Path) -> None:
    """Before ``ipsec-cluster run`` starts the dispatcher and its members."""
    prepare_control_dir(control_dir, config, config_path)
    sync = config.cluster.sync
    if sync.startswith("ipc://"):
        check_ipc_dir(sync, f"{config_path}: cluster.sync")


def prepare_control_dir(path: Path, config: Config, config_path: str) -> None:
    """The folder of the control (and members) sockets: created if missing,
    and we must be able to make a socket in it."""
    if config.cluster.control:
        what, fix = f"{config_path}: cluster.control", "set cluster.control to a folder " \
                                                        "this user can create and write"
    else:
        what, fix = "the run folder", "set cluster.control to a folder this user can write"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"{what}: cannot create the folder {path}: {_reason(exc)} "
                           f"({fix})") from None
    # Root may write where the mode bits say no, and /proc or a read-only mount
    # refuse anyone whatever they say: only trying tells.
    probe = path / f".probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise StartupError(f"{what}: cannot write in the folder {path}: {_reason(exc)} "
                           f"({fix})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        probe.unlink()


def check_ipc_dir(endpoint: str, what: str) -> None:
    """An ipc:// socket is made in an existing folder (ZeroMQ does not create it)."""
    folder = Path(endpoint.removeprefix("ipc://")).parent
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise StartupError(f"{what}: {endpoint}: the folder {folder} {problem} (create it, "
                           "or choose a path in an existing folder)")


def bind_error(endpoint: str, what: str, exc: zmq.ZMQError) -> StartupError:
    """A failed ``bind`` of a ZeroMQ endpoint as one line with the fix."""
    if exc.errno == errno.EADDRINUSE:
        fix = "another cluster runs with it? stop it or choose another endpoint"
    elif endpoint.startswith("ipc://"):
        fix = "choose a path in a folder this user can write"
    else:
        fix = "choose an address of this host and a free port"
    reason = zmq.strerror(exc.errno or 0)
    return StartupError(f"{what}: cannot bind {endpoint}: {reason} ({fix})")


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
