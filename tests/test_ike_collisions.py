"""Simultaneous exchanges (RFC 7296 §2.8.1 child rekey collisions, §2.8.2 IKE
rekey collisions, §2.25 delete vs rekey). Who wins is decided by the lowest of
the four nonces, which the tests choose through the engines' random source."""

from __future__ import annotations

import pytest

from common.ike.constants import NotifyType
from common.ike.context import ChildState, IkeState
from common.ike.events import (
    ChildSaDeleted,
    ChildSaInstalled,
    IkeSaDeleted,
    IkeSaRekeyed,
)
from common.ike.message import decode_header, decode_message
from common.ike.payloads import NoncePayload
from tests.ike_pair import (
    Pair,
    assert_children_agree,
    esp_carries,
    make_pair,
    nonce,
    other,
    script_nonces,
)

#: Which of the four nonces is the lowest: a's request (Ni of a's exchange),
#: b's answer to it (Nr of a's exchange), b's request, a's answer.
LOWEST = ["a_request", "b_answer", "b_request", "a_answer"]


def scripted(lowest: str) -> tuple[list[bytes], list[bytes]]:
    """Nonces for (a: its request, its answer), (b: its request, its answer)."""
    values = {k: nonce(0x80 + i) for i, k in enumerate(LOWEST)}
    values[lowest] = nonce(0x01)
    return ([values["a_request"], values["a_answer"]],
            [values["b_request"], values["b_answer"]])


def loser_of(lowest: str) -> str:
    """The side whose exchange carried the lowest nonce: its new SA is redundant."""
    return "a" if lowest in ("a_request", "b_answer") else "b"


def established() -> Pair:
    p = make_pair()
    p.establish("a")
    p.clear_events()
    return p


def cross(p: Pair) -> None:
    """Both queued requests cross on the wire, then both answers."""
    [req_a] = p.pending("a")
    [req_b] = p.pending("b")
    # CREATE_CHILD_SA (a) -->       <-- CREATE_CHILD_SA (b)
    p.deliver("a", req_a.data, req_a)
    p.deliver("b", req_b.data, req_b)
    [ans_b] = p.pending("b")
    [ans_a] = p.pending("a")
    # <-- answer to a's            answer to b's -->
    p.deliver("b", ans_b.data, ans_b)
    p.deliver("a", ans_a.data, ans_a)
    p.drain()


@pytest.mark.parametrize("lowest", LOWEST)
def test_child_rekey_collision(lowest: str) -> None:
    p = established()
    na, nb = scripted(lowest)
    script_nonces(p.a, *na)
    script_nonces(p.b, *nb)
    old_a = p.child_named("a", "net")
    old_b = p.child_named("b", "net")
    p.a.rekey_child(p.ike_id("a"), old_a.spi_in, p.now)
    p.b.rekey_child(p.ike_id("b"), old_b.spi_in, p.now)
    # CREATE_CHILD_SA SK { N(REKEY_SA), SA, Ni(a), TSi, TSr } -->
    #                        <-- CREATE_CHILD_SA SK { N(REKEY_SA), SA, Ni(b), TSi, TSr }
    # <-- CREATE_CHILD_SA SK { SA, Nr(b), TSi, TSr }
    #                        CREATE_CHILD_SA SK { SA, Nr(a), TSi, TSr } -->
    cross(p)
    # Each side now holds two new children for "net".
    assert len(p.of("a", ChildSaInstalled)) == 2 and len(p.of("b", ChildSaInstalled)) == 2
    # INFORMATIONAL SK { D(ESP, redundant) } from the loser, D(ESP, old) from
    # the winner, and their answers.
    p.flush()
    loser = loser_of(lowest)
    winner = "b" if loser == "a" else "a"
    nets_a = [c for c in p.live("a").values() if c.name == "net"]
    nets_b = [c for c in p.live("b").values() if c.name == "net"]
    assert len(nets_a) == 1 and len(nets_b) == 1
    assert_children_agree(p)
    survivor_a = nets_a[0]
    assert survivor_a.spi_in != old_a.spi_in
    # The survivor is the child created by the winner's exchange.
    created_by_winner = {e.spi_in for e in p.of(winner, ChildSaInstalled)
                         if e.replaces is not None}
    survivor_w = survivor_a if winner == "a" else nets_b[0]
    assert survivor_w.spi_in in created_by_winner
    # Old child gone on both sides; every other new child deleted.
    deleted_a = {e.spi_in for e in p.of("a", ChildSaDeleted)}
    deleted_b = {e.spi_in for e in p.of("b", ChildSaDeleted)}
    assert old_a.spi_in in deleted_a and old_b.spi_in in deleted_b
    assert len(deleted_a) == 2 and len(deleted_b) == 2
    installed_a = {e.spi_in for e in p.of("a", ChildSaInstalled)}
    assert installed_a - deleted_a == {survivor_a.spi_in}
    assert esp_carries(survivor_a, nets_b[0])
    # Nothing left in a rekeying state; both SAs keep working.
    assert p.dpd_ok("a") and p.dpd_ok("b")
    p.a.rekey_child(p.ike_id("a"), survivor_a.spi_in, p.now)
    p.flush()
    assert_children_agree(p)


