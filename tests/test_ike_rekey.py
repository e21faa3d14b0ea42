"""CREATE_CHILD_SA: new children, child rekeys and IKE rekeys (RFC 7296 §1.3,
§2.8), initiated by either side."""

from __future__ import annotations

import pytest

from common.ike.constants import DhId, ExchangeType, NotifyType, ProtocolId
from common.ike.context import IkeState
from common.ike.events import (
    ChildSaDeleted,
    ChildSaInstalled,
    IkeSaDeleted,
    IkeSaRekeyed,
)
from common.ike.message import decode_header, decode_message
from common.ike.payloads import DeletePayload, KePayload, NoncePayload, SaPayload
from tests.ike_pair import Pair, assert_children_agree, child, esp_carries, make_pair, other

ROLES = ["a", "b"]


def pair_with(esp_ctr: str = "aes128ctr-sha256", **kw: object) -> Pair:
    """Both sides know children "net" and "ctr"; only "net" is set up."""
    p = make_pair(
        children_a=[child("net", "10.91.1.0/24", "10.91.2.0/24"),
                    child("ctr", "10.91.11.0/24", "10.91.12.0/24", esp_ctr)],
        children_b=[child("net", "10.91.2.0/24", "10.91.1.0/24"),
                    child("ctr", "10.91.12.0/24", "10.91.11.0/24", esp_ctr)], **kw)
    p.establish("a", children=["net"])
    p.clear_events()
    return p


@pytest.mark.parametrize("pfs", [False, True])
@pytest.mark.parametrize("side", ROLES)
def test_new_child(side: str, pfs: bool) -> None:
    p = pair_with("aes128gcm16-ecp256" if pfs else "aes128ctr-sha256")
    peer = other(side)
    p.engine(side).create_child(p.ike_id(side), "ctr", p.now)
    # CREATE_CHILD_SA SK { SA, Ni, [KEi,] TSi, TSr } -->
    [req] = p.step(side)
    msg = decode_message(req, p.sa(peer).sk_in)
    assert msg.exchange == ExchangeType.CREATE_CHILD_SA and not msg.has_notify(NotifyType.REKEY_SA)
    assert (msg.get(KePayload) is not None) == pfs
    # <-- CREATE_CHILD_SA SK { SA, Nr, [KEr,] TSi, TSr }
    [answer] = p.step(peer)
    reply = decode_message(answer, p.sa(side).sk_in)
    assert reply.get(NoncePayload) is not None
    if pfs:
        ke = reply.get(KePayload)
        assert ke is not None and ke.group == DhId.ECP_256
    [ci] = p.of(side, ChildSaInstalled)
    [cr] = p.of(peer, ChildSaInstalled)
    assert ci.name == cr.name == "ctr"
    assert (ci.spi_in, ci.keymat_in) == (cr.spi_out, cr.keymat_out)
    assert esp_carries(ci, cr)
    assert_children_agree(p)


@pytest.mark.parametrize("pfs", [False, True])
@pytest.mark.parametrize("side", ROLES)
def test_child_rekey(side: str, pfs: bool) -> None:
    p = pair_with()
    if pfs:
        for e in (p.a, p.b):
            e.policies["conn"].children["net"] = child(
                "net", *(("10.91.1.0/24", "10.91.2.0/24") if e is p.a
                         else ("10.91.2.0/24", "10.91.1.0/24")), "aes128gcm16-ecp256")
    peer = other(side)
    old = p.child_named(side, "net")
    old_peer = p.child_named(peer, "net")
    p.engine(side).rekey_child(p.ike_id(side), old.spi_in, p.now)
    # CREATE_CHILD_SA SK { N(REKEY_SA, old spi), SA, Ni, [KEi,] TSi, TSr } -->
    [req] = p.step(side)
    msg = decode_message(req, p.sa(peer).sk_in)
    n = msg.notify(NotifyType.REKEY_SA)
    assert n is not None and n.protocol == ProtocolId.ESP
    assert n.spi == old.spi_in.to_bytes(4, "big")
    assert (msg.get(KePayload) is not None) == pfs
    # <-- CREATE_CHILD_SA SK { SA, Nr, [KEr,] TSi, TSr }
    p.step(peer)
    [new_i] = p.of(side, ChildSaInstalled)
    [new_r] = p.of(peer, ChildSaInstalled)
    assert new_i.replaces == old.spi_in and new_r.replaces == old_peer.spi_in
    assert new_i.keymat_in not in (old.keymat_in, old.keymat_out)
    assert new_i.spi_in != old.spi_in and new_i.spi_out != old.spi_out
    # INFORMATIONAL SK { D(ESP, old spi) } -->
    [delete] = p.step(side)
    d = decode_message(delete, p.sa(peer).sk_in).get(DeletePayload)
    assert d is not None and d.spis == [old.spi_in.to_bytes(4, "big")]
    # <-- INFORMATIONAL SK { D(ESP, old peer spi) }
    p.step(peer)
    assert [e.spi_in for e in p.of(side, ChildSaDeleted)] == [old.spi_in]
    assert [e.spi_in for e in p.of(peer, ChildSaDeleted)] == [old_peer.spi_in]
    assert_children_agree(p)
    assert esp_carries(new_i, new_r)
    assert p.child_named("a", "net").spi_in != (old.spi_in if side == "a" else old_peer.spi_in)


def test_child_rekey_twice_in_a_row() -> None:
    p = pair_with()
    for side in ("a", "b", "a", "b"):
        spi = p.child_named(side, "net").spi_in
        p.engine(side).rekey_child(p.ike_id(side), spi, p.now)
        p.flush()
        assert spi not in p.live(side)
        assert_children_agree(p)
    assert len(p.of("a", ChildSaInstalled)) == 4 and len(p.of("a", ChildSaDeleted)) == 4


