"""INFORMATIONAL exchanges (RFC 7296 §1.4, §2.4), retransmissions (§2.1) and
RFC 6311 message-ID synchronisation, between two in-memory engines."""

from __future__ import annotations

import pytest

from common.ike.constants import ExchangeType, NotifyType
from common.ike.context import IkeState
from common.ike.events import (
    ChildSaDeleted,
    DpdSucceeded,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    MessageIdsSynced,
)
from common.ike.exchanges.informational import _MID_SYNC
from common.ike.message import IkeMessage, decode_header, decode_message, encode_message
from common.ike.msgid import RetransmitPolicy
from common.ike.payloads import DeletePayload, NotifyPayload
from common.ike.sa import IkeSa
from tests.ike_pair import Pair, assert_children_agree, make_pair, other

ROLES = ["a", "b"]


def established(ini: str = "a", **kw: object) -> Pair:
    p = make_pair(**kw)  # type: ignore[arg-type]
    p.establish(ini)
    p.clear_events()
    return p


# -- retransmissions ---------------------------------------------------------------


@pytest.mark.parametrize("ini", ROLES)
def test_lost_response_gets_cached_copy(ini: str) -> None:
    p = established(ini)
    resp = other(ini)
    lost: list[bytes] = []

    def drop_first_response(sender: str, out: object) -> bool:
        if sender == resp and not lost:
            lost.append(out.data)  # type: ignore[attr-defined]
            return True
        return False

    p.drop = drop_first_response
    p.engine(ini).dpd(p.ike_id(ini), p.now)
    # INFORMATIONAL SK {} -->
    [req] = p.step(ini)
    # <-- INFORMATIONAL SK {}   (lost)
    p.step(resp)
    assert lost and not p.of(ini, DpdSucceeded)
    assert p.engine(ini).get_timer() == pytest.approx(p.now + 2.0)
    p.now += 2.0
    p.engine(ini).handle_timer(p.now)
    # INFORMATIONAL SK {} -->   (retransmitted, the very same bytes)
    [again] = p.step(ini)
    assert again == req
    # <-- INFORMATIONAL SK {}   (the cached response, byte for byte)
    [cached] = p.step(resp)
    assert cached == lost[0]
    assert p.sa(resp).counters["retransmits_answered"] == 1
    assert len(p.of(ini, DpdSucceeded)) == 1


def test_lost_ike_sa_init_response_resent_from_half_open() -> None:
    p = make_pair(extra_children=False)
    p.initiate("a")
    p.drop = lambda sender, out: sender == "b"
    # IKE_SA_INIT { SAi1, KEi, Ni } -->
    [req] = p.step("a")
    # <-- IKE_SA_INIT { SAr1, KEr, Nr }   (lost)
    [first] = p.step("b")
    p.drop = None
    p.advance(2.0)
    retransmitted = [o.data for s, o in p.wire if s == "a" and o.data == req]
    assert len(retransmitted) == 2
    answers = [o.data for s, o in p.wire if s == "b" and decode_header(o.data).message_id == 0]
    assert answers[0] == first and answers[1] == first
    assert p.of("a", IkeSaEstablished) and len(p.b.by_id) == 1


def test_backoff_and_give_up() -> None:
    p = established("a")
    p.drop = lambda sender, out: True  # the peer is gone
    p.a.dpd(p.ike_id("a"), p.now)
    p.flush()
    t0 = p.now
    deadlines = []
    sends = 1
    while (t := p.a.get_timer()) is not None and p.a.established():
        deadlines.append(t - t0)
        t0 = t
        p.now = t
        p.a.handle_timer(t)
        sends += len(p.pending("a"))
        p.drain()
    # RFC 7296 §2.4: exponential back-off, then the IKE SA is dead.
    assert deadlines == pytest.approx([2.0, 2.0 * 1.4, 2.0 * 1.4**2, 2.0 * 1.4**3])
    assert sends == 4  # the request and three retransmits
    [f] = p.of("a", IkeSaFailed)
    assert "peer not answering" in f.reason
    assert len(p.of("a", ChildSaDeleted)) == 2
    assert not p.a.by_id


