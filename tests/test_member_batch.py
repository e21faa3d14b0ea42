"""Bursts through a member (``Member.handle_esp_batch``, ``handle_inner_batch``)
against the per-packet path (``handle_esp``, ``handle_inner``) on a twin.

The twins are two identical worlds: a gateway member and our peer built from
the same seeded randomness run the same IKE exchanges in memory, so both
gateways hold the same IKE SA and children with the same keys. Each gateway
then also carries the same pushed children (AES-CBC with ESN, a rekey of the
GCM child still deferred, a replica at the end of its sequence space). One
twin takes every burst whole, the other packet by packet; after every burst
their outputs, drops, replay windows, sequence numbers, counters, rekey
events, DPD liveness, routes and notices are equal. Every test runs against
the compiled byte primitive and the pure-Python fallback.

scapy's ``SecurityAssociation`` is the independent oracle for the bytes: it
decrypts what ``handle_inner_batch`` sealed, and what it encrypts
``handle_esp_batch`` opens.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.ipsec import ESP, SecurityAssociation

from common.cluster.sync import ChildState
from common.cluster.wire import ChildPush
from common.config import load_config
from common.esp.replay import ReplayState
from common.esp.transforms import MAX_SEQ_32, TRANSFORMS, OutboundSA
from common.ike.ts import ts_from_cidr
from common.packets import udp4_packet
from common.rand import deterministic_random
from member.worker import Member
from tests.esp_impls import IMPLS, use_impl
from tests.fuzz import fuzz_settings
from tests.test_esp_scapy_oracle import OUTER, SCAPY_AUTHS, SCAPY_CIPHERS
from tests.test_peer import GW_ADDR, PEER_ADDR, gateway_config, peer_config

PORTS = (500, 4500)
PEER = (PEER_ADDR, 4500)
#: SPIs of the children pushed onto the gateway (the IKE ones are allocated)
CBC_SPI, REKEYED_SPI, REPLICA_SPI = 0x7000_0101, 0x7000_0202, 0x7000_0303
UNKNOWN_SPI = 0x0BAD_0001
#: the peer's first sequence number: packets from 1 on are then out of window
START_SEQ = 5000


@pytest.fixture(autouse=True, params=IMPLS)
def esp_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs against the compiled and the pure-Python ESP path."""
    use_impl(request.param, monkeypatch)
    return str(request.param)


def keymat(transform: str, label: str) -> bytes:
    size = TRANSFORMS[transform].keymat_size
    return hashlib.shake_256(label.encode()).digest(size)


def push(spi_in: int, ike_id: int, name: str, transform: str, esn: bool, local: str,
         remote: str) -> ChildPush:
    return ChildPush(spi_in, ike_id, name, spi_in, spi_in + 0x0100_0000, transform, esn,
                     keymat(transform, f"{spi_in}/in"), keymat(transform, f"{spi_in}/out"),
                     (ts_from_cidr(local),), (ts_from_cidr(remote),),
                     ipaddress.IPv4Address(PEER[0]).packed, PEER[1], bytes(8))


def carry(gw: Member, peer: Member) -> None:
    """IKE datagrams both ways until quiet."""
    for _ in range(20):
        moved = False
        for out in peer.ike_out():
            moved = True
            gw.handle_ike(out.data, (PEER_ADDR, out.local_port), out.remote[1], 0.0)
        for out in gw.ike_out():
            moved = True
            peer.handle_ike(out.data, (GW_ADDR, out.local_port), out.remote[1], 0.0)
        if not moved:
            return


