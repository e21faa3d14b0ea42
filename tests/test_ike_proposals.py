"""Proposal strings (strongSwan syntax), negotiation and suites (RFC 7296 §2.7, §3.3)."""

from __future__ import annotations

import pytest

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
    ESP_TRANSFORMS,
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
        ("aes128gcm16-prfsha256-ecp521", "'ecp521'"),
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
    assert (
        suite.keymat_len
        == {"aes128gcm16": 20, "aes256gcm16": 36, "aes128ctr-sha256": 52, "aes256ctr-sha256": 68}[
            name
        ]
    )


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
        ("aes128", "'aes128'"),  # CBC is not a data-plane transform
        ("aes128gcm16-sha256", "AEAD with an integrity"),
        ("aes128ctr", "integrity"),
        ("aes128ctr-sha384", "'sha384'"),
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
        ike_suite(Proposal(1, ProtocolId.IKE, b"", [*base, Transform(T.DH, DhId(21))]))
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
            Proposal(1, ProtocolId.IKE, b"", [base[0], Transform(T.PRF, PrfId.PRF_HMAC_SHA1), dh])
        )
    with pytest.raises(ValueError, match="not an IKE"):
        ike_suite(parse_esp_proposal("aes128gcm16"))


def test_esp_suite_errors() -> None:
    with pytest.raises(ValueError, match="unsupported ESP"):
        esp_suite(Proposal(1, ProtocolId.ESP, b"", [Transform(T.ENCR, EncrId.ENCR_AES_CBC, 128)]))
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
