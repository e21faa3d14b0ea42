"""What the supervisor hands its dispatcher, and the channel between the two.

``ipsec-cluster run`` as a cluster is two kinds of process under one
supervisor (dispatcher/supervisor.py): the dispatcher (dispatcher/process.py)
and the members. What must outlive a dispatcher is the supervisor's: the
sockets of the steered groups (slot 0 included), the plain UDP sockets of the
relay path, the inside TUN device with its policy rules, the members' TUN
devices and the dispatcher's CURVE key pair. Each dispatcher incarnation gets
them at its start: the file descriptors through ``pass_fds`` (the same numbers
in the child), and their description with the secrets in the first message
of a ``socketpair`` only the two processes share (never argv or the
environment, which other local users can read).

The channel carries one JSON object a line, both ways:

supervisor -> dispatcher
  ``handoff`` (first, once), ``key`` (a member incarnation's public key,
  before the supervisor starts it; answered ``key_ok``), ``exited`` (a
  member's process ended: fence it), ``stop`` (a clean stop: every IKE SA
  deleted with its peer, then exit).
dispatcher -> supervisor
  ``ready`` (it serves), ``failed`` (one line why it could not start),
  ``key_ok``, ``dead`` (it declared a member dead: a process that still runs
  is ended at once).

Rules of this file: a line longer than ``MAX_LINE`` or that is not a JSON
object with a known ``op`` is a counted refusal, never a crash; the fds named
in a handoff are checked to be sockets or devices before anything uses them
(dispatcher/process.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import Any

from common.config import Config
from member.reuseport import SteeringGroup
from member.tun import TunDevice
from member.tuns import MemberTuns

#: the longest line either side writes (a handoff of 64 members fits easily)
MAX_LINE = 1 << 20
OPS_TO_DISPATCHER = frozenset({"handoff", "key", "exited", "stop", "activate"})
OPS_TO_SUPERVISOR = frozenset({"ready", "failed", "key_ok", "dead", "deposed"})


@dataclass(slots=True)
class GroupFds:
    """One steered SO_REUSEPORT group: its sockets' fds in slot order (slot 0
    the dispatcher's), the member id of each further slot."""

    port: int
    host: str
    natt: bool
    fds: list[int]
    members: list[int]


@dataclass(slots=True)
class Handoff:
    """Everything a dispatcher incarnation needs from its supervisor."""

    supervisor_pid: int
    #: the dispatcher's CURVE key pair (z85)
    curve_public: str
    curve_secret: str
    #: member id -> the public key of its current incarnation (z85)
    member_keys: dict[int, str]
    #: member id -> the pid of its running incarnation (those the new
    #: dispatcher may find already running: it adopts, it does not start them)
    running: dict[int, int]
    #: the first dispatcher of this run (start_action runs once)
    first: bool
    groups: list[GroupFds] = field(default_factory=list)
    #: port -> fd of a plain UDP socket (the relay path)
    plain: dict[int, int] = field(default_factory=dict)
    #: why the kernel data path is off ("" when on or never asked for)
    steering_off: str = ""
    #: the inside TUN device (fd, name), or None (a udp: inside: the dispatcher binds it)
    inside_fd: int | None = None
    inside_name: str = ""
    #: member id -> (fd, device name) of its TUN device; empty: cleartext
    #: goes through the dispatcher, ``tuns_off`` says why
    tuns: dict[int, tuple[int, str]] = field(default_factory=dict)
    tuns_base: str = ""
    tuns_mtu: int = 0
    tuns_off: str = ""
    #: two dispatcher hosts: "active", or "standby" (it takes no member until
    #: the supervisor's ``activate``)
    role: str = "active"

    def fds(self) -> list[int]:
        """Every descriptor this handoff names (for ``pass_fds``)."""
        out = [fd for g in self.groups for fd in g.fds]
        out += list(self.plain.values())
        out += [fd for fd, _ in self.tuns.values()]
        if self.inside_fd is not None:
            out.append(self.inside_fd)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "op": "handoff", "supervisor_pid": self.supervisor_pid,
            "curve": [self.curve_public, self.curve_secret],
            "member_keys": {str(m): k for m, k in self.member_keys.items()},
            "running": {str(m): p for m, p in self.running.items()},
            "first": self.first,
            "groups": [{"port": g.port, "host": g.host, "natt": g.natt, "fds": g.fds,
                        "members": g.members} for g in self.groups],
            "plain": {str(p): fd for p, fd in self.plain.items()},
            "steering_off": self.steering_off,
            "inside": None if self.inside_fd is None else [self.inside_fd, self.inside_name],
            "tuns": {str(m): [fd, name] for m, (fd, name) in self.tuns.items()},
            "tuns_base": self.tuns_base, "tuns_mtu": self.tuns_mtu, "tuns_off": self.tuns_off,
            "role": self.role,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Handoff:
        """``ValueError`` naming the field for anything of the wrong shape."""
        try:
            curve = obj["curve"]
            inside = obj.get("inside")
            return cls(
                supervisor_pid=_int(obj["supervisor_pid"]),
                curve_public=_str(curve[0]), curve_secret=_str(curve[1]),
                member_keys={_int(m): _str(k) for m, k in dict(obj["member_keys"]).items()},
                running={_int(m): _int(p) for m, p in dict(obj["running"]).items()},
                first=bool(obj["first"]),
                groups=[GroupFds(_int(g["port"]), _str(g["host"]), bool(g["natt"]),
                                 [_int(fd) for fd in g["fds"]],
                                 [_int(m) for m in g["members"]]) for g in obj["groups"]],
                plain={_int(p): _int(fd) for p, fd in dict(obj["plain"]).items()},
                steering_off=_str(obj.get("steering_off", "")),
                inside_fd=None if inside is None else _int(inside[0]),
                inside_name="" if inside is None else _str(inside[1]),
                tuns={_int(m): (_int(v[0]), _str(v[1])) for m, v in dict(obj["tuns"]).items()},
                tuns_base=_str(obj.get("tuns_base", "")), tuns_mtu=_int(obj.get("tuns_mtu", 0)),
                tuns_off=_str(obj.get("tuns_off", "")),
                role="standby" if obj.get("role") == "standby" else "active")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ValueError(f"handoff: bad or missing field ({type(exc).__name__}: {exc})") \
                from None


