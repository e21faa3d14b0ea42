"""The member process's entry point (``ipsec-cluster member``: ``run_member``),
its CURVE keys (from the config's key files, or the line the supervisor
writes to its stdin), and the one event-loop runner every process of the
command line uses (``run_loop``, uvloop when present). Reading the config
file is member/config_file.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from common.config import Config
from common.errors import StartupError


def load_certificate(config_path: str, key: str, path: Path) -> tuple[bytes, bytes | None]:
    """``zmq.auth.load_certificate``, its failures as one line naming the key."""
    import zmq.auth

    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError, IndexError) as exc:
        reason = getattr(exc, "strerror", None) or "not a CURVE certificate"
        raise StartupError(f"{config_path}: cluster.{key}: cannot load {path}: {reason} "
                           "(make keys with `ipsec-cluster keygen`)") from None


def load_member_curve(config: Config, config_path: str) -> tuple[bytes, bytes, bytes]:

    c = config.cluster
    base = Path(config_path).parent
    if not c.curve_secret_key or not c.curve_server_key:
        raise StartupError(f"{config_path}: a member on tcp:// needs "
                           "cluster.curve_secret_key and cluster.curve_server_key")
    public, secret = load_certificate(config_path, "curve_secret_key", base / c.curve_secret_key)
    server, _ = load_certificate(config_path, "curve_server_key", base / c.curve_server_key)
    if secret is None:
        raise StartupError(f"{config_path}: cluster.curve_secret_key: {c.curve_secret_key} "
                           "holds no secret key (use NAME.key_secret from keygen)")
    return public, secret, server


def load_standby(config: Config, config_path: str) -> tuple[str, bytes] | None:
    """Two dispatcher hosts: the standby's endpoint (``cluster.sync_standby``)
    and its public key (``cluster.curve_server_key_standby``), or None."""
    c = config.cluster
    if not c.sync_standby:
        return None
    path = Path(config_path).parent / c.curve_server_key_standby
    server, _ = load_certificate(config_path, "curve_server_key_standby", path)
    return c.sync_standby, server


def read_key_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """(our public key, our secret key, the dispatcher's public key), z85,
    as the supervisor writes them to a member's stdin."""
    parts = line.split()
    if len(parts) != 3 or any(len(p) != 40 for p in parts):
        raise StartupError("--key-stdin: expected one line 'public secret server' of z85 "
                           "CURVE keys on stdin (the supervisor writes it)")
    return parts[0], parts[1], parts[2]


def run_member(config: Config, config_path: str, member_id: int, endpoint: str, *,
               key_stdin: bool = False, udp_fds: dict[int, int] | None = None,
               tun_fd: int | None = None) -> int:
    """``udp_fds``: port -> our socket of the cluster's steered group on that
    port; ``tun_fd``: this member's TUN device (member/tuns.py), the
    cleartext of the children it carries; both handed down by the
    supervisor (docs/routing.md "The data path on one host")."""
    from member.process import MemberProcess

    if not endpoint.startswith(("ipc://", "tcp://")):
        raise StartupError(f"--connect {endpoint}: not an endpoint (expected the "
                           "dispatcher's ipc://PATH or tcp://HOST:PORT)")
    if key_stdin:
        curve = read_key_line(sys.stdin.buffer.readline(256))
    elif endpoint.startswith("tcp://") or config.cluster.curve_secret_key:
        curve = load_member_curve(config, config_path)
    else:
        raise StartupError(f"a member on {endpoint} needs its CURVE key: members on the "
                           "dispatcher's host are started by `ipsec-cluster run` (which "
                           "hands each its key), others need cluster.curve_secret_key "
                           "and cluster.curve_server_key")
    if tun_fd is not None:
        check_tun_fd(tun_fd)
    proc = MemberProcess(config, member_id, endpoint, curve=curve,
                         udp=own_sockets(udp_fds or {}), tun_fd=tun_fd,
                         standby=None if key_stdin else load_standby(config, config_path))
    proc.config_path = config_path

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: os._exit(0))
        await proc.run()

    with contextlib.suppress(KeyboardInterrupt):
        run_loop(main())
    return 0


def own_sockets(fds: dict[int, int]) -> dict[int, socket.socket]:
    """The sockets of the steered groups our supervisor handed us (port ->
    inherited fd): each must be a UDP socket bound to that port, else the
    start fails with one line."""
    out: dict[int, socket.socket] = {}
    for port, fd in fds.items():
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise StartupError(f"--udp-fd {port}={fd}: not an open socket "
                               f"({exc.strerror})") from None
        bound = sock.getsockname()
        if sock.type != socket.SOCK_DGRAM or not isinstance(bound, tuple) \
                or bound[1] != port:
            sock.detach()
            raise StartupError(f"--udp-fd {port}={fd}: not a UDP socket bound to port {port}")
        sock.setblocking(False)
        out[port] = sock
    return out


def check_tun_fd(fd: int) -> None:
    """``--tun-fd N``: N must be an open fd of ours (the supervisor's pass_fds)."""
    try:
        os.fstat(fd)
    except OSError as exc:
        raise StartupError(f"--tun-fd {fd}: not an open file descriptor ({exc.strerror}); "
                           "the supervisor hands it to the members it starts") from None
    os.set_blocking(fd, False)


def run_loop(coro: Coroutine[Any, Any, Any]) -> None:
    """Run ``coro`` to completion on uvloop (asyncio's loop if it is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(coro)
        return
    uvloop.run(coro)
