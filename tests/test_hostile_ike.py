"""Hostile input to the IKE engine: the attacks found so far as plain
regression tests, and every truncation and random mutation of real messages
fed to the decoders (only their documented errors come out) and to the engine
(nothing comes out). The engine over (state, authenticated hostile message)
pairs is in test_hostile_ike_states.py."""

from __future__ import annotations

import functools
import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import (
    IntegrityError,
    LocalProtocolError,
    MalformedMessage,
    RemoteProtocolError,
)
from common.ike.constants import (
    IKE_HEADER_LEN,
    ExchangeType,
    NotifyType,
    PayloadType,
    ProtocolId,
    TransformType,
    TsType,
)
from common.ike.context import IkeState
from common.ike.events import (
    ChildSaFailed,
    ChildSaInstalled,
    IkeSaEstablished,
    IkeSaFailed,
    MessageIdsSynced,
)
from common.ike.message import (
    HEADER,
    MAX_MESSAGE_ID,
    IkeMessage,
    InvalidMajorVersion,
    decode_header,
    decode_message,
)
from common.ike.payloads import (
    GENERIC_HEADER,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
    TsiPayload,
    TsrPayload,
    UnsupportedCriticalPayload,
    decode_payloads,
    encode_payloads,
)
from common.ike.sa import IkeSa
from common.ike.sk import SkCipher
from common.ike.transforms import Proposal, Transform
from common.ike.ts import TrafficSelector
from tests.fuzz import fuzz_settings
from tests.ike_pair import Pair, child, make_pair

pytestmark = pytest.mark.fuzz

_LENGTH = struct.Struct("!I")
_MID_SYNC = struct.Struct("!4sII")

#: RFC 7296 §3.1 header flags
I_FLAG = 0x08
R_FLAG = 0x20


# -- crafting messages as an authenticated peer ------------------------------------


def seal_raw(sa: IkeSa, exchange: int, mid: int, inner: bytes, first: int, *,
             response: bool = False, initiator: bool | None = None) -> bytes:
    """A message protected with ``sa``'s outbound keys whose SK payload holds
    ``inner`` (a payload chain as raw bytes, starting with type ``first``):
    any header values and any payload bytes, sealed like the real thing."""
    sk = sa.sk_out
    assert sk is not None
    ini = sa.initiator if initiator is None else initiator
    sk_len = 4 + sk.sealed_size(len(inner))
    flags = (I_FLAG if ini else 0) | (R_FLAG if response else 0)
    header = HEADER.pack(sa.spi_i, sa.spi_r, PayloadType.SK, 0x20, exchange, flags, mid,
                         IKE_HEADER_LEN + sk_len)
    aad = header + GENERIC_HEADER.pack(first, 0, sk_len)
    return aad + sk.seal(aad, inner, sa.ctx.random(sk.iv_size))


def seal(sa: IkeSa, exchange: int, mid: int, payloads: list[Payload], *,
         response: bool = False) -> bytes:
    first, inner = encode_payloads(payloads)
    return seal_raw(sa, exchange, mid, inner, int(first), response=response)


def opened(sa: IkeSa, data: bytes) -> IkeMessage:
    """A message ``sa``'s peer sent, decrypted with ``sa``'s inbound keys."""
    return decode_message(data, sa.sk_in)


def established() -> Pair:
    p = make_pair()
    p.establish("a", children=["net"])
    p.clear_events()
    return p


def answers(p: Pair, side: str) -> list[bytes]:
    return [o.data for o in p.pending(side)]


# -- finding 1: an SK payload where no keys exist -------------------------------------

SK_ONLY_INIT = bytes.fromhex(
    "0102030405060708" "0000000000000000" "2e202208" "00000000" "00000020" "00000004")


def test_sk_only_ike_sa_init_is_a_counted_drop() -> None:
    """Before: EncryptedWithoutKeys (a LocalProtocolError) left receive_datagram.
    After: dropped, counted as sk_without_keys, nothing answered or kept."""
    p = make_pair()
    for port in (500, 4500):
        p.b.receive_datagram(SK_ONLY_INIT, ("198.18.0.9", port), port, 0.0)
    assert p.b.drops == {"sk_without_keys": 2}
    assert not p.b.by_id and not p.b.datagrams_to_send()
    assert p.b.next_event() is None