@dataclass(slots=True)
class Handed:
    """A handoff as the dispatcher uses it: sockets and devices around the
    inherited fds (closing them closes our copies only: the supervisor's keep
    the groups, the devices and their routes alive)."""

    groups: dict[int, SteeringGroup]
    plain: dict[int, socket.socket]
    steering_off: str
    inside: TunDevice | None
    tuns: MemberTuns | None
    tuns_off: str
    #: member id -> pid of the incarnation running when we started
    running: dict[int, int]


def take(handoff: Handoff, config: Config) -> Handed:
    """Wrap the inherited fds; ``ValueError`` naming the first fd that is not
    what the handoff says (a UDP socket on its port, a character device)."""
    groups: dict[int, SteeringGroup] = {}
    for g in handoff.groups:
        socks = [_udp(fd, g.port) for fd in g.fds]
        if len(socks) != 1 + len(g.members):
            raise ValueError(f"handoff: port {g.port}: {len(socks)} sockets for "
                             f"{len(g.members)} members")
        groups[g.port] = SteeringGroup(socks, tuple(g.members), (g.host, g.port), g.natt)
    plain = {port: _udp(fd, port) for port, fd in handoff.plain.items()}
    c = config.cluster
    inside = None
    if handoff.inside_fd is not None:
        _device(handoff.inside_fd)
        routes = [n for conn in config.connections.values()
                  for ch in conn.children.values() for n in ch.remote_nets]
        inside = TunDevice(handoff.inside_name, routes=routes, table=c.inside.route_table,
                           mark=c.inside.route_mark)
        inside.fd = handoff.inside_fd   # (open() is then a no-op; close() closes our fd only)
    tuns = None
    if handoff.tuns:
        for fd, _name in handoff.tuns.values():
            _device(fd)
        tuns = MemberTuns(handoff.tuns_base, len(handoff.tuns), handoff.tuns_mtu)
        tuns.devices = dict(handoff.tuns)
    return Handed(groups, plain, handoff.steering_off, inside, tuns, handoff.tuns_off,
                  dict(handoff.running))


def _udp(fd: int, port: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ValueError(f"handoff: fd {fd} is not a socket ({exc.strerror})") from None
    if sock.type != socket.SOCK_DGRAM or sock.getsockname()[1] != port:
        sock.detach()
        raise ValueError(f"handoff: fd {fd} is not a UDP socket on port {port}")
    sock.setblocking(False)
    return sock


def _device(fd: int) -> None:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ValueError(f"handoff: fd {fd}: {exc.strerror}") from None
    if not stat.S_ISCHR(mode):
        raise ValueError(f"handoff: fd {fd} is not a TUN device")


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"handoff: expected an integer, got {v!r}")
    return int(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"handoff: expected a string, got {type(v).__name__}")
    return v


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes, ops: frozenset[str]) -> dict[str, Any]:
    """One line as a message; ``ValueError`` (one line why) when it is not one."""
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("op") not in ops:
        raise ValueError("not a message of this channel (no known op)")
    return obj


class Channel:
    """One end of the supervisor <-> dispatcher socketpair, in the event loop:
    ``read`` the next message (None at EOF: the other process is gone),
    ``send`` one (False when the other side is gone). Refused lines are
    counted in ``refused``."""

    def __init__(self, sock: socket.socket, ops_in: frozenset[str]) -> None:
        self.sock = sock
        self.ops_in = ops_in
        self.refused = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.sock.setblocking(False)
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self.sock,
                                                                        limit=MAX_LINE)

    async def read(self) -> dict[str, Any] | None:
        reader = self._reader
        if reader is None:
            return None
        while True:
            try:
                line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):   # longer than MAX_LINE
                self.refused += 1
                return None
            except OSError:
                return None
            if not line:
                return None
            try:
                return decode(line, self.ops_in)
            except ValueError:
                self.refused += 1

    def send(self, obj: dict[str, Any]) -> bool:
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        try:
            writer.write(encode(obj))
        except (OSError, RuntimeError):
            return False
        return True

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        else:
            self.sock.close()
        self._reader = None
