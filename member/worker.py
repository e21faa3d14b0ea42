"""A member's work without its I/O: the IKE engine for the IKE SAs it owns and
the ESP transforms of the child SAs it carries.

The single-process gateway (dispatcher/gateway.py) drives one ``Member``
directly; in the cluster each member process (member/process.py) drives one
behind the dispatcher.
Inputs: IKE datagrams, ESP datagrams, inner packets, the time. Outputs: IKE
datagrams (``Outgoing``), ESP datagrams, inner packets.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from common.cluster.events import Event
from common.cluster.pools import Pool, PoolSet
from common.cluster.routing import InsideRoutes
from common.cluster.spi import SpiAllocator
from common.cluster.stats import EspTraffic, MemberStats
from common.cluster.sync import ChildState
from common.cluster.wire import ChildDelete, ChildPush, RouteAdd, RouteDel
from common.config import Config
from common.errors import (
    IntegrityError,
    LocalProtocolError,
    MalformedMessage,
    ReplayError,
    SequenceExhausted,
)
from common.esp.iv import COUNTER_LIMIT
from common.esp.replay import MAX_WINDOW_SIZE, MIN_WINDOW_SIZE, ReplayState
from common.esp.selectors import Matcher, five_tuple, matcher
from common.esp.transforms import (
    MAX_SEQ_32,
    MAX_SEQ_64,
    MIN_SPI,
    TRANSFORMS,
    InboundRefusal,
    InboundSA,
    OutboundRefusal,
    OutboundSA,
)
from common.ike.context import IkeOptions, Outgoing
from common.ike.engine import IkeEngine
from common.ike.events import (
    ChildSaDeleted,
    ChildSaInstalled,
    DpdSucceeded,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaRekeyed,
    MessageIdsSynced,
)
from common.ike.policy import policies_from_config
from common.ike.spis import SegmentSpis
from common.ike.ts import PORT_MAX, PORT_MIN, TrafficSelector
from common.rand import RandomBytes
from member.keylog import keylog_for
from member.logs import SaEventLog, engine_lookup
from member.sa_counts import connection_counts

log = logging.getLogger("ipsec_cluster.member")

Address = tuple[str, int]
#: the shells' ESP traffic counters (``MemberStats.esp``, not its ``counters``)
ESP_COUNTERS = frozenset({"esp_in", "esp_in_bytes", "esp_out", "esp_out_bytes"})


@dataclass(slots=True, eq=False)
class ChildRoute:
    """One installed child SA as the data plane sees it."""

    ike_id: int
    name: str
    outbound: OutboundSA
    inbound: InboundSA
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    remote: Address
    #: kept for the backup of this child (common/cluster/sync.py ChildState)
    keymat_in: bytes = field(default=b"", repr=False)
    keymat_out: bytes = field(default=b"", repr=False)
    #: our SPI of the IKE SA that negotiated it (on whichever member owns it)
    ike_spi: bytes = b""
    #: inbound selector check (RFC 4301 §5.2), compiled once: a decrypted
    #: packet's source must be in remote_ts and its destination in local_ts
    in_match: Matcher = field(init=False, repr=False)
    #: decrypted packets dropped for being outside the selectors
    selector_drops: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.in_match = matcher(self.remote_ts, self.local_ts)


#: ``Member._lookup_or_none``: a packet whose headers ``lookup_child`` refused
_MALFORMED = (-1, -1)

#: bits of the member slot in every SPI (common/cluster/spi.py): up to 64 members
SLOT_BITS = 6
#: selectors per side of a pushed or replicated child (the wire's u8 count)
MAX_SELECTORS = 255


def selectors_refusal(tss: tuple[TrafficSelector, ...]) -> bool:
    """True if these selectors are not well-formed: none at all, or an
    address range that is empty or mixes address families (RFC 7296
    §3.13.1). A port range start > end is OPAQUE (common/ike/ts.py), not bad."""
    if not tss or len(tss) > MAX_SELECTORS:
        return True
    for ts in tss:
        if not isinstance(ts, TrafficSelector) or ts.version not in (4, 6) \
                or ts.start_addr.version != ts.version or ts.end_addr.version != ts.version \
                or ts.start_int > ts.end_int or not 0 <= ts.ip_protocol <= 0xFF \
                or not (PORT_MIN <= ts.start_port <= PORT_MAX
                        and PORT_MIN <= ts.end_port <= PORT_MAX):
            return True
    return False


def child_refusal(transform: str, keymat_in: bytes, keymat_out: bytes, spi_in: int,
                  spi_out: int, local_ts: tuple[TrafficSelector, ...],
                  remote_ts: tuple[TrafficSelector, ...], remote_ip: bytes, remote_port: int,
                  ike_spi: bytes) -> str | None:
    """Why a child SA from another process (CHILD_PUSH, a replica) is refused,
    or None. Checked before anything is built from it: a bad field would
    otherwise fail later, on the data path or in the middle of a takeover."""
    t = TRANSFORMS.get(transform)
    if t is None:
        return "unknown_transform"
    if len(keymat_in) != t.keymat_size or len(keymat_out) != t.keymat_size:
        return "bad_key_length"
    if not (MIN_SPI <= spi_in <= MAX_SEQ_32 and MIN_SPI <= spi_out <= MAX_SEQ_32):
        return "bad_spi"   # RFC 4303 §2.1: 0 and 1..255 are reserved
    if selectors_refusal(local_ts) or selectors_refusal(remote_ts):
        return "bad_selectors"
    if len(remote_ip) not in (4, 16) or not 1 <= remote_port <= 0xFFFF:
        return "bad_remote"
    if len(ike_spi) not in (0, 8):
        return "bad_ike_spi"
    return None


def child_state_refusal(cs: ChildState) -> str | None:
    """``child_refusal`` and the counters of a replicated child (common/cluster/sync.py
    ChildState): a sequence number within its space (RFC 4303 §3.3.3, and
    the 48 bits of the IV counter), a replay window we can hold."""
    reason = child_refusal(cs.transform, cs.keymat_in, cs.keymat_out, cs.spi_in, cs.spi_out,
                           cs.local_ts, cs.remote_ts, cs.remote_ip, cs.remote_port, cs.ike_spi)
    if reason is not None:
        return reason
    max_seq = MAX_SEQ_64 if cs.esn else MAX_SEQ_32
    if not 1 <= cs.out_seq < COUNTER_LIMIT or cs.out_seq > max_seq + 1 \
            or cs.replay_highest > max_seq:
        return "bad_seq"
    if not MIN_WINDOW_SIZE <= cs.replay_size <= MAX_WINDOW_SIZE \
            or cs.replay_bitmap >> cs.replay_size:
        return "bad_window"
    return None


class Member:
    """``owner_of_esp`` says which member carries a child SA with a given
    inbound SPI (the owner of its segment); a child that lands elsewhere is
    pushed there (``notices``: wire messages for the dispatcher to relay)."""

    def __init__(self, config: Config, *, member_id: int = 1, sender_id: int = 1,
                 segments: list[int] | None = None, random: RandomBytes = os.urandom,
                 owner_of_esp: Callable[[int], int] | None = None,
                 esp_segment: Callable[[], int] | None = None,
                 publish: Callable[[Event], None] | None = None) -> None:
        """``publish``: where SA events go as ``Event``s (the event stream of
        the control API); without it they are only logged."""
        c = config.cluster
        self.config = config
        self.member_id = member_id
        self.sender_id = sender_id
        self.replay_window = c.replay_window
        slot_bits = SLOT_BITS if c.segment_bits + SLOT_BITS <= 16 else 0
        allocator = SpiAllocator(random, c.segment_bits, slot=member_id % (1 << slot_bits),
                                 slot_bits=slot_bits)
        segs = segments if segments is not None else list(range(1, 1 << c.segment_bits))
        self.spis = SegmentSpis(allocator, segs, esp_segment=esp_segment)
        self.owner_of_esp = owner_of_esp
        #: ChildPush / ChildDelete / RouteAdd / RouteDel for the dispatcher
        self.notices: list[ChildPush | ChildDelete | RouteAdd | RouteDel] = []
        #: inbound SPI -> member, for children we negotiated that live elsewhere
        self.placed: dict[int, int] = {}
        #: IKE SAs whose state changed since the last flush (to replicate)
        self.touched: set[int] = set()
        #: new inbound SPI -> the one it replaces, while we still send on the old
        self.deferred: dict[int, int] = {}
        self.engine = IkeEngine(
            policies_from_config(config.connections), random=random, spis=self.spis,
            options=IkeOptions(ike_port=c.ike_port, natt_port=c.natt_port,
                               cookie_threshold=c.cookie_threshold,
                               # certificate validity needs the wall clock (common/ is pure)
                               utc_now=lambda: datetime.now(UTC)))
        if config.pools:
            # Virtual IPs (RFC 7296 §3.15), leased from our segments' partitions.
            self.engine.ctx.pools = PoolSet(
                [Pool(p.name, p.addrs, p.dns) for p in config.pools.values()], c.segment_bits)
        #: inbound SPI -> route (old SAs stay here until deleted, for packets in flight)
        self.by_spi: dict[int, ChildRoute] = {}
        #: routes that carry outbound traffic (rekeyed ones leave this list)
        #: which carried child an inner packet belongs to (newest child first,
        #: so a rekeyed child takes over its predecessor's traffic)
        self.routes = InsideRoutes()
        self.drops: Counter[str] = Counter()
        #: the inner bytes the last ``handle_inner_batch`` sealed (the shell's counters)
        self.sealed_bytes = 0
        self.counters: Counter[str] = Counter()
        self.esp_out: list[tuple[bytes, Address]] = []
        self.sa_log = SaEventLog(member_id, engine_lookup(self.engine), publish)
        self.keylog = keylog_for(c.save_keys, str(c.address))

    # -- IKE ------------------------------------------------------------------

    def handle_ike(self, data: bytes, remote: Address, local_port: int, now: float) -> None:
        self.counters["ike_in"] += 1
        self.engine.receive_datagram(data, remote, local_port, now)
        self._events()

    def ike_out(self) -> list[Outgoing]:
        out = self.engine.datagrams_to_send()
        self.counters["ike_out"] += len(out)
        return out

    def get_timer(self) -> float | None:
        return self.engine.get_timer()

    def handle_timer(self, now: float) -> None:
        self.engine.handle_timer(now)
        self._events()

    def start_connections(self, now: float, only_start_action: bool = True) -> list[int]:
        """Initiator: bring up every connection (our ``peer`` command)."""
        ids = []
        for conn in self.config.connections.values():
            if not conn.remote_addrs:
                continue
            children = [n for n, ch in conn.children.items()
                        if ch.start_action == "start" or not only_start_action]
            if not children:
                children = list(conn.children)
            ids.append(self.engine.initiate(conn.name, (str(conn.remote_addrs[0]),
                                                        conn.remote_port), now, children))
        return ids

    def _events(self) -> None:
        while (e := self.engine.next_event()) is not None:
            for attr in ("ike_id", "old_ike_id", "new_ike_id"):
                ike_id = getattr(e, attr, None)
                if ike_id:
                    self.touched.add(ike_id)
            self.sa_log.event(e)
            self.keylog.event(e, self.engine.by_id.get)
            if isinstance(e, ChildSaInstalled):
                self._install(e)
            elif isinstance(e, ChildSaDeleted):
                self._remove(e.spi_in)
            elif isinstance(e, IkeSaEstablished):
                self.counters["ike_established"] += 1
            elif isinstance(e, IkeSaRekeyed):
                for r in self.by_spi.values():
                    if r.ike_id == e.old_ike_id:
                        r.ike_id = e.new_ike_id
            elif isinstance(e, IkeSaFailed):
                self.counters["ike_failed"] += 1
            elif isinstance(e, DpdSucceeded):
                self.counters["dpd_ok"] += 1
                log.info("IKE SA %d: DPD answered", e.ike_id)
            elif isinstance(e, MessageIdsSynced):
                log.info("IKE SA %d: message IDs synced (send %d, recv %d)", e.ike_id,
                         e.send_mid, e.recv_mid)

    def _install(self, e: ChildSaInstalled) -> None:
        target = self.owner_of_esp(e.spi_in) if self.owner_of_esp else self.member_id
        if target != self.member_id:
            # The IKE SA owner manages children: this one lives on another member.
            self.notices.append(self._push(e))
            self.placed[e.spi_in] = target
            log.debug("child SA %s %08x_i placed on member %d", e.name, e.spi_in, target)
            return
        self._install_local(e.ike_id, e.name, e.spi_in, e.spi_out, e.transform, e.esn,
                            e.keymat_in, e.keymat_out, e.local_ts, e.remote_ts, e.remote,
                            e.replaces, self._ike_spi(e.ike_id),
                            defer=e.replaces is not None and not e.initiator
                            and e.replaces in self.by_spi)
        # The child's backup learns of it through the same relay as a push.
        self.notices.append(self._push(e))

    def _push(self, e: ChildSaInstalled) -> ChildPush:
        """The child as the relay carries it to its carrier and its backup."""
        return ChildPush(e.spi_in, e.ike_id, e.name, e.spi_in, e.spi_out, e.transform, e.esn,
                         e.keymat_in, e.keymat_out, e.local_ts, e.remote_ts,
                         ipaddress.ip_address(e.remote[0]).packed, e.remote[1],
                         self._ike_spi(e.ike_id))

    def _ike_spi(self, ike_id: int) -> bytes:
        sa = self.engine.by_id.get(ike_id)
        if sa is None:
            return b""
        return sa.spi_i if sa.initiator else sa.spi_r

    def ike_spi_of(self, spi_in: int) -> bytes:
        route = self.by_spi.get(spi_in)
        return route.ike_spi if route is not None else b""

    def install_pushed(self, push: ChildPush) -> str | None:
        """A child SA negotiated by another member's IKE SA, carried here;
        why it was refused (nothing installed), or None."""
        reason = child_refusal(push.transform, push.keymat_in, push.keymat_out, push.spi_in,
                               push.spi_out, push.local_ts, push.remote_ts, push.remote_ip,
                               push.remote_port, push.ike_spi)
        if reason is not None:
            return reason
        remote = (str(ipaddress.ip_address(push.remote_ip)), push.remote_port)
        self._install_local(push.ike_id, push.name, push.spi_in, push.spi_out, push.transform,
                            push.esn, push.keymat_in, push.keymat_out, push.local_ts,
                            push.remote_ts, remote, None, push.ike_spi)
        return None

    def install_replica(self, cs: ChildState, skip: int, replay: ReplayState,
                        now: float) -> str | None:
        """Carry a child SA whose carrier died (RFC 6027 §3.4, §3.5, §3.7.1):
        our own IV sender id, the outbound sequence number skipped ahead, the
        inbound window as the replay policy says. Why it was refused (nothing
        installed), or None."""
        reason = child_state_refusal(cs)
        if reason is not None:
            return reason
        remote = (str(ipaddress.ip_address(cs.remote_ip)), cs.remote_port)
        # Near the end of the sequence (or IV counter) space the skip ahead is
        # clamped: the SA then runs out at once and is rekeyed (RFC 4303 §3.3.3).
        last = min(MAX_SEQ_64 if cs.esn else MAX_SEQ_32, COUNTER_LIMIT - 1)
        self._install_local(0, cs.name, cs.spi_in, cs.spi_out, cs.transform, cs.esn,
                            cs.keymat_in, cs.keymat_out, cs.local_ts, cs.remote_ts, remote,
                            None, cs.ike_spi, initial_seq=min(last, max(1, cs.out_seq + skip)))
        route = self.by_spi[cs.spi_in]
        if replay.size == route.inbound.window.export_state().size:
            route.inbound.import_window(replay)
        self.spis.mark_used_esp(cs.spi_in)
        return None

    def carried(self) -> list[ChildRoute]:
        """The child SAs whose outbound traffic we carry, newest first."""
        return [self.by_spi[c] for c in self.routes.child_ids() if c in self.by_spi]

    def drop_route(self, spi_in: int) -> None:
        """Stop carrying a child (its segment moved away); no notices."""
        self.by_spi.pop(spi_in, None)
        self.routes.remove(spi_in)

    def remove_pushed(self, spi_in: int) -> None:
        """The IKE SA owner deleted a child we carry (no notices back but the
        route: the owner already told the backup)."""
        route = self.by_spi.pop(spi_in, None)
        if route is not None:
            self.routes.remove(spi_in)
            self.notices.append(RouteDel(spi_in))

    def _install_local(self, ike_id: int, name: str, spi_in: int, spi_out: int,
                       transform: str, esn: bool, keymat_in: bytes, keymat_out: bytes,
                       local_ts: tuple[TrafficSelector, ...],
                       remote_ts: tuple[TrafficSelector, ...], remote: Address,
                       replaces: int | None, ike_spi: bytes = b"", *,
                       initial_seq: int = 1, defer: bool = False) -> None:
        route = ChildRoute(
            ike_id, name,
            OutboundSA(spi_out, transform, keymat_out, self.sender_id, esn=esn,
                       initial_seq=initial_seq),
            InboundSA(spi_in, transform, keymat_in, self.replay_window, esn=esn),
            local_ts, remote_ts, remote, keymat_in, keymat_out, ike_spi)
        self.by_spi[spi_in] = route
        log.debug("carrying child SA %s here: %08x_i %08x_o %s%s", name, spi_in, spi_out,
                  transform, f" (rekeys {replaces:08x})" if replaces else "")
        if defer and replaces is not None:
            # RFC 7296 §2.8: as the responder of a rekey we cannot know that the
            # initiator has installed the new SA until traffic arrives on it or
            # the old SA is deleted: until then we go on sending on the old one.
            self.deferred[spi_in] = replaces
            return
        self._activate(spi_in, replaces)

    def _activate(self, spi_in: int, replaces: int | None) -> None:
        """Send on this child from now on (and no longer on the one it replaces)."""
        route = self.by_spi.get(spi_in)
        if route is None:
            return
        if replaces is not None:
            self.routes.remove(replaces)
        self.routes.add(spi_in, route.local_ts, route.remote_ts, self.member_id)
        self.notices.append(RouteAdd(spi_in, self.member_id, route.local_ts, route.remote_ts))

    def _remove(self, spi_in: int) -> None:
        self.placed.pop(spi_in, None)
        self.deferred.pop(spi_in, None)
        for new, old in list(self.deferred.items()):
            if old == spi_in:   # the old SA is gone: the peer has the new one
                del self.deferred[new]
                self._activate(new, old)
        route = self.by_spi.pop(spi_in, None)
        if route is None:
            # Carried by another member (placed there, or we took the IKE SA
            # over and never knew where): the carrier and its backup drop it.
            if self.owner_of_esp is not None:
                self.notices.append(ChildDelete(spi_in, spi_in))
            return
        self.routes.remove(spi_in)
        self.notices.append(RouteDel(spi_in))
        if self.owner_of_esp is not None:
            # ... and the backup drops its replica.
            self.notices.append(ChildDelete(spi_in, spi_in))

    # -- ESP --------------------------------------------------------------------

    def handle_esp(self, data: bytes, spi: int, remote: Address, now: float) -> bytes | None:
        """Decrypt one ESP packet; the inner packet, or None (counted drop).

        RFC 4301 §5.2: the inner packet must fall inside the child's selectors
        (source in remote_ts, destination in local_ts, protocol and ports);
        otherwise it is dropped (``selector_mismatch``), never written to the
        inside: an authenticated peer may only send what it negotiated."""
        route = self.by_spi.get(spi)
        if route is None:
            self.drops["esp_unknown_spi"] += 1
            return None
        try:
            inner = route.inbound.unprotect(data)
        except ReplayError:
            self.drops["esp_replay"] += 1
            return None
        except IntegrityError:
            self.drops["esp_integrity"] += 1
            return None
        except MalformedMessage:
            self.drops["esp_malformed"] += 1
            return None
        # Authentic: the peer is alive and has this SA, whatever it carries.
        self.engine.note_activity(route.ike_id, now)
        if self.deferred and spi in self.deferred:
            self._activate(spi, self.deferred.pop(spi))
        try:
            if route.in_match(inner):
                return inner
        except MalformedMessage:
            self.drops["inner_malformed"] += 1
            return None
        self.drops["selector_mismatch"] += 1
        self._selector_drop(route, spi, inner)
        return None

    def _selector_drop(self, route: ChildRoute, spi: int, inner: bytes) -> None:
        """Log the 1st, 2nd, 4th, 8th... mismatch of a child (bounded cost
        under a flood; the counter has them all)."""
        route.selector_drops += 1
        n = route.selector_drops
        if n & (n - 1):
            return
        version, src, dst, proto, sport, dport = five_tuple(inner)
        addr = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        log.warning("child SA %s %08x_i: dropped a decrypted packet outside its selectors "
                    "(%s -> %s protocol %d ports %d/%d; %d so far, RFC 4301 §5.2)",
                    route.name, spi, addr(src), addr(dst),
                    proto, sport, dport, n)

    def handle_inner(self, packet: bytes) -> tuple[bytes, Address] | None:
        """Encrypt one inner packet for the child SA whose selectors hold it
        (addresses, protocol and ports: RFC 4301 §5.1); a packet outside every
        child's selectors is dropped (``no_child``)."""
        try:
            found = self.routes.lookup_child(packet)
        except MalformedMessage:
            self.drops["inner_malformed"] += 1
            return None
        route = self.by_spi.get(found[0]) if found is not None else None
        if route is None:
            self.drops["no_child"] += 1
            return None
        try:
            return route.outbound.protect(packet), route.remote
        except SequenceExhausted:
            self.drops["esp_seq_exhausted"] += 1
            return None
        except MalformedMessage:
            self.drops["inner_malformed"] += 1
            return None

    # -- ESP in bursts -------------------------------------------------------------

    def handle_esp_batch(self, items: Sequence[tuple[bytes, int, Address]],
                         now: float) -> list[bytes]:
        """``handle_esp`` over a burst of ESP packets ``(payload, spi, remote)``:
        the inner packets that pass, in arrival order, with the drops, replay
        windows, counters, DPD liveness, deferred activations and selector
        checks exactly as ``handle_esp`` called on each item in order.

        The packets of one SPI go through one ``InboundSA.open_batch`` (one
        compiled call), in their order; SAs share no state, so opening SA by
        SA is the same as opening packet by packet. What follows is in
        arrival order: liveness once per IKE SA (one ``now``), a deferred
        child activated by its first authentic packet, the selector check
        per packet."""
        n = len(items)
        if not n:
            return []
        spi = items[0][1]
        if all(item[1] == spi for item in items):
            return self._esp_burst_one_spi(spi, [item[0] for item in items], now)
        by_spi = self.by_spi
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            group = groups.get(item[1])
            if group is None:
                groups[item[1]] = [i]
            else:
                group.append(i)
        results: list[bytes | InboundRefusal | None] = [None] * n
        for spi, idx in groups.items():
            route = by_spi.get(spi)
            if route is None:
                self.drops["esp_unknown_spi"] += len(idx)
                continue
            opened = route.inbound.open_batch([items[i][0] for i in idx])
            for i, result in zip(idx, opened, strict=True):
                results[i] = result
        out: list[bytes] = []
        noted: set[int] = set()
        deferred = self.deferred
        refused: list[InboundRefusal] = []
        inner_malformed = 0
        for item, inner in zip(items, results, strict=True):
            if inner is None:                       # unknown SPI, counted above
                continue
            if not isinstance(inner, bytes):
                refused.append(inner)
                continue
            spi = item[1]
            route = by_spi[spi]
            # Authentic: the peer is alive and has this SA, whatever it carries.
            if route.ike_id not in noted:
                noted.add(route.ike_id)
                self.engine.note_activity(route.ike_id, now)
            if deferred and spi in deferred:
                self._activate(spi, deferred.pop(spi))
            try:
                if route.in_match(inner):
                    out.append(inner)
                    continue
            except MalformedMessage:
                inner_malformed += 1
                continue
            self.drops["selector_mismatch"] += 1
            self._selector_drop(route, spi, inner)
        self._count_refused(refused, inner_malformed)
        return out

    def _esp_burst_one_spi(self, spi: int, packets: list[bytes], now: float) -> list[bytes]:
        """``handle_esp_batch`` when every packet names the same SPI (the usual
        burst): one child, so liveness and a deferred activation happen at
        most once and may come before the selector checks."""
        route = self.by_spi.get(spi)
        if route is None:
            self.drops["esp_unknown_spi"] += len(packets)
            return []
        results = route.inbound.open_batch(packets)
        inners: list[bytes] = [x for x in results if x.__class__ is bytes]
        if len(inners) != len(results):
            self._count_refused([x for x in results if x.__class__ is not bytes], 0)
        if not inners:
            return []
        self.engine.note_activity(route.ike_id, now)
        if self.deferred and spi in self.deferred:
            self._activate(spi, self.deferred.pop(spi))
        try:
            if all(map(route.in_match, inners)):
                return inners
        except MalformedMessage:
            pass
        out: list[bytes] = []
        inner_malformed = 0
        for inner in inners:
            try:
                if route.in_match(inner):
                    out.append(inner)
                    continue
            except MalformedMessage:
                inner_malformed += 1
                continue
            self.drops["selector_mismatch"] += 1
            self._selector_drop(route, spi, inner)
        if inner_malformed:
            self.drops["inner_malformed"] += inner_malformed
        return out

    def _count_refused(self, refused: Sequence[object], inner_malformed: int) -> None:
        """The drops of ``handle_esp``'s refusals, counted as there."""
        replay = sum(1 for x in refused if isinstance(x, ReplayError))
        integrity = sum(1 for x in refused if isinstance(x, IntegrityError))
        for name, count in (("esp_replay", replay), ("esp_integrity", integrity),
                            ("esp_malformed", len(refused) - replay - integrity),
                            ("inner_malformed", inner_malformed)):
            if count:
                self.drops[name] += count

    def handle_inner_batch(self, packets: Sequence[bytes]) -> list[tuple[bytes, Address]]:
        """``handle_inner`` over a burst of inner packets: the ESP packets and
        where they go, in arrival order (dropped packets leave no gap), with
        the same sequence numbers, IVs, counters, rekey events and drops as
        ``handle_inner`` called on each packet in order.

        The child of each packet is looked up as there; then each child seals
        its packets, in their order, with one ``OutboundSA.seal_batch`` (one
        compiled call per run between the SA's checkpoints); SAs share no
        state, so sealing child by child is the same as packet by packet."""
        n = len(packets)
        self.sealed_bytes = 0
        if not n:
            return []
        lookup, by_spi = self.routes.lookup_child, self.by_spi
        try:
            found = [lookup(packet) for packet in packets]
        except MalformedMessage:
            found = [self._lookup_or_none(packet) for packet in packets]
        first = found[0]
        if first is not None and found.count(first) == n:   # one child: the usual burst
            route = by_spi.get(first[0])
            if route is not None:
                remote = route.remote
                sealed = route.outbound.seal_batch(packets)
                out = [(esp, remote) for esp in sealed
                       if esp.__class__ is bytes]
                if len(out) != n:
                    self._count_unsealed([x for x in sealed if x.__class__ is not bytes])
                    self.sealed_bytes = sum(len(p) for p, x in zip(packets, sealed, strict=True)
                                            if x.__class__ is bytes)
                else:
                    self.sealed_bytes = sum(len(p) for p in packets)
                return out
        chosen: list[ChildRoute | None] = [None] * n
        groups: dict[int, list[int]] = {}
        no_child = malformed = 0
        for i, f in enumerate(found):
            if f is _MALFORMED:
                malformed += 1
                continue
            route = by_spi.get(f[0]) if f is not None else None
            if route is None:
                no_child += 1
                continue
            chosen[i] = route
            group = groups.get(id(route))
            if group is None:
                groups[id(route)] = [i]
            else:
                group.append(i)
        results: list[bytes | OutboundRefusal | None] = [None] * n
        for idx in groups.values():
            route = chosen[idx[0]]
            if route is None:   # unreachable: a group holds found packets only
                continue
            batch = route.outbound.seal_batch([packets[i] for i in idx])
            for i, result in zip(idx, batch, strict=True):
                results[i] = result
        out = []
        unsealed: list[OutboundRefusal] = []
        n_bytes = 0
        for route, esp, packet in zip(chosen, results, packets, strict=True):
            if route is None or esp is None:
                continue
            if isinstance(esp, bytes):
                out.append((esp, route.remote))
                n_bytes += len(packet)
            else:
                unsealed.append(esp)
        self.sealed_bytes = n_bytes
        for name, count in (("no_child", no_child), ("inner_malformed", malformed)):
            if count:
                self.drops[name] += count
        self._count_unsealed(unsealed)
        return out

    def _lookup_or_none(self, packet: bytes) -> tuple[int, int] | None:
        """``lookup_child``, with ``_MALFORMED`` for a packet it refuses."""
        try:
            return self.routes.lookup_child(packet)
        except MalformedMessage:
            return _MALFORMED

    def _count_unsealed(self, refused: Sequence[object]) -> None:
        """The drops of ``handle_inner``'s refused packets, counted as there."""
        exhausted = sum(1 for x in refused if isinstance(x, SequenceExhausted))
        if exhausted:
            self.drops["esp_seq_exhausted"] += exhausted
        if len(refused) > exhausted:
            self.drops["inner_malformed"] += len(refused) - exhausted

    # -- seeing it ----------------------------------------------------------------

    def stats(self) -> MemberStats:
        """This member's figures (common/cluster/stats.py); the shell adds its
        own (refusals, sync, replicas) and bounds them for the heartbeat."""
        c = self.counters
        pools = self.engine.ctx.pools
        return MemberStats(
            ike_sas=len(self.engine.established()),
            half_open_ike_sas=self.engine.half_open_count(),
            child_sas=len(self.by_spi),
            esp=EspTraffic(c["esp_in"], c["esp_in_bytes"], c["esp_out"], c["esp_out_bytes"]),
            counters={k: v for k, v in c.items() if k not in ESP_COUNTERS},
            drops={**self.drops, **{f"ike_{k}": v for k, v in self.engine.drops.items()}},
            pools={name: len(p.leased) for name, p in pools.pools.items()}
            if pools is not None else {},
            connections=connection_counts((sa.name for sa in self.engine.established()),
                                          (route.name for route in self.by_spi.values())))

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Every IKE SA and child SA of this member (``ipsec-cluster sas``);
        with ``now``, also ages and rekey timers in seconds."""
        from common.ike.policy import format_identity
        from common.ike.proposals import format_esp_suite, format_ike_suite

        ike_sas = []
        for sa in self.engine.by_id.values():
            children = []
            for c in sa.children.values():
                where = self.placed.get(c.spi_in, self.member_id)
                children.append({
                    "name": c.name, "spi_in": f"{c.spi_in:08x}", "spi_out": f"{c.spi_out:08x}",
                    "algorithms": format_esp_suite(c.suite), "state": c.state.name,
                    "member": where, **_times(now, c.installed_at, c.rekey_at),
                    "local_ts": [str(t) for t in c.local_ts],
                    "remote_ts": [str(t) for t in c.remote_ts]})
            ike_sas.append({
                "id": sa.ike_id, "name": sa.name, "state": sa.state.name,
                "initiator": sa.initiator, "spi_i": sa.spi_i.hex(), "spi_r": sa.spi_r.hex(),
                "remote": f"{sa.remote[0]}:{sa.remote[1]}",
                "algorithms": format_ike_suite(sa.suite) if sa.suite else "",
                "remote_id": format_identity(*sa.peer_id) if sa.peer_id else "",
                "virtual_ips": [str(lease.address) for lease in sa.leases],
                "message_ids": {"send_next": sa.mids.send_next, "recv_next": sa.mids.recv_next},
                "children": children, "counters": dict(sa.counters),
                "spi": (sa.spi_i if sa.initiator else sa.spi_r).hex(), "member": self.member_id,
                **_times(now, sa.established_at, sa.rekey_at)})
        esp = []
        for spi, r in self.by_spi.items():
            esp.append({
                "name": r.name, "ike_id": r.ike_id, "spi_in": f"{spi:08x}",
                "member": self.member_id,
                "spi_out": f"{r.outbound.spi:08x}", "transform": r.outbound.transform,
                "packets_in": r.inbound.packets, "bytes_in": r.inbound.octets,
                "packets_out": r.outbound.packets, "bytes_out": r.outbound.octets,
                "local_ts": [str(t) for t in r.local_ts],
                "remote_ts": [str(t) for t in r.remote_ts]})
        pools = self.engine.ctx.pools
        return {"ike_sas": ike_sas, "child_sas": esp,
                "pools": pools.status() if pools is not None else []}

    def remote_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for conn in self.config.connections.values():
            for ch in conn.children.values():
                nets += ch.remote_nets
        return nets


def _times(now: float | None, since: float | None, rekey_at: float | None) -> dict[str, Any]:
    if now is None:
        return {}
    return {"age_s": None if since is None else round(now - since, 1),
            "rekey_in_s": None if rekey_at is None else round(rekey_at - now, 1)}


# -- the control API's member side (docs/operations.md "Control API") ---------------


class ControlError(Exception):
    """A control request this member refuses: one line for the operator."""


def _ike_matches(sa: Any, key: str) -> bool:
    """An IKE SA named by its id, our SPI (hex) or its connection's name."""
    ours = sa.spi_i if sa.initiator else sa.spi_r
    return key in (str(sa.ike_id), ours.hex(), sa.name)


