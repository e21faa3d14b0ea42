"""Hostile CERT payloads, AUTH data and DN identities: a peer's bytes make the
certificate checks return a reason (AUTHENTICATION_FAILED), never raise."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from common.ike import certs
from common.ike.certs import TrustAnchors, load_credential, sign_auth
from common.ike.constants import AuthMethod, IdType
from common.ike.policy import IkePolicy, format_identity
from tests.fuzz import fuzz_settings
from tests.pki import NOW, make_ca, make_cert

pytestmark = pytest.mark.fuzz

CA = make_ca()
LEAF = make_cert(CA, "C=CH, O=Test, CN=gw.test", "p256", sans=("@gw.test",))
DER = LEAF.cert.public_bytes(serialization.Encoding.DER)
ANCHORS = TrustAnchors((CA.cert,))
IDENT = (IdType.ID_FQDN, b"gw.test")
METHODS = st.sampled_from([AuthMethod.RSA_SIG, AuthMethod.ECDSA_SHA256_P256,
                           AuthMethod.ECDSA_SHA384_P384, AuthMethod.ECDSA_SHA512_P521,
                           AuthMethod.DIGITAL_SIGNATURE, AuthMethod(200)])


def _check(chain: list[bytes], method: AuthMethod, data: bytes) -> str:
    return certs.check_peer(chain, ANCHORS, NOW, IDENT, "gw.test", method, data, b"octets")


@fuzz_settings(200)
@given(st.lists(st.binary(max_size=300), max_size=3), METHODS, st.binary(max_size=200))
def test_random_certificates_and_auth_data_are_refused(chain: list[bytes], method: AuthMethod,
                                                        data: bytes) -> None:
    assert _check(chain, method, data)


@fuzz_settings(200)
@given(st.lists(st.tuples(st.integers(0, len(DER) - 1), st.integers(0, 255)), min_size=1,
                max_size=4), METHODS, st.binary(max_size=120))
def test_mutated_certificate_never_raises(flips: list[tuple[int, int]], method: AuthMethod,
                                          data: bytes) -> None:
    der = bytearray(DER)
    for pos, value in flips:
        der[pos] = value
    assert isinstance(_check([bytes(der)], method, data), str)


@fuzz_settings(200)
@given(st.binary(max_size=120))
def test_random_rfc7427_auth_data_with_a_good_certificate_is_refused(data: bytes) -> None:
    assert _check([DER], AuthMethod.DIGITAL_SIGNATURE, data)


def test_a_good_signature_holds() -> None:
    method, data = sign_auth(load_credential(LEAF.cert_pem, LEAF.key_pem), b"octets",
                             frozenset({2}))
    assert _check([DER], method, data) == ""


@fuzz_settings(200)
@given(st.binary(max_size=100))
def test_random_dn_identities(data: bytes) -> None:
    """A peer's ID_DER_ASN1_DN: compared, shown and looked up without raising."""
    assert isinstance(format_identity(IdType.ID_DER_ASN1_DN, data), str)
    assert isinstance(certs.dn_equal(data, CA.cert.subject.public_bytes()), bool)
    assert isinstance(certs.identity_in_certificate(LEAF.cert, IdType.ID_DER_ASN1_DN, data),
                      bool)
    pol = IkePolicy("c", IDENT, (IdType.ID_DER_ASN1_DN, certs.parse_dn("CN=x")), b"", [])
    assert isinstance(pol.matches_remote_id(IdType.ID_DER_ASN1_DN, data), bool)


@fuzz_settings(100)
@given(st.binary(max_size=40))
def test_random_signature_hash_algorithms(data: bytes) -> None:
    assert all(0 <= h <= 0xFFFF for h in certs.parse_hash_algorithms(data))


def test_too_many_certificates_are_refused_before_any_work() -> None:
    assert "CERT payloads (at most" in _check([DER] * 50, AuthMethod.DIGITAL_SIGNATURE, b"")