def test_child_rekey_collision_nonces_really_used() -> None:
    p = established()
    script_nonces(p.a, nonce(0x11), nonce(0x22))
    script_nonces(p.b, nonce(0x33), nonce(0x44))
    p.a.rekey_child(p.ike_id("a"), p.child_named("a", "net").spi_in, p.now)
    p.b.rekey_child(p.ike_id("b"), p.child_named("b", "net").spi_in, p.now)
    [req_a] = p.pending("a")
    msg = decode_message(req_a.data, p.sa("b").sk_in)
    n = msg.get(NoncePayload)
    assert n is not None and n.data == nonce(0x11)


@pytest.mark.parametrize("lowest", LOWEST)
def test_ike_rekey_collision(lowest: str) -> None:
    p = established()
    na, nb = scripted(lowest)
    script_nonces(p.a, *na)
    script_nonces(p.b, *nb)
    old_a, old_b = p.sa("a"), p.sa("b")
    children = dict(p.live("a"))
    p.a.rekey_ike(old_a.ike_id, p.now)
    p.b.rekey_ike(old_b.ike_id, p.now)
    # CREATE_CHILD_SA SK { SA(IKE), Ni(a), KEi } -->
    #                        <-- CREATE_CHILD_SA SK { SA(IKE), Ni(b), KEi }
    # <-- CREATE_CHILD_SA SK { SA(IKE), Nr(b), KEr }
    #                        CREATE_CHILD_SA SK { SA(IKE), Nr(a), KEr } -->
    cross(p)
    # INFORMATIONAL SK { D(IKE) } on the redundant new SA (from the loser) and
    # on the old SA (from the winner), and their answers.
    p.flush()
    assert old_a.terminal and old_b.terminal
    new_a, new_b = p.sa("a"), p.sa("b")
    assert (new_a.spi_i, new_a.spi_r) == (new_b.spi_i, new_b.spi_r)
    loser = loser_of(lowest)
    winner = "b" if loser == "a" else "a"
    assert p.sa(winner).initiator  # the winner's exchange created the survivor
    assert p.sa(winner).mids.send_next == p.sa(loser).mids.recv_next
    # Exactly one IkeSaRekeyed per side, naming the survivor.
    for side in ("a", "b"):
        [r] = p.of(side, IkeSaRekeyed)
        assert r.new_ike_id == p.sa(side).ike_id
        assert len(p.engine(side).by_id) == 1
        assert len(p.of(side, IkeSaDeleted)) == 2  # the old and the redundant one
    assert p.live("a") == children and not p.of("a", ChildSaDeleted)
    assert_children_agree(p)
    assert p.dpd_ok("a") and p.dpd_ok("b")
    spi = p.child_named("b", "net").spi_in
    p.b.rekey_child(p.ike_id("b"), spi, p.now)
    p.flush()
    assert_children_agree(p)
    assert new_a.state is IkeState.ESTABLISHED and new_b.state is IkeState.ESTABLISHED