def gateway() -> Member:
    """One twin: the same seeds, so the same IKE SA, children and keys."""
    gw = Member(load_config(gateway_config(PORTS, 9), "gw.toml"),
                random=deterministic_random(7))
    peer = Member(load_config(peer_config(PORTS), "peer.toml"), random=deterministic_random(8))
    peer.start_connections(0.0, only_start_action=False)
    carry(gw, peer)
    [sa] = gw.engine.established()
    assert len(gw.by_spi) == 2       # the GCM and the CTR child of connection "c"
    gcm = next(r for r in gw.by_spi.values() if r.name == "gcm")
    gcm_spi = gcm.inbound.spi
    assert gw.install_pushed(push(CBC_SPI, sa.ike_id, "cbc", "aes128cbc-sha256", True,
                                  "10.91.22.0/24", "10.91.21.0/24")) is None
    # A rekey of the GCM child, as its responder: it replaces the old child
    # outbound only once the peer's first packet on it arrives (RFC 7296 §2.8).
    rekey = push(REKEYED_SPI, sa.ike_id, "gcm", "aes128gcm16", False, "10.91.2.0/24",
                 "10.91.1.0/24")
    gw._install_local(sa.ike_id, "gcm", REKEYED_SPI, rekey.spi_out, rekey.transform, False,
                      rekey.keymat_in, rekey.keymat_out, rekey.local_ts, rekey.remote_ts, PEER,
                      gcm_spi, rekey.ike_spi, defer=True)
    assert gw.deferred == {REKEYED_SPI: gcm_spi}
    # A replica taken over three sequence numbers before the end of its space.
    rp = push(REPLICA_SPI, 0, "replica", "aes128ctr-sha256", False, "10.91.32.0/24",
              "10.91.31.0/24")
    state = ChildState(REPLICA_SPI, rp.spi_out, "replica", rp.transform, False, rp.keymat_in,
                       rp.keymat_out, rp.local_ts, rp.remote_ts, rp.remote_ip, rp.remote_port,
                       rp.ike_spi, MAX_SEQ_32 - 2, 1024, 0, 0)
    assert gw.install_replica(state, 0, ReplayState(1024, 0, 0), 0.0) is None
    return gw


def host(net: Any, n: int) -> str:
    return str(net.start_addr + 1 + n % 200)


@dataclass
class Peer:
    """The far side of every child of a gateway: its senders (one at
    START_SEQ, one far behind it) and the addresses behind each side."""

    spis: list[int]
    senders: dict[int, OutboundSA] = field(default_factory=dict)
    old: dict[int, OutboundSA] = field(default_factory=dict)
    behind: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    history: list[tuple[bytes, int]] = field(default_factory=list)

    @classmethod
    def of(cls, gw: Member) -> Peer:
        p = cls(sorted(gw.by_spi))
        for spi, r in gw.by_spi.items():
            t, km, esn = r.inbound.transform, r.keymat_in, r.inbound.esn
            p.senders[spi] = OutboundSA(spi, t, km, sender_id=9, esn=esn, initial_seq=START_SEQ)
            p.old[spi] = OutboundSA(spi, t, km, sender_id=10, esn=esn)
            p.behind[spi] = (r.remote_ts[0], r.local_ts[0])   # (peer's side, ours)
        return p

    def inner(self, spi: int, size: int, outbound: bool = False) -> bytes:
        theirs, ours = self.behind[spi]
        src, dst = (ours, theirs) if outbound else (theirs, ours)
        return udp4_packet(host(src, size), host(dst, size + 1), 40000 + size, 7001,
                           bytes(size % 251 for _ in range(size)), ident=size)

    def esp(self, op: tuple[str, int, int, int]) -> tuple[bytes, int, tuple[str, int]]:
        """One ESP datagram for the gateway, as op says."""
        kind, k, size, aux = op
        spi = self.spis[k % len(self.spis)]
        sender = self.senders[spi]
        if kind == "replay" and self.history:
            data, spi = self.history[aux % len(self.history)]
            return data, spi, PEER
        if kind == "old":
            return self.old[spi].protect(self.inner(spi, size)), spi, PEER
        if kind == "spoof":
            return sender.protect(udp4_packet("10.99.0.1", host(self.behind[spi][1], size),
                                              1, 2, b"spoof")), spi, PEER
        if kind == "bad_inner":
            return sender.protect(b"\x45" + bytes(10)), spi, PEER
        data = sender.protect(self.inner(spi, size))
        if kind == "corrupt":
            at = aux % len(data)
            return data[:at] + bytes([data[at] ^ (1 << aux % 8)]) + data[at + 1:], spi, PEER
        if kind == "truncate":
            return data[:aux % len(data)], spi, PEER
        if kind == "unknown":
            return data, UNKNOWN_SPI, PEER
        if kind == "wrong_spi":
            return data, self.spis[(k + 1) % len(self.spis)], PEER
        self.history.append((data, spi))
        return data, spi, PEER

    def cleartext(self, op: tuple[str, int, int]) -> bytes:
        """One inner packet from our inside, as op says."""
        kind, k, size = op
        if kind == "no_child":
            return udp4_packet("10.91.2.9", "10.200.0.1", 1, 2, bytes(size))
        if kind == "malformed":
            return b"\x45\x00\x00"[:size % 4]
        return self.inner(self.spis[k % len(self.spis)], size, outbound=True)


