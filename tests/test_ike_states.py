"""The IKE SA and child SA state tables are the single source of truth
(docs/design.md "Code conventions": an unknown (state, input) pair moves the machine to a terminal
state and raises)."""

from __future__ import annotations

import pytest

from common.errors import IpsecClusterError, LocalProtocolError, PeerTimeout
from common.ike.constants import ExchangeType
from common.ike.context import IKE_TRANSITIONS, ChildInput, ChildState, IkeInput, IkeState
from common.ike.events import DpdSucceeded, IkeSaDeleted, IkeSaFailed
from common.ike.message import decode_header
from common.ike.msgid import MessageIds, RetransmitPolicy, RetransmitsExhausted
from tests.ike_pair import Pair, assert_children_agree, make_pair


def test_fail_goes_through_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_pair()
    p.establish("a")
    sa = p.sa("a")
    sa.fail("test")
    assert sa.state is IkeState.FAILED
    assert p.a.next_event() is not None
    # Without the table's row, failing is a bug in the core, not a silent set.
    p = make_pair()
    p.establish("a")
    sa = p.sa("a")
    monkeypatch.delitem(IKE_TRANSITIONS, (IkeState.ESTABLISHED, IkeInput.FAILED))
    with pytest.raises(LocalProtocolError):
        sa.fail("test")
    assert sa.state is IkeState.FAILED


def test_fail_on_a_terminal_sa_is_a_no_op() -> None:
    p = make_pair()
    p.establish("a")
    sa = p.sa("a")
    sa.fail("first")
    sa.fail("second")
    p.drain()
    assert [e.reason for e in p.of("a", IkeSaFailed)] == ["first"]


def test_unknown_child_transition_ends_the_child() -> None:
    p = make_pair()
    p.establish("a")
    c = p.child_named("a", "net")
    c.apply(ChildInput.DELETE_STARTED)
    with pytest.raises(LocalProtocolError):
        c.apply(ChildInput.REKEY_STARTED)  # (DELETING, REKEY_STARTED): no row
    assert c.state is ChildState.DELETED


def test_retransmits_exhausted_is_in_the_exception_tree() -> None:
    mids = MessageIds(policy=RetransmitPolicy(timeout_s=1.0, base=1.0, tries=0))
    mids.sent_request(mids.take_request_id(), b"request", 0.0)
    with pytest.raises(RetransmitsExhausted) as info:
        mids.retransmit_due(1.0)
    assert isinstance(info.value, PeerTimeout)
    assert isinstance(info.value, IpsecClusterError)


# -- actions on IKE SAs that are not (or no longer) established -------------------------


def _half_open() -> Pair:
    p = make_pair()
    p.initiate("a")
    # IKE_SA_INIT { SAi1, KEi, Ni } -->
    p.step("a")
    assert p.sa("b").state is IkeState.HALF_OPEN
    return p


def test_actions_on_half_open_responder_wait_for_ike_auth() -> None:
    p = _half_open()
    sa_b = p.sa("b")
    p.b.dpd(sa_b.ike_id, p.now)
    p.b.create_child(sa_b.ike_id, "ctr", p.now)
    # Nothing goes to a peer that is not authenticated yet...
    [init_answer] = p.pending("b")
    assert decode_header(init_answer.data).exchange == ExchangeType.IKE_SA_INIT
    p.deliver("b", init_answer.data, init_answer)
    # IKE_AUTH { IDi, AUTH, SAi2, TSi, TSr } -->   <-- IKE_AUTH { IDr, AUTH, ... }
    # ...then the queued DPD and CREATE_CHILD_SA run.
    p.flush()
    assert sa_b.state is IkeState.ESTABLISHED
    assert p.of("b", DpdSucceeded)
    assert len(p.live("b")) == 3
    assert_children_agree(p)


def test_actions_on_initiator_queue_behind_ike_auth() -> None:
    p = make_pair(extra_children=False)
    ike_id = p.initiate("a")
    p.a.dpd(ike_id, p.now)
    p.flush()
    assert p.of("a", DpdSucceeded) and p.sa("a").state is IkeState.ESTABLISHED


def test_delete_ike_before_established_ends_it_locally() -> None:
    p = _half_open()
    sa_b = p.sa("b")
    p.b.delete_ike(sa_b.ike_id, p.now)
    p.drain()
    assert [e.ike_id for e in p.of("b", IkeSaDeleted)] == [sa_b.ike_id]
    assert sa_b.state is IkeState.DELETED and not p.b.by_id
    assert [decode_header(o.data).exchange for o in p.pending("b")] == \
        [ExchangeType.IKE_SA_INIT]


@pytest.mark.parametrize("action", ["dpd", "rekey_ike", "create_child", "rekey_child",
                                    "delete_child"])
def test_actions_on_deleting_sa_refused(action: str) -> None:
    p = make_pair()
    p.establish("a")
    sa = p.sa("a")
    spi = p.child_named("a", "net").spi_in
    p.a.delete_ike(sa.ike_id, p.now)
    p.pending("a")
    assert sa.state is IkeState.DELETING
    args: dict[str, tuple[object, ...]] = {"create_child": ("ctr",), "rekey_child": (spi,),
                                           "delete_child": (spi,)}
    with pytest.raises(LocalProtocolError):
        getattr(p.a, action)(sa.ike_id, *args.get(action, ()), p.now)
    assert sa.state is IkeState.DELETING and not p.pending("a")
    p.a.delete_ike(sa.ike_id, p.now)  # already under way: nothing more
    assert not p.pending("a")