@pytest.mark.parametrize("deleter", ["a", "b"])
def test_delete_collides_with_rekey(deleter: str) -> None:
    p = established()
    rekeyer = "b" if deleter == "a" else "a"
    child_r = p.child_named(rekeyer, "net")
    child_d = p.child_named(deleter, "net")
    p.engine(rekeyer).rekey_child(p.ike_id(rekeyer), child_r.spi_in, p.now)
    p.engine(deleter).delete_child(p.ike_id(deleter), child_d.spi_in, p.now)
    # CREATE_CHILD_SA SK { N(REKEY_SA), SA, Ni, TSi, TSr } -->
    #                        <-- INFORMATIONAL SK { D(ESP, spi) }
    # <-- CREATE_CHILD_SA SK { N(TEMPORARY_FAILURE) }   (the child is being deleted)
    #                        INFORMATIONAL SK { D(ESP, spi) } -->
    [req_r] = p.pending(rekeyer)
    [req_d] = p.pending(deleter)
    p.deliver(rekeyer, req_r.data, req_r)
    p.deliver(deleter, req_d.data, req_d)
    p.flush()
    # The deletion wins: "net" is gone on both sides, nothing half-made remains.
    assert [c.name for c in p.live("a").values()] == ["ctr"]
    assert_children_agree(p)
    for side in ("a", "b"):
        sa = p.sa(side)
        assert all(c.state.name == "INSTALLED" for c in sa.children.values())
        installed = {e.spi_in for e in p.of(side, ChildSaInstalled)}
        deleted = {e.spi_in for e in p.of(side, ChildSaDeleted)}
        assert installed <= deleted
    assert p.dpd_ok("a") and p.dpd_ok("b")


@pytest.mark.parametrize("deleter", ["a", "b"])
def test_ike_delete_collides_with_ike_rekey(deleter: str) -> None:
    p = established()
    rekeyer = "b" if deleter == "a" else "a"
    p.engine(rekeyer).rekey_ike(p.ike_id(rekeyer), p.now)
    p.engine(deleter).delete_ike(p.ike_id(deleter), p.now)
    # CREATE_CHILD_SA SK { SA(IKE), Ni, KEi } -->   <-- INFORMATIONAL SK { D(IKE) }
    [req_r] = p.pending(rekeyer)
    [req_d] = p.pending(deleter)
    p.deliver(rekeyer, req_r.data, req_r)
    p.deliver(deleter, req_d.data, req_d)
    p.flush()
    p.advance(60.0)
    # Everything is gone on both sides (RFC 7296 §2.25.2).
    assert not p.a.by_id and not p.b.by_id
    assert not p.live("a") and not p.live("b")


def test_child_rekey_while_ike_rekey() -> None:
    p = established()
    spi = p.child_named("b", "net").spi_in
    p.a.rekey_ike(p.ike_id("a"), p.now)
    p.b.rekey_child(p.ike_id("b"), spi, p.now)
    # CREATE_CHILD_SA SK { SA(IKE), Ni, KEi } -->
    #                   <-- CREATE_CHILD_SA SK { N(REKEY_SA), SA, Ni, TSi, TSr }
    # <-- N(TEMPORARY_FAILURE) (RFC 7296 §2.25.2: child exchange in progress)
    cross_ok = p.pending("a"), p.pending("b")
    for sender, outs in zip(("a", "b"), cross_ok, strict=True):
        for o in outs:
            p.deliver(sender, o.data, o)
    p.flush()
    p.advance(30.0)  # retries after TEMPORARY_FAILURE
    assert len(p.a.by_id) == 1 and len(p.b.by_id) == 1
    assert_children_agree(p)
    assert p.dpd_ok("a") and p.dpd_ok("b")