def state(m: Member) -> dict[str, Any]:
    """Everything the shells, the replicator and the heartbeat read."""
    return {
        "drops": dict(m.drops),
        "children": {spi: (r.inbound.export_window(), r.inbound.packets, r.inbound.octets,
                           r.outbound.next_seq, r.outbound.next_iv_counter, r.outbound.octets,
                           r.outbound.packets, r.outbound.rekey_requested,
                           list(r.outbound.events), r.selector_drops, r.ike_id)
                     for spi, r in m.by_spi.items()},
        "deferred": dict(m.deferred),
        "routes": m.routes.child_ids(),
        "notices": list(m.notices),
        "last_heard": {sa.ike_id: sa.last_heard for sa in m.engine.by_id.values()},
    }


ESP_KINDS = ["good", "good", "good", "replay", "old", "corrupt", "truncate", "unknown",
             "spoof", "bad_inner", "wrong_spi"]
INNER_KINDS = ["to", "to", "to", "to", "no_child", "malformed"]
esp_op = st.tuples(st.sampled_from(ESP_KINDS), st.integers(0, 15), st.integers(0, 300),
                   st.integers(0, 1 << 16))
inner_op = st.tuples(st.sampled_from(INNER_KINDS), st.integers(0, 15), st.integers(0, 300))
rounds = st.lists(st.one_of(st.tuples(st.just("esp"), st.lists(esp_op, max_size=24),
                                      st.booleans()),
                            st.tuples(st.just("inner"), st.lists(inner_op, max_size=24),
                                      st.booleans())),
                  min_size=1, max_size=6)


def one_child(ops: list[Any]) -> list[Any]:
    """The burst on the first op's child only (a burst of one SPI)."""
    return [(op[0], ops[0][1], *op[2:]) for op in ops]


@pytest.mark.fuzz
@fuzz_settings(25)
@given(rounds=rounds)
def test_bursts_equal_the_per_packet_path_on_a_twin(
        rounds: list[tuple[str, list[Any], bool]]) -> None:
    batch, single = gateway(), gateway()
    assert state(batch) == state(single)
    peer = Peer.of(batch)
    for t, (direction, ops, single_child) in enumerate(rounds):
        now = 10.0 + t
        if single_child:
            ops = one_child(ops)
        if direction == "esp":
            items = [peer.esp(op) for op in ops]
            got = batch.handle_esp_batch(items, now)
            want = [x for x in (single.handle_esp(d, s, r, now) for d, s, r in items)
                    if x is not None]
        else:
            packets = [peer.cleartext(op) for op in ops]
            got_out = batch.handle_inner_batch(packets)
            want_out = [x for x in map(single.handle_inner, packets) if x is not None]
            assert got_out == want_out
            continue
        assert got == want
        assert state(batch) == state(single)
    assert state(batch) == state(single)