def test_sk_only_message_to_an_sa_without_keys_is_a_counted_drop() -> None:
    """The same on an initiator's SA that has no keys yet (INIT_SENT): a
    response with SK, and a request of any kind, are dropped and counted."""
    p = make_pair()
    p.initiate("a")
    [req] = answers(p, "a")
    sa = p.sa("a")
    response = HEADER.pack(sa.spi_i, bytes(range(8)), PayloadType.SK, 0x20,
                           ExchangeType.IKE_SA_INIT, R_FLAG, 0, 32) + bytes([0, 0, 0, 4])
    request = HEADER.pack(sa.spi_i, bytes(range(8)), PayloadType.NONE, 0x20,
                          ExchangeType.INFORMATIONAL, 0, 0, 28)
    for data in (response, request):
        p.a.receive_datagram(data, p.addr("b"), 500, 0.0)
    assert p.a.drops == {"sk_without_keys": 1, "unexpected_exchange": 1}
    assert not p.a.datagrams_to_send()
    # The real exchange goes on untouched.
    p.deliver("a", req)
    p.flush()
    assert p.sa("a").state is IkeState.ESTABLISHED


# -- finding 2a: an ESP proposal with a transform of unknown type ----------------------


def _child_request(p: Pair, extra: list[Transform], notifies: tuple[Payload, ...] = ()) -> bytes:
    """A CREATE_CHILD_SA for child "ctr" from a, its one proposal ours plus
    ``extra`` transforms."""
    sa = p.sa("a")
    pol = sa.policy
    assert pol is not None
    c = pol.children["ctr"]
    transforms = list(c.esp_proposals[0].transforms) + extra
    payloads: list[Payload] = [
        *notifies,
        SaPayload([Proposal(1, ProtocolId.ESP, b"\x0a\x0b\x0c\x0d", transforms)]),
        NoncePayload(bytes(32)), TsiPayload(list(c.local_ts)), TsrPayload(list(c.remote_ts))]
    return seal(sa, ExchangeType.CREATE_CHILD_SA, sa.mids.take_request_id(), payloads)


@pytest.mark.parametrize("extra", [
    [Transform(TransformType(200), 0)],           # the attack: unknown type, ID 0
    [Transform(TransformType(13), 0)],
    [Transform(TransformType(0), 0)],
    [Transform(TransformType(255), 0xFFFF, 0xFFFF)],
    [Transform(TransformType.ADDKE1, 31)],        # RFC 9370: only NONE is ours
])
def test_unknown_transform_type_makes_the_proposal_not_match(extra: list[Transform]) -> None:
    """Before: esp_suite raised ValueError out of receive_datagram. After: the
    proposal is unacceptable (RFC 7296 §3.3.6), the child is refused with
    NO_PROPOSAL_CHOSEN, the IKE SA goes on."""
    p = established()
    p.deliver("a", _child_request(p, extra))
    [answer] = answers(p, "b")
    msg = opened(p.sa("a"), answer)
    assert [n.notify_type for n in msg.get_all(NotifyPayload)] == [
        NotifyType.NO_PROPOSAL_CHOSEN]
    assert not p.b.drops
    assert len(p.live("b")) == 1
    assert p.dpd_ok("a") and p.dpd_ok("b")


def test_addke_none_is_accepted() -> None:
    """RFC 9370 additional key exchanges offered with NONE: we choose NONE
    and the child comes up (what made the unknown-type check per protocol)."""
    p = established()
    p.deliver("a", _child_request(p, [Transform(TransformType.ADDKE1, 0)]))
    p.drain()
    [installed] = p.of("b", ChildSaInstalled)
    assert installed.name == "ctr"


def test_answer_with_unknown_transform_type_fails_only_the_child() -> None:
    """Initiator side: a chosen proposal with a type we never offered does not
    match what we offered; the child fails, the IKE SA lives."""
    p = established()
    p.a.create_child(p.ike_id("a"), "ctr", p.now)
    [req] = answers(p, "a")
    b_sa = p.sa("b")
    msg = opened(b_sa, req)
    sa_p = msg.get(SaPayload)
    assert sa_p is not None
    chosen = Proposal(1, ProtocolId.ESP, b"\x01\x02\x03\x04",
                      [*sa_p.proposals[0].transforms, Transform(TransformType(77), 0)])
    answer = seal(b_sa, ExchangeType.CREATE_CHILD_SA, msg.message_id,
                  [SaPayload([chosen]), NoncePayload(bytes(32)), *[
                      x for x in msg.payloads if isinstance(x, TsiPayload | TsrPayload)]],
                  response=True)
    b_sa.mids.recv_next = msg.message_id + 1  # as if b had sent that answer
    p.deliver("b", answer)
    p.drain()
    [failed] = p.of("a", ChildSaFailed)
    assert "did not offer" in failed.reason
    assert not p.of("a", ChildSaInstalled)
    assert p.dpd_ok("a")


