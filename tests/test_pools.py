"""Virtual IPs (RFC 7296 §3.15): the pools partitioned by segment
(common/cluster/pools.py), the CP payload codec, the CP exchange in IKE_AUTH with the
peer's traffic selector narrowed to its lease, and leases kept across a
takeover of the IKE SA's replica."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.harness.configs import dumps
from common.cluster.pools import Lease, Pool, PoolSet
from common.cluster.snapshot import restore, snapshot
from common.cluster.sync import decode_sync, encode_sync
from common.config import load_config
from common.errors import MalformedMessage
from common.ike.constants import CfgAttr, CfgType, PayloadType
from common.ike.exchanges.ike_auth import IkeAuthTask
from common.ike.payloads import (
    CfgAttribute,
    CpPayload,
    Payload,
    decode_payloads,
    encode_payloads,
)
from common.ike.sa import IkeSa
from tests.ike_pair import B_ADDR, Pair, child, engine, make_pair

V4 = ipaddress.IPv4Address

# -- the partition ------------------------------------------------------------


def test_usable_addresses_skip_network_and_broadcast() -> None:
    pool = Pool("rw", ipaddress.ip_network("10.3.0.0/24"), segment_bits=2)
    assert pool.size == 254
    assert pool.address(0) == V4("10.3.0.1") and pool.address(253) == V4("10.3.0.254")
    assert pool.index_of(V4("10.3.0.0")) is None and pool.index_of(V4("10.3.0.255")) is None
    assert [pool.per_segment(s) for s in range(4)] == [64, 64, 63, 63]
    assert sum(pool.per_segment(s) for s in range(4)) == pool.size


def test_a_segment_leases_only_its_partition_until_it_is_full() -> None:
    pool = Pool("rw", ipaddress.ip_network("10.3.0.0/28"), segment_bits=2)  # 14 addresses
    got = [pool.lease(1, b"peer%d" % i) for i in range(5)]
    assert got[:4] == [V4("10.3.0.2"), V4("10.3.0.6"), V4("10.3.0.10"), V4("10.3.0.14")]
    assert got[4] is None  # segment 1's four addresses are taken
    assert all(pool.segment_of(a) == 1 for a in got[:4] if a is not None)
    pool.release(V4("10.3.0.6"))
    assert pool.lease(1, b"peer9") == V4("10.3.0.6")


def test_a_reconnecting_peer_gets_its_old_address_back_when_free() -> None:
    pool = Pool("rw", ipaddress.ip_network("10.3.0.0/24"), segment_bits=1)
    alice, bob = pool.lease(0, b"alice"), pool.lease(0, b"bob")
    assert alice is not None and bob is not None
    pool.release(alice)
    pool.release(bob)
    assert pool.lease(0, b"bob") == bob        # not the lowest free one (alice's)
    assert pool.lease(0, b"carol", prefer=alice) == alice   # a requested address
    assert pool.lease(0, b"alice") not in (alice, bob)     # taken: another one


def test_an_ipv6_pool_leases_from_a_large_prefix_without_enumerating_it() -> None:
    pool = Pool("rw6", ipaddress.ip_network("fd00:3::/64"), segment_bits=8)
    assert pool.per_segment(5) == (2 ** 64 - 1 - 5 + 255) // 256
    assert pool.lease(5, b"x") == ipaddress.IPv6Address("fd00:3::6")


@st.composite
def _ops(draw: st.DrawFn) -> tuple[int, int, list[tuple[str, int, int]]]:
    bits = draw(st.integers(1, 3))
    members = draw(st.integers(1, 4))
    ops = draw(st.lists(st.tuples(st.sampled_from(["lease", "release", "move", "kill"]),
                                  st.integers(0, 7), st.integers(0, 7)), max_size=60))
    return bits, members, ops


@settings(max_examples=150, deadline=None)
@given(_ops())
def test_no_address_is_leased_twice_across_members(
        case: tuple[int, int, list[tuple[str, int, int]]]) -> None:
    """Any segment table, any sequence of leases, releases, planned moves and
    member deaths: the live IKE SAs never hold one address twice, and the owner
    of each segment knows every lease of its segment's SAs."""
    bits, n_members, ops = case
    net = ipaddress.ip_network("10.3.0.0/28")   # 14 addresses: pools fill up
    pools = {m: PoolSet([Pool("rw", net)], bits) for m in range(n_members)}
    owner = {s: s % n_members for s in range(1 << bits)}
    live: dict[int, tuple[int, Lease]] = {}   # SA -> (segment, lease); the replicas
    next_sa = 0
    for op, x, y in ops:
        seg = x % (1 << bits)
        if op == "lease":
            lease = pools[owner[seg]].lease(["rw"], 4, seg, b"sa%d" % next_sa)
            if lease is not None:
                live[next_sa] = (seg, lease)
            next_sa += 1
        elif op == "release" and live:
            sa = sorted(live)[y % len(live)]
            s, lease = live.pop(sa)
            pools[owner[s]].release(lease)
        elif op in ("move", "kill"):
            old = owner[seg]
            new = y % n_members
            moved = [s for s, o in owner.items() if o == old] if op == "kill" else [seg]
            if op == "kill":
                pools[old] = PoolSet([Pool("rw", net)], bits)  # a restart forgets all
            for s in moved:
                owner[s] = new
                for sa, (ls, lease) in live.items():
                    if ls == s:
                        # the new owner adopts the replica; a live old owner forgets it
                        pools[new].claim(lease, b"sa%d" % sa)
                        if op == "move" and old != new:
                            pools[old].release(lease)
        addrs = [lease.address for _, lease in live.values()]
        assert len(addrs) == len(set(addrs))
        for s, lease in live.values():
            assert pools[owner[s]].pools["rw"].index_of(lease.address) in \
                pools[owner[s]].pools["rw"].leased


