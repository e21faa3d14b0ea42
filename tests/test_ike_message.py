"""IKEv2 messages (RFC 7296 §3.1) in the clear and inside SK (§3.14)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import IntegrityError, MalformedMessage
from common.ike.constants import (
    AuthMethod,
    DhId,
    EncrId,
    EsnId,
    ExchangeType,
    HeaderFlag,
    IdType,
    IntegId,
    NotifyType,
    PayloadType,
    PrfId,
    ProtocolId,
    TransformType,
    TsType,
)
from common.ike.message import (
    EncryptedWithoutKeys,
    IkeMessage,
    InvalidMajorVersion,
    decode_header,
    decode_message,
    encode_message,
)
from common.ike.payloads import (
    AuthPayload,
    DeletePayload,
    IdiPayload,
    IdrPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
    TsiPayload,
    TsrPayload,
    UnsupportedCriticalPayload,
    VendorIdPayload,
    encode_payloads,
)
from common.ike.sk import SkCipher
from common.ike.transforms import Proposal, Transform
from common.ike.ts import TrafficSelector
from tests.test_ike_sk import SUITE_IDS, SUITES, all_ciphers, make_cipher

SPI_I = bytes.fromhex("0102030405060708")
SPI_R = bytes.fromhex("c100000000000abc")
NAT_SRC = bytes(range(20))  # SHA-1 of SPIs, address, port (RFC 7296 §2.23)
NAT_DST = bytes(range(20, 40))
FUZZ_ERRORS = (MalformedMessage, IntegrityError, UnsupportedCriticalPayload,
               InvalidMajorVersion)


def strongswan_sa_init() -> IkeMessage:
    """IKE_SA_INIT request as strongSwan 5.9 sends it with
    proposals = aes128gcm16-prfsha256-ecp256:
    HDR, SA, KEi, Ni, N(NAT_DETECTION_SOURCE_IP), N(NAT_DETECTION_DESTINATION_IP),
    N(IKEV2_FRAGMENTATION_SUPPORTED), N(SIGNATURE_HASH_ALGORITHMS), N(REDIRECT_SUPPORTED)."""
    return IkeMessage(SPI_I, bytes(8), ExchangeType.IKE_SA_INIT, 0, is_response=False,
                      is_initiator=True, payloads=[
        SaPayload([Proposal(1, ProtocolId.IKE, b"", [
            Transform(TransformType.ENCR, EncrId.ENCR_AES_GCM_16, 128),
            Transform(TransformType.PRF, PrfId.PRF_HMAC_SHA2_256),
            Transform(TransformType.DH, DhId.ECP_256),
        ])]),
        KePayload(DhId.ECP_256, bytes(range(64))),
        NoncePayload(bytes(range(100, 132))),
        NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, data=NAT_SRC),
        NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP, data=NAT_DST),
        NotifyPayload(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED),
        # RFC 7427 §4: SHA2-256, SHA2-384, SHA2-512, Identity.
        NotifyPayload(NotifyType.SIGNATURE_HASH_ALGORITHMS,
                      data=bytes.fromhex("0002000300040005")),
        NotifyPayload(NotifyType.REDIRECT_SUPPORTED),
    ])


def ike_auth_request() -> IkeMessage:
    """IKE_AUTH as strongSwan sends it: IDi N(INITIAL_CONTACT) IDr AUTH SA TSi TSr
    N(MULTIPLE_AUTH_SUPPORTED) N(EAP_ONLY_AUTHENTICATION) N(MESSAGE_ID_SYNC_SUPPORTED)."""
    return IkeMessage(SPI_I, SPI_R, ExchangeType.IKE_AUTH, 1, is_response=False,
                      is_initiator=True, payloads=[
        IdiPayload(IdType.ID_FQDN, b"gw-a.test"),
        NotifyPayload(NotifyType.INITIAL_CONTACT),
        IdrPayload(IdType.ID_FQDN, b"gw-b.test"),
        AuthPayload(AuthMethod.SHARED_KEY_MIC, bytes(range(32))),
        SaPayload([Proposal(1, ProtocolId.ESP, b"\xc7\x00\x12\x34", [
            Transform(TransformType.ENCR, EncrId.ENCR_AES_GCM_16, 128),
            Transform(TransformType.ESN, EsnId.NO_ESN),
        ])]),
        TsiPayload([TrafficSelector(TsType.TS_IPV4_ADDR_RANGE, 0, 0, 65535,
                                    ipaddress.IPv4Address("10.91.1.0"),
                                    ipaddress.IPv4Address("10.91.1.255"))]),
        TsrPayload([TrafficSelector(TsType.TS_IPV6_ADDR_RANGE, 0, 0, 65535,
                                    ipaddress.IPv6Address("2001:db8:2::"),
                                    ipaddress.IPv6Address("2001:db8:2::ffff"))]),
        NotifyPayload(NotifyType.MULTIPLE_AUTH_SUPPORTED),
        NotifyPayload(NotifyType.EAP_ONLY_AUTHENTICATION),
        NotifyPayload(NotifyType.IKEV2_MESSAGE_ID_SYNC_SUPPORTED),
    ])


def informational(payloads: list[Payload] | None = None, response: bool = True) -> IkeMessage:
    return IkeMessage(SPI_I, SPI_R, ExchangeType.INFORMATIONAL, 7, is_response=response,
                      is_initiator=False, payloads=payloads or [])


def sample_messages() -> list[IkeMessage]:
    return [
        strongswan_sa_init(),
        ike_auth_request(),
        informational(),  # DPD: an empty INFORMATIONAL
        informational([DeletePayload(ProtocolId.ESP, [b"\xc7\x00\x12\x34", b"\xc7\x00\x12\x35"])]),
        informational([DeletePayload(ProtocolId.IKE)], response=False),
    ]


# -- the strongSwan IKE_SA_INIT, byte by byte --------------------------------------


def test_strongswan_sa_init_wire_format() -> None:
    data = encode_message(strongswan_sa_init())
    # 28 header + 40 SA + 72 KE + 36 Ni + 28 + 28 + 8 + 16 + 8 notifies
    assert len(data) == 264
    assert data[:28].hex() == (
        "0102030405060708" "0000000000000000"  # SPIi, SPIr
        "21" "20" "22" "08"  # next SA, version 2.0, IKE_SA_INIT, I flag
        "00000000" "00000108"  # message ID 0, length 264
    )
    sa = data[28:68]
    assert sa.hex() == (
        "22000028"  # next KE, length 40
        "00000024" "01010003"  # last proposal, length 36, #1, IKE, no SPI, 3 transforms
        "0300000c" "01000014" "800e0080"  # ENCR_AES_GCM_16, Key Length 128
        "03000008" "02000005"  # PRF_HMAC_SHA2_256
        "00000008" "04000013"  # last transform: DH group 19
    )
    assert data[68:76].hex() == "28000048" "00130000"  # next Ni, length 72, group 19
    assert data[140:144].hex() == "29000024"  # Ni: next N, length 36
    assert data[176:184].hex() == "2900001c" "00004004"  # N(NAT_DETECTION_SOURCE_IP)
    assert data[232:240].hex() == "29000008" "0000402e"  # N(IKEV2_FRAGMENTATION_SUPPORTED)
    assert data[240:256].hex() == "29000010" "0000402f" "0002000300040005"
    assert data[256:].hex() == "00000008" "00004016"  # last: N(REDIRECT_SUPPORTED)
    assert decode_message(data) == strongswan_sa_init()


def test_message_helpers() -> None:
    msg = decode_message(encode_message(strongswan_sa_init()))
    assert msg.get(KePayload) == KePayload(DhId.ECP_256, bytes(range(64)))
    assert msg.get(AuthPayload) is None
    assert len(msg.get_all(NotifyPayload)) == 5
    nat = msg.notify(NotifyType.NAT_DETECTION_SOURCE_IP)
    assert nat is not None and nat.data == NAT_SRC
    assert msg.has_notify(NotifyType.REDIRECT_SUPPORTED)
    assert not msg.has_notify(NotifyType.COOKIE)
    assert msg.notify(NotifyType.COOKIE) is None


# -- header ------------------------------------------------------------------------


def test_decode_header() -> None:
    data = encode_message(ike_auth_request(), make_cipher(SUITES[0]), bytes(8))
    h = decode_header(data)
    assert (h.spi_i, h.spi_r, h.exchange, h.message_id, h.length) == (
        SPI_I, SPI_R, ExchangeType.IKE_AUTH, 1, len(data))
    assert h.next_payload == PayloadType.SK
    assert h.flags == HeaderFlag.INITIATOR and h.is_initiator and not h.is_response


def test_response_flags() -> None:
    data = encode_message(informational())
    assert data[19] == 0x20  # R set, I clear
    h = decode_header(data)
    assert h.is_response and not h.is_initiator


@pytest.mark.parametrize("version", [0x10, 0x30, 0x00, 0xF0])
def test_wrong_major_version(version: int) -> None:
    data = bytearray(encode_message(informational()))
    data[17] = version
    with pytest.raises(InvalidMajorVersion) as info:
        decode_header(bytes(data))
    assert info.value.major_version == version >> 4
    assert info.value.notify_type == NotifyType.INVALID_MAJOR_VERSION == 5
    with pytest.raises(InvalidMajorVersion):
        decode_message(bytes(data))


def test_minor_version_and_unknown_flags_are_ignored() -> None:
    data = bytearray(encode_message(informational()))
    data[17] = 0x21
    data[19] |= 0x07 | HeaderFlag.VERSION
    assert decode_message(bytes(data)) == informational()


@pytest.mark.parametrize("delta", [-1, 1, 100])
def test_length_must_match_datagram(delta: int) -> None:
    data = bytearray(encode_message(strongswan_sa_init()))
    struct.pack_into("!I", data, 24, len(data) + delta)
    with pytest.raises(MalformedMessage):
        decode_header(bytes(data))


def test_too_short_for_a_header() -> None:
    for n in range(28):
        with pytest.raises(MalformedMessage):
            decode_header(bytes(n))


def test_trailing_bytes_after_chain() -> None:
    data = bytearray(encode_message(strongswan_sa_init()) + b"\x00")
    struct.pack_into("!I", data, 24, len(data))
    with pytest.raises(MalformedMessage):
        decode_message(bytes(data))


@pytest.mark.parametrize("msg", [
    IkeMessage(b"short", SPI_R, ExchangeType.INFORMATIONAL, 0, False, True),
    IkeMessage(SPI_I, SPI_R, ExchangeType.INFORMATIONAL, 2**32, False, True),
    IkeMessage(SPI_I, SPI_R, ExchangeType.INFORMATIONAL, -1, False, True),
], ids=repr)
def test_encoding_bad_header_is_a_value_error(msg: IkeMessage) -> None:
    with pytest.raises(ValueError):
        encode_message(msg)


# -- plain round trips and truncations ---------------------------------------------


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: m.exchange.name)
def test_plain_round_trip(msg: IkeMessage) -> None:
    assert decode_message(encode_message(msg)) == msg


def truncations(data: bytes) -> list[bytes]:
    """Every prefix as is, and every prefix with its Length field fixed up so
    the payload parsers see the short data too."""
    out = []
    for n in range(len(data)):
        out.append(data[:n])
        if n >= 28:
            fixed = bytearray(data[:n])
            struct.pack_into("!I", fixed, 24, n)
            out.append(bytes(fixed))
    return out


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: m.exchange.name)
def test_every_truncation_of_plain_is_malformed(msg: IkeMessage) -> None:
    for short in truncations(encode_message(msg)):
        with pytest.raises(MalformedMessage):
            decode_message(short)


# -- encrypted messages ------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
@pytest.mark.parametrize("msg", sample_messages()[1:], ids=lambda m: m.exchange.name)
def test_encrypted_round_trip(suite: tuple[EncrId, int, IntegId, int, int],
                              msg: IkeMessage) -> None:
    sk = make_cipher(suite)
    data = encode_message(msg, sk, bytes(range(sk.iv_size)))
    assert decode_header(data).next_payload == PayloadType.SK
    assert decode_message(data, make_cipher(suite)) == msg


def test_empty_informational_has_empty_sk() -> None:
    """DPD: HDR, SK {} — the SK Next Payload is NONE, the plaintext only the
    Pad Length octet."""
    sk = make_cipher(SUITES[0])
    data = encode_message(informational(), sk, bytes(8))
    assert len(data) == 28 + 4 + 8 + 1 + 16
    assert data[28:32].hex() == "0000001d"  # next NONE, length 29


def test_gcm_known_answer_through_the_message() -> None:
    """RFC 5282 §5.1 + RFC 7296 §3.14, built independently with bare AESGCM."""
    key, salt, iv = bytes(range(16)), bytes.fromhex("cafebabe"), bytes.fromhex("0000000000000001")
    sk = SkCipher(EncrId.ENCR_AES_GCM_16, 128, IntegId.NONE, key + salt, b"")
    msg = informational([NotifyPayload(NotifyType.INITIAL_CONTACT)], response=False)
    inner = bytes.fromhex("00000008" "00004000")  # N(INITIAL_CONTACT), last payload
    total = 28 + 4 + 8 + len(inner) + 1 + 16
    header = SPI_I + SPI_R + bytes([46, 0x20, 37, 0x00]) + struct.pack("!II", 7, total)
    sk_header = bytes([41, 0]) + struct.pack("!H", 4 + 8 + len(inner) + 1 + 16)
    aad = header + sk_header
    expected = aad + iv + AESGCM(key).encrypt(salt + iv, inner + b"\x00", aad)
    assert encode_message(msg, sk, iv) == expected
    assert decode_message(expected, sk) == msg


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
def test_every_altered_byte_fails(suite: tuple[EncrId, int, IntegId, int, int]) -> None:
    sk = make_cipher(suite)
    data = encode_message(ike_auth_request(), sk, bytes(sk.iv_size))
    for i in range(len(data)):
        for mask in (0x01, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            expected: tuple[type[Exception], ...] = (IntegrityError, MalformedMessage)
            if i == 17:  # the version octet: minor changes still break the ICV
                expected = (InvalidMajorVersion, IntegrityError)
            elif i >= 28 and i not in (30, 31):  # not the SK payload length
                expected = (IntegrityError,)
            with pytest.raises(expected):
                decode_message(bytes(bad), sk)


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
def test_wrong_key_fails_integrity(suite: tuple[EncrId, int, IntegId, int, int]) -> None:
    sk = make_cipher(suite, 1)
    data = encode_message(ike_auth_request(), sk, bytes(sk.iv_size))
    with pytest.raises(IntegrityError):
        decode_message(data, make_cipher(suite, 2))


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
def test_every_truncation_of_encrypted_fails(suite: tuple[EncrId, int, IntegId, int, int]
                                             ) -> None:
    sk = make_cipher(suite)
    for msg in sample_messages()[1:]:
        for short in truncations(encode_message(msg, sk, bytes(sk.iv_size))):
            with pytest.raises((MalformedMessage, IntegrityError)):
                decode_message(short, sk)


def test_encrypted_without_keys() -> None:
    data = encode_message(ike_auth_request(), make_cipher(SUITES[0]), bytes(8))
    with pytest.raises(EncryptedWithoutKeys):
        decode_message(data)


def test_keys_given_but_message_in_clear_fails_integrity() -> None:
    """An unprotected message is never accepted where keys are in use
    (RFC 7296 §2.21.4: unprotected messages are not acted upon)."""
    data = encode_message(informational([DeletePayload(ProtocolId.IKE)]))
    with pytest.raises(IntegrityError):
        decode_message(data, make_cipher(SUITES[0]))


def build(payload_chain: bytes, first: int, length_extra: int = 0) -> bytes:
    total = 28 + len(payload_chain) + length_extra
    return (SPI_I + SPI_R + bytes([first, 0x20, 37, 0x08]) + struct.pack("!II", 0, total)
            + payload_chain)


def test_skf_is_refused() -> None:
    """RFC 7383 fragments are reassembled by the IKE SA (common/ike/fragments.py):
    an SKF payload that reaches decode_message is malformed."""
    skf = bytes([41, 0]) + struct.pack("!HHH", 8 + 40, 1, 1) + bytes(40)
    with pytest.raises(MalformedMessage, match="SKF payload"):
        decode_message(build(skf, PayloadType.SKF), make_cipher(SUITES[0]))
    with pytest.raises(MalformedMessage, match="SKF payload"):
        decode_message(build(skf, PayloadType.SKF))


def test_sk_must_be_last() -> None:
    sk = make_cipher(SUITES[0])
    data = encode_message(informational(), sk, bytes(8))
    _, vid = encode_payloads([VendorIdPayload(b"after")])
    # Append a payload after SK (SK's Next Payload names the inner chain, so
    # nothing can legally follow it).
    forged = bytearray(data + vid)
    struct.pack_into("!I", forged, 24, len(forged))
    with pytest.raises(MalformedMessage):
        decode_message(bytes(forged), sk)


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
def test_clear_payloads_before_sk_are_authenticated(
        suite: tuple[EncrId, int, IntegId, int, int]) -> None:
    """RFC 7296 §3.14: SK is last; anything before it is covered by the ICV."""
    sk = make_cipher(suite)
    vid = VendorIdPayload(b"in the clear")
    note = NotifyPayload(NotifyType.INITIAL_CONTACT)
    _, clear = encode_payloads([vid], last_next=PayloadType.SK)
    inner_first, inner = encode_payloads([note])
    sk_len = 4 + sk.sealed_size(len(inner))
    header = (SPI_I + SPI_R + bytes([PayloadType.VENDOR_ID, 0x20, 37, 0x08])
              + struct.pack("!II", 0, 28 + len(clear) + sk_len))
    aad = header + clear + bytes([inner_first, 0]) + struct.pack("!H", sk_len)
    data = aad + sk.seal(aad, inner, bytes(sk.iv_size))
    assert decode_message(data, sk).payloads == [vid, note]
    bad = bytearray(data)
    bad[33] ^= 0x01  # inside the clear Vendor ID
    with pytest.raises(IntegrityError):
        decode_message(bytes(bad), sk)


# -- fuzzing -----------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=400), use_keys=st.booleans(), fix_length=st.booleans())
def test_random_bytes(data: bytes, use_keys: bool, fix_length: bool) -> None:
    if fix_length and len(data) >= 28:
        data = data[:17] + b"\x20" + data[18:24] + struct.pack("!I", len(data)) + data[28:]
    try:
        if use_keys:
            decode_message(data, all_ciphers()[2])
        else:
            decode_message(data)
    except FUZZ_ERRORS:
        pass
    except EncryptedWithoutKeys:
        assert not use_keys


def valid_wire_messages() -> list[tuple[bytes, SkCipher | None]]:
    out: list[tuple[bytes, SkCipher | None]] = [(encode_message(m), None)
                                               for m in sample_messages()]
    for sk in all_ciphers():
        out.append((encode_message(ike_auth_request(), sk, bytes(sk.iv_size)), sk))
    return out


VALID = valid_wire_messages()


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_mutated_messages(data: st.DataObject) -> None:
    wire, sk = data.draw(st.sampled_from(VALID))
    buf = bytearray(wire)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(buf) - 1))
        if op == "set":
            buf[pos] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf.insert(pos, data.draw(st.integers(0, 255)))
        elif len(buf) > 1:
            del buf[pos]
    if data.draw(st.booleans()) and len(buf) >= 28:
        struct.pack_into("!I", buf, 24, len(buf))
    try:
        decode_message(bytes(buf), sk)
    except FUZZ_ERRORS:
        pass
    except EncryptedWithoutKeys:
        assert sk is None