# -- finding 2b: MESSAGE_ID_SYNC with 0xffffffff ----------------------------------------


def _mid_sync_request(sa: IkeSa, m1: int, p1: int) -> bytes:
    data = _MID_SYNC.pack(b"\x01\x02\x03\x04", m1, p1)
    return seal(sa, ExchangeType.INFORMATIONAL, 0,
                [NotifyPayload(NotifyType.IKEV2_MESSAGE_ID_SYNC, data=data)])


@pytest.mark.parametrize("m1,p1", [(MAX_MESSAGE_ID, MAX_MESSAGE_ID), (MAX_MESSAGE_ID, 5),
                                   (7, MAX_MESSAGE_ID), (MAX_MESSAGE_ID - 1, MAX_MESSAGE_ID)])
def test_mid_sync_to_the_last_message_id_never_wraps(m1: int, p1: int) -> None:
    """Before: message IDs passed 2^32 and the next timer raised ValueError.
    After: the IDs are used up to 2^32-1, then the IKE SA is closed (RFC 7296
    §2.2); no timer at any later time raises, no ID ever wraps. The peer
    (a) plays along: it takes the values it announced."""
    p = established()
    a_sa, b_sa = p.sa("a"), p.sa("b")
    p.deliver("a", _mid_sync_request(a_sa, m1, p1))
    p.drain()
    [synced] = p.of("b", MessageIdsSynced)
    assert synced.recv_mid == m1 and synced.send_mid == p1
    a_sa.mids.send_next, a_sa.mids.recv_next = m1, p1
    start = len(p.wire)
    p.advance(1e5)
    for sender, o in p.wire[start:]:
        header = decode_header(o.data)
        if not header.is_response:
            assert header.message_id >= (m1 if sender == "a" else p1), (sender, header)
    assert not any(sa.established for e in (p.a, p.b) for sa in e.by_id.values())
    assert b_sa.terminal and a_sa.terminal
    assert p.a.get_timer() is None and p.b.get_timer() is None


def test_exhausted_message_ids_close_the_sa_instead_of_wrapping() -> None:
    """No ID left for a request of ours: the IKE SA ends (not even a delete
    can go out), nothing is sent with a wrapped ID 0."""
    p = established()
    b_sa = p.sa("b")
    b_sa.mids.send_next = MAX_MESSAGE_ID + 1
    p.b.dpd(b_sa.ike_id, p.now)
    p.drain()
    assert b_sa.terminal
    [failed] = p.of("b", IkeSaFailed)
    assert "message IDs exhausted" in failed.reason
    assert not p.pending("b")


def test_peer_using_its_last_message_id_gets_the_ike_sa_deleted() -> None:
    """The peer's request 2^32-1 is answered; it can send no request after
    it, so we delete the IKE SA while our own IDs still allow it."""
    p = established()
    a_sa, b_sa = p.sa("a"), p.sa("b")
    a_sa.mids.send_next = b_sa.mids.recv_next = MAX_MESSAGE_ID
    assert p.dpd_ok("a")
    p.drain()
    assert a_sa.state is IkeState.DELETED and b_sa.state is IkeState.DELETED
    assert a_sa.mids.exhausted and not p.a.drops and not p.b.drops


def test_mid_sync_we_send_past_the_last_id_closes_instead_of_raising() -> None:
    p = established()
    b_sa = p.sa("b")
    b_sa.mids.send_next = MAX_MESSAGE_ID
    p.b.mid_sync(b_sa.ike_id, p.now, margin=5)
    p.drain()
    assert b_sa.terminal and "exhausted" in p.of("b", IkeSaFailed)[0].reason


# -- finding 2c: INVALID_KE naming a group we did not offer -------------------------------


def _invalid_ke(group: int, width: int = 2) -> NotifyPayload:
    return NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, data=group.to_bytes(width, "big"))


