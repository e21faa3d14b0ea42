"""Proposal strings (strongSwan syntax), negotiation and suites (RFC 7296 §2.7, §3.3)."""

from __future__ import annotations

import copy

import pytest

from common.esp.transforms import TRANSFORMS
from common.ike.constants import (
    DhId,
    EncrId,
    EsnId,
    IntegId,
    PrfId,
    ProtocolId,
    TransformType,
)
from common.ike.proposals import (
    AEAD_ENCR,
    ESP_TRANSFORMS,
    STRONGSWAN_DEFAULT_IKE,
    EspSuite,
    IkeSuite,
    choose_proposal,
    esp_suite,
    format_esp_suite,
    format_ike_suite,
    ike_suite,
    parse_esp_proposal,
    parse_esp_proposals,
    parse_ike_proposal,
    parse_ike_proposals,
    proposal_matches,
)
from common.ike.transforms import Proposal, Transform

T = TransformType


def ids(p: Proposal, ttype: TransformType) -> list[tuple[int, int | None]]:
    return [(t.id, t.key_length) for t in p.of_type(ttype)]


# -- parsing -------------------------------------------------------------------


def test_parse_aead_ike() -> None:
    p = parse_ike_proposal("aes128gcm16-prfsha256-ecp256")
    assert p.protocol == ProtocolId.IKE and p.number == 1 and p.spi == b""
    assert ids(p, T.ENCR) == [(EncrId.ENCR_AES_GCM_16, 128)]
    assert ids(p, T.PRF) == [(PrfId.PRF_HMAC_SHA2_256, None)]
    assert ids(p, T.INTEG) == []
    assert ids(p, T.DH) == [(DhId.ECP_256, None)]


def test_parse_non_aead_sha256_is_integ_and_prf() -> None:
    p = parse_ike_proposal("aes128-sha256-modp2048")
    assert ids(p, T.ENCR) == [(EncrId.ENCR_AES_CBC, 128)]
    assert ids(p, T.INTEG) == [(IntegId.AUTH_HMAC_SHA2_256_128, None)]
    assert ids(p, T.PRF) == [(PrfId.PRF_HMAC_SHA2_256, None)]


def test_parse_explicit_prf_wins() -> None:
    p = parse_ike_proposal("aes256-sha256-prfsha384-ecp384")
    assert ids(p, T.PRF) == [(PrfId.PRF_HMAC_SHA2_384, None)]
    assert ids(p, T.INTEG) == [(IntegId.AUTH_HMAC_SHA2_256_128, None)]


def test_parse_aead_with_integ_token_gives_prf_only() -> None:
    # strongSwan: "aes128gcm16-sha256-ecp256" == "aes128gcm16-prfsha256-ecp256"
    assert parse_ike_proposal("aes128gcm16-sha256-ecp256") == parse_ike_proposal(
        "aes128gcm16-prfsha256-ecp256"
    )


def test_parse_several_of_a_type_in_order() -> None:
    p = parse_ike_proposal("aes128gcm16-aes256gcm16-prfsha256-prfsha384-ecp256-curve25519-modp3072")
    assert ids(p, T.ENCR) == [(EncrId.ENCR_AES_GCM_16, 128), (EncrId.ENCR_AES_GCM_16, 256)]
    assert [t.id for t in p.of_type(T.PRF)] == [PrfId.PRF_HMAC_SHA2_256, PrfId.PRF_HMAC_SHA2_384]
    assert [t.id for t in p.of_type(T.DH)] == [DhId.ECP_256, DhId.CURVE_25519, DhId.MODP_3072]


def test_parse_x25519_alias_and_case() -> None:
    assert parse_ike_proposal(" AES256GCM16-PRFSHA384-X25519 ") == parse_ike_proposal(
        "aes256gcm16-prfsha384-curve25519"
    )