def _child_matches(child: Any, key: str) -> bool:
    return key in (f"{child.spi_in:08x}", child.name)


def control(member: Member, req: dict[str, Any], now: float) -> dict[str, Any]:
    """One control request acted on by this member's engine; the answer's
    ``ok`` says whether it did anything (a cluster asks every member and
    merges). Unknown IDs are not an error here: another member may own them."""
    cmd = req.get("cmd")
    try:
        if cmd == "list-sas":
            return {"ok": True, **member.snapshot(now)}
        if cmd == "initiate":
            return {"ok": True, "ike_ids": _initiate(member, req, now)}
        if cmd == "terminate":
            return {"ok": True, "done": _terminate(member, req, now)}
        if cmd == "rekey":
            return {"ok": True, "done": _rekey(member, req, now)}
        if cmd == "start":
            return {"ok": True, "ike_ids": start_configured(member, now)}
        if cmd == "shutdown":
            return {"ok": True, "done": delete_all(member, now)}
        if cmd == "stats":
            return {"ok": True, "counters": dict(member.counters), "drops": dict(member.drops),
                    "ike_drops": dict(member.engine.drops),
                    "ike_sas": len(member.engine.established()),
                    "child_sas": len(member.by_spi)}
    except (ControlError, LocalProtocolError) as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": False, "error": f"unknown command {str(cmd)[:40]!r}"}