def test_backoff_custom_policy() -> None:
    p = established("a", retransmit=RetransmitPolicy(timeout_s=1.0, base=2.0, tries=2))
    p.drop = lambda sender, out: True
    p.a.dpd(p.ike_id("a"), p.now)
    p.flush()
    times = []
    while (t := p.a.get_timer()) is not None and p.a.established():
        times.append(t)
        p.advance(t - p.now)
    assert times == pytest.approx([1.0, 3.0, 7.0])
    assert p.of("a", IkeSaFailed)


def test_ike_sa_init_unanswered() -> None:
    p = make_pair(extra_children=False)
    p.drop = lambda sender, out: True
    p.initiate("a")
    p.advance(60.0)
    [f] = p.of("a", IkeSaFailed)
    assert "peer not answering" in f.reason
    assert not p.a.by_id
    # b's half-open SAs (one per retransmit is answered from the same one) time out too.
    assert not p.b.by_id


# -- DPD ---------------------------------------------------------------------------


@pytest.mark.parametrize("side", ROLES)
def test_dpd_on_idle_sa(side: str) -> None:
    p = make_pair(dpd_delay=30.0)
    p.establish("a")
    p.clear_events()
    # Only one side's timer fires first: keep the other busy hearing from it.
    p.sa(other(side)).last_heard = p.now + 1000.0
    p.advance(29.0)
    assert not p.of(side, DpdSucceeded)
    # INFORMATIONAL SK {} --> <-- SK {}   (after dpd_delay of silence)
    p.advance(1.5)
    assert len(p.of(side, DpdSucceeded)) == 1
    mids = p.sa(side).mids
    assert mids.send_next >= 1


def test_dpd_both_ways_periodically() -> None:
    p = established("a", dpd_delay=10.0)
    p.advance(35.0)
    assert p.of("a", DpdSucceeded) or p.of("b", DpdSucceeded)
    assert p.a.established() and p.b.established()
    assert_children_agree(p)


@pytest.mark.parametrize("side", ROLES)
def test_dead_peer(side: str) -> None:
    p = established("a", dpd_delay=10.0)
    p.drop = lambda sender, out: sender == other(side)
    p.advance(60.0)
    [f] = p.of(side, IkeSaFailed)
    assert "peer not answering" in f.reason
    assert not p.engine(side).by_id
    assert len(p.of(side, ChildSaDeleted)) == 2


# -- deletes -----------------------------------------------------------------------


@pytest.mark.parametrize("side", ROLES)
def test_child_delete(side: str) -> None:
    p = established("a")
    peer = other(side)
    victim = p.child_named(side, "net")
    p.engine(side).delete_child(p.ike_id(side), victim.spi_in, p.now)
    # INFORMATIONAL SK { D(ESP, spi_in of ours) } -->
    p.step(side)
    # <-- INFORMATIONAL SK { D(ESP, spi_in of theirs) }
    [answer] = p.step(peer)
    reply = decode_message(answer, p.sa(side).sk_in)
    d = reply.get(DeletePayload)
    assert d is not None and d.spis == [victim.spi_out.to_bytes(4, "big")]
    assert [e.spi_in for e in p.of(side, ChildSaDeleted)] == [victim.spi_in]
    assert [e.spi_in for e in p.of(peer, ChildSaDeleted)] == [victim.spi_out]
    assert [c.name for c in p.live("a").values()] == ["ctr"]
    assert_children_agree(p)
    assert p.dpd_ok(peer)


@pytest.mark.parametrize("side", ROLES)
def test_ike_delete(side: str) -> None:
    p = established("a")
    peer = other(side)
    p.engine(side).delete_ike(p.ike_id(side), p.now)
    assert p.sa(side).state is IkeState.DELETING
    # INFORMATIONAL SK { D(IKE) } -->
    p.step(side)
    # <-- INFORMATIONAL SK {}
    p.step(peer)
    assert not p.a.by_id and not p.b.by_id
    for s in ROLES:
        assert len(p.of(s, IkeSaDeleted)) == 1
        assert len(p.of(s, ChildSaDeleted)) == 2


