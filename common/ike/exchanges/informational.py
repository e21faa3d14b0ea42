"""INFORMATIONAL: delete (child and IKE), liveness checks (DPD), and the RFC
6311 message-ID synchronisation (RFC 7296 §1.4, §2.4).

    HDR, SK {D(ESP, spi...)}  -->  <--  HDR, SK {D(ESP, spi...)}   child delete
    HDR, SK {D(IKE)}          -->  <--  HDR, SK {}                  IKE delete
    HDR, SK {}                -->  <--  HDR, SK {}                  DPD
    HDR(mid 0), SK {N(IKEV2_MESSAGE_ID_SYNC)} --> <-- same          RFC 6311 §4
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

from common.ike.constants import ExchangeType, NotifyType, ProtocolId
from common.ike.context import ChildInput, IkeInput
from common.ike.events import DpdSucceeded, MessageIdsSynced
from common.ike.message import MAX_MESSAGE_ID, IkeMessage
from common.ike.payloads import DeletePayload, NotifyPayload, Payload
from common.ike.refusals import DropRequest, Refused
from common.ike.sa import IkeSa

log = logging.getLogger("ipsec_cluster.ike")

_MID_SYNC = struct.Struct("!4sII")  # nonce, EXPECTED_SEND_REQ_MESSAGE_ID, EXPECTED_RECV_REQ...


class MessageIdsExhausted(DropRequest):
    """A MID sync that would announce a message ID past 2^32-1: IDs never
    wrap (RFC 7296 §2.2), so there is nothing to synchronise to."""

    drop_reason = "message_ids_exhausted"


# -- initiator tasks ---------------------------------------------------------


@dataclass(slots=True)
class DpdTask:
    exchange = ExchangeType.INFORMATIONAL
    name = "dpd"

    def build(self, sa: IkeSa, now: float) -> list[Payload] | None:
        return []

    def process(self, sa: IkeSa, msg: IkeMessage, now: float) -> None:
        sa.ctx.events.append(DpdSucceeded(sa.ike_id))

    def failed(self, sa: IkeSa, now: float) -> None:
        pass


@dataclass(slots=True)
class ChildDeleteTask:
    spis: list[int]
    exchange = ExchangeType.INFORMATIONAL
    name = "child_delete"
    sent: list[int] = field(default_factory=list)

    def build(self, sa: IkeSa, now: float) -> list[Payload] | None:
        self.sent = [s for s in self.spis if s in sa.children]
        if not self.sent:
            return None
        for spi in self.sent:
            sa.children[spi].apply(ChildInput.DELETE_STARTED)
        return [DeletePayload(ProtocolId.ESP, [s.to_bytes(4, "big") for s in self.sent])]

    def process(self, sa: IkeSa, msg: IkeMessage, now: float) -> None:
        for spi in self.sent:
            child = sa.children.get(spi)
            if child is not None:
                sa.child_gone(child, "deleted")

    def failed(self, sa: IkeSa, now: float) -> None:
        self.process(sa, IkeMessage(sa.spi_i, sa.spi_r, self.exchange, 0, True, False, []), now)


@dataclass(slots=True)
class RefusedChildDeleteTask:
    """Delete a child the peer installed and we refused (RFC 7296 §2.9: it
    widened our traffic selectors); we never installed our half. The SPI is
    ours until the peer has answered."""

    spi_in: int
    exchange = ExchangeType.INFORMATIONAL
    name = "child_delete"

    def build(self, sa: IkeSa, now: float) -> list[Payload] | None:
        return [DeletePayload(ProtocolId.ESP, [self.spi_in.to_bytes(4, "big")])]

    def process(self, sa: IkeSa, msg: IkeMessage, now: float) -> None:
        sa.ctx.spis.release_esp(self.spi_in)

    def failed(self, sa: IkeSa, now: float) -> None:
        sa.ctx.spis.release_esp(self.spi_in)


@dataclass(slots=True)
class IkeDeleteTask:
    exchange = ExchangeType.INFORMATIONAL
    name = "ike_delete"
    reason: str = "deleted"

    def build(self, sa: IkeSa, now: float) -> list[Payload] | None:
        if sa.terminal:
            return None
        sa.apply(IkeInput.DELETE_STARTED)
        return [DeletePayload(ProtocolId.IKE, [])]

    def process(self, sa: IkeSa, msg: IkeMessage, now: float) -> None:
        sa.gone(self.reason)

    def failed(self, sa: IkeSa, now: float) -> None:
        sa.gone(self.reason + " (peer did not answer the delete)")


@dataclass(slots=True)
class MidSyncTask:
    """RFC 6311 §4: resynchronise message IDs after a takeover. The request
    always uses message ID 0. ``margin`` is added to our send ID so that
    requests a dead owner may have sent are skipped."""

    margin: int = 0
    nonce: bytes = b""
    exchange = ExchangeType.INFORMATIONAL
    name = "mid_sync"
    fixed_mid = 0

    def build(self, sa: IkeSa, now: float) -> list[Payload] | None:
        if not sa.peer_mid_sync:
            return None
        self.nonce = sa.ctx.random(4)
        # Never announce 0: ID 0 is the sync's own, and a late copy of the sync
        # answer would be taken for the answer to a regular request 0.
        # RFC 6311 §5.1: the peer drops a sync whose M1 is not above every M1
        # it has seen, so each of ours announces a higher one.
        send = max(sa.mids.send_next + self.margin, sa.mid_sync_m1_sent + 1, 1)
        if send > MAX_MESSAGE_ID or sa.mids.recv_next > MAX_MESSAGE_ID:
            # RFC 7296 §2.2: no ID left to announce; the IKE SA is used up.
            sa.fail(f"message IDs exhausted, no MID sync possible ({send})")
            return None
        sa.mid_sync_m1_sent = send
        return [NotifyPayload(NotifyType.IKEV2_MESSAGE_ID_SYNC,
                              data=_MID_SYNC.pack(self.nonce, send, sa.mids.recv_next))]

    def process(self, sa: IkeSa, msg: IkeMessage, now: float) -> None:
        n = msg.notify(NotifyType.IKEV2_MESSAGE_ID_SYNC)
        if n is None or len(n.data) != _MID_SYNC.size:
            if msg.exchange == ExchangeType.INFORMATIONAL and any(
                    p.notify_type.is_error for p in msg.get_all(NotifyPayload)):
                log.warning("IKE SA %d: MID sync refused", sa.ike_id)
                return
            # Message ID 0 is not only the sync's: a late copy of the answer to
            # our request 0 (any exchange) can arrive now. Not ours: wait on.
            log.info("IKE SA %d: a message-ID-0 answer that is not the MID sync's",
                     sa.ike_id)
            self._wait_on(sa, now)
            return
        nonce, peer_send, peer_recv = _MID_SYNC.unpack(n.data)
        if nonce != self.nonce:
            # RFC 6311 §4.4: not the answer to our request; keep waiting for
            # it (same request, same retransmit count), as if never received.
            log.warning("IKE SA %d: MID sync answer with a foreign nonce", sa.ike_id)
            self._wait_on(sa, now)
            return
        # The peer's answer: M2 = what it expects from us, P2 = what it sends next.
        sa.mids.send_next = max(sa.mids.send_next + self.margin, peer_recv)
        sa.mids.recv_next = max(sa.mids.recv_next, peer_send)
        sa.ctx.events.append(MessageIdsSynced(sa.ike_id, sa.mids.send_next, sa.mids.recv_next))

    def failed(self, sa: IkeSa, now: float) -> None:
        pass

    def _wait_on(self, sa: IkeSa, now: float) -> None:
        """As if the answer had never arrived: same request, same retransmit
        count."""
        mids = sa.mids
        mids.request = sa.last_request
        mids.request_deadline = now + mids.policy.timeout_s * (
            mids.policy.base ** mids.request_tries)
        sa.active = self


# -- responder handlers --------------------------------------------------------


def handle_dpd(sa: IkeSa, msg: IkeMessage, now: float) -> list[Payload]:
    return []


def handle_temporary_failure(sa: IkeSa, msg: IkeMessage, now: float) -> list[Payload]:
    # RFC 7296 §2.25: the SA is being rekeyed or deleted; try again later.
    raise Refused(NotifyType.TEMPORARY_FAILURE, f"IKE SA is {sa.state.name}")


def handle_delete(sa: IkeSa, msg: IkeMessage, now: float) -> list[Payload]:
    answer: list[bytes] = []
    for d in msg.get_all(DeletePayload):
        if d.protocol == ProtocolId.IKE:
            if sa.peer_rekey is not None:
                # §2.8.2: the peer deletes the old SA only when its new one won.
                sa.peer_rekey_won(now)
            sa.gone("deleted by peer")
            return []
        if d.protocol != ProtocolId.ESP:
            continue
        for raw in d.spis:
            # The peer names its inbound SPIs: our outbound ones (§1.4.1).
            child = sa.child_by_out(int.from_bytes(raw, "big"))
            if child is None:
                continue
            answer.append(child.spi_in.to_bytes(4, "big"))
            sa.child_gone(child, "deleted by peer")
    return [DeletePayload(ProtocolId.ESP, answer)] if answer else []


def handle_mid_sync(sa: IkeSa, msg: IkeMessage, now: float) -> list[Payload]:
    """RFC 6311 §5.1, responder: M2 = max(M1, our expected), P2 = max(P1, the
    ID of our next request, or of the one in flight)."""
    n = msg.notify(NotifyType.IKEV2_MESSAGE_ID_SYNC)
    if n is None or len(n.data) != _MID_SYNC.size or msg.message_id != 0:
        raise Refused(NotifyType.INVALID_SYNTAX, "bad IKEV2_MESSAGE_ID_SYNC notify")
    nonce, m1, p1 = _MID_SYNC.unpack(n.data)
    if sa.mid_sync_answered is not None and sa.mid_sync_answered[0] == nonce:
        # A retransmission (it always has message ID 0, so the message-ID
        # cache cannot catch it): the same answer, no second increment.
        return [NotifyPayload(NotifyType.IKEV2_MESSAGE_ID_SYNC, data=sa.mid_sync_answered[1])]
    mids = sa.mids
    highest = max(mids.recv_next - 1, sa.mid_sync_m1_seen)
    if m1 <= highest:
        # RFC 6311 §5.1: "MUST silently drop" a sync whose M1 is not above the
        # highest sender value seen, earlier syncs included.
        raise DropRequest(f"MID sync with M1 {m1} not above {highest}")
    sa.mid_sync_m1_seen = m1
    m2 = max(m1, mids.recv_next)
    # P2: the next request ID the peer will see from us. A request of ours in
    # flight keeps its ID (send_next is already past it): announcing past it
    # would make the peer drop it and every retransmit, and the IKE SA would
    # die. So it stays outstanding and the peer takes it as new (or answers
    # it from its cache, when P1 shows it was already processed).
    ours = mids.request_id if mids.busy and not isinstance(sa.active, MidSyncTask) \
        else mids.send_next
    p2 = max(p1, ours)
    if m2 > MAX_MESSAGE_ID or p2 > MAX_MESSAGE_ID:
        raise MessageIdsExhausted(f"MID sync past the last message ID ({m2}, {p2})")
    mids.recv_next = m2
    mids.send_next = max(mids.send_next, p2)
    sa.ctx.events.append(MessageIdsSynced(sa.ike_id, p2, m2))
    sa.mid_sync_answered = (nonce, _MID_SYNC.pack(nonce, p2, m2))
    return [NotifyPayload(NotifyType.IKEV2_MESSAGE_ID_SYNC, data=sa.mid_sync_answered[1])]