def _initiate(member: Member, req: dict[str, Any], now: float) -> list[int]:
    ike, child = req.get("ike"), req.get("child")
    if isinstance(child, str):
        # a child of an established IKE SA of its connection, else a new IKE SA
        for conn in member.config.connections.values():
            if child in conn.children:
                for sa in member.engine.established():
                    if sa.name == conn.name:
                        member.engine.create_child(sa.ike_id, child, now)
                        return [sa.ike_id]
                if req.get("existing"):   # only on an IKE SA we own
                    return []
                return [_initiate_conn(member, conn.name, [child], now)]
        raise ControlError(f"no child named {child!r} in the config")
    if not isinstance(ike, str):
        raise ControlError("initiate: expected \"ike\" or \"child\" (a name)")
    return [_initiate_conn(member, ike, None, now)]


def _initiate_conn(member: Member, name: str, children: list[str] | None, now: float) -> int:
    conn = member.config.connections.get(name)
    if conn is None:
        raise ControlError(f"no connection named {name!r} in the config")
    if not conn.remote_addrs:
        raise ControlError(f"connection {name!r} has no remote_addrs to initiate to")
    if children is None:
        children = [n for n, ch in conn.children.items() if ch.start_action == "start"] \
            or list(conn.children)
    return member.engine.initiate(name, (str(conn.remote_addrs[0]), conn.remote_port), now,
                                  children)