@pytest.mark.parametrize("side", ROLES)
def test_ike_rekey(side: str) -> None:
    p = make_pair()
    p.establish("a")
    p.clear_events()
    peer = other(side)
    for _ in range(2):
        assert p.dpd_ok("a") and p.dpd_ok("b")
    old_i, old_r = p.sa(side), p.sa(peer)
    children_before = dict(p.live(side))
    p.engine(side).rekey_ike(old_i.ike_id, p.now)
    # CREATE_CHILD_SA SK { SA(IKE, new SPIi), Ni, KEi } -->
    [req] = p.step(side)
    msg = decode_message(req, old_r.sk_in)
    sa_p = msg.get(SaPayload)
    assert sa_p is not None and sa_p.proposals[0].protocol == ProtocolId.IKE
    assert len(sa_p.proposals[0].spi) == 8 and msg.get(KePayload) is not None
    # <-- CREATE_CHILD_SA SK { SA(IKE, new SPIr), Nr, KEr }
    p.step(peer)
    # INFORMATIONAL SK { D(IKE) } on the old IKE SA -->
    [delete] = p.step(side)
    assert decode_header(delete).spi_i == old_i.spi_i
    assert decode_message(delete, old_r.sk_in).get(DeletePayload).protocol == ProtocolId.IKE
    # <-- INFORMATIONAL SK {}
    p.step(peer)
    assert old_i.state is IkeState.DELETED and old_r.state is IkeState.DELETED
    new_i, new_r = p.sa(side), p.sa(peer)
    assert (new_i.spi_i, new_i.spi_r) == (new_r.spi_i, new_r.spi_r)
    assert {new_i.spi_i, new_i.spi_r}.isdisjoint({old_i.spi_i, old_i.spi_r})
    assert new_i.initiator and not new_r.initiator  # §2.18: the rekeyer is the new initiator
    assert new_i.mids.send_next == new_r.mids.recv_next == 0  # message IDs restart
    assert new_r.mids.send_next == new_i.mids.recv_next == 0
    assert new_i.keys is not None and old_i.keys is not None
    assert new_i.keys.sk_d != old_i.keys.sk_d
    [ri] = p.of(side, IkeSaRekeyed)
    [rr] = p.of(peer, IkeSaRekeyed)
    assert (ri.spi_i, ri.spi_r) == (rr.spi_i, rr.spi_r) == (new_i.spi_i, new_i.spi_r)
    assert (ri.old_ike_id, ri.new_ike_id) == (old_i.ike_id, new_i.ike_id)
    assert p.of(side, IkeSaDeleted) and p.of(peer, IkeSaDeleted)
    # Children moved over untouched: no delete, no reinstall.
    assert not p.of("a", ChildSaDeleted) and not p.of("b", ChildSaDeleted)
    assert p.live(side) == children_before
    assert_children_agree(p)
    # The new IKE SA works both ways and can rekey and delete the children.
    assert p.dpd_ok("a") and p.dpd_ok("b")
    spi = p.child_named(peer, "net").spi_in
    p.engine(peer).rekey_child(new_r.ike_id, spi, p.now)
    p.flush()
    assert_children_agree(p)
    assert p.of(side, ChildSaInstalled)[0].ike_id == new_i.ike_id
    spi = p.child_named(side, "ctr").spi_in
    p.engine(side).delete_child(new_i.ike_id, spi, p.now)
    p.flush()
    assert [c.name for c in p.live(peer).values()] == ["net"]
    assert_children_agree(p)
    # ... and be rekeyed again, and deleted.
    p.engine(peer).rekey_ike(new_r.ike_id, p.now)
    p.flush()
    assert new_r.state is IkeState.DELETED
    newest = p.sa(peer)
    assert newest.initiator and newest.ike_id != new_r.ike_id
    p.engine(peer).delete_ike(newest.ike_id, p.now)
    p.flush()
    assert not p.a.by_id and not p.b.by_id


@pytest.mark.parametrize("side", ROLES)
def test_rekey_timers(side: str) -> None:
    kw = {"rekey_time": 500.0}
    p = make_pair(dpd_delay=0.0, **kw)  # type: ignore[arg-type]
    for e in (p.a, p.b):
        for c in e.policies["conn"].children.values():
            c.rekey_time = 100.0 if (e is p.engine(side)) else 1000.0
    if side == "b":
        p.a.policies["conn"].rekey_time = 5000.0
    else:
        p.b.policies["conn"].rekey_time = 5000.0
    p.establish("a")
    p.clear_events()
    p.advance(99.0)
    assert not p.of("a", ChildSaInstalled)
    # CREATE_CHILD_SA SK { N(REKEY_SA), SA, Ni, TSi, TSr } --> <-- ; INFORMATIONAL D(ESP) --> <--
    p.advance(2.0)
    assert len(p.of(side, ChildSaInstalled)) == 2
    assert all(e.replaces is not None for e in p.of(side, ChildSaInstalled))
    assert len(p.of(side, ChildSaDeleted)) == 2
    assert_children_agree(p)
    # Rekeyed children get a fresh timer.
    p.advance(100.0)
    assert len(p.of(side, ChildSaInstalled)) == 4
    assert_children_agree(p)
    # CREATE_CHILD_SA SK { SA(IKE), Ni, KEi } --> <-- ; INFORMATIONAL D(IKE) --> <--
    p.advance(300.0)
    rekeyed = p.of(side, IkeSaRekeyed)
    assert len(rekeyed) == 1
    assert p.sa(side).initiator
    assert p.sa(side).rekey_at is not None
    assert p.dpd_ok("a") and p.dpd_ok("b")
    assert_children_agree(p)