# -- the CP payload codec ---------------------------------------------------


def test_cp_payload_round_trips_with_its_attributes() -> None:
    cp = CpPayload(CfgType.CFG_REPLY, [
        CfgAttribute(CfgAttr.INTERNAL_IP4_ADDRESS, bytes([10, 3, 0, 1])),
        CfgAttribute(CfgAttr.INTERNAL_IP6_ADDRESS, bytes(16) + b"\x80"),
        CfgAttribute(CfgAttr.INTERNAL_IP4_DNS, bytes([10, 3, 0, 53])),
        CfgAttribute(CfgAttr(0x7000), b"")])   # unknown attributes are carried
    first, data = encode_payloads([cp])
    assert first == PayloadType.CP
    assert decode_payloads(first, data) == [cp]
    # RFC 7296 §3.15.1: the R bit is ignored on receipt.
    body = bytearray(data)
    body[8] |= 0x80
    assert decode_payloads(first, bytes(body)) == [cp]


def test_a_cut_attribute_is_malformed() -> None:
    cp = CpPayload(CfgType.CFG_REQUEST, [CfgAttribute(CfgAttr.INTERNAL_IP4_ADDRESS,
                                                      bytes(4))])
    first, data = encode_payloads([cp])
    for n in range(5, len(data)):
        short = data[:2] + n.to_bytes(2, "big") + data[4:n]
        if n in (8,):     # cut between the header and the first attribute: an empty CP
            assert decode_payloads(first, short) == [CpPayload(CfgType.CFG_REQUEST)]
            continue
        with pytest.raises(MalformedMessage):
            decode_payloads(first, short)


# -- the exchange -------------------------------------------------------------

POOL_NET = "10.3.0.0/16"


def _request_vip(monkeypatch: pytest.MonkeyPatch, *attrs: CfgAttribute) -> None:
    """Our initiator has no virtual IP support: its IKE_AUTH request gets the
    CFG_REQUEST a road warrior (strongSwan ``vips = 0.0.0.0``) sends."""
    build = IkeAuthTask.build

    def with_cp(self: IkeAuthTask, sa: IkeSa, now: float) -> list[Payload] | None:
        out = build(self, sa, now)
        if out is not None:
            out.insert(1, CpPayload(CfgType.CFG_REQUEST, list(attrs) or [
                CfgAttribute(CfgAttr.INTERNAL_IP4_ADDRESS),
                CfgAttribute(CfgAttr.INTERNAL_IP4_DNS)]))
        return out

    monkeypatch.setattr(IkeAuthTask, "build", with_cp)


def _gateway_pools(e: object, net: str = POOL_NET) -> PoolSet:
    pools = PoolSet([Pool("rw", ipaddress.ip_network(net),
                          (V4("10.3.0.53"),))], 8)
    e.ctx.pools = pools  # type: ignore[attr-defined]
    for p in e.policies.values():  # type: ignore[attr-defined]
        p.pools = ["rw"]
    return pools


def _road_warrior(seed: int = 1, id_a: str = "rw-a.test") -> Pair:
    p = make_pair(seed=seed, id_a=id_a, extra_children=False,
                  children_a=[child("net", "0.0.0.0/0", "10.91.2.0/24")],
                  children_b=[child("net", "10.91.2.0/24", POOL_NET)])
    return p