@pytest.mark.parametrize("group,width", [(0xFFFF, 2), (0, 2), (19, 2), (31, 2), (1, 1),
                                         (0xFFFFFF, 3)])
def test_invalid_ke_in_answer_to_our_ike_rekey(group: int, width: int) -> None:
    """Before: 0xffff made the queued retry raise ValueError in the next timer.
    After: a group we did not configure (or the one we sent) fails this rekey
    only; it is tried again later and then succeeds."""
    p = established()
    a_sa, b_sa = p.sa("a"), p.sa("b")
    p.a.rekey_ike(a_sa.ike_id, p.now)
    [req] = answers(p, "a")
    mid = decode_header(req).message_id
    b_sa.mids.recv_next = mid + 1  # as if b had sent this answer
    p.deliver("b", seal(b_sa, ExchangeType.CREATE_CHILD_SA, mid, [_invalid_ke(group, width)],
                        response=True))
    assert a_sa.state is IkeState.ESTABLISHED and a_sa.rekey_at == p.now + 10.0
    assert not p.pending("a") and not p.a.drops
    p.advance(60.0)
    p.drain()
    assert [type(e).__name__ for e in p.events_a].count("IkeSaRekeyed") == 1
    assert p.dpd_ok("a") and p.dpd_ok("b")


def test_invalid_ke_in_answer_to_ike_sa_init_fails_that_sa_cleanly() -> None:
    p = make_pair()
    p.initiate("a")
    [req] = answers(p, "a")
    spi_i = decode_header(req).spi_i
    answer = IkeMessage(spi_i, bytes(8), ExchangeType.IKE_SA_INIT, 0, True, False,
                        [_invalid_ke(0xFFFF)])
    first, body = encode_payloads(answer.payloads)
    data = HEADER.pack(spi_i, bytes(8), first, 0x20, ExchangeType.IKE_SA_INIT, R_FLAG, 0,
                       IKE_HEADER_LEN + len(body)) + body
    p.a.receive_datagram(data, p.addr("b"), 500, 0.0)
    p.drain()
    [failed] = p.of("a", IkeSaFailed)
    assert "did not offer" in failed.reason
    p.a.handle_timer(1e6)


@pytest.mark.parametrize("group,width", [(0xFFFF, 2), (0, 2), (19, 2), (21, 2), (20, 3)])
def test_invalid_ke_in_answer_to_a_pfs_child(group: int, width: int) -> None:
    """CREATE_CHILD_SA with PFS (ecp256 sent, ecp384 also offered): a group we
    did not offer, the one we sent, or no proper group fails the child only,
    without a retry; never the IKE SA or the engine."""
    p = make_pair(esp="aes128gcm16-ecp256-ecp384", extra_children=False)
    p.establish("a", children=[])
    p.clear_events()
    p.a.create_child(p.ike_id("a"), "net", p.now)
    [req] = answers(p, "a")
    mid = decode_header(req).message_id
    p.deliver("b", seal(p.sa("b"), ExchangeType.CREATE_CHILD_SA, mid,
                        [_invalid_ke(group, width)], response=True))
    p.drain()
    assert not p.pending("a")
    [failed] = p.of("a", ChildSaFailed)
    assert "INVALID_KE_PAYLOAD" in failed.reason
    p.a.handle_timer(1e6)
    assert not p.a.drops and p.sa("a").state is IkeState.ESTABLISHED


def test_invalid_ke_for_an_offered_group_retries_the_child() -> None:
    """The legitimate case still works: b wants ecp384, which a offered."""
    p = make_pair(esp="aes128gcm16-ecp256-ecp384", extra_children=False,
                  children_b=[child("net", "10.91.2.0/24", "10.91.1.0/24",
                                    "aes128gcm16-ecp384")])
    p.establish("a", children=[])
    p.clear_events()
    p.a.create_child(p.ike_id("a"), "net", p.now)
    p.flush()
    [installed] = p.of("a", ChildSaInstalled)
    assert installed.name == "net" and not p.of("a", ChildSaFailed)


# -- finding 3: transport mode ---------------------------------------------------------