def test_delete_unknown_child_spi_is_answered_empty() -> None:
    p = established("a")
    sa = p.sa("a")
    mid = sa.mids.take_request_id()
    msg = IkeMessage(sa.spi_i, sa.spi_r, ExchangeType.INFORMATIONAL, mid, False, True,
                     [DeletePayload(3, [b"\x00\x00\x12\x34"])])
    # INFORMATIONAL SK { D(ESP, unknown) } --> <-- SK {}
    p.deliver("a", encode_message(msg, sa.sk_out, bytes(8)))
    [answer] = p.pending("b")
    assert decode_message(answer.data, sa.sk_in).payloads == []
    sa.mids.send_next = mid + 1
    assert len(p.live("b")) == 2 and p.dpd_ok("a")


# -- RFC 6311 message-ID sync -----------------------------------------------------------


@pytest.mark.parametrize("side", ROLES)
@pytest.mark.parametrize("margin", [0, 5])
def test_mid_sync(side: str, margin: int) -> None:
    p = established("a")
    peer = other(side)
    # Some traffic first so the counters are not all zero.
    assert p.dpd_ok("a") and p.dpd_ok("b") and p.dpd_ok(side)
    p.engine(side).mid_sync(p.ike_id(side), p.now, margin=margin)
    # INFORMATIONAL(mid 0) SK { N(IKEV2_MESSAGE_ID_SYNC, nonce, M1, P1) } -->
    [req] = p.step(side)
    assert decode_header(req).message_id == 0
    # <-- INFORMATIONAL(mid 0) SK { N(IKEV2_MESSAGE_ID_SYNC, nonce, M2, P2) }
    p.step(peer)
    [ours] = p.of(side, MessageIdsSynced)
    [theirs] = p.of(peer, MessageIdsSynced)
    assert (theirs.send_mid, theirs.recv_mid) == (p.sa(peer).mids.send_next,
                                                  p.sa(peer).mids.recv_next)
    ms, mp = p.sa(side).mids, p.sa(peer).mids
    assert ms.send_next == mp.recv_next and mp.send_next == ms.recv_next
    assert (ours.send_mid, ours.recv_mid) == (ms.send_next, ms.recv_next)
    assert ms.send_next >= 2 + margin  # §4: at least what we had plus the margin
    # Further exchanges work in both directions.
    assert p.dpd_ok(side) and p.dpd_ok(peer)
    spi = p.child_named(peer, "net").spi_in
    p.engine(peer).rekey_child(p.ike_id(peer), spi, p.now)
    p.flush()
    assert_children_agree(p)
    assert spi not in p.live(peer)


def test_mid_sync_after_lost_state() -> None:
    """What a cluster takeover looks like: the new owner's copy of the SA is a
    few exchanges behind in message IDs; MID sync (with a margin) heals it."""
    p = established("a")
    for _ in range(3):
        assert p.dpd_ok("a") and p.dpd_ok("b")
    sa = p.sa("a")
    # a "forgets" the last two exchanges in each direction.
    sa.mids.send_next -= 2
    sa.mids.recv_next -= 2
    sa.mids.response = None
    p.a.mid_sync(sa.ike_id, p.now, margin=4)
    p.flush()
    assert p.of("a", MessageIdsSynced) and p.of("b", MessageIdsSynced)
    assert sa.mids.send_next == p.sa("b").mids.recv_next
    assert sa.mids.recv_next == p.sa("b").mids.send_next
    assert p.dpd_ok("a") and p.dpd_ok("b")