def _terminate(member: Member, req: dict[str, Any], now: float) -> int:
    ike, child = req.get("ike"), req.get("child")
    done = 0
    if isinstance(ike, str):
        for sa in list(member.engine.by_id.values()):
            if _ike_matches(sa, ike) and not sa.terminal:
                member.engine.delete_ike(sa.ike_id, now)
                done += 1
        return done
    if not isinstance(child, str):
        raise ControlError("terminate: expected \"ike\" or \"child\" (a name or an ID)")
    for sa in member.engine.established():
        for c in list(sa.children.values()):
            if _child_matches(c, child):
                member.engine.delete_child(sa.ike_id, c.spi_in, now)
                done += 1
    return done


def _rekey(member: Member, req: dict[str, Any], now: float) -> int:
    ike, child = req.get("ike"), req.get("child")
    done = 0
    for sa in member.engine.established():
        if isinstance(ike, str) and _ike_matches(sa, ike):
            member.engine.rekey_ike(sa.ike_id, now)
            done += 1
        elif isinstance(child, str):
            for c in list(sa.children.values()):
                if _child_matches(c, child):
                    member.engine.rekey_child(sa.ike_id, c.spi_in, now)
                    done += 1
    if not isinstance(ike, str) and not isinstance(child, str):
        raise ControlError("rekey: expected \"ike\" or \"child\" (an ID)")
    return done


