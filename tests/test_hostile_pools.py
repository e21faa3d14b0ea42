"""Hostile Configuration payloads (RFC 7296 §3.15): random CP bodies decode or
raise MalformedMessage, and any CP request an authenticated peer sends leases
at most one address per family, from its IKE SA's partition, without an
exception escaping the engine."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import MalformedMessage
from common.ike.constants import CfgAttr, PayloadType
from common.ike.payloads import CfgAttribute, decode_payloads
from tests.fuzz import fuzz_settings
from tests.ike_pair import B_ADDR
from tests.test_pools import _gateway_pools, _request_vip, _road_warrior

pytestmark = pytest.mark.fuzz


@fuzz_settings(300)
@given(st.binary(max_size=80))
def test_random_cp_bodies_raise_only_malformed(body: bytes) -> None:
    data = bytes([0, 0]) + (4 + len(body)).to_bytes(2, "big") + body
    try:
        decode_payloads(PayloadType.CP, data)
    except MalformedMessage:
        pass


_ATTR = st.builds(
    CfgAttribute,
    st.sampled_from([CfgAttr.INTERNAL_IP4_ADDRESS, CfgAttr.INTERNAL_IP6_ADDRESS,
                     CfgAttr.INTERNAL_IP4_DNS, CfgAttr.INTERNAL_IP6_DNS,
                     CfgAttr.INTERNAL_IP4_NETMASK, CfgAttr(0x1234)]),
    st.one_of(st.just(b""), st.binary(min_size=4, max_size=4),
              st.binary(min_size=17, max_size=17), st.binary(max_size=40)))


@fuzz_settings(25)
@given(st.lists(_ATTR, max_size=8))
def test_any_cp_request_leases_at_most_one_address_per_family(
        attrs: list[CfgAttribute]) -> None:
    with pytest.MonkeyPatch.context() as mp:
        # (no attributes at all would mean "the usual request" to the helper)
        _request_vip(mp, *(attrs or [CfgAttribute(CfgAttr(0x1234), b"x")]))
        p = _road_warrior()
        pools = _gateway_pools(p.b)
        p.a.initiate("conn", B_ADDR, 0.0)
        p.flush()
    (gw,) = p.b.established()
    families = [lease.address.version for lease in gw.leases]
    assert families in ([], [4])   # the pools are IPv4 only
    asked = any(a.attr_type == CfgAttr.INTERNAL_IP4_ADDRESS for a in attrs)
    assert bool(gw.leases) == asked
    for lease in gw.leases:
        assert pools.pools["rw"].segment_of(lease.address) == pools.segment_of_spi(gw.spi_r)
    assert sum(len(p.leased) for p in pools.pools.values()) == len(gw.leases)
