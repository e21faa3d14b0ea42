"""Hostile RFC 7383 fragments (Hypothesis): random fragment numbers, totals,
sizes and bodies, forged or sealed with the peer's real keys, never crash the
engine and never grow reassembly state past its bounds
(common/ike/fragments.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.ike.constants import ExchangeType, PayloadType
from common.ike.context import IkeState
from common.ike.fragments import SKF_HEADER, SKF_HEADER_LEN
from common.ike.message import IkeMessage, encode_header
from common.ike.sa import IkeSa
from tests.fuzz import fuzz_settings
from tests.ike_pair import Pair, make_pair

PEER = ("198.18.0.1", 4500)
_PAIR: list[Pair] = []


def established() -> Pair:
    """One established pair for the whole module (each example adds to its
    state, which is the point: the bounds hold whatever came before)."""
    if not _PAIR:
        p = make_pair(extra_children=False)
        p.establish("a")
        _PAIR.append(p)
    return _PAIR[0]


def sealed_fragment(sa: IkeSa, mid: int, response: bool, number: int, total: int,
                    next_type: int, piece: bytes, iv: bytes) -> bytes:
    """A fragment as the authenticated peer ``sa`` can make it: any numbers."""
    assert sa.sk_out is not None
    msg = IkeMessage(sa.spi_i, sa.spi_r, ExchangeType.INFORMATIONAL, mid, response,
                     sa.initiator, [])
    skf_len = SKF_HEADER_LEN + sa.sk_out.sealed_size(len(piece))
    aad = (encode_header(msg, PayloadType.SKF, 28 + skf_len)
           + SKF_HEADER.pack(next_type, 0, skf_len, number, total))
    return aad + sa.sk_out.seal(aad, piece, iv)


def check_bounds(p: Pair) -> None:
    r = p.b.ctx.reassembly
    # One IKE SA: at most one partial message per direction (window size 1).
    assert len(r) <= 2
    assert r.held_bytes <= r.max_bytes * 2
    assert r.held_fragments <= r.max_fragments * 2
    assert p.sa("b").state is IkeState.ESTABLISHED


@pytest.mark.fuzz
@fuzz_settings(200)
@given(number=st.integers(0, 80) | st.integers(0, 0xFFFF),
       total=st.integers(0, 80) | st.integers(0, 0xFFFF),
       mid_offset=st.sampled_from([0, 0, 0, -1, 1, 2]), response=st.booleans(),
       next_type=st.integers(0, 255), piece=st.binary(max_size=1200),
       iv=st.binary(min_size=8, max_size=8), dt=st.floats(0, 40))
def test_authenticated_hostile_fragments_stay_bounded(
        number: int, total: int, mid_offset: int, response: bool, next_type: int,
        piece: bytes, iv: bytes, dt: float) -> None:
    p = established()
    sa_a, sa_b = p.sa("a"), p.sa("b")
    mid = max(0, (sa_b.mids.recv_next if not response else sa_b.mids.request_id)
              + mid_offset)
    data = sealed_fragment(sa_a, mid, response, number, total, next_type, piece, iv)
    p.now += dt
    p.b.receive_datagram(data, PEER, 4500, p.now)
    p.b.datagrams_to_send()
    check_bounds(p)


@pytest.mark.fuzz
@fuzz_settings(200)
@given(number=st.integers(0, 0xFFFF), total=st.integers(0, 0xFFFF),
       mid_offset=st.integers(-1, 2), body=st.binary(max_size=1500),
       length_delta=st.integers(-3, 3))
def test_forged_fragments_are_never_stored(number: int, total: int, mid_offset: int,
                                           body: bytes, length_delta: int) -> None:
    p = established()
    sa_a, sa_b = p.sa("a"), p.sa("b")
    before = len(p.b.ctx.reassembly)
    msg = IkeMessage(sa_a.spi_i, sa_a.spi_r, ExchangeType.INFORMATIONAL,
                     max(0, sa_b.mids.recv_next + mid_offset), False, True, [])
    skf_len = max(0, SKF_HEADER_LEN + len(body) + length_delta)
    data = (encode_header(msg, PayloadType.SKF, 28 + SKF_HEADER_LEN + len(body))
            + SKF_HEADER.pack(0, 0, min(skf_len, 0xFFFF), number, total) + body)
    p.b.receive_datagram(data, PEER, 4500, p.now)
    p.b.datagrams_to_send()
    assert len(p.b.ctx.reassembly) <= before
    check_bounds(p)