def test_a_mixed_burst_drops_what_handle_esp_drops() -> None:
    """One burst, each kind of drop once, several SPIs interleaved: the
    counted names, the activation of the deferred child, liveness."""
    gw = gateway()
    peer = Peer.of(gw)
    ctr = next(spi for spi, r in gw.by_spi.items() if r.name == "ctr")
    gcm = gw.deferred[REKEYED_SPI]
    k = {spi: i for i, spi in enumerate(peer.spis)}
    good = [peer.esp(("good", k[spi], 40, 0)) for spi in (ctr, CBC_SPI, ctr, REKEYED_SPI)]
    items = [good[0], good[1], good[0],                 # a replay in the same burst
             peer.esp(("corrupt", k[ctr], 40, 1000)),
             peer.esp(("truncate", k[ctr], 40, 5)),
             peer.esp(("unknown", k[ctr], 40, 0)),
             peer.esp(("spoof", k[CBC_SPI], 0, 0)),
             peer.esp(("bad_inner", k[ctr], 0, 0)),
             peer.esp(("old", k[ctr], 40, 0)),            # left of the window
             good[2], good[3]]
    inners = gw.handle_esp_batch(items, 42.0)
    assert inners == [peer.inner(ctr, 40), peer.inner(CBC_SPI, 40), peer.inner(ctr, 40),
                      peer.inner(REKEYED_SPI, 40)]
    assert gw.drops == {"esp_replay": 2, "esp_integrity": 1, "esp_malformed": 1,
                        "esp_unknown_spi": 1, "selector_mismatch": 1, "inner_malformed": 1}
    assert gw.by_spi[CBC_SPI].selector_drops == 1
    assert gw.deferred == {}
    assert gw.routes.child_ids()[0] == REKEYED_SPI and gcm not in gw.routes.child_ids()
    # seq START_SEQ .. +5 went out on the CTR child: good, good, corrupt,
    # truncated, unknown SPI (never reached it), bad inner (authentic)
    assert gw.by_spi[ctr].inbound.window.highest == START_SEQ + 5
    assert gw.by_spi[ctr].inbound.packets == 3   # the bad inner one was authentic
    [sa] = gw.engine.established()
    assert sa.last_heard == 42.0


def test_a_burst_of_cleartext_keeps_arrival_order_and_sequence_numbers() -> None:
    gw = gateway()
    peer = Peer.of(gw)
    ctr = next(spi for spi, r in gw.by_spi.items() if r.name == "ctr")
    order = [ctr, CBC_SPI, REPLICA_SPI, ctr, REPLICA_SPI, REPLICA_SPI, CBC_SPI, REPLICA_SPI]
    packets = [peer.inner(spi, 20 + i, outbound=True) for i, spi in enumerate(order)]
    packets.insert(3, b"\x45\x00")
    packets.insert(5, udp4_packet("10.91.2.9", "10.200.0.1", 1, 2, b""))
    out = gw.handle_inner_batch(packets)
    spi_outs = [int.from_bytes(esp[:4]) for esp, _ in out]
    seqs = [int.from_bytes(esp[4:8]) for esp, _ in out]
    # the replica has three numbers left: its fourth packet is refused
    assert spi_outs == [gw.by_spi[s].outbound.spi for s in order[:-1]]
    assert seqs == [1, 1, MAX_SEQ_32 - 2, 2, MAX_SEQ_32 - 1, MAX_SEQ_32, 2]
    assert {remote for _, remote in out} == {PEER}
    assert gw.drops == {"inner_malformed": 1, "no_child": 1, "esp_seq_exhausted": 1}
    assert gw.handle_inner_batch([]) == [] and gw.handle_esp_batch([], 1.0) == []


def test_bursts_of_one_child_count_their_drops() -> None:
    """The usual burst (one SPI in, one child out) has its own fast path."""
    gw = gateway()
    peer = Peer.of(gw)
    k = peer.spis.index(CBC_SPI)
    good = peer.esp(("good", k, 40, 0))
    items = [good, peer.esp(("corrupt", k, 40, 99)), good, peer.esp(("old", k, 40, 0)),
             peer.esp(("truncate", k, 40, 7)), peer.esp(("spoof", k, 0, 0)),
             peer.esp(("bad_inner", k, 0, 0)), peer.esp(("good", k, 41, 0))]
    assert gw.handle_esp_batch(items, 5.0) == [peer.inner(CBC_SPI, 40), peer.inner(CBC_SPI, 41)]
    # ESN (RFC 4303 §A2): seq 1 so far behind the window is taken as the
    # next 2^32 space, so the old packet fails its ICV rather than the window
    assert gw.drops == {"esp_replay": 1, "esp_integrity": 2, "esp_malformed": 1,
                        "selector_mismatch": 1, "inner_malformed": 1}
    assert gw.handle_esp_batch([(good[0], UNKNOWN_SPI, PEER)] * 2, 5.0) == []
    assert gw.drops["esp_unknown_spi"] == 2
    # the replica has three sequence numbers left
    burst = [peer.inner(REPLICA_SPI, n, outbound=True) for n in range(5)]
    out = gw.handle_inner_batch(burst)
    assert [int.from_bytes(esp[4:8]) for esp, _ in out] == [MAX_SEQ_32 - 2, MAX_SEQ_32 - 1,
                                                             MAX_SEQ_32]
    assert gw.drops["esp_seq_exhausted"] == 2