@pytest.fixture
def vip(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    _request_vip(monkeypatch)
    yield


def test_cp_request_gets_a_lease_and_the_child_is_narrowed_to_it(vip: None) -> None:
    p = _road_warrior()
    pools = _gateway_pools(p.b)
    p.a.initiate("conn", B_ADDR, 0.0)
    p.flush()
    (gw,) = p.b.established()
    (lease,) = gw.leases
    seg = pools.segment_of_spi(gw.spi_r)
    assert pools.pools["rw"].segment_of(lease.address) == seg
    want = f"{lease.address}/32"
    (b_child,) = gw.children.values()
    (a_child,) = p.a.established()[0].children.values()
    assert [str(t) for t in b_child.remote_ts] == [want]
    assert [str(t) for t in a_child.local_ts] == [want]   # TSi narrowed (RFC 7296 §2.9)


def _spy_cp(monkeypatch: pytest.MonkeyPatch) -> list[CpPayload]:
    """The CP replies the gateway sends (the wire is encrypted)."""
    from common.ike.exchanges import ike_auth

    seen: list[CpPayload] = []
    answer = ike_auth.answer_cp

    def spy(sa: IkeSa, msg: object) -> list[Payload]:
        out = answer(sa, msg)  # type: ignore[arg-type]
        seen.extend(x for x in out if isinstance(x, CpPayload))
        return out

    monkeypatch.setattr(ike_auth, "answer_cp", spy)
    return seen


def test_the_reply_carries_the_address_and_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    _request_vip(monkeypatch)
    p = _road_warrior()
    _gateway_pools(p.b)
    seen = _spy_cp(monkeypatch)
    p.a.initiate("conn", B_ADDR, 0.0)
    p.flush()
    (cp,) = seen
    (gw,) = p.b.established()
    assert cp.cfg_type == CfgType.CFG_REPLY
    assert cp.attributes == [
        CfgAttribute(CfgAttr.INTERNAL_IP4_ADDRESS, gw.leases[0].address.packed),
        CfgAttribute(CfgAttr.INTERNAL_IP4_DNS, V4("10.3.0.53").packed)]


def test_two_road_warriors_get_different_addresses_and_delete_returns_them(
        vip: None) -> None:
    p = _road_warrior()
    pools = _gateway_pools(p.b)
    p.a.initiate("conn", B_ADDR, 0.0)
    p.flush()
    q = _road_warrior(seed=5, id_a="rw-b.test")
    # the second road warrior talks to the same gateway engine
    q = Pair(q.a, p.b)
    q.b.policies["conn"].remote_id = None   # both identities are accepted
    q.a.initiate("conn", B_ADDR, 0.0)
    q.flush()
    sas = p.b.established()
    assert len(sas) == 2
    addrs = {s.leases[0].address for s in sas}
    assert len(addrs) == 2
    assert len(pools.pools["rw"].leased) == 2
    (a_sa,) = p.a.established()
    p.a.delete_ike(a_sa.ike_id, p.now)
    p.flush()
    assert len(pools.pools["rw"].leased) == 1


def test_exhausted_pool_refuses_the_child_but_keeps_the_ike_sa(vip: None) -> None:
    p = _road_warrior()
    pools = _gateway_pools(p.b)
    for k in range(pools.pools["rw"].per_segment(2)):
        pools.pools["rw"].leased[2 + k * 256] = b"x"   # segment 2 (b's SPIs) is full
    p.a.initiate("conn", B_ADDR, 0.0)
    p.flush()
    (gw,) = p.b.established()
    # RFC 7296 §3.15.4: INTERNAL_ADDRESS_FAILURE, no child, the IKE SA stays
    assert gw.leases == () and not gw.children
    assert not p.a.established()[0].children


def test_no_pools_ignores_the_cp_request(vip: None) -> None:
    p = make_pair(extra_children=False)
    p.a.initiate("conn", B_ADDR, 0.0)
    p.flush()
    (gw,) = p.b.established()
    assert gw.leases == () and len(gw.children) == 1


def test_takeover_keeps_the_lease_and_never_hands_it_out_again(vip: None) -> None:
    p = _road_warrior()
    _gateway_pools(p.b)
    p.a.initiate("conn", B_ADDR, 0.0)
    p.flush()
    (gw,) = p.b.established()
    state = decode_sync(encode_sync(snapshot(gw, p.now)))
    assert state.leases == (("rw", gw.leases[0].address.packed),)  # type: ignore[union-attr]
    new = engine(list(p.b.policies.values()), 77, 2)
    new_pools = _gateway_pools(new)
    adopted = new.adopt(restore(new, state, p.now), p.now)  # type: ignore[arg-type]
    assert adopted.leases == gw.leases
    held = gw.leases[0]
    assert new_pools.pools["rw"].index_of(held.address) in new_pools.pools["rw"].leased
    # the new owner leases the same segment's next address, not the held one
    other = new_pools.lease(["rw"], 4, new_pools.segment_of_spi(gw.spi_r), b"someone")
    assert other is not None and other.address != held.address
    # the IKE SA's delete returns it
    new.forget(adopted.spi_i, adopted.spi_r)
    assert new_pools.pools["rw"].index_of(held.address) not in new_pools.pools["rw"].leased


def test_config_pools_and_their_limits() -> None:
    def base(addrs: str, pools: list[str]) -> str:
        return dumps({
            "cluster": {"address": "198.18.0.2", "segment_bits": 4},
            "pools": {"rw": {"addrs": addrs, "dns": ["10.3.0.53"]}},
            "connections": {"rw": {"psk_file": "x", "pools": pools, "children": {
                "net": {"local_ts": ["10.91.2.0/24"], "remote_ts": ["10.3.0.0/16"]}}}}})

    cfg = load_config(base("10.3.0.0/16", ["rw"]), "gw.toml")
    assert cfg.pools["rw"].addrs == ipaddress.ip_network("10.3.0.0/16")
    assert cfg.pools["rw"].dns == (V4("10.3.0.53"),)
    assert cfg.connections["rw"].pools == ("rw",)
    with pytest.raises(ValueError, match=r"pools\[0\]"):
        load_config(base("10.3.0.0/16", ["nope"]), "gw.toml")
    # 8 usable addresses for 16 segments: some segments would have none
    with pytest.raises(ValueError, match="at least 16 usable addresses"):
        load_config(base("10.3.0.0/28", ["rw"]), "gw.toml")


@pytest.mark.parametrize("ini", ["a", "b"])
def test_an_ike_rekey_keeps_the_sa_and_its_lease_in_one_segment(vip: None, ini: str) -> None:
    """The lease's partition is the IKE SA's segment: a rekey (by either end)
    draws the new SPI from the same segment, and the lease moves with it."""
    from common.cluster.spi import SpiAllocator
    from common.ike.spis import SegmentSpis
    from common.rand import deterministic_random

    p = _road_warrior()
    p.b.ctx.spis = SegmentSpis(SpiAllocator(deterministic_random(5)), list(range(2, 40)))
    pools = _gateway_pools(p.b)
    p.a.initiate("conn", B_ADDR, 0.0)
    p.flush()
    (old,) = p.b.established()
    (lease,) = old.leases
    for _ in range(3):
        sa = p.engine(ini).established()[0]
        p.engine(ini).rekey_ike(sa.ike_id, p.now)
        p.flush()
        (new,) = p.b.established()
        ours = new.spi_i if new.initiator else new.spi_r   # b's SPI of the new SA
        assert new.leases == (lease,) and ours != old.spi_r
        assert pools.segment_of_spi(ours) == pools.segment_of_spi(old.spi_r)
    assert len(pools.pools["rw"].leased) == 1


def test_ipv4_and_ipv6_addresses_in_one_request(monkeypatch: pytest.MonkeyPatch) -> None:
    _request_vip(monkeypatch, CfgAttribute(CfgAttr.INTERNAL_IP4_ADDRESS),
                 CfgAttribute(CfgAttr.INTERNAL_IP6_ADDRESS))
    p = _road_warrior()
    pools = PoolSet([Pool("rw", ipaddress.ip_network(POOL_NET)),
                     Pool("rw6", ipaddress.ip_network("fd00:3::/112"),
                          (ipaddress.IPv6Address("fd00::53"),))], 8)
    p.b.ctx.pools = pools
    p.b.policies["conn"].pools = ["rw6", "rw"]
    seen = _spy_cp(monkeypatch)
    p.a.initiate("conn", B_ADDR, 0.0)
    p.flush()
    (gw,) = p.b.established()
    v4, v6 = gw.leases
    assert (v4.pool, v6.pool) == ("rw", "rw6") and v6.address.version == 6
    (cp,) = seen
    assert CfgAttribute(CfgAttr.INTERNAL_IP6_ADDRESS, v6.address.packed + b"\x80") \
        in cp.attributes
    assert CfgAttribute(CfgAttr.INTERNAL_IP6_DNS,
                        ipaddress.IPv6Address("fd00::53").packed) in cp.attributes
    # the initiator proposed 0.0.0.0/0 only: the child is narrowed to the IPv4 lease
    (b_child,) = gw.children.values()
    assert [str(t) for t in b_child.remote_ts] == [f"{v4.address}/32"]


def test_a_cut_lease_list_in_a_replica_is_malformed(vip: None) -> None:
    p = _road_warrior()
    _gateway_pools(p.b)
    p.a.initiate("conn", B_ADDR, 0.0)
    p.flush()
    (gw,) = p.b.established()
    wire = encode_sync(snapshot(gw, p.now))
    for n in range(1, 9):   # count, name length, "rw", address length, 4 bytes
        with pytest.raises(MalformedMessage):
            decode_sync(wire[:-n])
    with pytest.raises(MalformedMessage):
        decode_sync(wire + b"\x00")