def test_transport_mode_in_ike_auth_refuses_the_child_not_the_ike_sa() -> None:
    """Before: answered in tunnel mode, silently. After: the child is refused
    with NO_PROPOSAL_CHOSEN and a ChildSaFailed saying why; the IKE SA comes
    up (RFC 7296 §1.2, §2.21.1)."""
    p = make_pair()
    p.initiate("a", ["net"])
    p.step("a")
    p.step("b")
    [auth] = answers(p, "a")
    a_sa, b_sa = p.sa("a"), p.sa("b")
    msg = opened(b_sa, auth)
    payloads = [NotifyPayload(NotifyType.USE_TRANSPORT_MODE), *msg.payloads]
    tampered = a_sa.encode(ExchangeType.IKE_AUTH, msg.message_id, False, payloads)
    p.deliver("a", tampered)
    p.drain()
    assert p.of("b", IkeSaEstablished) and not p.of("b", ChildSaInstalled)
    [failed] = p.of("b", ChildSaFailed)
    assert failed.reason == "transport mode requested, not supported" and failed.name == "net"
    [answer] = answers(p, "b")
    notes = [n.notify_type for n in opened(a_sa, answer).get_all(NotifyPayload)]
    assert NotifyType.NO_PROPOSAL_CHOSEN in notes
    assert NotifyType.USE_TRANSPORT_MODE not in notes
    p.deliver("b", answer)
    p.flush()
    assert a_sa.state is IkeState.ESTABLISHED and not p.live("a") and not p.live("b")
    assert p.of("a", ChildSaFailed)
    assert p.dpd_ok("a") and p.dpd_ok("b")


def test_transport_mode_in_create_child_sa_is_refused() -> None:
    p = established()
    p.deliver("a", _child_request(p, [], (NotifyPayload(NotifyType.USE_TRANSPORT_MODE),)))
    p.drain()
    [answer] = answers(p, "b")
    msg = opened(p.sa("a"), answer)
    assert [n.notify_type for n in msg.get_all(NotifyPayload)] == [
        NotifyType.NO_PROPOSAL_CHOSEN]
    [failed] = p.of("b", ChildSaFailed)
    assert failed.reason == "transport mode requested, not supported" and failed.name == "ctr"
    assert not p.of("b", ChildSaInstalled)


def test_answer_in_transport_mode_we_did_not_ask_for_is_deleted() -> None:
    p = established()
    p.a.create_child(p.ike_id("a"), "ctr", p.now)
    [req] = answers(p, "a")
    p.deliver("a", req)
    [answer] = answers(p, "b")
    b_sa = p.sa("b")
    msg = opened(p.sa("a"), answer)
    tampered = b_sa.encode(ExchangeType.CREATE_CHILD_SA, msg.message_id, True,
                           [NotifyPayload(NotifyType.USE_TRANSPORT_MODE), *msg.payloads])
    p.deliver("b", tampered)
    p.flush()
    [failed] = p.of("a", ChildSaFailed)
    assert "transport mode" in failed.reason
    assert [c.name for c in p.live("a").values()] == ["net"]
    assert [c.name for c in p.live("b").values()] == ["net"]  # b's half was deleted


# -- decoders: every truncation, random mutations -----------------------------------------


@functools.cache
def _session() -> tuple[Pair, tuple[tuple[str, bytes], ...]]:
    """Every exchange once (the corpus) and the pair that made it."""
    from tests.test_ike_robustness import full_session

    p = full_session()
    return p, tuple((s, o.data) for s, o in p.wire)


def _keys_for(data: bytes) -> SkCipher | None:
    """The inbound cipher that opens ``data`` (SK messages), else None."""
    p, _ = _session()
    header = decode_header(data)
    if header.next_payload != PayloadType.SK:
        return None
    for e in (p.a, p.b):
        for sa in e.by_id.values():
            if sa.spis() == (header.spi_i, header.spi_r) and sa.initiator != header.is_initiator:
                return sa.sk_in
    return _any_keys()


@functools.cache
def _any_keys() -> SkCipher:
    p = established()
    sk = p.sa("b").sk_in
    assert sk is not None
    return sk


#: what the decoders may raise for bad bytes: MalformedMessage (with
#: EncryptedWithoutKeys), and the three RFC-defined refusals beside it
DECODER_ERRORS = (MalformedMessage, IntegrityError, UnsupportedCriticalPayload,
                  InvalidMajorVersion)


