"""IKEv2 payload codec (RFC 7296 §3.2-§3.13): round trips, strictness, fuzzing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import MalformedMessage
from common.ike.constants import (
    AuthMethod,
    CertEncoding,
    CfgAttr,
    CfgType,
    DhId,
    EncrId,
    EsnId,
    IdType,
    IntegId,
    NotifyType,
    PayloadType,
    PrfId,
    ProtocolId,
    TransformType,
    TsType,
)
from common.ike.payloads import (
    AuthPayload,
    CertReqPayload,
    CfgAttribute,
    CpPayload,
    DeletePayload,
    IdiPayload,
    IdrPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    OpaquePayload,
    Payload,
    SaPayload,
    TsiPayload,
    TsrPayload,
    UnsupportedCriticalPayload,
    VendorIdPayload,
    decode_payloads,
    encode_payloads,
)
from common.ike.transforms import Proposal, Transform
from common.ike.ts import TrafficSelector

ENCR, PRF, INTEG, DH, ESN = (TransformType.ENCR, TransformType.PRF, TransformType.INTEG,
                            TransformType.DH, TransformType.ESN)
FUZZ_ERRORS = (MalformedMessage, UnsupportedCriticalPayload)


def ike_sa() -> SaPayload:
    """Two IKE proposals, the first with two Key Length variants of AES-GCM."""
    return SaPayload([
        Proposal(1, ProtocolId.IKE, b"", [
            Transform(ENCR, EncrId.ENCR_AES_GCM_16, 256),
            Transform(ENCR, EncrId.ENCR_AES_GCM_16, 128),
            Transform(PRF, PrfId.PRF_HMAC_SHA2_256),
            Transform(DH, DhId.ECP_256),
            Transform(DH, DhId.CURVE_25519),
        ]),
        Proposal(2, ProtocolId.IKE, b"", [
            Transform(ENCR, EncrId.ENCR_AES_CBC, 128),
            Transform(INTEG, IntegId.AUTH_HMAC_SHA2_256_128),
            Transform(PRF, PrfId.PRF_HMAC_SHA2_256),
            Transform(DH, DhId.MODP_2048),
        ]),
    ])


def esp_sa() -> SaPayload:
    return SaPayload([
        Proposal(1, ProtocolId.ESP, b"\xc1\x00\x01\x02", [
            Transform(ENCR, EncrId.ENCR_AES_GCM_16, 128),
            Transform(ESN, EsnId.NO_ESN),
        ]),
        Proposal(2, ProtocolId.ESP, b"\xc1\x00\x01\x02", [
            Transform(ENCR, EncrId.ENCR_AES_CTR, 128),
            Transform(INTEG, IntegId.AUTH_HMAC_SHA2_256_128),
            Transform(ESN, EsnId.NO_ESN),
            Transform(ESN, EsnId.ESN),
        ]),
    ])


def v4(start: str, end: str, proto: int = 0, ports: tuple[int, int] = (0, 65535)
       ) -> TrafficSelector:
    return TrafficSelector(TsType.TS_IPV4_ADDR_RANGE, proto, ports[0], ports[1],
                           ipaddress.IPv4Address(start), ipaddress.IPv4Address(end))


def v6(start: str, end: str, proto: int = 0, ports: tuple[int, int] = (0, 65535)
       ) -> TrafficSelector:
    return TrafficSelector(TsType.TS_IPV6_ADDR_RANGE, proto, ports[0], ports[1],
                           ipaddress.IPv6Address(start), ipaddress.IPv6Address(end))


def every_payload() -> list[Payload]:
    return [
        ike_sa(),
        esp_sa(),
        SaPayload([Proposal(1, ProtocolId.IKE, bytes(range(8)), [Transform(PRF, 7)])]),
        KePayload(DhId.ECP_256, bytes(range(64))),
        KePayload(DhId(1234), b"\x01\x02"),  # unknown group is carried
        IdiPayload(IdType.ID_FQDN, b"gw-a.test"),
        IdrPayload(IdType.ID_IPV4_ADDR, bytes([198, 18, 0, 2])),
        AuthPayload(AuthMethod.SHARED_KEY_MIC, bytes(32)),
        NoncePayload(bytes(range(16))),
        NoncePayload(bytes(256)),
        NotifyPayload(NotifyType.INITIAL_CONTACT),
        NotifyPayload(NotifyType.REKEY_SA, ProtocolId.ESP, b"\xc1\x00\x00\x09"),
        NotifyPayload(NotifyType.SIGNATURE_HASH_ALGORITHMS,
                      data=bytes.fromhex("0002000300040005")),
        NotifyPayload(NotifyType(40000), data=b"x"),  # unknown status type is carried
        DeletePayload(ProtocolId.IKE),
        DeletePayload(ProtocolId.ESP, [i.to_bytes(4, "big") for i in range(256, 256 + 300)]),
        VendorIdPayload(b"strongSwan"),
        TsiPayload([v4("10.91.1.0", "10.91.1.255"),
                    v4("0.0.0.0", "255.255.255.255", 6, (443, 443))]),
        # RFC 7296 §3.13.1: ports 65535..0 mean OPAQUE.
        TsrPayload([v6("2001:db8::", "2001:db8::ffff"),
                    v6("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 17, (65535, 0))]),
        TsiPayload([v4("10.0.0.1", "10.0.0.1"), v6("fe80::1", "fe80::2")]),
        CpPayload(CfgType.CFG_REQUEST, [CfgAttribute(CfgAttr.INTERNAL_IP4_ADDRESS)]),
        CertReqPayload(CertEncoding.X509_SIGNATURE, bytes(20)),
        OpaquePayload(PayloadType.EAP, b"\x01\x02\x00\x05\x01", critical=True),
    ]


def raw_payload(ptype: int, body: bytes, next_type: int = 0, critical: bool = False) -> bytes:
    return bytes([next_type, 0x80 if critical else 0]) + (4 + len(body)).to_bytes(2, "big") + body


@pytest.mark.parametrize("payload", every_payload(), ids=lambda p: type(p).__name__)
def test_every_payload_round_trips_alone(payload: Payload) -> None:
    first, data = encode_payloads([payload])
    assert first == payload.payload_type
    assert decode_payloads(first, data) == [payload]


def test_whole_chain_round_trips() -> None:
    payloads = every_payload()
    first, data = encode_payloads(payloads)
    assert decode_payloads(first, data) == payloads


def test_empty_chain() -> None:
    assert encode_payloads([]) == (PayloadType.NONE, b"")
    assert decode_payloads(PayloadType.NONE, b"") == []
    with pytest.raises(MalformedMessage):
        decode_payloads(PayloadType.NONE, b"\x00")


def test_subclasses_stay_apart() -> None:
    # IDi and IDr (and TSi/TSr) share a layout but are different payloads.
    assert IdiPayload(IdType.ID_FQDN, b"a") != IdrPayload(IdType.ID_FQDN, b"a")
    first, data = encode_payloads([TsrPayload([v4("1.2.3.4", "1.2.3.4")])])
    assert first == PayloadType.TSR
    assert type(decode_payloads(first, data)[0]) is TsrPayload


def test_sa_wire_format_rfc7296_3_3() -> None:
    sa = SaPayload([Proposal(1, ProtocolId.ESP, b"\x00\x00\x01\x00", [
        Transform(ENCR, EncrId.ENCR_AES_CBC, 256),
        Transform(INTEG, IntegId.AUTH_HMAC_SHA2_256_128),
    ])])
    _, data = encode_payloads([sa])
    assert data.hex() == (
        "00000024"  # generic header: no next payload, length 36
        "00000020" "01030402" "00000100"  # last proposal, len 32, #1 ESP, SPI size 4, 2 transforms
        "0300000c" "0100000c" "800e0100"  # more transforms, ENCR_AES_CBC, Key Length 256 (TV)
        "00000008" "0300000c"  # last transform, INTEG AUTH_HMAC_SHA2_256_128
    )


def test_unknown_non_critical_payload_is_skipped() -> None:
    nonce = NoncePayload(bytes(range(20)))
    _, nonce_bytes = encode_payloads([nonce])
    data = raw_payload(200, b"whatever", next_type=PayloadType.NONCE) + nonce_bytes
    assert decode_payloads(200, data) == [nonce]


@pytest.mark.parametrize("ptype", [49, 54, 200, 255])
def test_unknown_critical_payload_is_refused(ptype: int) -> None:
    data = raw_payload(ptype, b"x", critical=True)
    with pytest.raises(UnsupportedCriticalPayload) as info:
        decode_payloads(ptype, data)
    assert info.value.payload_type == ptype
    assert info.value.notify_type == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD == 1
    assert info.value.notify_data == bytes([ptype])


def test_critical_bit_on_known_payload_is_ignored() -> None:
    # RFC 7296 §2.5: the critical bit only matters for payloads not understood.
    data = raw_payload(PayloadType.VENDOR_ID, b"abc", critical=True)
    assert decode_payloads(PayloadType.VENDOR_ID, data) == [VendorIdPayload(b"abc")]


@pytest.mark.parametrize("ptype", [PayloadType.SK, PayloadType.SKF])
def test_sk_inside_a_chain_is_malformed(ptype: PayloadType) -> None:
    with pytest.raises(MalformedMessage):
        decode_payloads(ptype, raw_payload(ptype, bytes(40)))


BAD_BODIES = {
    "nonce too short": (PayloadType.NONCE, bytes(15)),
    "nonce too long": (PayloadType.NONCE, bytes(257)),
    "IKE delete with SPIs": (PayloadType.DELETE, bytes.fromhex("01080001") + bytes(8)),
    "ESP delete with 8-byte SPI": (PayloadType.DELETE, bytes.fromhex("03080001") + bytes(8)),
    "delete count too big": (PayloadType.DELETE, bytes.fromhex("03040003") + bytes(8)),
    "delete count too small": (PayloadType.DELETE, bytes.fromhex("03040001") + bytes(8)),
    "delete unknown protocol": (PayloadType.DELETE, bytes.fromhex("09000000")),
    "notify SPI beyond body": (PayloadType.NOTIFY, bytes.fromhex("0304400a") + bytes(2)),
    "TS count too big": (PayloadType.TSI, bytes.fromhex("02000000") + bytes.fromhex(
        "07000010" "0000ffff" "0a000000" "0affffff")),
    "TS trailing bytes": (PayloadType.TSI, bytes.fromhex("01000000") + bytes.fromhex(
        "07000010" "0000ffff" "0a000000" "0affffff") + b"\x00"),
    "TS bad selector length": (PayloadType.TSI, bytes.fromhex("01000000") + bytes.fromhex(
        "07000014" "0000ffff" "0a000000" "0affffff" "00000000")),
    "TS v6 length on v4": (PayloadType.TSR, bytes.fromhex("01000000") + bytes.fromhex(
        "08000010" "0000ffff" "0a000000" "0affffff")),
    "TS unknown type": (PayloadType.TSR, bytes.fromhex("01000000") + bytes.fromhex(
        "0a000010" "0000ffff" "0a000000" "0affffff")),
    "KE short": (PayloadType.KE, b"\x00\x13\x00"),
    "ID short": (PayloadType.IDI, b"\x02\x00"),
    "AUTH short": (PayloadType.AUTH, b""),
    "empty SA": (PayloadType.SA, b""),
    "proposal length too small": (PayloadType.SA, bytes.fromhex("00000004")),
    "proposal beyond payload": (PayloadType.SA, bytes.fromhex("00000030" "01010001")),
    "proposal says more, none follows": (PayloadType.SA, bytes.fromhex(
        "02000010" "01010001" "00000008" "02000005")),
    "bad proposal last value": (PayloadType.SA, bytes.fromhex(
        "03000010" "01010001" "00000008" "02000005")),
    "transform count too big": (PayloadType.SA, bytes.fromhex(
        "00000010" "01010002" "00000008" "02000005")),
    "transform says more, count says no": (PayloadType.SA, bytes.fromhex(
        "00000010" "01010001" "03000008" "02000005")),
    "ESP SPI size 0": (PayloadType.SA, bytes.fromhex(
        "00000010" "01030001" "00000008" "01000014")),
    "IKE SPI size 4": (PayloadType.SA, bytes.fromhex(
        "00000014" "01010401" "00000000" "00000008" "02000005")),
    "transform length too small": (PayloadType.SA, bytes.fromhex(
        "00000010" "01010001" "00000004" "02000005")),
    "unknown attribute": (PayloadType.SA, bytes.fromhex(
        "00000014" "01010001" "0000000c" "01000014" "800f0080")),
    "TLV key length": (PayloadType.SA, bytes.fromhex(
        "00000016" "01010001" "0000000e" "01000014" "000e0002" "0080")),
    "duplicate key length": (PayloadType.SA, bytes.fromhex(
        "00000018" "01010001" "00000010" "01000014" "800e0080" "800e0100")),
    "attribute cut": (PayloadType.SA, bytes.fromhex(
        "00000012" "01010001" "0000000a" "01000014" "800e")),
    "proposals not 1,2": (PayloadType.SA, bytes.fromhex(
        "02000010" "01010001" "00000008" "02000005"
        "00000010" "03010001" "00000008" "02000005")),
    "proposal number 0": (PayloadType.SA, bytes.fromhex(
        "00000010" "00010001" "00000008" "02000005")),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_bodies_are_malformed(case: str) -> None:
    ptype, body = BAD_BODIES[case]
    with pytest.raises(MalformedMessage):
        decode_payloads(ptype, raw_payload(ptype, body))


def test_accepted_proposal_keeps_its_number() -> None:
    # RFC 7296 §3.3.1: a response's single proposal carries the chosen number.
    sa = SaPayload([Proposal(3, ProtocolId.IKE, b"", [Transform(PRF, PrfId.PRF_HMAC_SHA2_256)])])
    first, data = encode_payloads([sa])
    assert decode_payloads(first, data) == [sa]


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_generic_length_below_header_is_malformed(length: int) -> None:
    with pytest.raises(MalformedMessage):
        decode_payloads(PayloadType.VENDOR_ID, bytes([0, 0, 0, length]) + bytes(8))


@pytest.mark.parametrize("bad", [
    SaPayload([]),
    SaPayload([Proposal(2, ProtocolId.IKE, b"", [Transform(PRF, 5)]),
               Proposal(3, ProtocolId.IKE, b"", [Transform(PRF, 5)])]),
    SaPayload([Proposal(1, ProtocolId.ESP, b"", [Transform(ENCR, 20, 128)])]),
    SaPayload([Proposal(1, ProtocolId.IKE, b"", [])]),
    SaPayload([Proposal(1, ProtocolId.IKE, b"", [Transform(ENCR, 20, 70000)])]),
    NoncePayload(bytes(8)),
    DeletePayload(ProtocolId.IKE, [b"\x00" * 4]),
    DeletePayload(ProtocolId.ESP, [b"\x00" * 8]),
    TsiPayload([TrafficSelector(TsType.TS_IPV4_ADDR_RANGE, 0, 0, 65535,
                                ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::"))]),
    OpaquePayload(PayloadType.NONCE, bytes(16)),
    VendorIdPayload(bytes(70000)),
], ids=repr)
def test_encoding_bad_values_is_a_value_error(bad: Payload) -> None:
    with pytest.raises(ValueError):
        encode_payloads([bad])


def test_every_truncation_is_malformed() -> None:
    first, data = encode_payloads(every_payload())
    for n in range(len(data)):
        with pytest.raises(MalformedMessage):
            decode_payloads(first, data[:n])


@pytest.mark.parametrize("payload", every_payload(), ids=lambda p: type(p).__name__)
def test_every_shortened_body_is_malformed(payload: Payload) -> None:
    """Truncate inside the body but keep the generic length consistent, so
    the body parser itself meets the short data."""
    first, data = encode_payloads([payload])
    for n in range(4, len(data)):
        short = data[:2] + n.to_bytes(2, "big") + data[4:n]
        try:
            decode_payloads(first, short)
        except MalformedMessage:
            continue
        # Some bodies are legitimately shorter (opaque data, a dropped SPI, a
        # CP cut between its attributes...).
        assert isinstance(payload, (CpPayload, KePayload, IdiPayload, IdrPayload, AuthPayload,
                                    NoncePayload, NotifyPayload, VendorIdPayload,
                                    OpaquePayload, CertReqPayload))


@settings(max_examples=500, deadline=None)
@given(first=st.integers(0, 255), data=st.binary(max_size=300))
def test_random_bytes_raise_only_malformed(first: int, data: bytes) -> None:
    try:
        decode_payloads(first, data)
    except FUZZ_ERRORS:
        pass


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_mutated_chains_raise_only_malformed(data: st.DataObject) -> None:
    first, raw = encode_payloads(every_payload())
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    try:
        decode_payloads(first, bytes(buf))
    except FUZZ_ERRORS:
        pass