def test_mid_sync_answer_with_foreign_nonce_ignored() -> None:
    p = established("a")
    sa_a, sa_b = p.sa("a"), p.sa("b")
    before = (sa_a.mids.send_next, sa_a.mids.recv_next)
    p.a.mid_sync(sa_a.ike_id, p.now, margin=0)
    # INFORMATIONAL(mid 0) SK { N(IKEV2_MESSAGE_ID_SYNC, nonce, M1, P1) } -->
    [req] = p.pending("a")  # held back
    # <-- INFORMATIONAL(mid 0) SK { N(IKEV2_MESSAGE_ID_SYNC, other nonce, 100, 100) }
    forged = IkeMessage(sa_b.spi_i, sa_b.spi_r, ExchangeType.INFORMATIONAL, 0, True, False,
                        [NotifyPayload(NotifyType.IKEV2_MESSAGE_ID_SYNC,
                                       data=_MID_SYNC.pack(b"XXXX", 100, 100))])
    p.deliver("b", encode_message(forged, sa_b.sk_out, bytes(8)))
    p.drain()
    assert not p.of("a", MessageIdsSynced)
    assert (sa_a.mids.send_next, sa_a.mids.recv_next) == before
    assert sa_a.state is IkeState.ESTABLISHED
    # The real exchange still completes: the forged answer did not end it.
    p.deliver("a", req.data, req)
    p.flush()
    assert len(p.of("a", MessageIdsSynced)) == 1 and len(p.of("b", MessageIdsSynced)) == 1
    assert sa_a.mids.send_next == sa_b.mids.recv_next
    assert p.dpd_ok("a") and p.dpd_ok("b")


@pytest.mark.parametrize("busy", [False, True])
def test_mid_sync_request_retransmitted(busy: bool) -> None:
    """A MID sync request always has message ID 0, so the message-ID cache
    cannot spot its retransmission: it must get the same answer, no second bump.
    With ``busy``, a request of the responder's is in flight: RFC 6311 §5.1's
    P2 must not skip it, or the peer drops it and every retransmit."""
    p = established("a")
    sa_a, sa_b = p.sa("a"), p.sa("b")
    if busy:
        p.a.dpd(sa_a.ike_id, p.now)  # a request of a's is in flight
        [dpd] = p.pending("a")
    p.b.mid_sync(sa_b.ike_id, p.now)
    # INFORMATIONAL(mid 0) SK { N(IKEV2_MESSAGE_ID_SYNC) } -->   (twice)
    [req] = p.pending("b")
    p.deliver("b", req.data, req)
    after_first = (sa_a.mids.send_next, sa_a.mids.recv_next)
    p.deliver("b", req.data, req)
    assert (sa_a.mids.send_next, sa_a.mids.recv_next) == after_first
    # <-- the same answer twice
    first, second = p.pending("a")
    assert decode_message(first.data, sa_b.sk_in).payloads == \
        decode_message(second.data, sa_b.sk_in).payloads
    p.deliver("a", first.data, first)
    p.deliver("a", second.data, second)
    if busy:
        # P2 is the in-flight request's ID: it is still new to b.
        assert p.sa("b").mids.recv_next == sa_a.mids.request_id
        # INFORMATIONAL SK {} -->   (a's DPD, sent before the sync)
        dropped = sa_b.counters["dropped"]  # the second sync answer
        p.deliver("a", dpd.data, dpd)
        assert sa_b.counters["dropped"] == dropped
        # <-- INFORMATIONAL SK {}
        p.step("b")
        assert p.of("a", DpdSucceeded)
    p.flush()
    p.advance(30.0)
    assert sa_a.state is IkeState.ESTABLISHED and sa_b.state is IkeState.ESTABLISHED
    assert p.dpd_ok("a") and p.dpd_ok("b")


def _sync_request(sa: IkeSa, m1: int, p1: int, nonce: bytes = b"SYNC") -> bytes:
    """An RFC 6311 sync request as ``sa`` (the sender's IKE SA) would send it."""
    msg = IkeMessage(sa.spi_i, sa.spi_r, ExchangeType.INFORMATIONAL, 0, False, sa.initiator,
                     [NotifyPayload(NotifyType.IKEV2_MESSAGE_ID_SYNC,
                                    data=_MID_SYNC.pack(nonce, m1, p1))])
    return encode_message(msg, sa.sk_out, bytes(8))