def _with_length(data: bytes) -> bytes:
    if len(data) < IKE_HEADER_LEN:
        return data
    return data[:24] + _LENGTH.pack(len(data)) + data[28:]


def test_every_truncation_of_every_exchange_is_malformed() -> None:
    """Cut anywhere, with and without the header Length fixed up, decoded with
    and without the right keys: MalformedMessage only (IntegrityError for a
    cut SK payload, RFC 7296 §2.21.2)."""
    _, corpus = _session()
    kinds = {decode_header(d).exchange for _, d in corpus}
    assert kinds == {ExchangeType.IKE_SA_INIT, ExchangeType.IKE_AUTH,
                     ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL}
    cuts = 0
    for _, data in corpus:
        sk = _keys_for(data)
        for n in range(len(data)):
            with pytest.raises(MalformedMessage):
                decode_message(data[:n])
            with pytest.raises(MalformedMessage):
                decode_message(data[:n], sk)
            with pytest.raises((MalformedMessage, IntegrityError)):
                decode_message(_with_length(data[:n]), sk)
            cuts += 1
    assert cuts == sum(len(d) for _, d in corpus)


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: flip a byte, cut, insert."""
    out = bytearray(data)
    for kind, pos, value in edits:
        if not out:
            break
        i = pos % len(out)
        if kind == 0:
            out[i] ^= value or 1
        elif kind == 1:
            del out[i:]
        elif kind == 2:
            out[i:i] = bytes([value])
        else:
            out[i] = value
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)),
                 min_size=1, max_size=6)


@fuzz_settings(200)
@given(pick=st.integers(0, 1 << 16), edits=EDITS, fix_length=st.booleans())
def test_mutated_messages_raise_only_decoder_errors(pick: int, edits: list[tuple[int, int, int]],
                                                    fix_length: bool) -> None:
    _, corpus = _session()
    _, data = corpus[pick % len(corpus)]
    sk = _keys_for(data)
    bad = _mutate(data, edits)
    if fix_length:
        bad = _with_length(bad)
    for keys in (None, sk):
        try:
            decode_message(bad, keys)
        except DECODER_ERRORS:
            pass


@fuzz_settings(200)
@given(first=st.integers(0, 255), body=st.binary(max_size=300))
def test_random_payload_chains_raise_only_decoder_errors(first: int, body: bytes) -> None:
    try:
        decode_payloads(first, body)
    except (MalformedMessage, UnsupportedCriticalPayload):
        pass


# -- the engine: random and mutated datagrams on an established pair -----------------------


@functools.cache
def _engine_corpus() -> tuple[tuple[str, bytes], ...]:
    return _session()[1]


@fuzz_settings(100)
@given(batch=st.lists(st.tuples(st.integers(0, 1 << 16), EDITS, st.booleans(),
                                st.sampled_from(["a", "b"])), min_size=1, max_size=8),
       noise=st.lists(st.binary(min_size=0, max_size=120), max_size=3),
       later=st.sampled_from([0.0, 5.0, 31.0, 1e4]))
def test_engine_never_raises_on_mutated_datagrams(
        batch: list[tuple[int, list[tuple[int, int, int]], bool, str]], noise: list[bytes],
        later: float) -> None:
    # Another seed than the corpus session's: with the same one, the corpus
    # holds this pair's *future* requests under its real keys (message ID 2
    # before the pair ever sent it), which no attacker can have; replays of
    # what the pair did send are in the corpus too (p.wire).
    p = make_pair(seed=11)
    p.establish("a", children=["net"])
    p.clear_events()
    before = {s: p.sa(s).spis() for s in ("a", "b")}
    corpus = _engine_corpus() + tuple((s, o.data) for s, o in p.wire)
    for pick, edits, fix_length, to in batch:
        _, data = corpus[pick % len(corpus)]
        bad = _mutate(data, edits)
        p.engine(to).receive_datagram(_with_length(bad) if fix_length else bad,
                                      p.addr("a" if to == "b" else "b"), 4500, p.now)
    for n in noise:
        p.b.receive_datagram(n, p.addr("a"), 500, p.now)
        p.b.receive_datagram(_with_length(n), p.addr("a"), 4500, p.now)
    # Answers reach the other engine (which drops them); timers run at a
    # later time; the real SAs are untouched.
    p.flush()
    p.now = later
    p.a.handle_timer(later)
    p.b.handle_timer(later)
    p.flush()
    for s in ("a", "b"):
        assert p.established_sa(s).spis() == before[s]
    assert p.dpd_ok("a") and p.dpd_ok("b")


# -- the boundary: peer errors counted by reason, our own bugs not swallowed ----------------


class _Odd(RemoteProtocolError):
    drop_reason = "odd_peer_error"


def test_any_remote_error_is_counted_by_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever part of the core finds a peer error, receive_datagram and
    handle_timer count it under its drop_reason and go on."""
    p = established()

    def peer_error(*args: object) -> None:
        raise _Odd("something the peer did")

    monkeypatch.setattr(IkeSa, "receive_request", peer_error)
    p.b.dpd(p.ike_id("b"), p.now)
    p.a.dpd(p.ike_id("a"), p.now)
    p.flush()
    assert p.b.drops["odd_peer_error"] == 1 and p.a.drops["odd_peer_error"] == 1
    monkeypatch.setattr(IkeSa, "handle_timer", peer_error)
    p.b.handle_timer(1e6)
    assert p.b.drops["odd_peer_error"] == 2
    p.drain()
    assert p.of("b", IkeSaFailed)  # the SA whose timer hit it cannot go on


