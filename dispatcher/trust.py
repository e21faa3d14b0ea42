"""The trust model of the cluster's inside (docs/design.md "Trust model").

Rules of this file:
- Every member connection is CURVE-authenticated, on ipc:// too. A public key
  is bound to exactly one member id (``KeyRing``); the ZAP handler returns that
  id as the ZAP User-Id, which ZeroMQ attaches to every message the
  connection delivers. Whatever a message claims (HELLO, HEARTBEAT, SYNC src,
  ROUTE_ADD member) must equal it.
- What an authenticated member may say is bounded by its role (``Guard``):
  it speaks only for SAs in segments it owns (per the segment table, or owned
  until a moment ago: ``GRACE_S``), for children it was seen to negotiate
  (CHILD_PUSH passes through the dispatcher), and only to its synch partners.
  Each refusal has a reason; the caller counts it.
- The run directory holding the sockets is ours, 0700, or we do not start.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.cluster.routing import FLAG_INITIATOR, IKE_HEADER_LEN, NON_ESP_MARKER_LEN, init_segment
from common.cluster.segments import SegmentTable
from common.cluster.spi import segment_of_esp_spi, segment_of_ike_spi
from common.cluster.wire import ChildClaim, ChildDelete, ChildPush, Datagram, RouteAdd, Sync
from common.errors import MalformedMessage, StartupError
from common.esp.natt import Kind, classify_4500
from common.ike.ts import TrafficSelector

log = logging.getLogger("ipsec_cluster.trust")

#: the file name that binds an authorized public key to a member id
MEMBER_KEY_FILE = re.compile(r"^member([0-9]{1,5})\.key$")
MAX_MEMBER_ID = 0xFFFF
#: ZAP domain of the members endpoint
ZAP_DOMAIN = "ipsec-cluster"
#: after a table change, the previous owner of a segment may still finish
#: what it was saying (a reply already on its way, a retransmission) this long
GRACE_S = 2.0
#: the SocketHandshake events of a ZeroMQ socket monitor (libzmq 4.3)
HANDSHAKE_FAILED_EVENTS = 0x0800 | 0x2000 | 0x4000   # NO_DETAIL, PROTOCOL, AUTH

#: ROUTE_ADDs that came before their child's CHILD_PUSH (a member announces a
#: child it carries itself before it tells the child's backup), kept at most
MAX_PENDING_ROUTES = 4096

_IKE_SPIS = struct.Struct("!QQBBBB")
_ESP_SPI = struct.Struct("!I")


# -- keys ------------------------------------------------------------------------------


class KeyRing:
    """CURVE public key (z85) -> the one member id it may speak for."""

    __slots__ = ("_local", "_member")

    def __init__(self) -> None:
        self._member: dict[bytes, int] = {}
        #: keys the supervisor made for its own members' incarnations
        self._local: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._member)

    def add(self, member_id: int, public: bytes) -> None:
        """An authorized key (a remote member's key file)."""
        if not 1 <= member_id <= MAX_MEMBER_ID:
            raise StartupError(f"member id {member_id} out of 1..{MAX_MEMBER_ID}")
        other = self._member.get(public)
        if other is not None and other != member_id:
            raise StartupError(f"one CURVE key is authorized for members {other} and "
                               f"{member_id}: give each member its own key pair "
                               "(ipsec-cluster keygen --name memberN)")
        self._member[public] = member_id

    def register_local(self, member_id: int, public: bytes) -> None:
        """A new incarnation of a member we start: its fresh key replaces the
        previous incarnation's, which can no longer connect."""
        old = self._local.pop(member_id, None)
        if old is not None:
            self._member.pop(old, None)
        self._member[public] = member_id
        self._local[member_id] = public

    def member_of(self, public: bytes) -> int | None:
        return self._member.get(public)

    def load_authorized(self, folder: Path) -> None:
        """``memberN.key`` files (public keys, ``ipsec-cluster keygen --name
        memberN``): the key of each may speak for member N and nobody else."""
        import zmq.auth

        for path in sorted(folder.iterdir()):
            match = MEMBER_KEY_FILE.match(path.name)
            if match is None:
                if path.name.endswith(".key"):
                    log.warning("%s: not authorized (the file name must be memberN.key, "
                                "N the member id it may speak for)", path)
                continue
            try:
                public, _secret = zmq.auth.load_certificate(str(path))
            except (OSError, ValueError) as exc:
                raise StartupError(f"{path}: not a CURVE public key file ({exc}); make one "
                                   "with `ipsec-cluster keygen`") from None
            self.add(int(match.group(1)), public)


def authenticator(keys: KeyRing, drops: Counter[str], context: Any) -> Any:
    """A ZAP handler (RFC 27/ZAP) that admits the keys of ``keys`` only and
    answers with the member id as the User-Id; a refused key is a counted drop
    (``member_refused``) and a WARNING the first time (a refused member
    reconnects every 100 ms)."""
    from zmq.auth.asyncio import AsyncioAuthenticator
    from zmq.utils import z85

    zap_log = logging.getLogger("ipsec_cluster.zap")
    refused: set[bytes] = set()

    class Authenticator(AsyncioAuthenticator):

        async def _authenticate_curve(self, domain: str,
                                      client_key: bytes) -> tuple[bool, bytes]:
            key = z85.encode(client_key)
            if domain == ZAP_DOMAIN and keys.member_of(key) is not None:
                return True, b"OK"
            drops["member_refused"] += 1
            level = logging.DEBUG if key in refused else logging.WARNING
            refused.add(key)
            zap_log.log(level, "refused a member: CURVE key %s is not authorized for any "
                        "member id", key.decode())
            return False, b"Unknown key"

        def curve_user_id(self, client_public_key: bytes) -> str:
            member = keys.member_of(z85.encode(client_public_key))
            # (revoked between the two calls: an empty id, refused per message)
            return "" if member is None else str(member)

    auth = Authenticator(context)
    auth.log = zap_log
    return auth


def member_of_user_id(user_id: str | None) -> int | None:
    """The member id the ZAP handler put on a message (None: unauthenticated)."""
    if not user_id or not user_id.isdigit() or len(user_id) > 5:
        return None
    member = int(user_id)
    return member if 1 <= member <= MAX_MEMBER_ID else None


# -- the run directory --------------------------------------------------------------------


def secure_run_dir(path: Path, sockets: Sequence[str]) -> None:
    """Make ``path`` ours and 0700, or raise StartupError naming the fix.

    Missing: created 0700. Ours, 0700, from a dead run: its stale sockets are
    removed. Someone else's, a symlink, or open to group/other: refused (an
    existing folder we do not own could hold a listener in our place)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StartupError(f"cannot create the run directory {path}: {exc.strerror}") from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"run directory {path} is not a directory (a symlink?); remove it "
                           "or set cluster.control to a directory of ours")
    if st.st_uid != os.geteuid():
        raise StartupError(f"run directory {path} belongs to uid {st.st_uid}, not to us; "
                           "remove it or set cluster.control to a directory of ours")
    if st.st_mode & 0o077:
        raise StartupError(f"run directory {path} has mode {stat.S_IMODE(st.st_mode):o}; it "
                           f"must be 700 (chmod 700 {path}, or remove it)")
    for name in sockets:
        sock_path = path / name
        if not sock_path.exists():
            continue
        if _listening(sock_path):
            raise StartupError(f"a cluster already runs with this config ({sock_path} "
                               "answers); stop it first")
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()


def _listening(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
    finally:
        s.close()
    return True


# -- roles ----------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ChildRecord:
    """A child SA as its IKE SA owner announced it (CHILD_PUSH)."""

    spi_in: int
    spi_out: int
    ike_spi: bytes
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]


def ts_within(inner: Sequence[TrafficSelector], outer: Sequence[TrafficSelector]) -> bool:
    """Every selector of ``inner`` inside one of ``outer`` (RFC 7296 §2.9:
    addresses, ports and protocol)."""
    return all(any(_ts_in(t, o) for o in outer) for t in inner)


def _ts_in(t: TrafficSelector, o: TrafficSelector) -> bool:
    return (t.version == o.version and (o.ip_protocol == 0 or t.ip_protocol == o.ip_protocol)
            and o.start_port <= t.start_port <= t.end_port <= o.end_port
            and o.start_int <= t.start_int <= t.end_int <= o.end_int)


class Guard:
    """What each member may say, from its role: the owner of a segment speaks
    for the SAs in it, the IKE SA owner for its children, a carrier for the
    children it carries. Each method returns None (allowed) or the reason of
    the refusal (a drop counter's name)."""

    def __init__(self, table: SegmentTable, ports: frozenset[int],
                 allowed_remote: tuple[TrafficSelector, ...] | None = None) -> None:
        self.table = table
        self.ports = ports
        #: the configured remote selectors: no child may be wider (None: no check)
        self.allowed_remote = allowed_remote
        self.children: dict[int, ChildRecord] = {}
        #: outbound ESP SPI -> the child's inbound SPI (its segment: its carrier)
        self.esp_out: dict[int, int] = {}
        #: child id -> the ROUTE_ADD waiting for the child's CHILD_PUSH
        self.pending_routes: dict[int, RouteAdd] = {}
        self._epoch = -1
        self._owners: list[int | None] = []
        self._previous: list[int | None] = []
        self._previous_until = 0.0
        self._pairs: frozenset[tuple[int, int]] = frozenset()
        self._previous_pairs: frozenset[tuple[int, int]] = frozenset()

    # -- the table, as of now and a moment ago

    def _refresh(self) -> None:
        t = self.table
        if t.epoch == self._epoch:
            return
        owners = [t.owner(s) for s in range(t.segments)]
        pairs: set[tuple[int, int]] = set()
        for s, o in enumerate(owners):
            b = t.backup(s)
            if o is not None and b is not None and o != b:
                pairs.update(((o, b), (b, o)))
        if self._epoch >= 0:
            self._previous, self._previous_pairs = self._owners, self._pairs
            self._previous_until = time.monotonic() + GRACE_S
        self._epoch, self._owners, self._pairs = t.epoch, owners, frozenset(pairs)

    def owns(self, member: int, segment: int) -> bool:
        self._refresh()
        if self._owners[segment] == member:
            return True
        return (time.monotonic() < self._previous_until
                and segment < len(self._previous) and self._previous[segment] == member)

    # -- children

    def child_push(self, msg: ChildPush, sender: int) -> str | None:
        if len(msg.ike_spi) != 8:
            return "child_push_no_ike_sa"
        (ike_spi,) = struct.unpack("!Q", msg.ike_spi)
        if not self.owns(sender, segment_of_ike_spi(ike_spi, self.table.segment_bits)):
            return "child_push_not_ike_owner"
        if msg.child_id != msg.spi_in:
            return "child_push_bad_id"
        old = self.children.get(msg.spi_in)
        if old is not None and old.spi_out != msg.spi_out:
            # (the IKE SA may have been rekeyed or taken over: its SPI may change)
            return "child_push_conflict"
        if self.allowed_remote is not None and not ts_within(msg.remote_ts,
                                                             self.allowed_remote):
            return "child_push_outside_config"
        self.children[msg.spi_in] = ChildRecord(msg.spi_in, msg.spi_out, bytes(msg.ike_spi),
                                                msg.local_ts, msg.remote_ts)
        self.esp_out[msg.spi_out] = msg.spi_in
        return None

    def child_claim(self, msg: ChildClaim, sender: int) -> str | None:
        """A child a member carries, announced after its reattach to a
        dispatcher that never saw its CHILD_PUSH: only by the owner of its
        inbound SPI's segment, never over a child we know with another
        outbound SPI nor over another child's outbound SPI (the same claim
        again is fine), never wider than the configuration."""
        if len(msg.ike_spi) != 8:
            return "child_claim_no_ike_sa"
        if not self.owns(sender, segment_of_esp_spi(msg.spi_in, self.table.segment_bits)):
            return "child_claim_not_carrier"
        old = self.children.get(msg.spi_in)
        if old is not None:
            return None if old.spi_out == msg.spi_out else "child_claim_conflict"
        if msg.spi_out in self.esp_out:
            return "child_claim_conflict"
        if self.allowed_remote is not None and not ts_within(msg.remote_ts,
                                                             self.allowed_remote):
            return "child_claim_outside_config"
        self.children[msg.spi_in] = ChildRecord(msg.spi_in, msg.spi_out, bytes(msg.ike_spi),
                                                msg.local_ts, msg.remote_ts)
        self.esp_out[msg.spi_out] = msg.spi_in
        return None

    def pending_route(self, child_id: int) -> RouteAdd | None:
        """The ROUTE_ADD that waited for this child (checked again by the caller)."""
        return self.pending_routes.pop(child_id, None)

    def child_delete(self, msg: ChildDelete, sender: int) -> str | None:
        rec = self.children.get(msg.spi_in)
        if rec is None or msg.child_id != msg.spi_in:
            return "child_delete_unknown"
        (ike_spi,) = struct.unpack("!Q", rec.ike_spi)
        if not self.owns(sender, segment_of_ike_spi(ike_spi, self.table.segment_bits)):
            return "child_delete_not_ike_owner"
        del self.children[msg.spi_in]
        self.pending_routes.pop(msg.spi_in, None)
        if self.esp_out.get(rec.spi_out) == rec.spi_in:
            del self.esp_out[rec.spi_out]
        return None

    def route_add(self, msg: RouteAdd, sender: int) -> str | None:
        if msg.member != sender:
            return "route_add_other_member"
        rec = self.children.get(msg.child_id)
        if rec is None:
            if len(self.pending_routes) >= MAX_PENDING_ROUTES:
                # the oldest waited longest (its push normally follows at
                # once): a flood of unknown children cannot lock out new ones
                del self.pending_routes[next(iter(self.pending_routes))]
            self.pending_routes[msg.child_id] = msg
            return "route_add_pending"
        if not self.owns(sender, segment_of_esp_spi(msg.child_id, self.table.segment_bits)):
            return "route_add_not_carrier"
        if not (ts_within(msg.remote_ts, rec.remote_ts)
                and ts_within(msg.local_ts, rec.local_ts)):
            return "route_add_wider_than_child"
        return None

    # -- the network

    def datagram(self, d: Datagram, sender: int) -> str | None:
        """May ``sender`` send this from the cluster address? IKE: only in an
        IKE SA whose SPI (ours) lies in a segment it owns, or the answer to a
        first IKE_SA_INIT hashed to it; ESP: only on a child it carries."""
        if d.local_port not in self.ports:
            return "datagram_port"
        payload = d.payload
        offset = 0
        if d.local_port != 500:
            try:
                kind, spi = classify_4500(payload)
            except MalformedMessage:
                return "datagram_malformed"
            if kind is Kind.KEEPALIVE:
                return None
            if kind is Kind.ESP:
                spi_in = self.esp_out.get(spi)
                if spi_in is None:
                    return "datagram_esp_unknown_sa"
                if not self.owns(sender, segment_of_esp_spi(spi_in, self.table.segment_bits)):
                    return "datagram_esp_not_carrier"
                return None
            offset = NON_ESP_MARKER_LEN
        if len(payload) < offset + IKE_HEADER_LEN:
            return "datagram_malformed"
        spi_i, spi_r, _, _, _, flags = _IKE_SPIS.unpack_from(payload, offset)
        # RFC 7296 §3.1: the I flag is set by the original initiator, so in
        # what we send it says which SPI is ours.
        ours = spi_i if flags & FLAG_INITIATOR else spi_r
        bits = self.table.segment_bits
        if ours == 0:
            segment = init_segment(d.peer_ip, d.peer_port, spi_i, bits)
        else:
            segment = segment_of_ike_spi(ours, bits)
        if not self.owns(sender, segment):
            return "datagram_ike_not_owner"
        return None

    def sync(self, msg: Sync, sender: int) -> str | None:
        """SYNC: from whom it says, between an owner and its backup."""
        if msg.src != sender:
            return "sync_wrong_src"
        self._refresh()
        pair = (sender, msg.dst)
        if pair in self._pairs or (pair in self._previous_pairs
                                   and time.monotonic() < self._previous_until):
            return None
        return "sync_not_partner"
