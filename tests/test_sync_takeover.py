"""An IKE SA carried over the synch channel to another member (RFC 6027
§3.2-3.6): the member that takes over continues the very same IKE SA with the
peer. Two in-memory engines play the cluster member before and after the
takeover; a third plays the peer."""

from __future__ import annotations

import pytest

from common.cluster.snapshot import restore, snapshot
from common.cluster.sync import decode_sync, encode_sync
from common.errors import LocalProtocolError
from common.ike.constants import ExchangeType
from common.ike.events import ChildSaInstalled, DpdSucceeded, IkeSaRekeyed, MessageIdsSynced
from common.ike.message import decode_header
from tests.ike_pair import B_ADDR, Pair, engine, make_pair


def _takeover(pair: Pair, *, stale: bool = False) -> Pair:
    """Replicate a's IKE SA through the sync codec into a fresh engine that
    replaces a (same policies, different randomness and SPI slot)."""
    (sa,) = pair.a.established()
    wire = encode_sync(snapshot(sa, pair.now, stale=stale))
    state = decode_sync(wire)
    new = engine(list(pair.a.policies.values()), 99, 1)
    new.adopt(restore(new, state, pair.now), pair.now,  # type: ignore[arg-type]
              mid_sync=stale, margin=5)
    return Pair(new, pair.b, now=pair.now)


@pytest.fixture
def established() -> Pair:
    p = make_pair()
    # IKE_SA_INIT, IKE_AUTH { first child }, CREATE_CHILD_SA { second child } -->
    p.a.initiate("conn", B_ADDR, 0.0)
    p.flush()
    assert len(p.of("b", ChildSaInstalled)) == 2
    return p


def test_snapshot_round_trips_through_the_codec(established: Pair) -> None:
    (sa,) = established.a.established()
    st = snapshot(sa, 0.0)
    assert decode_sync(encode_sync(st)) == st
    # IKE_SA_INIT, IKE_AUTH and one CREATE_CHILD_SA: the next request is 3
    assert st.send_next == 3 and len(st.children) == 2
    assert "sk_ei" not in repr(st) or repr(st.sk_ei) not in repr(st)


def test_new_owner_answers_a_retransmitted_request_byte_for_byte(established: Pair) -> None:
    p = established
    # b (the peer) asks for a DPD; a answers; then a "dies" after replicating.
    (b_sa,) = p.b.established()
    p.b.dpd(b_sa.ike_id, p.now)
    request = p.b.datagrams_to_send()[0]
    p.a.receive_datagram(request.data, (B_ADDR[0], 4500), 4500, p.now)
    first_answer = p.a.datagrams_to_send()[0].data
    q = _takeover(p)
    # The peer never saw the answer and retransmits:  INFORMATIONAL { } -->
    q.a.receive_datagram(request.data, (B_ADDR[0], 4500), 4500, q.now)
    (again,) = q.a.datagrams_to_send()
    assert again.data == first_answer


def test_new_owner_continues_dpd_and_rekeys(established: Pair) -> None:
    q = _takeover(established)
    (sa,) = q.a.established()
    # INFORMATIONAL { } -->  (DPD from the new owner, the right message ID)
    q.a.dpd(sa.ike_id, q.now)
    q.flush()
    assert q.of("a", DpdSucceeded)
    # CREATE_CHILD_SA { N(REKEY_SA), SA, Ni, TSi, TSr } -->  (child rekey by the new owner)
    spi = next(iter(sa.children))
    q.a.rekey_child(sa.ike_id, spi, q.now)
    q.flush()
    assert any(e.replaces == spi for e in q.of("a", ChildSaInstalled))
    # the peer rekeys a child and the IKE SA through the new owner
    (b_sa,) = q.b.established()
    q.b.rekey_child(b_sa.ike_id, next(iter(b_sa.children)), q.now)
    q.flush()
    q.b.rekey_ike(b_sa.ike_id, q.now)
    q.flush()
    assert q.of("a", IkeSaRekeyed) and q.of("b", IkeSaRekeyed)
    (new_b,) = q.b.established()
    assert len(new_b.children) == 2


def test_stale_replica_resyncs_message_ids_with_rfc_6311(established: Pair) -> None:
    p = established
    (a_sa,) = p.a.established()
    stale_state = encode_sync(snapshot(a_sa, p.now, stale=True))
    # After the snapshot, a and b run two more exchanges the replica misses.
    for _ in range(2):
        p.a.dpd(a_sa.ike_id, p.now)
        p.flush()
    new = engine(list(p.a.policies.values()), 77, 1)
    new.adopt(restore(new, decode_sync(stale_state), p.now),  # type: ignore[arg-type]
              p.now, mid_sync=True, margin=5)
    q = Pair(new, p.b, now=p.now)
    out = q.a.datagrams_to_send()
    # HDR(mid 0), SK { N(IKEV2_MESSAGE_ID_SYNC) } -->
    assert decode_header(out[0].data).message_id == 0
    assert decode_header(out[0].data).exchange == ExchangeType.INFORMATIONAL
    q.a.ctx.outbox.extend(out)
    q.flush()
    synced = q.of("a", MessageIdsSynced)
    # M1 = 3 + margin 5 (the replica saw 3 requests); the peer expects 5: max is 8
    assert synced and synced[0].send_mid == 8
    (sa,) = q.a.established()
    q.a.dpd(sa.ike_id, q.now)
    q.flush()
    assert q.of("a", DpdSucceeded)


def test_adopt_refuses_an_sa_restored_for_another_engine(established: Pair) -> None:
    """``restore`` builds the SA in one engine's context (its ids, SPIs,
    outbox, events): another engine must not index it."""
    (sa,) = established.a.established()
    state = decode_sync(encode_sync(snapshot(sa, established.now)))
    one = engine(list(established.a.policies.values()), 99, 1)
    other = engine(list(established.a.policies.values()), 98, 1)
    restored = restore(one, state, established.now)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        other.adopt(restored, established.now)
    assert not other.sas and not other.by_id and not one.sas
    assert one.adopt(restored, established.now) is restored
    assert one.established() == [restored]