def test_parse_list_numbers_from_one() -> None:
    ps = parse_ike_proposals("aes256gcm16-prfsha384-ecp384, aes128-sha256-modp2048")
    assert [p.number for p in ps] == [1, 2]
    es = parse_esp_proposals("aes256gcm16,aes128ctr-sha256-esn")
    assert [p.number for p in es] == [1, 2]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("aes128gcm16-prfsha256-ecp224", "'ecp224'"),
        ("3des-sha1-modp1024", "'3des'"),
        ("aes128gcm16--ecp256", "empty"),
        ("aes128gcm16-aes128-prfsha256-ecp256", "mixes AEAD"),
        ("aes128-prfsha256-ecp256", "integrity"),
        ("aes128gcm16-ecp256", "PRF"),
        ("aes128gcm16-prfsha256", "key exchange"),
        ("prfsha256-ecp256", "no encryption"),
    ],
)
def test_parse_ike_errors(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_ike_proposal(text)


def test_unknown_token_lists_supported() -> None:
    with pytest.raises(ValueError) as info:
        parse_ike_proposal("aes128gcm16-prfmd5-ecp256")
    message = str(info.value)
    assert "'prfmd5'" in message and "prfsha256" in message and "curve25519" in message


@pytest.mark.parametrize("name", sorted(ESP_TRANSFORMS))
def test_parse_esp_names_of_the_data_plane(name: str) -> None:
    suite = esp_suite(parse_esp_proposal(name))
    assert suite.transform == name
    assert (suite.dh, suite.esn) == (DhId.NONE, False)
    # The KEYMAT IKE derives is the layout common.esp.transforms takes (RFC 7296 §2.17).
    assert suite.keymat_len == TRANSFORMS[name].keymat_size
    assert suite.keymat_len == {
        "aes128gcm16": 20, "aes256gcm16": 36, "chacha20poly1305": 36,
        "aes128ctr-sha256": 52, "aes256ctr-sha256": 68,
        "aes128cbc-sha1": 36, "aes128cbc-sha256": 48, "aes128cbc-sha384": 64,
        "aes128cbc-sha512": 80, "aes256cbc-sha1": 52, "aes256cbc-sha256": 64,
        "aes256cbc-sha384": 80, "aes256cbc-sha512": 96}[name]


def test_parse_esp_pfs_and_esn() -> None:
    p = parse_esp_proposal("aes128gcm16-ecp256")
    assert ids(p, T.DH) == [(DhId.ECP_256, None)]
    assert ids(p, T.ESN) == [(EsnId.NO_ESN, None)]
    p = parse_esp_proposal("aes256ctr-sha256-esn-noesn")
    assert [t.id for t in p.of_type(T.ESN)] == [EsnId.ESN, EsnId.NO_ESN]
    assert p.protocol == ProtocolId.ESP


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("aes192", "'aes192'"),
        ("aes128", "integrity"),
        ("aes128gcm16-sha256", "AEAD with an integrity"),
        ("chacha20poly1305-sha1", "AEAD with an integrity"),
        ("aes128ctr", "integrity"),
        ("aes128ctr-sha384", "AES_CTR_128 with AUTH_HMAC_SHA2_384_192, which is not supported"),
        ("aes256-aes256ctr-sha1", "AES_CTR_256 with AUTH_HMAC_SHA1_96"),
        ("sha1-md5", "'md5'"),
        ("aes128gcm16-prfsha256", "'prfsha256'"),
    ],
)
def test_parse_esp_errors(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_esp_proposal(text)


# -- negotiation ---------------------------------------------------------------


def offered(text: str, number: int = 1, spi: bytes = b"") -> Proposal:
    p = parse_ike_proposal(text, number)
    p.spi = spi
    return p


def test_choose_follows_our_order() -> None:
    ours = parse_ike_proposals("aes256gcm16-prfsha384-ecp384,aes128gcm16-prfsha256-ecp256")
    theirs = [
        offered("aes128gcm16-prfsha256-ecp256", 1),
        offered("aes256gcm16-prfsha384-ecp384", 2),
    ]
    chosen = choose_proposal(ours, theirs)
    assert chosen is not None
    assert chosen.number == 2  # the peer's number
    assert ike_suite(chosen) == IkeSuite(
        EncrId.ENCR_AES_GCM_16, 256, PrfId.PRF_HMAC_SHA2_384, IntegId.NONE, DhId.ECP_384
    )


def test_choose_picks_one_transform_per_type_in_our_order() -> None:
    ours = [parse_ike_proposal("aes256gcm16-aes128gcm16-prfsha512-prfsha256-curve25519-ecp256")]
    theirs = [offered("aes128gcm16-aes256gcm16-prfsha256-prfsha512-ecp256-curve25519", 3, b"S" * 8)]
    chosen = choose_proposal(ours, theirs)
    assert chosen is not None
    assert (chosen.number, chosen.spi) == (3, b"S" * 8)
    assert [t.type for t in chosen.transforms] == [T.ENCR, T.PRF, T.DH]
    assert ike_suite(chosen).encr == EncrId.ENCR_AES_GCM_16
    assert ike_suite(chosen).key_bits == 256
    assert ike_suite(chosen).prf == PrfId.PRF_HMAC_SHA2_512
    assert ike_suite(chosen).dh == DhId.CURVE_25519
    assert proposal_matches(theirs[0], chosen)


def test_choose_key_length_must_match() -> None:
    assert (
        choose_proposal(
            [parse_ike_proposal("aes256-sha256-ecp256")], [offered("aes128-sha256-ecp256")]
        )
        is None
    )


def test_choose_nothing_in_common() -> None:
    ours = parse_ike_proposals("aes256gcm16-prfsha384-ecp384")
    assert choose_proposal(ours, [offered("aes256gcm16-prfsha384-ecp256")]) is None
    assert choose_proposal(ours, []) is None


def test_choose_protocol_must_match() -> None:
    assert (
        choose_proposal(
            [parse_esp_proposal("aes128gcm16")], [offered("aes128gcm16-prfsha256-ecp256")]
        )
        is None
    )


def test_choose_esp_absent_dh_is_none() -> None:
    ours = [parse_esp_proposal("aes128gcm16-esn-noesn")]
    # Peer offers "DH: NONE or ECP_256" explicitly (RFC 7296 §3.3.3).
    theirs = [
        Proposal(
            1,
            ProtocolId.ESP,
            b"\x01\x02\x03\x04",
            [
                Transform(T.ENCR, EncrId.ENCR_AES_GCM_16, 128),
                Transform(T.DH, DhId.ECP_256),
                Transform(T.DH, DhId.NONE),
                Transform(T.ESN, EsnId.NO_ESN),
            ],
        )
    ]
    chosen = choose_proposal(ours, theirs)
    assert chosen is not None
    assert chosen.spi == b"\x01\x02\x03\x04"
    assert chosen.of_type(T.DH) == [Transform(T.DH, DhId.NONE)]
    suite = esp_suite(chosen)
    assert (suite.dh, suite.esn) == (DhId.NONE, False)
    assert proposal_matches(theirs[0], chosen)


def test_choose_esp_pfs_required_by_peer_but_not_by_us() -> None:
    ours = [parse_esp_proposal("aes128gcm16")]
    assert choose_proposal(ours, [parse_esp_proposal("aes128gcm16-ecp256")]) is None


def test_choose_esp_esn_preference_is_ours() -> None:
    ours = [parse_esp_proposal("aes256ctr-sha256-esn-noesn")]
    theirs = [parse_esp_proposal("aes256ctr-sha256-noesn-esn")]
    chosen = choose_proposal(ours, theirs)
    assert chosen is not None and esp_suite(chosen).esn is True


def test_absent_type_in_peer_proposal_stays_absent() -> None:
    ours = [parse_esp_proposal("aes128gcm16")]
    theirs = [
        Proposal(1, ProtocolId.ESP, b"abcd", [Transform(T.ENCR, EncrId.ENCR_AES_GCM_16, 128)])
    ]
    chosen = choose_proposal(ours, theirs)
    assert chosen is not None and chosen.of_type(T.ESN) == []
    assert esp_suite(chosen).esn is False


def test_unknown_transform_type_with_none_is_accepted() -> None:
    # RFC 9370 ADDKE types (6+) offered with NONE: we choose NONE.
    ours = [parse_ike_proposal("aes128gcm16-prfsha256-ecp256")]
    peer = offered("aes128gcm16-prfsha256-ecp256")
    peer.transforms.append(Transform(TransformType(6), 0))
    chosen = choose_proposal(ours, [peer])
    assert chosen is not None and Transform(TransformType(6), 0) in chosen.transforms
    peer.transforms[-1] = Transform(TransformType(6), 35)
    assert choose_proposal(ours, [peer]) is None


# -- initiator checks the answer -------------------------------------------------


def test_proposal_matches() -> None:
    ours = parse_ike_proposals("aes256gcm16-prfsha384-ecp384-ecp256,aes128-sha256-modp2048")
    good = Proposal(
        1,
        ProtocolId.IKE,
        b"",
        [
            Transform(T.ENCR, EncrId.ENCR_AES_GCM_16, 256),
            Transform(T.PRF, PrfId.PRF_HMAC_SHA2_384),
            Transform(T.DH, DhId.ECP_256),
        ],
    )
    assert proposal_matches(ours[0], good)
    assert proposal_matches(ours, good)  # the whole list: number 1 selects
    # Two DH transforms: not a choice
    two = Proposal(1, ProtocolId.IKE, b"", [*good.transforms, Transform(T.DH, DhId.ECP_384)])
    assert not proposal_matches(ours[0], two)
    # A transform we never offered
    other = Proposal(
        1, ProtocolId.IKE, b"", [*good.transforms[:2], Transform(T.DH, DhId.MODP_2048)]
    )
    assert not proposal_matches(ours[0], other)
    # A type left out
    assert not proposal_matches(ours[0], Proposal(1, ProtocolId.IKE, b"", good.transforms[:2]))
    # Wrong number
    renumbered = Proposal(2, ProtocolId.IKE, b"", good.transforms)
    assert not proposal_matches(ours[0], renumbered)
    assert not proposal_matches(ours, renumbered)


def test_chosen_by_responder_matches_initiator_offer_roundtrip() -> None:
    offer = parse_ike_proposals(
        "aes128gcm16-aes256gcm16-prfsha256-prfsha384-ecp256-curve25519-modp3072,"
        "aes256-sha512-modp2048"
    )
    config = parse_ike_proposals("aes256-sha512-modp2048,aes256gcm16-prfsha384-curve25519")
    chosen = choose_proposal(config, offer)
    assert chosen is not None and chosen.number == 2
    assert proposal_matches(offer, chosen)
    assert format_ike_suite(ike_suite(chosen)) == (
        "AES_CBC_256/HMAC_SHA2_512_256/PRF_HMAC_SHA2_512/MODP_2048"
    )


# -- suites ----------------------------------------------------------------------


def test_ike_suite_lengths() -> None:
    gcm = IkeSuite(EncrId.ENCR_AES_GCM_16, 256, PrfId.PRF_HMAC_SHA2_384, IntegId.NONE, DhId.ECP_384)
    assert (gcm.sk_e_len, gcm.sk_a_len, gcm.prf_len, gcm.icv_len) == (36, 0, 48, 16)
    cbc = IkeSuite(
        EncrId.ENCR_AES_CBC,
        128,
        PrfId.PRF_HMAC_SHA2_256,
        IntegId.AUTH_HMAC_SHA2_256_128,
        DhId.MODP_2048,
    )
    assert (cbc.sk_e_len, cbc.sk_a_len, cbc.prf_len, cbc.icv_len) == (16, 32, 32, 16)


def test_ike_suite_errors() -> None:
    base = [
        Transform(T.ENCR, EncrId.ENCR_AES_GCM_16, 128),
        Transform(T.PRF, PrfId.PRF_HMAC_SHA2_256),
    ]
    dh = Transform(T.DH, DhId.ECP_256)
    assert ike_suite(Proposal(1, ProtocolId.IKE, b"", [*base, dh])).dh == DhId.ECP_256
    with pytest.raises(ValueError, match="no DH"):
        ike_suite(Proposal(1, ProtocolId.IKE, b"", base))
    with pytest.raises(ValueError, match="2 DH"):
        ike_suite(Proposal(1, ProtocolId.IKE, b"", [*base, dh, Transform(T.DH, DhId.ECP_384)]))
    with pytest.raises(ValueError, match="group"):
        ike_suite(Proposal(1, ProtocolId.IKE, b"", [*base, Transform(T.DH, DhId(22))]))
    with pytest.raises(ValueError, match="AEAD"):
        ike_suite(
            Proposal(
                1,
                ProtocolId.IKE,
                b"",
                [*base, dh, Transform(T.INTEG, IntegId.AUTH_HMAC_SHA2_256_128)],
            )
        )
    with pytest.raises(ValueError, match="PRF"):
        ike_suite(
            Proposal(1, ProtocolId.IKE, b"", [base[0], Transform(T.PRF, PrfId(1)), dh])  # MD5
        )
    with pytest.raises(ValueError, match="not an IKE"):
        ike_suite(parse_esp_proposal("aes128gcm16"))


def test_esp_suite_errors() -> None:
    with pytest.raises(ValueError, match="unsupported ESP"):
        esp_suite(Proposal(1, ProtocolId.ESP, b"", [Transform(T.ENCR, EncrId.ENCR_AES_CBC, 192),
                                                    Transform(T.INTEG, IntegId.AUTH_HMAC_SHA1_96)]))
    with pytest.raises(ValueError, match="not an ESP"):
        esp_suite(parse_ike_proposal("aes128gcm16-prfsha256-ecp256"))


def test_esp_suite_pfs() -> None:
    suite = esp_suite(
        Proposal(
            1,
            ProtocolId.ESP,
            b"abcd",
            [
                Transform(T.ENCR, EncrId.ENCR_AES_CTR, 128),
                Transform(T.INTEG, IntegId.AUTH_HMAC_SHA2_256_128),
                Transform(T.DH, DhId.CURVE_25519),
                Transform(T.ESN, EsnId.ESN),
            ],
        )
    )
    assert suite == EspSuite(
        "aes128ctr-sha256",
        EncrId.ENCR_AES_CTR,
        128,
        IntegId.AUTH_HMAC_SHA2_256_128,
        DhId.CURVE_25519,
        True,
    )
    assert format_esp_suite(suite) == "AES_CTR_128/HMAC_SHA2_256_128/CURVE_25519/ESN"


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("aes128gcm16-prfsha256-ecp256", "AES_GCM_16_128/PRF_HMAC_SHA2_256/ECP_256"),
        ("aes256gcm16-prfsha384-curve25519", "AES_GCM_16_256/PRF_HMAC_SHA2_384/CURVE_25519"),
        ("aes128-sha256-modp2048", "AES_CBC_128/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/MODP_2048"),
    ],
)
def test_format_ike_suite(text: str, name: str) -> None:
    assert format_ike_suite(ike_suite(parse_ike_proposal(text))) == name


