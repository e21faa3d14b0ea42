"""Policy routing for the TUN inside, and the gateway's own UDP sockets.

The children's remote networks are routed into the TUN device, but never in
the host's main table: a full-tunnel child (0.0.0.0/0, ::/0) would replace the
host's default route there, and a child covering the peer's own address would
route our IKE answers into the tunnel. As strongSwan does (table 220, rule
priority 220), the routes go into the cluster's own table, consulted by rules
we add and remove ourselves:

========  ===============================================  =========================
priority  rule (each for IPv4 and IPv6)                    for
========  ===============================================  =========================
P - 1     ``iif TUN lookup main suppress_prefixlength 0``  decrypted packets written
                                                            to the TUN device
P - 1     ``fwmark DEC lookup main suppress_prefixlength   decrypted packets from the
          0``                                              members' raw sockets
P         ``not fwmark MARK lookup TABLE``                 everything else: the
                                                            host's and the LAN's
                                                            cleartext goes to the
                                                            tunnel first
========  ===============================================  =========================

- The gateway's UDP sockets carry ``SO_MARK = MARK``, so the rule at P skips
  them: IKE and ESP to the peer are routed by the main table even when a child
  covers the peer's address or everything.
- Decrypted packets are routed to the main table's specific routes first (the
  LAN behind us), never to its default route (``suppress_prefixlength 0``):
  so a full-tunnel child does not send them back into the tunnel, and a
  destination that is another child's remote network (hub and spoke) still
  reaches the rule at P and the tunnel instead of leaving in cleartext by the
  default route. ``DEC = MARK + 1``.

``PolicyRoutes.install`` first checks that the table is ours to use (empty:
routes through a TUN device vanish with the device, so after a crash only our
rules are left, and they are removed here); ``remove`` deletes exactly what
``install`` added.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common.errors import StartupError

log = logging.getLogger("ipsec_cluster.routes")

IP_TIMEOUT_S = 10.0
#: strongSwan's table and priority (charon.routing_table / routing_table_prio)
DEFAULT_TABLE = 220
DEFAULT_MARK = 0x220
#: socket option numbers (linux/socket.h); Python's ``socket`` lacks SO_MARK before 3.12
SO_MARK = getattr(socket, "SO_MARK", 36)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RouteError(OSError):
    """An ``ip`` command for our table or rules failed (the message says which)."""


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; its stdout, or RouteError when it fails and ``check``."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True,
                          timeout=IP_TIMEOUT_S, check=False)
    if check and proc.returncode != 0:
        raise RouteError(f"ip {' '.join(args)} failed ({proc.returncode}): "
                         f"{proc.stderr.strip()}")
    return proc.stdout


@dataclass(slots=True, frozen=True)
class PolicyRoutes:
    """Our table, mark and rule priority for the TUN device ``dev``."""

    dev: str
    table: int = DEFAULT_TABLE
    mark: int = DEFAULT_MARK

    @property
    def decrypted_mark(self) -> int:
        return decrypted_mark(self.mark)

    def rules(self) -> list[tuple[str, ...]]:
        """The selectors of our rules (``ip rule add|del`` arguments, no family)."""
        pref, main = str(self.table), ("lookup", "main", "suppress_prefixlength", "0")
        return [
            ("iif", self.dev, *main, "pref", str(self.table - 1)),
            ("fwmark", hex(self.decrypted_mark), *main, "pref", str(self.table - 1)),
            ("not", "fwmark", hex(self.mark), "lookup", str(self.table), "pref", pref),
        ]

    def install(self, routes: Iterable[IPNetwork]) -> None:
        """Check the table is free, remove our leftovers, add routes then rules."""
        nets = list(routes)
        if not nets:
            return
        for family in ("-4", "-6"):
            self._check_free(family)
        self._remove_rules(stale=True)
        _warn_strict_rp_filter()
        try:
            for net in nets:
                ip(f"-{net.version}", "route", "replace", str(net), "dev", self.dev,
                   "table", str(self.table))
            for family in ("-4", "-6"):
                for rule in self.rules():
                    ip(family, "rule", "add", *rule)
        except BaseException:
            self.remove(nets)
            raise

    def remove(self, routes: Iterable[IPNetwork]) -> None:
        """Delete our rules and routes; missing ones are not an error."""
        self._remove_rules(stale=False)
        for net in routes:
            ip(f"-{net.version}", "route", "del", str(net), "dev", self.dev,
               "table", str(self.table), check=False)

    def _check_free(self, family: str) -> None:
        listing = ip(family, "route", "show", "table", str(self.table), check=False).strip()
        if listing:
            first = listing.splitlines()[0]
            raise StartupError(
                f"routing table {self.table} is in use by something else ({first!r}); "
                "set cluster.route_table to a free table")

    def _remove_rules(self, *, stale: bool) -> None:
        """Delete our rules; ``stale``: those a crashed run left (any TUN name),
        found in ``ip rule`` by their exact selectors and priorities."""
        for family in ("-4", "-6"):
            if stale:
                for rule in self._stale_rules(family):
                    log.info("removing a rule left by an earlier run: %s", " ".join(rule))
                    ip(family, "rule", "del", *rule, check=False)
                continue
            for rule in self.rules():
                ip(family, "rule", "del", *rule, check=False)

    def _stale_rules(self, family: str) -> list[tuple[str, ...]]:
        """Rules exactly like ours at our priorities; an ``iif`` one only for our
        new device's name or a device that is gone (``[detached]``: the TUN of
        a crashed run)."""
        ours = {" ".join(r[:-2]) for r in self.rules()}
        found: list[tuple[str, ...]] = []
        for line in ip(family, "rule", "show", check=False).splitlines():
            pref, _, text = line.partition(":")
            if not pref.strip().isdigit() or int(pref) not in (self.table - 1, self.table):
                continue
            words = text.split()
            detached = "[detached]" in words
            words = [w for w in words if w != "[detached]"]
            if words[:3] == ["not", "from", "all"]:
                words = ["not", *words[3:]]
            elif words[:2] == ["from", "all"]:
                words = words[2:]
            if words[:1] == ["iif"] and len(words) > 2:
                # ours: on the device we just created, or on one that is gone
                mine = detached or words[1] == self.dev
                if mine and " ".join(["iif", self.dev, *words[2:]]) in ours:
                    found.append((*words, "pref", pref.strip()))
            elif " ".join(words) in ours:
                found.append((*words, "pref", pref.strip()))
        return found


class KernelRoutes:
    """Applies route changes to the cluster's table: one ``ip -force -batch -``
    per change set, IPv4 and IPv6 alike (``ip`` tells the family from the
    prefix). Failures are logged and counted (``errors``), never raised: the
    caller is an event loop, and the userspace path still carries what a
    missing route sends to the dispatcher's TUN."""

    def __init__(self, table: int = DEFAULT_TABLE) -> None:
        self.table = table
        self.applied = 0   # change sets run
        self.changes = 0   # routes replaced or deleted
        self.errors = 0    # commands (or whole runs) that failed

    def commands(self, replace: Mapping[IPNetwork, str],
                 delete: Iterable[IPNetwork]) -> list[str]:
        table = str(self.table)
        lines = [f"route del {net} table {table}" for net in delete]
        lines += [f"route replace {net} dev {dev} table {table}"
                  for net, dev in replace.items()]
        return lines

    def apply(self, replace: Mapping[IPNetwork, str], delete: Iterable[IPNetwork]) -> bool:
        """Run the changes; False when any of them failed (counted, logged)."""
        lines = self.commands(replace, delete)
        if not lines:
            return True
        self.applied += 1
        self.changes += len(lines)
        try:
            proc = subprocess.run(["ip", "-force", "-batch", "-"], input="\n".join(lines) + "\n",
                                  capture_output=True, text=True, timeout=IP_TIMEOUT_S,
                                  check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            self.errors += len(lines)
            log.warning("cannot change the routes of table %d: %s", self.table, exc)
            return False
        if proc.returncode == 0:
            return True
        failed = max(1, proc.stderr.count("Command failed"))
        self.errors += failed
        log.warning("%d of %d route changes in table %d failed: %s", failed, len(lines),
                    self.table, proc.stderr.strip()[:500])
        return False


def adopted_routes(table: int, devices: Iterable[str]) -> dict[IPNetwork, str]:
    """What ``table`` routes through ``devices`` now (prefix -> device): the
    routes a restarted dispatcher finds from its predecessor and keeps until
    the members it adopts have announced theirs again (dispatcher/cluster.py).
    Unreadable output is an empty answer (the next change set then replaces
    what it needs; nothing is deleted that we do not know of)."""
    import json

    wanted = set(devices)
    out: dict[IPNetwork, str] = {}
    for family in ("-4", "-6"):
        try:
            text = ip("-j", family, "route", "show", "table", str(table), check=False)
            rows = json.loads(text) if text.strip() else []
        except (OSError, subprocess.SubprocessError, ValueError):
            continue
        for row in rows if isinstance(rows, list) else []:
            if not isinstance(row, dict) or row.get("dev") not in wanted:
                continue
            dst = row.get("dst")
            if dst == "default":
                dst = "0.0.0.0/0" if family == "-4" else "::/0"
            try:
                out[ipaddress.ip_network(str(dst))] = str(row["dev"])
            except ValueError:
                continue
    return out


def _warn_strict_rp_filter() -> None:
    """Strict reverse-path filtering looks the peer's address up like our own
    cleartext (mark 0), finds the tunnel and drops the peer's IKE and ESP when
    a child covers the peer's address (RFC 3704 §2.2; Linux rp_filter = 1)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/sys/net/ipv4/conf/all/rp_filter") as f:
            if int(f.read()) == 1:
                log.warning("net.ipv4.conf.all.rp_filter = 1 (strict): a child whose "
                            "remote_ts covers a peer's own address loses that peer's "
                            "packets; use 2 (loose)")


def decrypted_mark(mark: int) -> int:
    return mark + 1


def mark_for_tun(kind: str, mark: int) -> int | None:
    """The mark our UDP sockets carry: only a TUN inside installs our rules."""
    return mark if kind == "tun" else None


def mark_socket(sock: socket.socket, mark: int) -> None:
    """``SO_MARK`` on ``sock`` (needs CAP_NET_ADMIN)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


# -- the gateway's own UDP sockets --------------------------------------------------


def bind_udp(address: str, port: int, *, mark: int | None = None,
             bufsize: int = 0) -> socket.socket:
    """A UDP socket bound to ``address``:``port`` WITHOUT SO_REUSEADDR (another
    socket of any user bound beside it would receive our datagrams); ``mark``:
    SO_MARK, so that our own IKE and ESP bypass the tunnel's table. A port held
    by another process or an address not on this host is a StartupError."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if bufsize:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        if mark is not None:
            try:
                mark_socket(sock, mark)
            except OSError as exc:
                raise StartupError(f"cannot mark the UDP socket for {_where(address, port)} "
                                   f"(SO_MARK {mark:#x}): {exc.strerror}; a TUN inside "
                                   "needs CAP_NET_ADMIN") from None
        try:
            sock.bind((address, port))
        except OSError as exc:
            raise StartupError(bind_error(address, port, exc)) from None
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def keep_alone(sock: socket.socket, address: str, port: int) -> None:
    """After an event loop adopted ``sock``: libuv's ``uv_udp_open`` (uvloop)
    sets SO_REUSEADDR on every UDP socket it is given. Clear it again, then
    check that no other socket got bound to the port in between (StartupError)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    mine = f"socket:[{os.fstat(sock.fileno()).st_ino}]"
    others = _port_inodes(port, address) - {mine}
    if others:
        holder = _find_inode_owner(others)
        who = f" by {holder}" if holder else ""
        raise StartupError(f"cannot bind UDP {_where(address, port)} alone: another socket "
                           f"was bound beside ours{who}; stop it and start again")


def _where(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def bind_error(address: str, port: int, exc: OSError) -> str:
    """One line for the operator: why ``address``:``port`` cannot be bound."""
    where = _where(address, port)
    if exc.errno == errno.EADDRINUSE:
        holder = udp_port_holder(port, address)
        who = f" by {holder}" if holder else ""
        return (f"cannot bind UDP {where}: the port is already in use{who} "
                "(another ipsec-cluster with the same ports? stop it or change "
                "cluster.ike_port/natt_port)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"cannot bind UDP {where}: the address is not on this host "
                "(add it to an interface or fix cluster.address)")
    if exc.errno == errno.EACCES:
        return f"cannot bind UDP {where}: permission denied (ports below 1024 need root)"
    return f"cannot bind UDP {where}: {exc.strerror}"


def udp_port_holder(port: int, address: str | None = None) -> str | None:
    """``pid N (comm)`` of a process holding a UDP socket on ``port`` (from the
    socket inodes in /proc/net/udp{,6} and the processes' fds), or None."""
    inodes = _port_inodes(port, address)
    if not inodes:
        return None
    return _find_inode_owner(inodes)


def _port_inodes(port: int, address: str | None = None) -> set[str]:
    """``socket:[INODE]`` of every UDP socket of this namespace bound to
    ``port`` (and, given ``address``, to it or to a wildcard address)."""
    wanted = None
    if address is not None:
        wanted = {ipaddress.ip_address(address).packed, bytes(4), bytes(16)}
    inodes = set()
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError):
            with open(name) as f:
                next(f, None)  # header line
                for line in f:
                    fields = line.split()
                    if len(fields) <= 9:
                        continue
                    host, _, hexport = fields[1].partition(":")
                    if int(hexport, 16) != port:
                        continue
                    if wanted is not None and _proc_address(host) not in wanted:
                        continue
                    inodes.add(f"socket:[{fields[9]}]")
    return inodes


def _proc_address(text: str) -> bytes:
    """/proc/net/udp{,6} print addresses as 32-bit words in host order."""
    raw = bytes.fromhex(text)
    packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) \
        if sys.byteorder == "little" else raw
    if len(packed) == 16 and packed[:12] == bytes(10) + b"\xff\xff":
        return packed[12:]  # a v4-mapped address
    return packed


def _find_inode_owner(inodes: set[str]) -> str | None:
    me = os.getpid()
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        if int(pid) == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}") in inodes:
                        return f"pid {pid} ({_comm(pid)})"
    return None


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"
