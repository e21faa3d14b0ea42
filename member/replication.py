"""State sync between members: what makes a member's death invisible to peers
(RFC 6027 §3.2-3.7).

Rules of this file:
- IKE: after every change of an established IKE SA its owner sends the whole
  new state (common/cluster/sync.py ``IkeSaState``) to the SA's backup and HOLDS the
  datagrams that change produced until the backup acknowledged it. A peer can
  therefore never see a message the backup does not know about (§3.6 closed by
  design). Without a live backup the owner goes on unreplicated, counts it, and
  marks the SA stale (the new owner then resynchronises message IDs with
  RFC 6311). Half-open SAs are never replicated (§4: no sync storms).
- ESP: the carrier of a child SA sends its keys once (``ChildState``) and its
  outbound sequence number and replay window every ``seq_sync_packets``
  packets or ``seq_sync_interval`` seconds (§3.4, §3.5). A new carrier skips
  ahead by twice ``seq_sync_packets``, so no sequence number is sent twice,
  and encrypts with its own IV sender id (§3.7.1).
- Streams are numbered per (source, destination); a gap makes the receiver
  ask for a resync of everything the sender owns that it backs up.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.cluster.segments import SegmentTable, TableMode
from common.cluster.snapshot import restore, snapshot
from common.cluster.spi import segment_of_esp_spi, segment_of_ike_spi
from common.cluster.sync import (
    Ack,
    BulkDone,
    ChildGone,
    ChildState,
    EspCounter,
    EspCounters,
    IkeSaGone,
    IkeSaState,
    RekeyChild,
    Resync,
    SyncMessage,
    decode_sync,
    encode_sync,
)
from common.cluster.wire import Channel, ChildPush, StreamSeq, Sync
from common.errors import LocalProtocolError, MalformedMessage
from common.esp.replay import ReplayState
from common.esp.transforms import MAX_SEQ_32, MIN_SPI
from common.ike.constants import DhId, EncrId, IdType, IntegId, PrfId
from common.ike.context import ChildState as ChildSaState
from common.ike.context import IkeState, Outgoing
from common.ike.proposals import (
    _DH,
    _IKE_ENCR,
    _IKE_INTEG,
    _PRF,
    AEAD_ENCR,
    ESP_TRANSFORMS,
    IkeSuite,
)
from common.ike.sa import IkeSa
from member.refusals import Refusals
from member.worker import child_refusal, child_state_refusal, selectors_refusal

if TYPE_CHECKING:
    from common.ike.policy import IkePolicy
    from member.worker import ChildRoute, Member

log = logging.getLogger("ipsec_cluster.sync")

#: how long a held IKE datagram waits for the backup's ACK before it leaves anyway
ACK_TIMEOUT_S = 0.25
#: bulk messages kept while their sender is not (yet) the owner in our table:
#: the bulk channel is its own connection and may overtake the TABLE update
#: that made the sender the owner (re-checked at the next table)
MAX_PARKED = 100_000
#: a replica's timers (rekey_in) are at most this far away
MAX_REKEY_IN_S = 10 * 365 * 86400.0
#: children of one replicated IKE SA
MAX_CHILDREN = 4096
MAX_MID = (1 << 32) - 1

#: what our IKE engine can run (common/ike/proposals.py): a replica naming
#: anything else could not be restored
_ENCR_BITS = frozenset((int(t.id), t.key_length or 0) for t in _IKE_ENCR.values())
_INTEG_IDS = frozenset(int(t.id) for t in _IKE_INTEG.values())
_PRF_IDS = frozenset(int(t.id) for t in _PRF.values())
_DH_IDS = frozenset(int(t.id) for t in _DH.values())
_IKE_STATES = frozenset(s.value for s in IkeState)
_CHILD_STATES = frozenset(s.value for s in ChildSaState)
_ID_TYPES = frozenset(int(t) for t in IdType) | {0}
_AEAD_IDS = frozenset(int(e) for e in AEAD_ENCR)


def _timer_refusal(rekey_in: float) -> bool:
    return not math.isfinite(rekey_in) or not (rekey_in == -1.0 or 0.0 <= rekey_in
                                               <= MAX_REKEY_IN_S)


def ike_state_refusal(st: IkeSaState, policies: dict[str, IkePolicy],
                      ports: tuple[int, int]) -> str | None:
    """Why a replicated IKE SA is refused, or None: every field within what
    ``restore`` and ``IkeEngine.adopt`` can take (a known policy, a suite we run, keys of
    its lengths, message IDs < 2^32, finite timers, well-formed children)."""
    if st.spi_i == bytes(8) or st.spi_r == bytes(8):
        return "ike_bad_spi"
    if st.state not in _IKE_STATES or st.state == IkeState.HALF_OPEN.value:
        return "ike_bad_state"
    if st.policy not in policies:
        return "ike_unknown_policy"
    if len(st.remote_ip) not in (4, 16) or not 1 <= st.remote_port <= 0xFFFF \
            or st.local_port not in ports:
        return "ike_bad_address"
    aead = st.encr in _AEAD_IDS
    if (st.encr, st.key_bits) not in _ENCR_BITS or st.prf not in _PRF_IDS \
            or st.dh not in _DH_IDS \
            or (st.integ != IntegId.NONE if aead else st.integ not in _INTEG_IDS):
        return "ike_unknown_suite"
    suite = IkeSuite(EncrId(st.encr), st.key_bits, PrfId(st.prf), IntegId(st.integ),
                     DhId(st.dh))
    p, a, e = suite.prf_len, suite.sk_a_len, suite.sk_e_len
    if tuple(map(len, (st.sk_d, st.sk_ai, st.sk_ar, st.sk_ei, st.sk_er, st.sk_pi,
                       st.sk_pr))) != (p, a, a, e, e, p, p):
        return "ike_bad_key_length"
    if st.peer_id_type not in _ID_TYPES:
        return "ike_bad_identity"
    if not (0 <= st.send_next <= MAX_MID and 0 <= st.recv_next <= MAX_MID
            and -1 <= st.response_id <= MAX_MID):
        return "ike_bad_message_id"
    if _timer_refusal(st.rekey_in):
        return "ike_bad_timer"
    if len(st.children) > MAX_CHILDREN:
        return "ike_too_many_children"
    for c in st.children:
        if c.transform not in ESP_TRANSFORMS or c.dh not in _DH_IDS | {0} \
                or c.state not in _CHILD_STATES or _timer_refusal(c.rekey_in):
            return "ike_bad_child"
        if not (MIN_SPI <= c.spi_in <= MAX_SEQ_32 and MIN_SPI <= c.spi_out <= MAX_SEQ_32) \
                or selectors_refusal(c.local_ts) or selectors_refusal(c.remote_ts):
            return "ike_bad_child"
    return None


@dataclass(slots=True)
class Held:
    since: float
    datagrams: list[Outgoing]
    ike_key: bytes


def our_spi(sa: IkeSa) -> bytes:
    return sa.spi_i if sa.initiator else sa.spi_r


class Replicator:
    def __init__(self, member_id: int, member: Member, send: Callable[[Sync], None],
                 release: Callable[[list[Outgoing]], None] | None = None,
                 *, send_bulk: Callable[[Sync], None] | None = None,
                 seq_sync_packets: int, seq_sync_interval: float, replay_policy: str,
                 drop_rate: float = 0.0, refusals: Refusals | None = None) -> None:
        self.member_id = member_id
        self.member = member
        self._send = send
        self._release = release
        self._send_bulk = send_bulk
        self.bulk_tx: dict[int, StreamSeq] = {}
        self.seq_sync_packets = seq_sync_packets
        self.seq_sync_interval = seq_sync_interval
        self.replay_policy = replay_policy
        self.drop_rate = drop_rate  # a test hook: lose this share of outgoing sync messages
        self.table: SegmentTable | None = None
        self.tx: dict[int, StreamSeq] = {}
        self.rx: dict[int, StreamSeq] = {}
        self.held: dict[tuple[int, int], Held] = {}
        self.ike_replicas: dict[bytes, IkeSaState] = {}
        self.child_replicas: dict[int, ChildState] = {}
        #: our SPI -> backup we last replicated it to (to notice backup changes)
        self.replicated_to: dict[bytes, int] = {}
        self.child_backup: dict[int, int] = {}
        self.stale: set[bytes] = set()
        self.packets_since_sync = 0
        self.last_esp_sync = 0.0
        #: inbound SPI -> (outbound next seq, inbound highest) last sent to its backup
        self.esp_sent: dict[int, tuple[int, int]] = {}
        self.counters: Counter[str] = Counter()
        #: refused sync input and failed takeovers, by reason (the process's own)
        self.refusals = refusals if refusals is not None else Refusals(
            log, name=f"member {member_id}")
        #: bulk messages from a member not (yet) the owner in our table
        self.parked: list[tuple[Sync, SyncMessage]] = []

    # -- table ------------------------------------------------------------------------

    def backup_of_segment(self, segment: int) -> int | None:
        t = self.table
        if t is None:
            return None
        b = t.backup(segment)
        return None if b is None or b == self.member_id else b

    def extra_standbys(self) -> list[int]:
        """Hot-standby: every standby keeps replicas, not only the first."""
        t = self.table
        if t is None or t.mode is not TableMode.HOT_STANDBY:
            return []
        return [m for m in t.members if m != self.member_id]

    def ike_backup(self, sa: IkeSa) -> int | None:
        t = self.table
        if t is None:
            return None
        return self.backup_of_segment(segment_of_ike_spi(int.from_bytes(our_spi(sa), "big"),
                                                         t.segment_bits))

    def child_backup_of(self, spi_in: int) -> int | None:
        t = self.table
        if t is None:
            return None
        return self.backup_of_segment(segment_of_esp_spi(spi_in, t.segment_bits))

    # -- sending ------------------------------------------------------------------------

    def send(self, dst: int, msg: SyncMessage) -> int:
        seq = self.tx.setdefault(dst, StreamSeq()).next()
        self.counters["sync_out"] += 1
        if self.drop_rate and random.random() < self.drop_rate:
            self.counters["sync_dropped_on_purpose"] += 1
            return seq
        self._send(Sync(dst, self.member_id, seq, encode_sync(msg)))
        return seq

    def send_bulk(self, dst: int, msg: SyncMessage) -> None:
        """On the bulk channel (its own connection and sequence numbers)."""
        if self._send_bulk is None:
            self.send(dst, msg)
            return
        seq = self.bulk_tx.setdefault(dst, StreamSeq()).next()
        self.counters["bulk_out"] += 1
        self._send_bulk(Sync(dst, self.member_id, seq, encode_sync(msg)))

    # -- IKE: replicate, then release ------------------------------------------------------

    def outgoing(self, outs: list[Outgoing], touched: set[int], now: float) -> list[Outgoing]:
        """Replicate every touched established IKE SA; return the datagrams that
        may leave now, keep the others until their ACK arrives."""
        engine = self.member.engine
        by_sa: dict[int, list[Outgoing]] = {}
        for o in outs:
            by_sa.setdefault(o.ike_id, []).append(o)
        ready: list[Outgoing] = list(by_sa.pop(0, []))
        for ike_id in touched | set(by_sa):
            sa = engine.by_id.get(ike_id)
            datagrams = by_sa.get(ike_id, [])
            if sa is None:
                ready += datagrams
                continue
            key = our_spi(sa)
            if sa.terminal:
                backup = self.replicated_to.pop(key, None)
                if backup is not None:
                    self.send(backup, IkeSaGone(sa.spi_i, sa.spi_r))
                ready += datagrams
                continue
            if sa.state is IkeState.HALF_OPEN or sa.keys is None:
                ready += datagrams   # RFC 6027 §4: half-open SAs are not replicated
                continue
            backup = self.ike_backup(sa)
            if backup is None:
                self.counters["ike_unreplicated"] += 1
                self.stale.add(key)
                ready += datagrams
                continue
            state = snapshot(sa, now, stale=key in self.stale)
            seq = self.send(backup, state)
            for extra in self.extra_standbys():
                if extra != backup:
                    self.send(extra, state)
            self.replicated_to[key] = backup
            self.stale.discard(key)
            if datagrams:
                self.held[(backup, seq)] = Held(now, datagrams, key)
        return ready

    def release_expired(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        for k, h in list(self.held.items()):
            if now - h.since >= ACK_TIMEOUT_S:
                del self.held[k]
                self.counters["ack_timeouts"] += 1
                self.stale.add(h.ike_key)
                out += h.datagrams
        return out

    # -- ESP -------------------------------------------------------------------------------

    def child_installed(self, spi_in: int, route: ChildRoute, ike_spi: bytes) -> None:
        backup = self.child_backup_of(spi_in)
        self.child_backup[spi_in] = backup or 0
        if backup is not None:
            self.send(backup, self._child_state(spi_in, route, ike_spi))

    def child_removed(self, spi_in: int) -> None:
        self.esp_sent.pop(spi_in, None)
        backup = self.child_backup.pop(spi_in, 0)
        if backup:
            self.send(backup, ChildGone(spi_in))

    def _child_state(self, spi_in: int, r: ChildRoute, ike_spi: bytes) -> ChildState:
        w = r.inbound.export_window()
        return ChildState(spi_in, r.outbound.spi, r.name, r.outbound.transform, r.outbound.esn,
                          r.keymat_in, r.keymat_out, r.local_ts, r.remote_ts,
                          ipaddress.ip_address(r.remote[0]).packed, r.remote[1], ike_spi,
                          r.outbound.next_seq, w.size, w.highest, w.bitmap)

    def esp_tick(self, now: float, packets: int) -> None:
        """Send ESP counters when enough packets or time have passed: those
        of the children whose counters moved since they were last sent (an
        idle child costs nothing; a lost message shows as a stream gap and
        brings a resync of everything)."""
        self.packets_since_sync += packets
        if self.packets_since_sync < self.seq_sync_packets and \
                now - self.last_esp_sync < self.seq_sync_interval:
            return
        self.packets_since_sync = 0
        self.last_esp_sync = now
        per_backup: dict[int, list[EspCounter]] = {}
        for spi_in, r in self.member.by_spi.items():
            backup = self.child_backup.get(spi_in)
            if not backup:
                continue
            w = r.inbound.window
            mark = (r.outbound.next_seq, w.highest)
            if self.esp_sent.get(spi_in) == mark:
                continue
            self.esp_sent[spi_in] = mark
            per_backup.setdefault(backup, []).append(EspCounter(
                spi_in, r.outbound.next_seq, w.highest, w.export_state().bitmap))
        for backup, counters in per_backup.items():
            for i in range(0, len(counters), 1000):
                self.send(backup, EspCounters(tuple(counters[i:i + 1000])))

    # -- receiving ---------------------------------------------------------------------------

    def on_sync(self, env: Sync, now: float, channel: Channel = Channel.LIVE) -> None:
        """One synch message from the dispatcher, off our ``channel`` (LIVE
        or BULK: each has its own stream of sequence numbers)."""
        stream = env.src if channel is Channel.LIVE else -env.src
        lost = self.rx.setdefault(stream, StreamSeq()).check(env.seq)
        if lost < 0:
            # Numbers went back: the sender is a new incarnation (it was
            # restarted). Follow its new stream so its gaps are seen too.
            self.rx[stream] = StreamSeq()
            lost = self.rx[stream].check(env.seq)
        try:
            msg = decode_sync(env.payload)
        except MalformedMessage as exc:
            self.refusals.refuse("sync_malformed", f"member {env.src}", exc)
            return
        if lost > 0:
            # A gap: ask the sender for everything again (whole-state messages
            # make that enough to repair any loss).
            self.counters["sync_gaps"] += lost
            log.warning("member %d: %d sync messages from member %d lost; asking for a resync",
                        self.member_id, lost, env.src)
            self.send(env.src, Resync())
        self.counters["sync_in"] += 1
        self._handle(env, msg, now, channel)

    def _owner(self, segment: int) -> int | None:
        return self.table.owner(segment) if self.table is not None else None

    def _sender_refusal(self, env: Sync, msg: SyncMessage) -> str | None:
        """RFC 6027 §3.2: only the owner of an SA's segment speaks for it (a
        replica from anyone else would be taken over as if it were real)."""
        t = self.table
        bits = t.segment_bits if t is not None else 0
        if isinstance(msg, IkeSaState):
            reason = ike_state_refusal(msg, self.member.engine.policies, self._ports())
            if reason is not None:
                return reason
            key = msg.spi_i if msg.initiator else msg.spi_r
            segments = [segment_of_ike_spi(int.from_bytes(key, "big"), bits)]
        elif isinstance(msg, IkeSaGone):
            segments = [segment_of_ike_spi(int.from_bytes(k, "big"), bits)
                        for k in (msg.spi_i, msg.spi_r)]
        elif isinstance(msg, ChildState):
            reason = child_state_refusal(msg)
            if reason is not None:
                return f"child_{reason}"
            segments = [segment_of_esp_spi(msg.spi_in, bits)]
        elif isinstance(msg, ChildGone):
            segments = [segment_of_esp_spi(msg.spi_in, bits)]
        elif isinstance(msg, RekeyChild):
            return None if len(msg.ike_spi) == 8 else "rekey_bad_ike_spi"
        else:
            return None   # ESP counters are checked one by one; ACK, RESYNC, BULK_DONE
        if t is None or all(self._owner(s) != env.src for s in segments):
            return "not_owner"
        return None

    def _ports(self) -> tuple[int, int]:
        c = self.member.config.cluster
        return (c.ike_port, c.natt_port)

    def _handle(self, env: Sync, msg: SyncMessage, now: float,
                channel: Channel = Channel.LIVE, *, parked: bool = False) -> None:
        reason = self._sender_refusal(env, msg)
        if reason == "not_owner" and channel is Channel.BULK and not parked \
                and len(self.parked) < MAX_PARKED:
            self.parked.append((env, msg))   # our TABLE may be on its way
            return
        if reason is not None:
            # Never stored, never ACKed: a forged replica must not hold a place
            # a takeover would use, nor release its sender's held datagrams.
            self.refusals.refuse(f"sync_{reason}", f"member {env.src}", type(msg).__name__)
            return
        if isinstance(msg, IkeSaState):
            key = msg.spi_i if msg.initiator else msg.spi_r
            self.ike_replicas[key] = msg
            if channel is Channel.LIVE:
                # Only live changes hold datagrams. A bulk message's sequence
                # number is of the bulk stream: acking it would release the
                # live message with that number before its backup has it.
                self.send(env.src, Ack(env.seq))
        elif isinstance(msg, IkeSaGone):
            self.ike_replicas.pop(msg.spi_i, None)
            self.ike_replicas.pop(msg.spi_r, None)
        elif isinstance(msg, ChildState):
            old = self.child_replicas.get(msg.spi_in)
            if old is not None:
                # A resync on the bulk channel can overtake newer live counters:
                # never move a sequence number or a window backwards.
                msg = _with_counters(msg, EspCounter(msg.spi_in, old.out_seq,
                                                     old.replay_highest, old.replay_bitmap))
            self.child_replicas[msg.spi_in] = msg
        elif isinstance(msg, ChildGone):
            self.child_replicas.pop(msg.spi_in, None)
        elif isinstance(msg, EspCounters):
            self._esp_counters(env.src, msg)
        elif isinstance(msg, Ack):
            held = self.held.pop((env.src, msg.seq), None)
            if held is not None and self._release is not None:
                self._release(held.datagrams)
        elif isinstance(msg, Resync):
            self.resync(env.src, now)
        elif isinstance(msg, RekeyChild):
            self.rekey_child(msg.ike_spi, msg.spi_in, now)
        elif isinstance(msg, BulkDone):
            self.counters["bulk_received"] += msg.count   # (as its sender counted them)
            log.info("member %d: bulk transfer from member %d done (%d SAs)", self.member_id,
                     env.src, msg.count)

    def _esp_counters(self, src: int, msg: EspCounters) -> None:
        t = self.table
        bad = 0
        for c in msg.counters:
            old = self.child_replicas.get(c.spi_in)
            if old is None:
                continue
            new = _with_counters(old, c)
            if t is None or self._owner(segment_of_esp_spi(c.spi_in, t.segment_bits)) != src \
                    or child_state_refusal(new) is not None:
                bad += 1
                continue
            self.child_replicas[c.spi_in] = new
        if bad:
            self.refusals.refuse("sync_bad_counters", f"member {src}", f"{bad} counters")

    def rekey_child(self, ike_spi: bytes, spi_in: int, now: float) -> None:
        sa = self.member.engine.sas.get(ike_spi)
        if sa is None or sa.state is not IkeState.ESTABLISHED:
            return   # being rekeyed or deleted: its children get new keys anyway
        if spi_in in sa.children:
            try:
                self.member.engine.rekey_child(sa.ike_id, spi_in, now)
            except LocalProtocolError as exc:
                log.info("member %d: no rekey of %08x after the takeover: %s",
                         self.member_id, spi_in, exc)
                return
            self.counters["rekeys_after_failover"] += 1

    def resync(self, dst: int, now: float) -> int:
        """Send ``dst`` everything we own that it backs up (resync, bulk transfer)."""
        n = 0
        every = dst in self.extra_standbys()
        send_bulk, stale, replicated_to = self.send_bulk, self.stale, self.replicated_to
        for sa in list(self.member.engine.by_id.values()):
            if sa.terminal or sa.state is IkeState.HALF_OPEN or sa.keys is None:
                continue
            if every or self.ike_backup(sa) == dst:
                key = our_spi(sa)
                send_bulk(dst, snapshot(sa, now, stale=key in stale))
                replicated_to[key] = dst
                n += 1
        for spi_in, r in self.member.by_spi.items():
            if self.child_backup_of(spi_in) == dst:
                self.child_backup[spi_in] = dst
                self.send_bulk(dst, self._child_state(spi_in, r, self.member.ike_spi_of(spi_in)))
                n += 1
        self.send_bulk(dst, BulkDone(n))
        self.counters["bulk_sent"] += n
        return n

    # -- takeover ----------------------------------------------------------------------------

    def on_table(self, old: SegmentTable | None, new: SegmentTable, now: float) -> None:
        self.table = new
        if old is not None and not old.members:
            old = None   # the first real table: nothing to take over or give up
        mine = set(new.segments_of(self.member_id))
        before = set(old.segments_of(self.member_id)) if old is not None else set()
        gained, lost = mine - before, before - mine
        if lost:
            self._give_up(lost, new, now)
        if gained and old is not None:
            # Planned handover (autobalance): the old owner is alive and kept
            # syncing; a failure: it is gone.
            alive = set(new.members)
            planned = {s for s in gained if old.owner(s) in alive}
            self._take_over(gained, new, now, planned=planned)
        # Backups that changed get everything they now back up (bulk transfer).
        dsts: set[int] = set()
        for sa in self.member.engine.by_id.values():
            if sa.terminal or sa.keys is None or sa.state is IkeState.HALF_OPEN:
                continue
            b = self.ike_backup(sa)
            if b is not None and self.replicated_to.get(our_spi(sa)) != b:
                dsts.add(b)
        for spi_in in self.member.by_spi:
            b = self.child_backup_of(spi_in)
            if b is not None and self.child_backup.get(spi_in) != b:
                dsts.add(b)
        for dst in sorted(dsts):
            started = time.perf_counter()
            n = self.resync(dst, now)
            log.info("member %d: sent %d SAs to backup %d in %.3f s", self.member_id, n, dst,
                     time.perf_counter() - started)
        parked, self.parked = self.parked, []
        for env, msg in parked:
            self._handle(env, msg, now, Channel.BULK, parked=True)

    def _take_over(self, gained: set[int], table: SegmentTable, now: float, *,
                   planned: set[int] | None = None) -> None:
        bits = table.segment_bits
        engine = self.member.engine
        adopted = 0
        for key, st in list(self.ike_replicas.items()):
            if segment_of_ike_spi(int.from_bytes(key, "big"), bits) in gained:
                del self.ike_replicas[key]
                reason = ike_state_refusal(st, engine.policies, self._ports())
                if reason is not None:
                    self.refusals.refuse(f"takeover_{reason}", "replica", key.hex())
                    continue
                try:   # the barrier: one replica must not stop the takeover of the rest
                    sa = engine.adopt(restore(engine, st, now), now, mid_sync=st.stale,
                                      margin=16)
                except Exception as exc:
                    self.refusals.failed("takeover_ike", exc, "replica")
                    continue
                # the SA event log knows it from now on: its IKE_DOWN (and the
                # leases it frees) name its SPIs even after the SA is gone
                self.member.sa_log.remember(
                    sa.ike_id, sa.name, sa.spi_i, sa.spi_r, sa.remote[0], bool(sa.initiator),
                    tuple(str(lease.address) for lease in sa.leases))
                self.member.spis.mark_used_ike(key)
                adopted += 1
        children = 0
        planned = planned or set()
        for spi_in, cs in list(self.child_replicas.items()):
            segment = segment_of_esp_spi(spi_in, bits)
            if segment not in gained:
                continue
            # A planned move is not a failure: the old carrier synced until the
            # handover and accepted nothing after it, so the window continues
            # as synced (learn) and the child is not rekeyed; the outbound
            # sequence still skips ahead (packets since the last sync).
            handover = segment in planned
            del self.child_replicas[spi_in]
            try:   # the barrier, per replica
                reason = child_state_refusal(cs) or self.member.install_replica(
                    cs, self._skip(), self._replay(cs, learn=handover), now)
            except Exception as exc:
                self.refusals.failed("takeover_child", exc, "replica")
                continue
            if reason is not None:
                self.refusals.refuse(f"takeover_child_{reason}", "replica", f"{spi_in:#010x}")
                continue
            children += 1
            if self.replay_policy == "rekey" and not handover:
                self._ask_rekey(cs, now)
        self.counters["takeovers"] += 1
        self.counters["ike_sas_adopted"] += adopted
        self.counters["child_sas_adopted"] += children
        # A planned handover (autobalance) is routine: INFO; a failover: WARNING.
        log.log(logging.INFO if gained <= planned else logging.WARNING,
                "member %d took over %d segments: %d IKE SAs, %d child SAs",
                self.member_id, len(gained), adopted, children)

    def _give_up(self, lost: set[int], table: SegmentTable, now: float) -> None:
        """Segments moved to another member (autobalance): our live SAs there
        become replicas (we are usually the new backup), the new owner goes on."""
        bits = table.segment_bits
        engine = self.member.engine
        n_ike = n_child = 0
        for sa in list(engine.by_id.values()):
            key = our_spi(sa)
            if sa.terminal or segment_of_ike_spi(int.from_bytes(key, "big"), bits) not in lost:
                continue
            if sa.keys is not None and sa.state is not IkeState.HALF_OPEN:
                self.ike_replicas[key] = snapshot(sa, now, stale=key in self.stale)
            engine.forget(sa.spi_i, sa.spi_r)
            self.replicated_to.pop(key, None)
            n_ike += 1
        for spi_in in [s for s in self.member.by_spi if segment_of_esp_spi(s, bits) in lost]:
            r = self.member.by_spi[spi_in]
            self.child_replicas[spi_in] = self._child_state(spi_in, r, r.ike_spi)
            self.member.drop_route(spi_in)
            self.child_backup.pop(spi_in, None)
            n_child += 1
        log.info("member %d gave up %d segments: %d IKE SAs, %d child SAs now replicas",
                 self.member_id, len(lost), n_ike, n_child)

    def _skip(self) -> int:
        """How far a new carrier jumps ahead in the outbound sequence (§3.4):
        at most ``seq_sync_packets`` went out since the last sync, and that
        sync itself may have been lost with its sender."""
        return 2 * self.seq_sync_packets

    def _replay(self, cs: ChildState, *, learn: bool = False) -> ReplayState:
        """The inbound window after a takeover (§3.5, §4)."""
        if self.replay_policy == "strict" and not learn:
            # Accept only above the synced highest + margin: nothing the dead
            # carrier may have accepted can be replayed, at the cost of dropping
            # up to the margin of genuine packets.
            highest = min(cs.replay_highest + self._skip(), (1 << 64) - 1)
            return ReplayState(cs.replay_size, highest, (1 << cs.replay_size) - 1)
        # learn / rekey: continue from the synced window; packets the dead
        # carrier accepted after its last sync could be replayed once.
        return ReplayState(cs.replay_size, cs.replay_highest, cs.replay_bitmap)

    def _ask_rekey(self, cs: ChildState, now: float) -> None:
        t = self.table
        if t is None or len(cs.ike_spi) != 8:
            return
        owner = t.owner(segment_of_ike_spi(int.from_bytes(cs.ike_spi, "big"), t.segment_bits))
        if owner == self.member_id:
            self.rekey_child(cs.ike_spi, cs.spi_in, now)
        elif owner is not None:
            self.send(owner, RekeyChild(cs.ike_spi, cs.spi_in))

    def push_replica(self, push: ChildPush) -> None:
        """A child placed in a segment we back up: keep it as a replica.

        When the IKE SA owner carries the child itself, its ``ChildState``
        (sync) comes before this push (relay) on the same path: that one is
        kept, it may already carry counters. Either way the replica names the
        IKE SA (``ike_spi``), so that a new carrier can ask for a rekey."""
        reason = child_refusal(push.transform, push.keymat_in, push.keymat_out, push.spi_in,
                               push.spi_out, push.local_ts, push.remote_ts, push.remote_ip,
                               push.remote_port, push.ike_spi)
        if reason is not None:
            self.refusals.refuse(f"push_{reason}", "dispatcher", f"child {push.spi_in:#010x}")
            return
        old = self.child_replicas.get(push.spi_in)
        if old is not None and old.spi_out == push.spi_out:
            if not old.ike_spi and push.ike_spi:
                from dataclasses import replace

                self.child_replicas[push.spi_in] = replace(old, ike_spi=push.ike_spi)
            return
        self.child_replicas[push.spi_in] = ChildState(
            push.spi_in, push.spi_out, push.name, push.transform, push.esn, push.keymat_in,
            push.keymat_out, push.local_ts, push.remote_ts, push.remote_ip, push.remote_port,
            push.ike_spi, 1, self.member.replay_window, 0, 0)


def _with_counters(cs: ChildState, c: EspCounter) -> ChildState:
    from dataclasses import replace

    return replace(cs, out_seq=max(cs.out_seq, c.out_seq),
                   replay_highest=max(cs.replay_highest, c.replay_highest),
                   replay_bitmap=c.replay_bitmap if c.replay_highest >= cs.replay_highest
                   else cs.replay_bitmap)