def test_format_esp_suite() -> None:
    assert format_esp_suite(esp_suite(parse_esp_proposal("aes256gcm16"))) == "AES_GCM_16_256"
    assert format_esp_suite(esp_suite(parse_esp_proposal("aes128gcm16-ecp384"))) == (
        "AES_GCM_16_128/ECP_384"
    )


# -- the algorithms strongSwan peers offer ---------------------------------------


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("aes128-sha1-modp2048", "AES_CBC_128/HMAC_SHA1_96/PRF_HMAC_SHA1/MODP_2048"),
        ("aes256-sha512-ecp521", "AES_CBC_256/HMAC_SHA2_512_256/PRF_HMAC_SHA2_512/ECP_521"),
        ("aes256-sha384-prfsha1-modp4096",
         "AES_CBC_256/HMAC_SHA2_384_192/PRF_HMAC_SHA1/MODP_4096"),
        ("chacha20poly1305-prfsha256-curve25519",
         "CHACHA20_POLY1305/PRF_HMAC_SHA2_256/CURVE_25519"),
        ("chacha20poly1305-sha512-ecp384", "CHACHA20_POLY1305/PRF_HMAC_SHA2_512/ECP_384"),
        ("aes128gcm16-prfsha1-modp3072", "AES_GCM_16_128/PRF_HMAC_SHA1/MODP_3072"),
    ],
)
def test_new_ike_proposals_negotiate_to_suites(text: str, status: str) -> None:
    ours = parse_ike_proposals(text)
    chosen = choose_proposal(ours, [parse_ike_proposal(text)])
    assert chosen is not None and proposal_matches(ours, chosen)
    assert format_ike_suite(ike_suite(chosen)) == status


