"""RFC 7383 IKE fragmentation between two in-memory engines: negotiation,
splitting, reassembly, loss, duplicates, reordering and the bounds."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.harness.configs import dumps
from common.cluster.routing import PortKind, Route, RouteKind, route_datagram
from common.cluster.segments import SegmentTable
from common.config import ConfigError, load_config
from common.ike.constants import IKE_HEADER_LEN, ExchangeType, NotifyType, PayloadType
from common.ike.context import IkeState, Outgoing
from common.ike.fragments import (
    DROP_FRAGMENT_DUPLICATE,
    DROP_FRAGMENT_FULL,
    DROP_FRAGMENT_LIMIT,
    DROP_FRAGMENT_TOTAL,
    MAX_FRAGMENTS_PER_MESSAGE,
    Fragment,
    FragmentRefused,
    Reassembly,
    max_message_len,
    split_message,
)
from common.ike.message import IkeMessage, decode_header
from common.ike.payloads import NotifyPayload
from common.ike.policy import policies_from_config
from tests.ike_pair import Pair, assert_children_agree, child, make_pair
from tests.test_config import BASE, with_change

#: 4500 after the NAT-T float: the datagram carries a non-ESP marker too.
LIMIT = max_message_len(1280, "198.18.0.1", natt=True)


def big_children(n: int = 90) -> tuple[list, list]:
    """Children whose selectors make IKE_AUTH about 3 kB each way."""
    left = [f"10.50.{i}.0/24" for i in range(n)]
    right = [f"10.60.{i}.0/24" for i in range(n)]
    return [child("net", left, right)], [child("net", right, left)]


def big_pair(ini: str = "a", **kw: object) -> Pair:
    ca, cb = big_children()
    if ini == "b":
        ca, cb = cb, ca
    return make_pair(children_a=ca, children_b=cb, **kw)  # type: ignore[arg-type]


def is_fragment(data: bytes) -> bool:
    return len(data) > IKE_HEADER_LEN and data[16] == PayloadType.SKF


def auth_fragments(p: Pair, side: str) -> list[bytes]:
    return [o.data for s, o in p.wire if s == side and is_fragment(o.data)
            and decode_header(o.data).exchange == ExchangeType.IKE_AUTH]


@pytest.mark.parametrize("ini", ["a", "b"])
def test_large_ike_auth_goes_in_fragments_both_ways(ini: str) -> None:
    p = big_pair(ini)
    p.initiate(ini)
    p.flush()
    assert p.sa("a").state is IkeState.ESTABLISHED
    assert p.sa("b").state is IkeState.ESTABLISHED
    assert p.sa("a").peer_fragmentation and p.sa("b").peer_fragmentation
    for side in ("a", "b"):
        frags = auth_fragments(p, side)
        assert len(frags) >= 3, side
        assert all(len(f) <= LIMIT for f in frags)
    # RFC 7383 §2.5.3: IKE_SA_INIT is never fragmented.
    inits = [o.data for _, o in p.wire if decode_header(o.data).exchange
             == ExchangeType.IKE_SA_INIT]
    assert inits and not any(is_fragment(d) for d in inits)
    assert_children_agree(p)
    assert len(p.sa("a").children[next(iter(p.sa("a").children))].local_ts) == 90


@pytest.mark.parametrize("setting", ["no", "accept"])
def test_no_fragments_unless_both_sides_use_them(setting: str) -> None:
    p = big_pair()
    p.b.policies["conn"].fragmentation = setting
    p.establish("a")
    if setting == "no":
        # Not announced: neither side sends fragments.
        assert not p.sa("a").peer_fragmentation
        assert not auth_fragments(p, "a") and not auth_fragments(p, "b")
    else:
        # "accept" (strongSwan's meaning): announced, taken, never sent.
        assert auth_fragments(p, "a") and not auth_fragments(p, "b")


def test_small_messages_go_whole() -> None:
    p = make_pair()
    p.establish("a")
    assert not any(is_fragment(o.data) for _, o in p.wire)


def test_lost_request_fragment_is_resent_with_all_fragments() -> None:
    p = big_pair()
    lost: list[bytes] = []

    def drop(sender: str, out: Outgoing) -> bool:
        if sender == "a" and is_fragment(out.data) and out.data[IKE_HEADER_LEN + 5] == 2 \
                and not lost:
            lost.append(out.data)
            return True
        return False

    p.drop = drop
    p.initiate("a")
    p.flush()
    assert p.sa("a").state is IkeState.AUTH_SENT
    first = auth_fragments(p, "a")
    p.advance(3.0)
    assert p.sa("b").state is IkeState.ESTABLISHED
    assert p.sa("a").state is IkeState.ESTABLISHED
    # RFC 7383 §2.6: the retransmission is every fragment, the same bytes.
    again = auth_fragments(p, "a")[len(first):]
    assert again == first


def test_lost_response_fragment_answered_once_from_cache() -> None:
    p = big_pair()
    dropped: list[bytes] = []

    def drop(sender: str, out: Outgoing) -> bool:
        if sender == "b" and is_fragment(out.data) and not dropped:
            dropped.append(out.data)
            return True
        return False

    p.drop = drop
    p.initiate("a")
    p.flush()
    assert p.sa("b").state is IkeState.ESTABLISHED
    assert p.sa("a").state is IkeState.AUTH_SENT
    response = auth_fragments(p, "b")
    p.advance(3.0)
    assert p.sa("a").state is IkeState.ESTABLISHED
    # n request fragments again, one cached response (all of its fragments).
    assert auth_fragments(p, "b")[len(response):] == response
    assert p.sa("b").counters["retransmits_answered"] == 1


def test_reordered_and_duplicated_fragments() -> None:
    p = big_pair()
    p.initiate("a")
    p.step("a")  # IKE_SA_INIT
    p.step("b")
    frags = [o.data for o in p.pending("a")]
    assert len(frags) >= 3 and all(is_fragment(f) for f in frags)
    for f in [frags[-1], frags[0], frags[-1], *frags[1:-1][::-1]]:
        p.deliver("a", f)
    assert p.b.drops[DROP_FRAGMENT_DUPLICATE] == 1
    p.flush()
    assert p.sa("a").state is IkeState.ESTABLISHED
    assert len(p.b.ctx.reassembly) == 0


def test_forged_fragment_is_not_stored() -> None:
    p = big_pair()
    p.initiate("a")
    p.step("a")
    p.step("b")
    frags = [o.data for o in p.pending("a")]
    bad = bytearray(frags[0])
    bad[-1] ^= 1
    p.deliver("a", bytes(bad))
    assert p.b.drops["integrity"] == 1
    assert len(p.b.ctx.reassembly) == 0


def test_limits_and_totals() -> None:
    r = Reassembly(max_fragments=4, max_bytes=100, max_messages=2, timeout_s=10.0)
    assert r.add((1, 1, False), Fragment(1, 3, 35, b"a" * 10), 0.0) is None
    # RFC 7383 §2.6.2: a smaller total than stored is stale: dropped.
    with pytest.raises(FragmentRefused) as e:
        r.add((1, 1, False), Fragment(2, 2, 0, b"b"), 0.0)
    assert e.value.drop_reason == DROP_FRAGMENT_TOTAL
    # A larger total: the sender re-fragmented; start over.
    assert r.add((1, 1, False), Fragment(2, 4, 0, b"b"), 0.0) is None
    assert r.held_fragments == 1
    with pytest.raises(FragmentRefused) as e:
        r.add((2, 1, False), Fragment(1, 5, 0, b"x"), 0.0)
    assert e.value.drop_reason == DROP_FRAGMENT_LIMIT
    r.add((2, 1, False), Fragment(1, 2, 0, b"x"), 0.0)
    with pytest.raises(FragmentRefused) as e:
        r.add((3, 1, False), Fragment(1, 2, 0, b"x"), 0.0)
    assert e.value.drop_reason == DROP_FRAGMENT_FULL
    with pytest.raises(FragmentRefused) as e:
        r.add((2, 1, False), Fragment(2, 2, 0, b"x" * 100), 0.0)
    assert e.value.drop_reason == DROP_FRAGMENT_LIMIT
    assert len(r) == 1
    # Timed out partial messages make room.
    assert r.add((3, 1, False), Fragment(1, 2, 0, b"x"), 11.0) is None
    assert len(r) == 1
    # A new message ID of the same SA and direction replaces the old one.
    r.add((3, 2, False), Fragment(1, 2, 0, b"y"), 11.0)
    assert len(r) == 1
    assert r.add((3, 2, False), Fragment(2, 2, 0, b"z"), 11.0) == (0, b"yz")
    r.add((4, 0, True), Fragment(1, 2, 0, b"y"), 11.0)
    r.forget(4)
    assert len(r) == 0


def test_flood_of_authenticated_fragments_stays_bounded() -> None:
    """An established peer (it holds the keys) sends fragment after fragment:
    of the next message ID, of later ones, with every total: state stays
    within one partial message per direction and the byte limit."""
    p = big_pair()
    p.establish("a")
    sa_a, sa_b = p.sa("a"), p.sa("b")
    assert sa_a.sk_out is not None
    held = 0
    for i in range(400):
        mid = sa_b.mids.recv_next + (i % 3)
        total = 1 + (i * 7) % (MAX_FRAGMENTS_PER_MESSAGE + 5)
        msg = IkeMessage(sa_a.spi_i, sa_a.spi_r, ExchangeType.INFORMATIONAL, mid, False,
                         True, [NotifyPayload(NotifyType(16384 + i % 50), data=bytes(600))])
        frags = split_message(msg, sa_a.sk_out, p.a.ctx.random, 400) or []
        # Send all but the last, with a forged total in the header fields
        # we cannot change (they are authenticated): vary which we send.
        for f in frags[:-1][: total]:
            p.b.receive_datagram(f, ("198.18.0.1", 4500), 4500, p.now)
        held = max(held, p.b.ctx.reassembly.held_bytes)
        assert len(p.b.ctx.reassembly) <= 1
    assert held <= p.b.ctx.reassembly.max_bytes
    assert sa_b.state is IkeState.ESTABLISHED
    p.b.delete_ike(sa_b.ike_id, p.now)
    p.flush()
    assert len(p.b.ctx.reassembly) == 0



def test_fragments_route_to_the_member_that_owns_the_sa() -> None:
    """Cluster: every fragment carries the IKE header with our SPI, so the
    dispatcher's routing sends it where the IKE SA lives, like any IKE
    message (side a allocates SPIs in segment 1, side b in segment 2)."""
    table = SegmentTable(8).assign([1, 2, 3])
    p = big_pair()
    p.initiate("a")
    p.step("a")
    p.step("b")
    p.flush()
    assert p.sa("a").state is IkeState.ESTABLISHED
    for sender, segment in (("a", 2), ("b", 1)):
        frags = auth_fragments(p, sender)
        assert frags
        for f in frags:
            route = route_datagram(PortKind.NATT, bytes(4) + f, bytes([198, 18, 0, 1]),
                                   4500, table)
            assert route == Route(RouteKind.IKE, segment, table.owner(segment)), sender


@pytest.mark.parametrize("value", ["yes", "accept", "force", "no"])
def test_config_fragmentation_reaches_the_policy(value: str) -> None:
    cfg = load_config(with_change("connections.branch.fragmentation", value), "gw.toml")
    assert cfg.connections["branch"].fragmentation == value
    cfg = replace(cfg, connections={"branch": replace(cfg.connections["branch"],
                                                       psk=b"k")})
    assert policies_from_config(cfg.connections)[0].fragmentation == value


def test_config_fragmentation_default_and_bad_value() -> None:
    assert load_config(dumps(BASE), "gw.toml").connections["branch"].fragmentation == "yes"
    with pytest.raises(ConfigError, match=r"fragmentation: expected one of .*\"force\""):
        load_config(with_change("connections.branch.fragmentation", "maybe"), "gw.toml")


def test_rekeyed_ike_sa_keeps_fragmenting() -> None:
    """Support is announced in IKE_SA_INIT only (RFC 7383 §2.3): the IKE SA
    that replaces this one by a rekey still sends fragments."""
    p = big_pair()
    p.establish("a")
    p.a.rekey_ike(p.ike_id("a"), p.now)
    p.flush()
    p.advance(1.0)
    new_a = p.established_sa("a")
    assert new_a.peer_fragmentation
    before = len(p.wire)
    p.a.create_child(new_a.ike_id, "net", p.now)
    p.flush()
    later = [o.data for _, o in p.wire[before:]]
    assert any(is_fragment(d) for d in later)
    assert p.established_sa("b").peer_fragmentation