@pytest.mark.parametrize("lost", ["a", "b"])
@pytest.mark.parametrize("delete_lost", [False, True])
def test_ike_rekey_collision_with_lost_request(lost: str, delete_lost: bool) -> None:
    """§2.8.2 with one request lost: the other rekey completes first and the
    peer deletes the old SA, while the lost one is retransmitted. The side
    whose request was lost holds the peer's new SA (created when it answered)
    and must move its children there, not lose them with the old SA. With
    ``delete_lost``, the retransmit gets TEMPORARY_FAILURE before the delete
    arrives."""
    p = established()
    won = other(lost)
    p.engine(lost).rekey_ike(p.ike_id(lost), p.now)
    p.engine(won).rekey_ike(p.ike_id(won), p.now)
    # CREATE_CHILD_SA SK { SA(IKE), Ni, KEi } -->   (lost)
    p.pending(lost)
    #                  <-- CREATE_CHILD_SA SK { SA(IKE), Nr, KEr }
    [req] = p.pending(won)
    p.deliver(won, req.data, req)
    # CREATE_CHILD_SA SK { SA(IKE), Nr, KEr } -->   (the answer)
    p.step(lost)
    # (the winner's rekey is done: it deletes the old SA)
    assert [sa.state for sa in p.engine(won).by_id.values()].count(IkeState.DELETING) == 1
    if delete_lost:
        #                  <-- INFORMATIONAL(old) SK { D(IKE) }   (lost)
        p.pending(won)
    # retransmits, deletes, DPDs
    p.advance(120.0)
    spis_a = {(sa.spi_i, sa.spi_r) for sa in p.a.by_id.values() if sa.established}
    spis_b = {(sa.spi_i, sa.spi_r) for sa in p.b.by_id.values() if sa.established}
    assert spis_a == spis_b and len(spis_a) == 1
    assert len(p.live("a")) == 2
    assert_children_agree(p)
    assert not p.of(lost, ChildSaDeleted) and not p.of(won, ChildSaDeleted)
    assert p.dpd_ok("a") and p.dpd_ok("b")


@pytest.mark.parametrize("ini", ["a", "b"])
def test_child_rekey_refused_after_peer_rekey_of_same_child(ini: str) -> None:
    """§2.8.1 where the peer's rekey of the child completes before ours
    arrives: ours is refused (TEMPORARY_FAILURE). The child was replaced by
    the peer's exchange; the collision record must not outlive our rekey."""
    p = established()
    peer = other(ini)
    old = p.child_named(ini, "net")
    p.engine(ini).rekey_child(p.ike_id(ini), old.spi_in, p.now)
    # CREATE_CHILD_SA SK { N(REKEY_SA), SA, Ni, TSi, TSr } -->   (held back)
    [ours] = p.pending(ini)
    p.engine(peer).rekey_child(p.ike_id(peer), old.spi_out, p.now)
    #              <-- CREATE_CHILD_SA SK { N(REKEY_SA), SA, Ni, TSi, TSr }
    p.step(peer)
    assert old.peer_rekey_child is not None
    # CREATE_CHILD_SA SK { SA, Nr, TSi, TSr } -->   (the peer's rekey is done)
    p.step(ini)
    # CREATE_CHILD_SA (ours, late) -->   <-- N(TEMPORARY_FAILURE)
    # (the peer's INFORMATIONAL { D(ESP, old) } is held back meanwhile)
    p.deliver(ini, ours.data, ours)
    out = p.pending(peer)
    [refusal] = [o for o in out if decode_header(o.data).is_response]
    [delete] = [o for o in out if not decode_header(o.data).is_response]
    assert decode_message(refusal.data, p.sa(ini).sk_in).has_notify(
        NotifyType.TEMPORARY_FAILURE)
    p.deliver(peer, refusal.data, refusal)
    assert old.state is ChildState.REKEYED
    assert old.peer_rekey_nonces is None and old.peer_rekey_child is None
    #              <-- INFORMATIONAL SK { D(ESP, old) }
    p.deliver(peer, delete.data, delete)
    p.flush()
    assert len(p.live("a")) == 2 and old.spi_in not in p.live(ini)
    assert_children_agree(p)
    assert p.dpd_ok("a") and p.dpd_ok("b")


@pytest.mark.parametrize("lowest", LOWEST)
def test_ike_rekey_collision_new_sas_not_due_for_dpd(lowest: str) -> None:
    """Every IKE SA a rekey creates has heard from the peer when it is made:
    the one that loses the collision is not due for DPD at once."""
    p = established()
    p.now = 1000.0
    na, nb = scripted(lowest)
    script_nonces(p.a, *na)
    script_nonces(p.b, *nb)
    old = {p.sa("a").ike_id, p.sa("b").ike_id}
    p.a.rekey_ike(p.ike_id("a"), p.now)
    p.b.rekey_ike(p.ike_id("b"), p.now)
    # CREATE_CHILD_SA (a) -->   <-- CREATE_CHILD_SA (b), answers crossing
    cross(p)
    new = [sa for e in (p.a, p.b) for sa in e.by_id.values() if sa.ike_id not in old]
    assert len(new) == 4
    assert all(sa.last_heard == p.now for sa in new)
