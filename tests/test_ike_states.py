"""The IKE SA and child SA state tables are the single source of truth
(STYLE.md: an unknown (state, input) pair moves the machine to a terminal
state and raises)."""

from __future__ import annotations

import pytest

from common.errors import IpsecClusterError, LocalProtocolError, PeerTimeout
from common.ike.child import ChildInput, ChildState
from common.ike.events import IkeSaFailed
from common.ike.msgid import MessageIds, RetransmitPolicy, RetransmitsExhausted
from common.ike.sa import IKE_TRANSITIONS, IkeInput, IkeState
from tests.ike_pair import make_pair


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