def test_mid_sync_with_m1_not_above_seen_is_dropped() -> None:
    """RFC 6311 §5.1: the peer MUST silently drop a sync whose M1 is lower
    than or equal to the highest value it has seen, earlier syncs included."""
    p = established("a")
    for _ in range(3):
        assert p.dpd_ok("b")
    sa_a, sa_b = p.sa("a"), p.sa("b")
    seen = sa_a.mids.recv_next - 1  # b's last request
    before = (sa_a.mids.send_next, sa_a.mids.recv_next)
    # INFORMATIONAL(mid 0) SK { N(IKEV2_MESSAGE_ID_SYNC, nonce, M1 = seen, P1) } -->
    p.deliver("b", _sync_request(sa_b, seen, sa_b.mids.recv_next))
    assert not p.pending("a") and not p.a.next_event()
    assert (sa_a.mids.send_next, sa_a.mids.recv_next) == before
    # A sync above it is taken; the same M1 again (a new nonce) is dropped.
    p.deliver("b", _sync_request(sa_b, seen + 5, sa_b.mids.recv_next, b"SYN2"))
    assert len(p.pending("a")) == 1
    p.deliver("b", _sync_request(sa_b, seen + 5, sa_b.mids.recv_next, b"SYN3"))
    assert not p.pending("a")
    assert sa_a.counters["dropped"] == 2


def test_mid_sync_twice_in_a_row_announces_higher_m1() -> None:
    p = established("a")
    for _ in range(2):
        p.b.mid_sync(p.ike_id("b"), p.now)
        p.flush()
    assert len(p.of("b", MessageIdsSynced)) == 2 and len(p.of("a", MessageIdsSynced)) == 2
    assert p.dpd_ok("a") and p.dpd_ok("b")


def test_mid_sync_answered_while_deleting() -> None:
    p = established("a")
    sa_a = p.sa("a")
    p.a.delete_ike(sa_a.ike_id, p.now)
    [delete] = p.pending("a")  # INFORMATIONAL SK { D(IKE) } -->   (held back)
    assert sa_a.state is IkeState.DELETING
    p.b.mid_sync(p.ike_id("b"), p.now)
    # INFORMATIONAL(mid 0) SK { N(IKEV2_MESSAGE_ID_SYNC) } -->
    p.step("b")
    # <-- INFORMATIONAL(mid 0) SK { N(IKEV2_MESSAGE_ID_SYNC) }
    p.step("a")
    assert p.of("b", MessageIdsSynced) and p.of("a", MessageIdsSynced)
    # The delete still goes through: its ID was kept as the in-flight request.
    p.deliver("a", delete.data, delete)
    p.flush()
    assert not p.a.by_id and not p.b.by_id


def test_mid_sync_ignores_late_copy_of_another_mid_0_answer() -> None:
    """The sync request reuses message ID 0: a late (duplicated) answer to the
    sender's real request 0 must not be taken for the sync answer (found by
    test_random_interleavings)."""
    p = established("a")
    sb = p.sa("b")
    p.b.rekey_ike(sb.ike_id, p.now)
    p.b.mid_sync(sb.ike_id, p.now, margin=1)  # waits for the rekey
    #                  <-- CREATE_CHILD_SA(mid 0) SK { SA(IKE), Ni, KEi }
    p.step("b")
    # CREATE_CHILD_SA(mid 0) SK { SA(IKE), Nr, KEr } -->   (twice: a copy is late)
    [answer] = p.pending("a")
    p.deliver("a", answer.data, answer)
    #                  <-- INFORMATIONAL(mid 0) SK { N(IKEV2_MESSAGE_ID_SYNC) }
    [sync] = p.pending("b")
    p.deliver("a", answer.data, answer)  # the late copy: not the sync answer
    assert sb.active is not None and sb.active.name == "mid_sync"
    p.deliver("b", sync.data, sync)
    p.flush()
    assert p.of("b", MessageIdsSynced)
    # The old IKE SA is deleted on both sides with the synced message IDs.
    assert len(p.a.by_id) == 1 and len(p.b.by_id) == 1
    assert p.dpd_ok("a") and p.dpd_ok("b")