def test_chacha20poly1305_has_no_key_length_attribute() -> None:
    # RFC 7634 §3 (IKE) / §2 (ESP): the transform carries no Key Length.
    for p in (parse_ike_proposal("chacha20poly1305-prfsha256-ecp256"),
              parse_esp_proposal("chacha20poly1305")):
        assert ids(p, T.ENCR) == [(EncrId.ENCR_CHACHA20_POLY1305, None)]
    suite = ike_suite(choose_proposal(parse_ike_proposals("chacha20poly1305-prfsha256-ecp256"),
                                      parse_ike_proposals("chacha20poly1305-prfsha256-ecp256"))
                      or Proposal(0, ProtocolId.IKE))
    # RFC 7634 §3: SK_ei/SK_er are 36 octets, 32 key + 4 salt; 16-octet ICV.
    assert (suite.key_bits, suite.sk_e_len, suite.sk_a_len, suite.icv_len) == (256, 36, 0, 16)
    # A peer that sends a Key Length attribute anyway does not match.
    keyed = Proposal(1, ProtocolId.IKE, b"", [
        Transform(T.ENCR, EncrId.ENCR_CHACHA20_POLY1305, 256),
        Transform(T.PRF, PrfId.PRF_HMAC_SHA2_256), Transform(T.DH, DhId.ECP_256)])
    assert choose_proposal(parse_ike_proposals("chacha20poly1305-prfsha256-ecp256"),
                           [keyed]) is None