# -- scapy as the oracle ------------------------------------------------------------


#: scapy is untyped: its SA is used through Any
ScapySA: Any = SecurityAssociation


def scapy_sa(transform: str, spi: int, km: bytes) -> Any:
    t = TRANSFORMS[transform]
    kwargs: dict[str, object] = {"crypt_algo": SCAPY_CIPHERS[t.cipher],
                                 "crypt_key": km[:t.key_size + t.salt_size],
                                 "tunnel_header": OUTER.copy()}
    if t.integ is not None:
        kwargs.update(auth_algo=SCAPY_AUTHS[t.integ], auth_key=km[t.key_size + t.salt_size:])
    return ScapySA(ESP, spi=spi, **kwargs)


ORACLE_TRANSFORMS = ["aes128gcm16", "aes256gcm16", "aes128cbc-sha256", "aes256cbc-sha512",
                     "aes128cbc-sha1", "aes128ctr-sha256", "chacha20poly1305"]


def oracle_member() -> tuple[Member, list[ChildPush]]:
    m = Member(load_config(gateway_config(PORTS, 9), "gw.toml"))
    pushes = [push(0x6000_0100 + i, 1, t, t, False, f"10.92.{2 * i}.0/24",
                   f"10.92.{2 * i + 1}.0/24") for i, t in enumerate(ORACLE_TRANSFORMS)]
    for p in pushes:
        assert m.install_pushed(p) is None
    return m, pushes


def inner_of(p: ChildPush, n: int, outbound: bool) -> bytes:
    ours, theirs = p.local_ts[0], p.remote_ts[0]
    src, dst = (ours, theirs) if outbound else (theirs, ours)
    return udp4_packet(host(src, n), host(dst, n), 5000, 7001, bytes([n % 256]) * n)


SIZES = (0, 1, 2, 3, 15, 16, 17, 64, 200, 1400)


def test_scapy_decrypts_what_handle_inner_batch_seals() -> None:
    m, pushes = oracle_member()
    burst = [(p, n) for n in SIZES for p in pushes]   # every child, interleaved
    out = m.handle_inner_batch([inner_of(p, n, True) for p, n in burst])
    assert len(out) == len(burst)
    sas = {p.spi_out: scapy_sa(p.transform, p.spi_out, p.keymat_out) for p in pushes}
    for (p, n), (esp, remote) in zip(burst, out, strict=True):
        assert remote == PEER and int.from_bytes(esp[:4]) == p.spi_out
        outer = IP(bytes(OUTER.copy() / ESP(esp)))
        assert bytes(sas[p.spi_out].decrypt(outer)) == inner_of(p, n, True)
    assert sorted(int.from_bytes(esp[4:8]) for esp, _ in out) == \
        sorted(list(range(1, len(SIZES) + 1)) * len(pushes))


def test_handle_esp_batch_opens_what_scapy_encrypts() -> None:
    m, pushes = oracle_member()
    sas = {p.spi_in: scapy_sa(p.transform, p.spi_in, p.keymat_in) for p in pushes}
    items, want = [], []
    for seq, n in enumerate(SIZES, start=1):
        for p in pushes:
            inner = IP(inner_of(p, n, False))
            esp = bytes(sas[p.spi_in].encrypt(inner, seq_num=seq)[ESP])
            items.append((esp, p.spi_in, PEER))
            want.append(inner_of(p, n, False))
    items.append(items[3])   # and a replay
    assert m.handle_esp_batch(items, 1.0) == want
    assert m.drops == {"esp_replay": 1}
    for p in pushes:
        assert m.by_spi[p.spi_in].inbound.window.highest == len(SIZES)