def delete_all(member: Member, now: float) -> int:
    """A clean stop: an INFORMATIONAL Delete for every IKE SA (RFC 7296 §1.4.1),
    so that peers learn it now rather than by DPD."""
    done = 0
    for sa in list(member.engine.by_id.values()):
        if not sa.terminal:
            member.engine.delete_ike(sa.ike_id, now)
            done += 1
    member._events()
    return done


def start_configured(member: Member, now: float) -> list[int]:
    """``run``: the connections with a ``start_action = "start"`` child."""
    ids = []
    for conn in member.config.connections.values():
        if conn.remote_addrs and any(ch.start_action == "start"
                                     for ch in conn.children.values()):
            ids.append(_initiate_conn(member, conn.name, None, now))
    return ids


def reload(member: Member, new: Config, now: float) -> dict[str, list[str]]:
    """Take ``new``'s connections: added ones added, changed ones replaced and
    removed ones removed (their IKE SAs deleted with the peer), unchanged ones
    and their SAs untouched. The cluster section is not reloaded."""
    old = member.config.connections
    added = sorted(set(new.connections) - set(old))
    removed = sorted(set(old) - set(new.connections))
    changed = sorted(n for n in set(old) & set(new.connections) if old[n] != new.connections[n])
    for sa in list(member.engine.by_id.values()):
        if sa.name in removed or sa.name in changed:
            if not sa.terminal:
                member.engine.delete_ike(sa.ike_id, now)
    policies = {p.name: p for p in policies_from_config(new.connections)}
    for name in set(policies) & set(old):
        if name not in changed:   # SAs of unchanged connections keep their policy object
            policies[name] = member.engine.policies[name]
    member.engine.policies = policies
    member.config = new
    member._events()
    for name in added + changed:
        conn = new.connections[name]
        if conn.remote_addrs and any(ch.start_action == "start"
                                     for ch in conn.children.values()):
            _initiate_conn(member, name, None, now)
    return {"added": added, "changed": changed, "removed": removed}