@pytest.mark.parametrize(
    ("text", "transform", "status"),
    [
        ("aes128-sha1", "aes128cbc-sha1", "AES_CBC_128/HMAC_SHA1_96"),
        ("aes128-sha256", "aes128cbc-sha256", "AES_CBC_128/HMAC_SHA2_256_128"),
        ("aes256-sha384-ecp521", "aes256cbc-sha384", "AES_CBC_256/HMAC_SHA2_384_192/ECP_521"),
        ("aes256-sha512-modp4096-esn", "aes256cbc-sha512",
         "AES_CBC_256/HMAC_SHA2_512_256/MODP_4096/ESN"),
        ("chacha20poly1305", "chacha20poly1305", "CHACHA20_POLY1305"),
        ("chacha20poly1305-ecp384", "chacha20poly1305", "CHACHA20_POLY1305/ECP_384"),
    ],
)
def test_new_esp_proposals_negotiate_to_data_plane_transforms(text: str, transform: str,
                                                              status: str) -> None:
    ours = parse_esp_proposals(text)
    chosen = choose_proposal(ours, [parse_esp_proposal(text)])
    assert chosen is not None and proposal_matches(ours, chosen)
    suite = esp_suite(chosen)
    assert suite.transform == transform
    assert format_esp_suite(suite) == status


