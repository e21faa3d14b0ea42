"""The IKE engine: every IKE SA of one gateway (or one cluster member), fed
with datagrams and the time, giving datagrams and events back (aioquic style).

Surface for the shells:
    receive_datagram(data, remote, local_port, now)
    datagrams_to_send() -> list[Outgoing]
    next_event() -> IkeEvent | None
    get_timer() -> float | None ;  handle_timer(now)
    initiate(...), create_child(...), rekey_child(...), rekey_ike(...),
    delete_child(...), delete_ike(...), dpd(...), mid_sync(...)

Hostile input: nothing a peer sends escapes ``receive_datagram`` or a later
``handle_timer``. Every error the peer can cause is a ``RemoteProtocolError``;
the engine catches that one base at these two entry points, counts it in
``drops`` by its ``drop_reason`` and goes on. Our own bugs
(``LocalProtocolError`` and anything else) are not caught here: the shells
hold that barrier.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter

from common.errors import LocalProtocolError, RemoteProtocolError
from common.ike.constants import IKE_HEADER_LEN, ExchangeType, HeaderFlag, IdType
from common.ike.context import Address, IkeContext, IkeOptions, IkeState, Outgoing, SpiSource
from common.ike.cookies import CookieJar, cookie_answer, packed_ip, peek_init
from common.ike.describe import describe
from common.ike.events import IkeEvent
from common.ike.exchanges.child_sa import ChildCreateTask, ChildRekeyTask
from common.ike.exchanges.dispatch import EXCHANGES
from common.ike.exchanges.ike_auth import IkeAuthTask
from common.ike.exchanges.ike_init import (
    ZERO_SPI,
    IkeInitTask,
    error_answer,
    handle_init_request,
)
from common.ike.exchanges.ike_rekey import IkeRekeyTask
from common.ike.exchanges.informational import (
    ChildDeleteTask,
    DpdTask,
    IkeDeleteTask,
    MidSyncTask,
)
from common.ike.limits import (
    DROP_NO_ADDITIONAL_SAS,
    DROP_RETRANSMIT_RATE,
    EngineLimits,
    LimitSettings,
)
from common.ike.message import (
    HEADER,
    IkeHeader,
    InvalidMajorVersion,
    decode_header,
    decode_message,
)
from common.ike.msgid import RequestVerdict
from common.ike.payloads import UnsupportedCriticalPayload
from common.ike.policy import IkePolicy
from common.ike.sa import IkeSa
from common.rand import RandomBytes

log = logging.getLogger("ipsec_cluster.ike")

#: States in which actions are taken: established, or on the way there (the
#: task then waits for IKE_AUTH). REKEYED and DELETING SAs take no new work.
_ACTION_STATES = frozenset({IkeState.INIT_SENT, IkeState.AUTH_SENT, IkeState.HALF_OPEN,
                            IkeState.ESTABLISHED})


Identities = tuple[tuple[IdType, bytes], tuple[IdType, bytes]]


def _identities(sa: IkeSa) -> Identities | None:
    if sa.policy is None or sa.peer_id is None:
        return None
    return sa.policy.local_id, sa.peer_id


class IkeEngine:
    def __init__(self, policies: list[IkePolicy], *, random: RandomBytes, spis: SpiSource,
                 options: IkeOptions | None = None,
                 limits: LimitSettings | None = None) -> None:
        self.policies = {p.name: p for p in policies}
        self.ctx: IkeContext[IkeSa] = IkeContext(random, spis, options or IkeOptions(),
                                                 EXCHANGES)
        self.cookies = CookieJar(random)
        #: flood bounds: half-open caps, per-source and retransmit rates
        self.limits = EngineLimits(limits)
        #: IKE SAs by the SPI we chose (spi_r as responder, spi_i as initiator)
        self.sas: dict[bytes, IkeSa] = {}
        self.by_id: dict[int, IkeSa] = {}
        #: half-open responder SAs by (peer SPI, peer address): IKE_SA_INIT retransmits
        self.half_open: dict[tuple[bytes, str], IkeSa] = {}
        self._half_open_keys: dict[int, tuple[bytes, str]] = {}
        #: timer heap of (deadline, ike_id) and each SA's current deadline
        self._timers: list[tuple[float, int]] = []
        self._due: dict[int, float] = {}
        #: established IKE SAs by (our identity, peer identity), for INITIAL_CONTACT
        self._by_identities: dict[Identities, set[int]] = {}
        #: refused peer input by reason (shared with every IKE SA: ctx.drops)
        self.drops: Counter[str] = self.ctx.drops

    # -- datagrams ----------------------------------------------------------------

    def receive_datagram(self, data: bytes, remote: Address, local_port: int,
                         now: float) -> None:
        """One IKE message (without the non-ESP marker) from ``remote``.
        Never raises for anything the peer sent (see the top of this file)."""
        try:
            self._receive(data, remote, local_port, now)
        except InvalidMajorVersion as exc:
            self._invalid_major_version(data, exc, remote, local_port)
        except RemoteProtocolError as exc:
            self.drops[exc.drop_reason] += 1
            log.debug("dropped IKE datagram from %s (%s): %s", remote[0], exc.drop_reason, exc)
        self._housekeeping()

    def _receive(self, data: bytes, remote: Address, local_port: int, now: float) -> None:
        header = decode_header(data)
        if (header.exchange == ExchangeType.IKE_SA_INIT and not header.is_response
                and header.spi_r == ZERO_SPI):
            self._init_request(header, data, remote, local_port, now)
            return
        # The I flag says whether the sender is the original initiator, so
        # whether our SPI is the responder's or the initiator's.
        ours = header.spi_r if header.is_initiator else header.spi_i
        sa = self.sas.get(ours)
        if sa is None or sa.terminal:
            self.drops["unknown_spi"] += 1
            return
        if header.is_response:
            sa.receive_response(header, data, remote, local_port, now)
        elif self._retransmit_limited(sa, header, now):
            self.drops[DROP_RETRANSMIT_RATE] += 1
        else:
            refused = sa.counters.get(DROP_NO_ADDITIONAL_SAS, 0)
            sa.receive_request(header, data, remote, local_port, now)
            refused = sa.counters.get(DROP_NO_ADDITIONAL_SAS, 0) - refused
            if refused:
                self.drops[DROP_NO_ADDITIONAL_SAS] += refused

    def _retransmit_limited(self, sa: IkeSa, header: IkeHeader, now: float) -> bool:
        """RFC 7296 §2.1 answers a retransmitted request from the cache; at
        most RETRANSMIT_ANSWERS_PER_S a second per IKE SA, so that replayed
        bytes from spoofed sources do not make us a reflector. (Message ID 0
        INFORMATIONAL may be an RFC 6311 sync, which only decryption tells.)"""
        if sa.mids.classify_request(header.message_id) is not RequestVerdict.RETRANSMIT:
            return False
        if header.message_id == 0 and header.exchange == ExchangeType.INFORMATIONAL:
            return False
        return not self.limits.answer_retransmit(sa.ike_id, now)

    def _init_request(self, header: IkeHeader, data: bytes, remote: Address, local_port: int,
                      now: float) -> None:
        """A first IKE_SA_INIT request. Peer errors propagate as
        RemoteProtocolError to ``receive_datagram`` (dropped, counted)."""
        for _ in range(self.limits.cookie_rotations_due(now)):
            self.cookies.rotate()  # RFC 7296 §2.6: the secret changes periodically
        old = self.half_open.get((header.spi_i, remote[0]))
        if old is not None and not old.terminal:
            if data == old.init_request and old.mids.response is not None:
                if not self.limits.answer_retransmit(old.ike_id, now):
                    self.drops[DROP_RETRANSMIT_RATE] += 1
                    return
                self.ctx.outbox.append(Outgoing(old.mids.response, remote, local_port))
            else:
                self.drops["init_for_known_spi"] += 1
            return
        if self._shed_init(data, remote, local_port, now):
            return
        try:
            msg = decode_message(data)
        except UnsupportedCriticalPayload as exc:
            # RFC 7296 §2.5: even in a first IKE_SA_INIT, name the payload.
            self.drops["bad_init"] += 1
            self.ctx.outbox.append(Outgoing(error_answer(
                header.spi_i, ExchangeType.IKE_SA_INIT, 0, exc), remote, local_port))
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("received %s from %s", describe(msg), remote[0])
        count = self.half_open_count()
        result = handle_init_request(self.ctx, list(self.policies.values()), self.cookies,
                                     count, msg, data, remote, local_port, now, self.limits)
        if result.refused:
            self.drops[result.refused] += 1  # no state, no answer (common/ike/limits.py)
            return
        self.ctx.outbox.append(Outgoing(result.response, remote, local_port))
        if result.sa is not None:
            self._index(result.sa)
            pressure = count >= self.ctx.options.cookie_threshold  # a token was taken
            self.limits.half_open_added(result.sa.ike_id,
                                        len(result.sa.init_request) + len(result.response),
                                        remote[0] if pressure else None)
            key = (result.sa.spi_i, remote[0])
            self.half_open[key] = result.sa
            self._half_open_keys[result.sa.ike_id] = key

    def _shed_init(self, data: bytes, remote: Address, local_port: int, now: float) -> bool:
        """Under pressure (RFC 7296 §2.6, RFC 8019 §4), settle an IKE_SA_INIT
        without decoding it: the COOKIE answer when it brings no valid cookie,
        a counted drop when the caps or its source's rate refuse it anyway.
        False: the full path decides."""
        count = self.half_open_count()
        if count < self.ctx.options.cookie_threshold:
            return False
        peek = peek_init(data)
        if peek is None:
            return False
        ip = packed_ip(remote[0])
        if peek.cookie is None or not self.cookies.check(peek.cookie, peek.nonce, ip,
                                                         peek.spi_i):
            cookie = self.cookies.make(peek.nonce, ip, peek.spi_i)
            self.ctx.outbox.append(Outgoing(cookie_answer(peek.spi_i, cookie), remote,
                                            local_port))
            return True
        refused = self.limits.shed_half_open(remote[0], count, now, 2 * len(data))
        if refused is None:
            return False
        self.drops[refused] += 1
        return True

    def _invalid_major_version(self, data: bytes, exc: InvalidMajorVersion, remote: Address,
                               local_port: int) -> None:
        """RFC 7296 §1.5, §2.5: a request of a higher major version is dropped
        and answered, unauthenticated, with INVALID_MAJOR_VERSION in a version 2
        header (same SPIs, exchange type and message ID). Lower versions
        (IKEv1) and responses are only dropped."""
        self.drops["malformed"] += 1
        if exc.major_version <= 2 or len(data) < IKE_HEADER_LEN:
            return
        spi_i, _, _, _, exchange, flags, message_id, _ = HEADER.unpack_from(data, 0)
        if flags & HeaderFlag.RESPONSE:
            return
        try:
            answer = error_answer(spi_i, ExchangeType(exchange), message_id, exc)
        except ValueError:
            return
        self.ctx.outbox.append(Outgoing(answer, remote, local_port))

    def datagrams_to_send(self) -> list[Outgoing]:
        out, self.ctx.outbox = self.ctx.outbox, []
        return out

    def next_event(self) -> IkeEvent | None:
        return self.ctx.events.popleft() if self.ctx.events else None

    # -- timers ---------------------------------------------------------------------
    #
    # One heap of (deadline, ike_id) over all IKE SAs, with lazy invalidation:
    # ``_due`` holds each SA's current deadline, an entry that does not match
    # it is stale and skipped. Only SAs touched by a call (``ctx.touched``:
    # sent, received, ran a timer, changed state or queue) get their deadline
    # recomputed, so get_timer is O(log n) amortised and handle_timer
    # O(due SAs · log n), whatever the number of SAs held. A deadline that
    # moved later without a touch (ESP activity postponing DPD) leaves an
    # early entry behind: the SA's timer runs, finds nothing due, and its
    # deadline is recomputed. Nothing moves a deadline earlier untouched.

    def get_timer(self) -> float | None:
        heap = self._timers
        while heap:
            deadline, ike_id = heap[0]
            if self._due.get(ike_id) == deadline and ike_id in self.by_id:
                return deadline
            heapq.heappop(heap)
        return None

    def handle_timer(self, now: float) -> None:
        heap = self._timers
        while heap and heap[0][0] <= now:
            deadline, ike_id = heapq.heappop(heap)
            sa = self.by_id.get(ike_id)
            if sa is None or self._due.get(ike_id) != deadline:
                continue
            del self._due[ike_id]  # recomputed in _housekeeping
            self.ctx.touched.add(sa)
            try:
                sa.handle_timer(now)
            except RemoteProtocolError as exc:
                # Something the peer sent earlier, found only now (e.g. a
                # value a queued request is built from): that SA cannot go on.
                self.drops[exc.drop_reason] += 1
                sa.fail(f"peer input refused: {exc}")
        self._housekeeping()

    def _schedule(self, sa: IkeSa) -> None:
        deadline = sa.next_deadline()
        if deadline is None:
            self._due.pop(sa.ike_id, None)
        elif self._due.get(sa.ike_id) != deadline:
            self._due[sa.ike_id] = deadline
            heapq.heappush(self._timers, (deadline, sa.ike_id))

    # -- bookkeeping ------------------------------------------------------------------

    def _touch(self, sa: IkeSa) -> None:
        """``sa`` changed outside receive_datagram/handle_timer."""
        self.ctx.touched.add(sa)
        self._housekeeping()

    def _index(self, sa: IkeSa) -> None:
        self.sas[sa.spi_i if sa.initiator else sa.spi_r] = sa
        self.by_id[sa.ike_id] = sa
        self.ctx.touched.add(sa)

    def _unindex(self, sa: IkeSa) -> None:
        key = sa.spi_i if sa.initiator else sa.spi_r
        if self.sas.get(key) is sa:
            del self.sas[key]
        if self.by_id.get(sa.ike_id) is sa:
            del self.by_id[sa.ike_id]
        self._due.pop(sa.ike_id, None)
        self._drop_half_open(sa)
        self.limits.ike_sa_gone(sa.ike_id)
        self.ctx.reassembly.forget(sa.ike_id)
        if sa.leases and self.ctx.pools is not None:
            # RFC 7296 §3.15.4: the address returns to the pool with the IKE SA.
            for lease in sa.leases:
                self.ctx.pools.release(lease)
                log.info("IKE SA %d: %s returned to pool %s", sa.ike_id, lease.address,
                         lease.pool)
            sa.leases = ()
        idents = _identities(sa)
        ids = self._by_identities.get(idents) if idents is not None else None
        if idents is not None and ids is not None:
            ids.discard(sa.ike_id)
            if not ids:
                del self._by_identities[idents]

    def _drop_half_open(self, sa: IkeSa) -> None:
        key = self._half_open_keys.pop(sa.ike_id, None)
        if key is not None and self.half_open.get(key) is sa:
            del self.half_open[key]
        self.limits.half_open_gone(sa.ike_id, completed=sa.established)

    def _housekeeping(self) -> None:
        """After every call: index SAs created by rekeys, then for the SAs
        touched in this call only: forget terminal ones, recompute deadlines."""
        ctx = self.ctx
        for sa in ctx.created:
            self._index(sa)
        ctx.created.clear()
        while ctx.initial_contact:
            self._initial_contact(ctx.initial_contact.pop())
        touched, ctx.touched = ctx.touched, set()
        for sa in touched:
            if self.by_id.get(sa.ike_id) is not sa:
                continue  # forgotten, replaced by adopt(), or of another engine
            if sa.terminal:
                self._unindex(sa)
                continue
            if sa.state is not IkeState.HALF_OPEN:
                self._drop_half_open(sa)
                key = _identities(sa)
                if key is not None:
                    self._by_identities.setdefault(key, set()).add(sa.ike_id)
            self._schedule(sa)

    def _initial_contact(self, sa: IkeSa) -> None:
        """RFC 7296 §2.4: N(INITIAL_CONTACT) says the peer has no other IKE SA
        with us, so ours with the same authenticated identities (both of them:
        another connection of ours to the same peer identity is not this one)
        are stale: they end here, without a delete the peer would not know."""
        key = _identities(sa)
        if key is None:
            return
        for ike_id in sorted(self._by_identities.get(key, set())):
            other = self.by_id.get(ike_id)
            if other is None or other is sa or other.terminal or _identities(other) != key:
                continue
            log.info("IKE SA %d: INITIAL_CONTACT from %s on IKE SA %d, deleting this one",
                     other.ike_id, sa.remote[0], sa.ike_id)
            other.gone("peer restarted (INITIAL_CONTACT)")

    def half_open_count(self) -> int:
        return len(self.half_open)

    def get(self, ike_id: int) -> IkeSa:
        sa = self.by_id.get(ike_id)
        if sa is None:
            raise LocalProtocolError(f"no IKE SA {ike_id}")
        return sa

    def established(self) -> list[IkeSa]:
        return [sa for sa in self.by_id.values() if sa.state is IkeState.ESTABLISHED]

    # -- actions (initiator side) --------------------------------------------------------

    def initiate(self, policy_name: str, remote: Address, now: float,
                 children: list[str] | None = None, *, initial_contact: bool = True) -> int:
        """Start IKE_SA_INIT + IKE_AUTH with the first child, then CREATE_CHILD_SA
        for the others. Returns the new IKE SA's id. ``initial_contact``: send
        N(INITIAL_CONTACT) in IKE_AUTH (RFC 7296 §2.4); leave it off for IKE
        SAs started alongside others of the same identities, or the responder
        may delete those."""
        policy = self.policies.get(policy_name)
        if policy is None:
            raise LocalProtocolError(f"no connection named {policy_name!r}")
        names = list(policy.children) if children is None else children
        for name in names:
            if name not in policy.children:
                raise LocalProtocolError(f"connection {policy_name!r} has no child {name!r}")
        sa = IkeSa(self.ctx, initiator=True, spi_i=self.ctx.spis.allocate_ike(),
                   spi_r=ZERO_SPI, remote=remote, local_port=self.ctx.options.ike_port,
                   state=IkeState.INIT_SENT, policy=policy)
        sa.created_at = sa.last_heard = now
        self._index(sa)
        sa.queue.append(IkeInitTask())
        first = policy.children[names[0]] if names else None
        sa.queue.append(IkeAuthTask(first, initial_contact=initial_contact))
        for name in names[1:]:
            sa.queue.append(ChildCreateTask(policy.children[name]))
        sa.kick(now)
        self._housekeeping()
        return sa.ike_id

    def _for_action(self, ike_id: int, action: str) -> IkeSa:
        """The IKE SA an action is for, refused (LocalProtocolError, nothing
        done) unless it is established or on its way there: before IKE_AUTH
        completes, the task waits in the queue (``IkeSa.kick`` holds it)."""
        sa = self.get(ike_id)
        if sa.state not in _ACTION_STATES:
            raise LocalProtocolError(f"IKE SA {ike_id}: {action} in state {sa.state.name}")
        return sa

    def create_child(self, ike_id: int, child_name: str, now: float) -> None:
        sa = self._for_action(ike_id, "create_child")
        if sa.policy is None or child_name not in sa.policy.children:
            raise LocalProtocolError(f"IKE SA {ike_id} has no child config {child_name!r}")
        sa.queue_task(ChildCreateTask(sa.policy.children[child_name]), now)
        self._touch(sa)

    def rekey_child(self, ike_id: int, spi_in: int, now: float) -> None:
        sa = self._for_action(ike_id, "rekey_child")
        sa.queue_task(ChildRekeyTask(spi_in), now)
        self._touch(sa)

    def rekey_ike(self, ike_id: int, now: float) -> None:
        sa = self._for_action(ike_id, "rekey_ike")
        sa.queue_task(IkeRekeyTask(), now)
        self._touch(sa)

    def delete_child(self, ike_id: int, spi_in: int, now: float) -> None:
        sa = self._for_action(ike_id, "delete_child")
        sa.queue_task(ChildDeleteTask([spi_in]), now)
        self._touch(sa)

    def delete_ike(self, ike_id: int, now: float) -> None:
        """Delete the IKE SA with the peer. Before it is established there is
        nobody authenticated to tell: it just ends here (IkeSaDeleted)."""
        sa = self.get(ike_id)
        if sa.terminal or sa.state is IkeState.DELETING:
            return
        if sa.state in _ACTION_STATES and sa.state is not IkeState.ESTABLISHED:
            sa.gone("deleted before it was established")
        else:
            sa.queue_task(IkeDeleteTask(), now)
        self._touch(sa)

    def dpd(self, ike_id: int, now: float) -> None:
        sa = self._for_action(ike_id, "dpd")
        sa.queue_task(DpdTask(), now)
        self._touch(sa)

    def mid_sync(self, ike_id: int, now: float, margin: int = 0) -> None:
        sa = self.get(ike_id)
        if not sa.established:
            raise LocalProtocolError(f"IKE SA {ike_id}: mid_sync in state {sa.state.name}")
        sa.queue_task(MidSyncTask(margin), now, first=True)
        self._touch(sa)

    # -- failover (RFC 6027 §3.2-3.6) ---------------------------------------------------

    def adopt(self, sa: IkeSa, now: float, *, mid_sync: bool = False,
              margin: int = 0) -> IkeSa:
        """Take over an IKE SA restored from its replica (by
        ``common.cluster.snapshot.restore``, in this engine's context): answer
        retransmits from the cached response, go on with DPD and rekeys. An SA
        of this SPI already held is replaced. With ``mid_sync`` (the replica
        may be stale) and a peer that supports it, start with an RFC 6311
        IKEV2_MESSAGE_ID_SYNC exchange."""
        if sa.ctx is not self.ctx:
            raise LocalProtocolError(f"IKE SA {sa.ike_id} was restored for another engine")
        old = self.sas.get(sa.spi_i if sa.initiator else sa.spi_r)
        if old is not None:
            self._unindex(old)
        if self.ctx.pools is not None:
            # The replica's leases are ours now (a takeover rebuilds the
            # segment's lease set from the SAs it adopts).
            for lease in sa.leases:
                self.ctx.pools.claim(lease, sa.peer_id[1] if sa.peer_id else b"")
        self._index(sa)
        if mid_sync and sa.peer_mid_sync:
            sa.queue_task(MidSyncTask(margin), now, first=True)
        self._housekeeping()
        return sa

    def forget(self, spi_i: bytes, spi_r: bytes) -> None:
        """Drop an IKE SA without telling the peer (a replica whose owner deleted it)."""
        for key in (spi_i, spi_r):
            sa = self.sas.get(key)
            if sa is not None and sa.spi_i == spi_i and sa.spi_r == spi_r:
                self._unindex(sa)

    def note_activity(self, ike_id: int, now: float) -> None:
        """ESP traffic arrived for this IKE SA: no DPD needed (RFC 7296 §2.4)."""
        sa = self.by_id.get(ike_id)
        if sa is not None:
            # Only ever later: the SA's timer entry may now be early, which
            # costs one idle timer run, not a recomputation per ESP packet.
            sa.last_heard = max(sa.last_heard, now)
