"""The IKE engine over (state, hostile input) pairs.

Two in-memory engines (tests/ike_pair.py) are driven to a state: half-open
responder, initiator waiting for the IKE_SA_INIT or IKE_AUTH answer,
established, child rekey / IKE rekey / MID sync in progress, deleting. The
target engine is then fed (i) random and mutated datagrams and (ii) messages
sealed with the real SK keys of its authenticated peer (or, before keys
exist, in the clear with the right SPIs) carrying hostile payload values.

Property: receive_datagram and handle_timer (at any later time) never raise,
and afterwards an IKE SA established on both ends, if it was not
legitimately deleted, still answers a DPD from the honest peer.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.ike.constants import (
    IKE_HEADER_LEN,
    DhId,
    NotifyType,
    PayloadType,
    ProtocolId,
    TransformType,
    TsType,
)
from common.ike.context import ChildState, IkeState
from common.ike.dh import dh_generate
from common.ike.message import HEADER, MAX_MESSAGE_ID
from common.ike.payloads import (
    DeletePayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
    TsiPayload,
    TsrPayload,
    encode_payloads,
)
from common.ike.sa import IkeSa
from common.ike.transforms import Proposal, Transform
from common.ike.ts import TrafficSelector
from common.rand import deterministic_random
from tests.fuzz import fuzz_settings
from tests.ike_pair import Pair, child, make_pair, other
from tests.test_hostile_ike import I_FLAG, R_FLAG, seal_raw

pytestmark = pytest.mark.fuzz

_GENERIC = struct.Struct("!BBH")
_MID_SYNC = struct.Struct("!4sII")

#: state -> (target side, how far the honest exchange got)
STATES = ["init_sent", "half_open", "auth_sent", "established", "child_rekey", "ike_rekey",
          "mid_sync", "deleting"]


def drive(state: str) -> tuple[Pair, str]:
    """A pair in ``state``; returns it and the target side. What the honest
    side was about to send stays pending (delivered later, or never)."""
    # Two selectors a side: narrowing can multiply what the peer proposes.
    nets = (["10.91.1.0/24", "10.91.4.0/24"], ["10.91.2.0/24", "10.91.3.0/24"])
    p = make_pair(dpd_delay=10.0, children_a=[child("net", nets[0], nets[1])],
                  children_b=[child("net", nets[1], nets[0])])
    if state == "init_sent":
        p.initiate("a", ["net"])
        return p, "a"
    if state in ("half_open", "auth_sent"):
        p.initiate("a", ["net"])
        p.step("a")              # b: HALF_OPEN, its IKE_SA_INIT answer out
        p.step("b")              # a: AUTH_SENT, its IKE_AUTH request out (pending)
        return p, "b" if state == "half_open" else "a"
    p.establish("a", children=["net"])
    p.clear_events()
    sa = p.sa("a")
    if state == "child_rekey":
        p.a.rekey_child(sa.ike_id, next(iter(sa.children)), p.now)
    elif state == "ike_rekey":
        p.a.rekey_ike(sa.ike_id, p.now)
    elif state == "mid_sync":
        p.a.mid_sync(sa.ike_id, p.now)
    elif state == "deleting":
        p.a.delete_ike(sa.ike_id, p.now)
    return p, "a" if state == "established" else "b"


# -- hostile payloads as raw bytes ----------------------------------------------------

U16_EDGES = st.sampled_from([0, 1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF])
U32_EDGES = st.sampled_from([0, 1, 2, 3, 0x7FFFFFFF, MAX_MESSAGE_ID - 1, MAX_MESSAGE_ID])


def _u16() -> st.SearchStrategy[int]:
    return st.one_of(U16_EDGES, st.integers(0, 0xFFFF))


@st.composite
def transform_bytes(draw: st.DrawFn, last: bool) -> bytes:
    ttype = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 12, 13, 0, 255]))
    tid = draw(st.one_of(st.sampled_from([0, 1, 5, 12, 14, 19, 20, 21, 31, 0xFFFF]), _u16()))
    attrs = b""
    for kind in draw(st.lists(st.sampled_from(["keylen", "tv", "tlv"]), max_size=2)):
        if kind == "keylen":
            attrs += struct.pack("!HH", 0x800E, draw(st.sampled_from([0, 128, 256, 0xFFFF])))
        elif kind == "tv":
            attrs += struct.pack("!HH", 0x8000 | draw(_u16()) & 0x7FFF, draw(_u16()))
        else:
            value = draw(st.binary(max_size=6))
            attrs += struct.pack("!HH", draw(_u16()) & 0x7FFF, len(value)) + value
    body = struct.pack("!BBH", ttype, 0, tid) + attrs
    return struct.pack("!BBH", 0 if last else 3, 0, 4 + len(body)) + body


@st.composite
def proposal_bytes(draw: st.DrawFn, number: int, last: bool, spis: list[bytes]) -> bytes:
    protocol = draw(st.sampled_from([1, 3, 2, 0, 7]))
    spi = draw(st.one_of(st.sampled_from([b"", bytes(4), bytes(8), *spis]), st.binary(max_size=9)))
    n = draw(st.integers(0, 6))
    transforms = b"".join(draw(transform_bytes(i == n - 1)) for i in range(n))
    count = draw(st.one_of(st.just(n), st.integers(0, 255)))
    body = struct.pack("!BBBB", number, protocol, len(spi), count) + spi + transforms
    return struct.pack("!BBH", 0 if last else 2, 0, 4 + len(body)) + body


@st.composite
def sa_body(draw: st.DrawFn, spis: list[bytes]) -> bytes:
    n = draw(st.integers(1, 3))
    numbers = draw(st.one_of(st.just(list(range(1, n + 1))),
                             st.lists(st.integers(0, 255), min_size=n, max_size=n)))
    return b"".join(draw(proposal_bytes(numbers[i], i == n - 1, spis)) for i in range(n))


@st.composite
def selector_bytes(draw: st.DrawFn) -> bytes:
    ts_type = draw(st.sampled_from([7, 8, 0, 9, 255]))
    addr_len = {7: 4, 8: 16}.get(ts_type, draw(st.integers(0, 16)))
    length = draw(st.one_of(st.just(8 + 2 * addr_len), U16_EDGES))
    ports = struct.pack("!HH", draw(_u16()), draw(_u16()))
    addrs = draw(st.one_of(st.just(bytes(addr_len) + b"\xff" * addr_len),
                           st.binary(min_size=2 * addr_len, max_size=2 * addr_len)))
    return struct.pack("!BBH", ts_type, draw(st.integers(0, 255)), length) + ports + addrs


#: 255 distinct selectors, each overlapping everything (ports 0..254)
_MANY = [struct.pack("!BBHHH", 7, 0, 16, port, port) + bytes(4) + b"\xff" * 4
         for port in range(255)]


_EVERY = [TrafficSelector(TsType.TS_IPV4_ADDR_RANGE, 0, port, port, IPv4Address("0.0.0.0"),
                          IPv4Address("255.255.255.255")) for port in range(255)]


@st.composite
def ts_body(draw: st.DrawFn) -> bytes:
    selectors = draw(st.one_of(st.lists(selector_bytes(), max_size=3), st.just(_MANY)))
    count = draw(st.one_of(st.just(len(selectors)), st.sampled_from([0, 255])))
    return bytes([count, 0, 0, 0]) + b"".join(selectors)


NOTIFY_TYPES = [NotifyType.INVALID_KE_PAYLOAD, NotifyType.IKEV2_MESSAGE_ID_SYNC,
                NotifyType.REKEY_SA, NotifyType.USE_TRANSPORT_MODE, NotifyType.COOKIE,
                NotifyType.INITIAL_CONTACT, NotifyType.NO_PROPOSAL_CHOSEN,
                NotifyType.TEMPORARY_FAILURE, NotifyType.AUTHENTICATION_FAILED,
                NotifyType.IKEV2_MESSAGE_ID_SYNC_SUPPORTED, NotifyType.INVALID_SYNTAX,
                NotifyType.NAT_DETECTION_SOURCE_IP, NotifyType.CHILD_SA_NOT_FOUND]


@st.composite
def notify_body(draw: st.DrawFn, spis: list[bytes]) -> bytes:
    ntype = draw(st.one_of(st.sampled_from([int(t) for t in NOTIFY_TYPES]), _u16()))
    protocol = draw(st.sampled_from([0, 1, 3, 2, 200]))
    spi = draw(st.one_of(st.sampled_from([b"", *spis]), st.binary(max_size=9)))
    if ntype == NotifyType.INVALID_KE_PAYLOAD:
        data = draw(st.one_of(st.integers(0, 0xFFFF).map(lambda g: g.to_bytes(2, "big")),
                              st.binary(max_size=3)))
    elif ntype == NotifyType.IKEV2_MESSAGE_ID_SYNC:
        data = draw(st.one_of(
            st.builds(_MID_SYNC.pack, st.binary(min_size=4, max_size=4),
                      st.one_of(U32_EDGES, st.integers(0, MAX_MESSAGE_ID)),
                      st.one_of(U32_EDGES, st.integers(0, MAX_MESSAGE_ID))),
            st.binary(max_size=16)))
    else:
        data = draw(st.binary(max_size=40))
    return struct.pack("!BBH", protocol, len(spi), ntype) + spi + data


@st.composite
def delete_body(draw: st.DrawFn, spis: list[bytes]) -> bytes:
    protocol = draw(st.sampled_from([1, 3, 2, 0, 9]))
    size = draw(st.sampled_from([0, 4, 8]))
    items = draw(st.lists(st.one_of(st.sampled_from(spis or [bytes(4)]),
                                    st.binary(min_size=4, max_size=4)), max_size=4))
    raw = b"".join(i[:size].ljust(size, b"\0") for i in items)
    count = draw(st.one_of(st.just(len(items)), U16_EDGES))
    return struct.pack("!BBH", protocol, size, count) + raw


@st.composite
def ke_body(draw: st.DrawFn, public: bytes) -> bytes:
    group = draw(st.one_of(st.sampled_from([19, 31, 14, 20, 0, 0xFFFF]), _u16()))
    data = draw(st.one_of(st.just(public), st.binary(max_size=300),
                          st.just(b"\x04" + bytes(64))))
    return struct.pack("!HH", group, 0) + data


@st.composite
def raw_payload(draw: st.DrawFn, spis: list[bytes], public: bytes) -> tuple[int, int, bytes]:
    """(type, flags, body) of one hostile payload."""
    kind = draw(st.sampled_from(["sa", "ke", "nonce", "notify", "delete", "tsi", "tsr", "id",
                                 "auth", "unknown", "vendor"]))
    flags = draw(st.sampled_from([0, 0x80, 0x7F]))
    if kind == "sa":
        return PayloadType.SA, flags, draw(sa_body(spis))
    if kind == "ke":
        return PayloadType.KE, flags, draw(ke_body(public))
    if kind == "nonce":
        return PayloadType.NONCE, flags, draw(st.one_of(st.binary(min_size=16, max_size=40),
                                                        st.binary(max_size=300)))
    if kind == "notify":
        return PayloadType.NOTIFY, flags, draw(notify_body(spis))
    if kind == "delete":
        return PayloadType.DELETE, flags, draw(delete_body(spis))
    if kind in ("tsi", "tsr"):
        return (PayloadType.TSI if kind == "tsi" else PayloadType.TSR), flags, draw(ts_body())
    if kind in ("id", "auth"):
        ptype = draw(st.sampled_from([PayloadType.IDI, PayloadType.IDR])) if kind == "id" \
            else PayloadType.AUTH
        return ptype, flags, bytes([draw(st.integers(0, 255)), 0, 0, 0]) + draw(
            st.binary(max_size=48))
    if kind == "vendor":
        return PayloadType.VENDOR_ID, flags, draw(st.binary(max_size=20))
    ptype = draw(st.one_of(st.integers(0, 32), st.integers(49, 52), st.integers(54, 255)))
    return ptype, flags, draw(st.binary(max_size=20))


def chain(raws: list[tuple[int, int, bytes]], last_next: int = 0) -> tuple[int, bytes]:
    """A payload chain of raw payloads: (first type, bytes)."""
    out = b""
    for i, (_, flags, body) in enumerate(raws):
        nxt = raws[i + 1][0] if i + 1 < len(raws) else last_next
        body = body[:0xFFFF - 4]
        out += _GENERIC.pack(nxt, flags, 4 + len(body)) + body
    return (raws[0][0] if raws else last_next), out


# -- well-formed templates the hostile payloads are mixed into ----------------------------


def templates(sender: IkeSa, receiver: IkeSa, public: bytes,
              odd: Transform) -> dict[str, list[Payload]]:
    """Requests an honest peer could send, to get past the first checks."""
    pol = sender.policy
    assert pol is not None
    c = pol.children["net"]
    spi4 = b"\x0a\x0b\x0c\x0d"
    esp = [Proposal(i, ProtocolId.ESP, spi4, list(x.transforms))
           for i, x in enumerate(c.esp_proposals, 1)]
    ike = [Proposal(i, ProtocolId.IKE, bytes(range(1, 9)), list(x.transforms))
           for i, x in enumerate(pol.proposals, 1)]
    ts = [TsiPayload(list(c.local_ts)), TsrPayload(list(c.remote_ts))]
    outs = [ch.spi_in.to_bytes(4, "big") for ch in sender.children.values()]
    rekey = [NotifyPayload(NotifyType.REKEY_SA, ProtocolId.ESP, outs[0])] if outs else []
    odd_esp = [Proposal(1, ProtocolId.ESP, spi4, [*esp[0].transforms, odd])]
    return {
        "none": [],
        "child_new": [SaPayload(esp), NoncePayload(bytes(32)), *ts],
        # the raw payloads that follow bring the (hostile) TSi/TSr
        "child_no_ts": [SaPayload(esp), NoncePayload(bytes(32))],
        "child_odd_transform": [SaPayload(odd_esp), NoncePayload(bytes(32)), *ts],
        "child_many_ts": [SaPayload(esp), NoncePayload(bytes(32)), TsiPayload(_EVERY),
                          TsrPayload(_EVERY)],
        "child_rekey": [*rekey, SaPayload(esp), NoncePayload(bytes(32)), *ts],
        "ike_rekey": [SaPayload(ike), NoncePayload(bytes(32)), KePayload(DhId.ECP_256, public)],
        "delete_child": [DeletePayload(ProtocolId.ESP, outs)] if outs else [],
        "delete_ike": [DeletePayload(ProtocolId.IKE, [])],
        "mid_sync": [NotifyPayload(NotifyType.IKEV2_MESSAGE_ID_SYNC,
                                   data=_MID_SYNC.pack(b"abcd", receiver.mids.recv_next + 1,
                                                       receiver.mids.send_next))],
    }


#: the exchange each template belongs in (none: any)
_EXCHANGE = {"child_new": 36, "child_no_ts": 36, "child_odd_transform": 36, "child_rekey": 36,
             "child_many_ts": 36, "ike_rekey": 36, "delete_child": 37, "delete_ike": 37,
             "mid_sync": 37}


@st.composite
def header_values(draw: st.DrawFn, receiver: IkeSa, name: str) -> tuple[int, int, bool, bool]:
    """(exchange, message ID, response flag, flip the I flag). Mostly what the
    receiver takes (the next request, or the answer to its request in
    flight) so that the hostile payloads get past the message-ID window;
    otherwise any values: wrong exchange types, response flag games, IDs 0,
    2^32-1 and others."""
    mids = receiver.mids
    mode = draw(st.sampled_from(["request", "request", "response", "any"]))
    if mode == "request":
        exchange = _EXCHANGE.get(name) or draw(st.sampled_from([34, 35, 36, 37]))
        return exchange, 0 if name == "mid_sync" else mids.recv_next, False, False
    if mode == "response" and mids.busy and receiver.active is not None:
        return int(receiver.active.exchange), mids.request_id, True, False
    expected = mids.recv_next
    mid = draw(st.one_of(st.sampled_from([expected, max(expected - 1, 0), 0,
                                          mids.request_id % (MAX_MESSAGE_ID + 1),
                                          MAX_MESSAGE_ID]),
                         st.integers(0, MAX_MESSAGE_ID)))
    exchange = draw(st.one_of(st.sampled_from([34, 35, 36, 37]), st.integers(0, 255)))
    return exchange, mid, draw(st.booleans()), draw(st.sampled_from([False, False, True]))


@st.composite
def hostile_message(draw: st.DrawFn, p: Pair, target: str) -> bytes:
    """One message for ``target`` from its peer: sealed with the peer's real
    keys when it has them, in the clear otherwise; hostile values."""
    tsa = [s for s in p.engine(target).by_id.values() if not s.terminal]
    psa = [s for s in p.engine(other(target)).by_id.values() if not s.terminal]
    if not tsa:
        return draw(st.binary(max_size=64))
    receiver = draw(st.sampled_from(tsa))
    sender = next((s for s in psa if s.spi_i == receiver.spi_i), None)
    keyed = sender is not None and sender.sk_out is not None
    spis = [c.spi_out.to_bytes(4, "big") for c in receiver.children.values()]
    spis += [receiver.spi_i, receiver.spi_r]
    public = dh_generate(DhId.ECP_256, deterministic_random(draw(st.integers(0, 3)))).public
    name = "none"
    template: list[Payload] = []
    if sender is not None and keyed:
        odd = Transform(TransformType(draw(st.sampled_from([0, 6, 13, 200, 255]))),
                        draw(st.sampled_from([0, 1, 0xFFFF])),
                        draw(st.sampled_from([None, 0, 128, 0xFFFF])))
        name = draw(st.sampled_from(["none", *_EXCHANGE]))
        template = templates(sender, receiver, public, odd)[name]
    exchange, mid, response, flip = draw(header_values(receiver, name))
    raws = draw(st.one_of(st.just([]), st.lists(raw_payload(spis, public), max_size=3)))
    first_raw, raw_bytes = chain(raws)
    if template:
        first, inner = encode_payloads(template, first_raw)
        inner += raw_bytes
    else:
        first, inner = first_raw, raw_bytes
    initiator = (not receiver.initiator) != flip
    if sender is not None and keyed and draw(st.integers(0, 9)):
        return seal_raw(sender, exchange, mid, inner, int(first), response=response,
                        initiator=initiator)
    # In the clear (before keys, or as an unauthenticated forger).
    flags = (I_FLAG if initiator else 0) | (R_FLAG if response else 0)
    spi_r = draw(st.sampled_from([receiver.spi_r, bytes(8), bytes(range(8))]))
    return HEADER.pack(receiver.spi_i, spi_r, int(first), 0x20, exchange, flags, mid,
                       IKE_HEADER_LEN + len(inner)) + inner


def mutated(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        if out:
            out[pos % len(out)] ^= value or 1
    return bytes(out)


# -- the property --------------------------------------------------------------------------


def _align(p: Pair) -> list[tuple[IkeSa, IkeSa]]:
    """IKE SAs established on both ends (same SPIs), with message IDs brought
    into line: a hostile but authenticated peer may legitimately have used
    IDs (or synced them, RFC 6311) that the honest engine did not."""
    pairs = []
    for x in p.a.by_id.values():
        y = next((s for s in p.b.by_id.values() if s.spis() == x.spis()), None)
        if y is None or x.state is not IkeState.ESTABLISHED or y.state is not IkeState.ESTABLISHED:
            continue
        if x.mids.busy or y.mids.busy:
            continue
        for u, v in ((x, y), (y, x)):
            u.mids.send_next = v.mids.recv_next = max(u.mids.send_next, v.mids.recv_next)
        if max(x.mids.send_next, y.mids.send_next) < MAX_MESSAGE_ID - 8:
            pairs.append((x, y))
    return pairs


def _check_states(p: Pair) -> None:
    for e in (p.a, p.b):
        for sa in e.by_id.values():
            assert isinstance(sa.state, IkeState)
            assert sa.mids.recv_next <= MAX_MESSAGE_ID + 1
            for c in sa.children.values():
                assert isinstance(c.state, ChildState)


@fuzz_settings(150)
@given(state=st.sampled_from(STATES), data=st.data())
def test_engine_survives_hostile_input_in_every_state(state: str, data: st.DataObject) -> None:
    p, target = drive(state)
    peer = other(target)
    honest_first = data.draw(st.booleans(), label="honest_first")
    if honest_first:
        p.step(peer)
    corpus = [o.data for _, o in p.wire]
    for _ in range(data.draw(st.integers(1, 4), label="n")):
        kind = data.draw(st.sampled_from(["hostile", "hostile", "hostile", "mutated", "random"]),
                         label="kind")
        if kind == "hostile":
            msg = data.draw(hostile_message(p, target), label="msg")
        elif kind == "mutated" and corpus:
            msg = mutated(data.draw(st.sampled_from(corpus)), data.draw(
                st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1,
                         max_size=4)))
        else:
            msg = data.draw(st.binary(max_size=200))
        p.engine(target).receive_datagram(msg, p.addr(peer), 4500, p.now)
        _check_states(p)
    later = data.draw(st.sampled_from([0.0, 1.0, 2.5, 11.0, 31.0, 3601.0, 1e5]), label="later")
    p.engine(target).handle_timer(p.now + later)
    # The honest exchange goes on; everything is delivered, time runs (from
    # ``later`` on: what was due in between is due at once).
    p.flush()
    p.now += later
    p.advance(60.0)
    _check_states(p)
    for x, y in _align(p):
        assert p.dpd_ok("a", x.ike_id), (state, x.mids, y.mids)
        assert p.dpd_ok("b", y.ike_id), (state, x.mids, y.mids)
    p.a.handle_timer(p.now + 1e6)
    p.b.handle_timer(p.now + 1e6)