def test_default_keyword_expands_to_strongswan_defaults() -> None:
    ike = parse_ike_proposals("default")
    assert [p.number for p in ike] == [1, 2]
    assert [p.transforms for p in ike] == [
        parse_ike_proposal(text).transforms for text in STRONGSWAN_DEFAULT_IKE]
    assert not any(t.id in AEAD_ENCR for t in ike[0].of_type(T.ENCR))
    assert all(t.id in AEAD_ENCR for t in ike[1].of_type(T.ENCR))
    # KE payload of an initiator: the first group of the first proposal.
    assert ike[0].of_type(T.DH)[0].id == DhId.CURVE_25519
    both = parse_ike_proposals("aes256gcm16-prfsha384-ecp384, DEFAULT")
    assert [p.number for p in both] == [1, 2, 3]
    esp = parse_esp_proposals("default,chacha20poly1305")
    assert [p.number for p in esp] == [1, 2, 3]
    assert [t.id for t in esp[1].of_type(T.ENCR)] == [EncrId.ENCR_AES_GCM_16] * 2
    assert {esp_suite(choose_proposal([esp[0]], [parse_esp_proposal(t)])  # type: ignore[arg-type]
                      ).transform for t in ("aes128-sha256", "aes256-sha1", "aes128-sha512")} \
        == {"aes128cbc-sha256", "aes256cbc-sha1", "aes128cbc-sha512"}
    with pytest.raises(ValueError, match="'default'"):
        parse_ike_proposal("aes128-default")


def test_default_keyword_meets_strongswan_default_offers() -> None:
    # What charon 5.9.8 with "default" offers (its first proposal, as it logs
    # it, restricted to our tokens) is what our "default" accepts: we pick
    # its first choices, so its KE guess (curve25519) is right.
    ours = parse_ike_proposals("default")
    theirs = parse_ike_proposals(
        "aes128-aes256-sha256-sha384-sha512-sha1-prfsha256-prfsha384-prfsha512-prfsha1"
        "-curve25519-ecp256-ecp384-ecp521-modp3072-modp4096-modp2048")
    chosen = choose_proposal(ours, theirs)
    assert chosen is not None
    assert format_ike_suite(ike_suite(chosen)) == \
        "AES_CBC_128/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/CURVE_25519"


def test_config_accepts_the_new_names() -> None:
    from bench.harness.configs import dumps
    from common.config import load_config
    from tests.test_config import BASE
    data = copy.deepcopy(BASE)
    conn = data["connections"]["branch"]
    conn["proposals"] = ["aes256-sha512-ecp521", "aes128-sha1-modp4096",
                         "chacha20poly1305-prfsha256-ecp384", "default"]
    conn["children"]["net"]["esp_proposals"] = [
        "aes128-sha1", "aes256-sha512", "aes128-sha256-modp4096", "chacha20poly1305-ecp521",
        "default"]
    cfg = load_config(dumps(data), "gw.toml").connections["branch"]
    assert [p.proposal.number for p in cfg.proposals] == [1, 2, 3, 4, 5]
    assert [p.text for p in cfg.proposals][-2:] == ["default", "default"]
    esp = cfg.children["net"].esp_proposals
    assert [p.proposal.number for p in esp] == [1, 2, 3, 4, 5, 6]