def test_our_own_bugs_are_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """LocalProtocolError (and anything else) reaches the shell's barrier."""
    p = established()

    def bug(*args: object) -> None:
        raise LocalProtocolError("a bug of ours")

    monkeypatch.setattr(IkeSa, "receive_request", bug)
    p.a.dpd(p.ike_id("a"), p.now)
    [dpd] = answers(p, "a")
    with pytest.raises(LocalProtocolError):
        p.deliver("a", dpd)
    monkeypatch.setattr(IkeSa, "handle_timer", bug)
    with pytest.raises(LocalProtocolError):
        p.b.handle_timer(1e6)


# -- found by the state fuzzer: narrowing past what a TS payload holds ----------------------


def test_huge_traffic_selectors_are_narrowed_to_what_fits() -> None:
    """255 proposed selectors times our two: narrowing gave 510, the answer
    could not be encoded (ValueError out of receive_datagram). Now the
    answer carries the first 255 (a subset is a narrowing, RFC 7296 §2.9)."""
    two = (["10.91.2.0/24", "10.91.3.0/24"], ["10.91.1.0/24", "10.91.4.0/24"])
    p = make_pair(children_a=[child("net", two[1], two[0])],
                  children_b=[child("net", two[0], two[1])])
    p.establish("a", children=[])
    sa = p.sa("a")
    assert sa.policy is not None
    c = sa.policy.children["net"]
    every = [TrafficSelector(TsType.TS_IPV4_ADDR_RANGE, 0, port, port,
                             IPv4Address("0.0.0.0"), IPv4Address("255.255.255.255"))
             for port in range(255)]
    payloads: list[Payload] = [
        SaPayload([Proposal(1, ProtocolId.ESP, b"abcd", list(c.esp_proposals[0].transforms))]),
        NoncePayload(bytes(32)), TsiPayload(every), TsrPayload(every)]
    p.deliver("a", seal(sa, ExchangeType.CREATE_CHILD_SA, sa.mids.take_request_id(), payloads))
    p.drain()
    [installed] = p.of("b", ChildSaInstalled)
    assert len(installed.local_ts) == len(installed.remote_ts) == 255
    assert not p.b.drops


def test_engine_survives_every_truncation_of_its_own_session() -> None:
    """Every cut of every message of a session (each exchange, both ways),
    fed back to the engines that hold those SAs (the live ones after the IKE
    rekey): nothing raises, now or in any later timer, and the IKE SA still
    answers DPD both ways."""
    from tests.test_ike_robustness import full_session

    p = full_session()
    corpus = [(s, o.data) for s, o in p.wire]
    for sender, data in corpus:
        for n in range(len(data)):
            p.deliver(sender, data[:n])
            p.deliver(sender, _with_length(data[:n]))
    p.drain()
    assert p.a.drops["malformed"] + p.b.drops["malformed"] >= sum(len(d) for _, d in corpus)
    p.flush()
    for later in (1.0, 31.0, 1e4):
        p.a.handle_timer(p.now + later)
        p.b.handle_timer(p.now + later)
    p.flush()
    p.now += 1e4
    assert p.dpd_ok("a") and p.dpd_ok("b")
