"""Certificate authentication in IKE_AUTH (RFC 7296 §2.15, §3.6-§3.8; RFC 7427),
with two in-memory engines and certificates made here."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from common.cluster.snapshot import restore, snapshot
from common.cluster.sync import decode_sync, encode_sync
from common.config import ConfigError, load_config
from common.ike import certs
from common.ike.certs import LocalCredential, TrustAnchors, load_credential, parse_dn
from common.ike.constants import AuthMethod, HashAlgorithm, IdType, NotifyType
from common.ike.events import ChildSaInstalled, IkeSaFailed
from common.ike.exchanges import ike_auth
from common.ike.message import IkeMessage
from common.ike.payloads import AuthPayload, CertReqPayload
from common.ike.policy import policies_from_config
from tests.ike_pair import Pair, engine, make_pair, other
from tests.pki import KINDS, NOW, Issued, make_ca, make_cert

ROLES = ["a", "b"]
CA = make_ca()


def cred(issued: Issued, pss: bool = False) -> LocalCredential:
    return load_credential(issued.cert_pem, issued.key_pem, pss)


def leaf(side: str, kind: str = "p256", ca: Issued = CA, **kw: Any) -> Issued:
    return make_cert(ca, f"C=CH, O=Test, CN=gw-{side}.test", kind,
                     sans=(f"@gw-{side}.test",), **kw)


def cert_pair(kind_a: str = "p256", kind_b: str = "p256", *, leaf_a: Issued | None = None,
              leaf_b: Issued | None = None, pss: bool = False,
              auth: dict[str, tuple[str, str]] | None = None,
              anchors: Issued = CA, **kw: Any) -> Pair:
    """Both sides authenticate with certificates of CA (or as ``auth`` says:
    side -> (local_auth, remote_auth))."""
    p = make_pair(**kw)
    leaves = {"a": leaf_a or leaf("a", kind_a), "b": leaf_b or leaf("b", kind_b)}
    for side in ROLES:
        pol = p.engine(side).policies["conn"]
        pol.local_auth, pol.remote_auth = (auth or {}).get(side, ("pubkey", "pubkey"))
        pol.credential = cred(leaves[side], pss)
        pol.anchors = TrustAnchors((anchors.cert,))
        p.engine(side).ctx.options.utc_now = lambda: NOW
    return p


def auth_failed(p: Pair, ini: str) -> str:
    """The responder refused: AUTHENTICATION_FAILED; returns its one log reason."""
    p.initiate(ini)
    p.flush()
    assert not p.a.established() and not p.b.established()
    assert not p.of("a", ChildSaInstalled) and not p.of("b", ChildSaInstalled)
    [fi] = p.of(ini, IkeSaFailed)
    [fr] = p.of(other(ini), IkeSaFailed)
    assert "AUTHENTICATION_FAILED" in fi.reason
    return fr.reason


@pytest.fixture
def methods(monkeypatch: pytest.MonkeyPatch) -> list[tuple[AuthMethod, bytes]]:
    """Every (AUTH method, data) our engines sign."""
    seen: list[tuple[AuthMethod, bytes]] = []
    real = certs.sign_auth

    def spy(*args: Any) -> tuple[AuthMethod, bytes]:
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(ike_auth, "sign_auth", spy)
    return seen


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ini", ROLES)
def test_certificates_of_each_key_type_both_roles(
        kind: str, ini: str, methods: list[tuple[AuthMethod, bytes]]) -> None:
    p = cert_pair(kind, kind)
    p.establish(ini)
    assert p.sa(ini).peer_id == (IdType.ID_FQDN, f"gw-{other(ini)}.test".encode())
    # RFC 7427: both sent N(SIGNATURE_HASH_ALGORITHMS), so both sign with method 14
    assert [m for m, _ in methods] == [AuthMethod.DIGITAL_SIGNATURE] * 2
    assert len(p.of("a", ChildSaInstalled)) == 2


@pytest.mark.parametrize(("kind", "method"), [
    ("rsa2048", AuthMethod.RSA_SIG), ("p256", AuthMethod.ECDSA_SHA256_P256),
    ("p384", AuthMethod.ECDSA_SHA384_P384), ("p521", AuthMethod.ECDSA_SHA512_P521)])
@pytest.mark.parametrize("ini", ROLES)
def test_classic_methods_without_signature_hash_algorithms(
        kind: str, method: AuthMethod, ini: str, methods: list[tuple[AuthMethod, bytes]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that sent no N(SIGNATURE_HASH_ALGORITHMS) gets RFC 7296 / RFC
    4754 signatures (methods 1, 9, 10, 11), and we verify them."""
    from common.ike.exchanges import ike_init

    monkeypatch.setattr(ike_init, "peer_hash_algorithms", lambda msg: None)
    p = cert_pair(kind, kind)
    p.establish(ini)
    assert [m for m, _ in methods] == [method, method]


def test_rsa_pss(methods: list[tuple[AuthMethod, bytes]]) -> None:
    p = cert_pair("rsa2048", "rsa2048", pss=True)
    p.establish("a")
    for _, data in methods:
        assert bytes.fromhex("2a864886f70d01010a") in data[1:1 + data[0]]  # id-RSASSA-PSS


def test_init_carries_hash_algorithms_and_certreq() -> None:
    p = cert_pair()
    p.initiate("a")
    [request] = p.step("a")
    [response] = p.step("b")
    from common.ike.message import decode_message

    def plain(raw: bytes) -> IkeMessage:
        return decode_message(raw, None)

    for msg in (plain(request), plain(response)):
        n = msg.notify(NotifyType.SIGNATURE_HASH_ALGORITHMS)
        assert n is not None and certs.parse_hash_algorithms(n.data) >= {
            HashAlgorithm.SHA2_256, HashAlgorithm.IDENTITY}
    [req] = plain(response).get_all(CertReqPayload)
    assert req.data == certs.spki_sha1(CA.cert)


@pytest.mark.parametrize("ini", ROLES)
def test_psk_one_way_certificate_the_other(ini: str) -> None:
    p = cert_pair(auth={"a": ("psk", "pubkey"), "b": ("pubkey", "psk")})
    p.establish(ini)
    assert len(p.of("b", ChildSaInstalled)) == 2


def test_psk_connections_send_no_certificate_payloads() -> None:
    p = make_pair()
    p.initiate("a")
    [request] = p.step("a")
    from common.ike.message import decode_message

    assert decode_message(request, None).notify(NotifyType.SIGNATURE_HASH_ALGORITHMS) is None


# -- failures: AUTHENTICATION_FAILED and one line naming the check ----------------------


@pytest.mark.parametrize("ini", ROLES)
def test_untrusted_ca(ini: str) -> None:
    rogue = make_ca("C=CH, O=Rogue, CN=Rogue CA")
    p = cert_pair(**{f"leaf_{ini}": leaf(ini, ca=rogue)})  # type: ignore[arg-type]
    assert "is not issued by a trusted CA" in auth_failed(p, ini)


@pytest.mark.parametrize("ini", ROLES)
def test_expired_certificate(ini: str) -> None:
    old = leaf(ini, not_before=NOW - timedelta(days=400), not_after=NOW - timedelta(days=30))
    p = cert_pair(**{f"leaf_{ini}": old})  # type: ignore[arg-type]
    assert "expired on" in auth_failed(p, ini)


def test_not_yet_valid_certificate() -> None:
    p = cert_pair(leaf_a=leaf("a", not_before=NOW + timedelta(days=3)))
    assert "is not valid before" in auth_failed(p, "a")


@pytest.mark.parametrize("ini", ROLES)
def test_identity_not_in_certificate(ini: str) -> None:
    wrong = make_cert(CA, "C=CH, O=Test, CN=other.test", "p256", sans=("@other.test",))
    p = cert_pair(**{f"leaf_{ini}": wrong})  # type: ignore[arg-type]
    reason = auth_failed(p, ini)
    assert f"identity gw-{ini}.test is not in its certificate" in reason


@pytest.mark.parametrize("ini", ROLES)
def test_key_usage_without_digital_signature(ini: str) -> None:
    p = cert_pair(**{f"leaf_{ini}": leaf(ini, digital_signature=False)})  # type: ignore[arg-type]
    assert "key usage lacks digitalSignature" in auth_failed(p, ini)


@pytest.mark.parametrize("ini", ROLES)
def test_bad_signature(ini: str) -> None:
    p = cert_pair()
    pol = p.engine(ini).policies["conn"]
    assert pol.credential is not None
    # the right certificate, signed with another key of the same type
    impostor = leaf(ini, slot="impostor")
    pol.credential = LocalCredential(pol.credential.chain, impostor.key, pol.credential.cert)
    assert "bad signature" in auth_failed(p, ini)


def test_expected_certificate_but_got_psk() -> None:
    p = cert_pair(auth={"a": ("psk", "psk"), "b": ("pubkey", "pubkey")})
    assert "expects a certificate" in auth_failed(p, "a")


def test_eap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = ike_auth.IkeAuthTask.build

    def without_auth(self: ike_auth.IkeAuthTask, sa: Any, now: float) -> Any:
        payloads = real(self, sa, now)
        return [x for x in payloads or [] if not isinstance(x, AuthPayload)]

    monkeypatch.setattr(ike_auth.IkeAuthTask, "build", without_auth)
    p = cert_pair()
    assert "EAP is not supported" in auth_failed(p, "a")


def test_no_wall_clock_refuses_certificates() -> None:
    p = cert_pair()
    p.b.ctx.options.utc_now = None
    assert "no wall clock" in auth_failed(p, "a")


# -- identities, DNs, replication ---------------------------------------------------------


def test_dn_identities_compare_like_strongswan() -> None:
    subject = CA.cert.subject.public_bytes()
    assert certs.dn_equal(parse_dn("C=CH,O=Test,  CN=test ca"), subject)
    assert certs.dn_equal(parse_dn("CN=Test CA, O=Test, C=CH"), subject)  # RFC 4514 order
    assert not certs.dn_equal(parse_dn("C=CH, O=Test, CN=Other CA"), subject)
    assert certs.format_dn(subject) == "C=CH, O=Test, CN=Test CA"


@pytest.mark.parametrize("ini", ROLES)
def test_dn_identity_and_ip_identity(ini: str) -> None:
    """IDs may be the subject DN or an IP subjectAltName."""
    a = make_cert(CA, "C=CH, O=Test, CN=dn-a", "p256")
    b = make_cert(CA, "C=CH, O=Test, CN=gw-b", "p256", sans=("198.18.0.2",))
    id_a = (IdType.ID_DER_ASN1_DN, parse_dn("C=CH, O=Test, CN=dn-a"))
    id_b = (IdType.ID_IPV4_ADDR, bytes([198, 18, 0, 2]))
    p = cert_pair(leaf_a=a, leaf_b=b, id_a=id_a, id_b=id_b)
    p.establish(ini)
    assert p.sa("b").peer_id == id_a


def test_intermediate_ca_chain() -> None:
    inter = make_ca("C=CH, O=Test, CN=Intermediate", issuer=CA)
    a = make_cert(inter, "C=CH, O=Test, CN=gw-a.test", "p256", sans=("@gw-a.test",))
    p = cert_pair(leaf_a=a)
    pol = p.a.policies["conn"]
    pem = a.cert_pem + inter.cert_pem
    pol.credential = load_credential(pem, a.key_pem)
    p.establish("a")


def test_certificate_sa_replicates(methods: list[tuple[AuthMethod, bytes]]) -> None:
    """A member that takes over a certificate-authenticated IKE SA needs only
    the same config: the replica carries the peer identity."""
    p = cert_pair()
    p.establish("a")
    (sa,) = p.a.established()
    state = decode_sync(encode_sync(snapshot(sa, p.now)))
    new = engine(list(p.a.policies.values()), 99, 1)
    new.adopt(restore(new, state, p.now), p.now,  # type: ignore[arg-type]
              mid_sync=False, margin=5)
    (restored,) = new.established()
    assert restored.peer_id == sa.peer_id and restored.policy is p.a.policies["conn"]
    q = Pair(new, p.b, now=p.now)
    (b_sa,) = p.b.established()
    assert q.dpd_ok("b", b_sa.ike_id)


# -- configuration --------------------------------------------------------------------------

CONFIG = """
[cluster]
address = "198.18.0.2"
[connections.gw]
remote_addrs = ["198.18.0.1"]
local_auth = "pubkey"
local_cert = "gw.crt"
local_key = "gw.key"
remote_auth = "pubkey"
remote_cacerts = ["ca.crt"]
remote_id = "CN=peer, O=Test, C=CH"
[connections.gw.children.net]
local_ts = ["10.0.2.0/24"]
remote_ts = ["10.0.1.0/24"]
"""


def _files(tmp_path: Path) -> Path:
    gw = make_cert(CA, "C=CH, O=Test, CN=gw", "p256", sans=("@gw.test",))
    gw.write(tmp_path, "gw")
    (tmp_path / "ca.crt").write_bytes(CA.cert_pem)
    return tmp_path / "gw.toml"


def _load(path: Path, text: str = CONFIG) -> Any:
    return load_config(text, str(path), lambda n: Path(n).read_bytes())


def test_config_loads_certificates(tmp_path: Path) -> None:
    cfg = _load(_files(tmp_path))
    conn = cfg.connections["gw"]
    # without local_id, the certificate's subject DN (as strongSwan)
    assert conn.local_id.id_type == IdType.ID_DER_ASN1_DN
    assert conn.local_id.text == "C=CH, O=Test, CN=gw"
    [pol] = policies_from_config(cfg.connections)
    assert pol.credential is not None and pol.anchors is not None and pol.psk == b""
    assert pol.matches_remote_id(IdType.ID_DER_ASN1_DN, parse_dn("C=CH, O=Test, CN=peer"))


@pytest.mark.parametrize(("change", "key", "words"), [
    (("gw.key", "missing.key"), "local_key", "missing.key\" (No such file"),
    (("gw.crt", "gw.key"), "local_cert", "a PEM certificate file"),
    (('["ca.crt"]', '["nope.crt"]'), "remote_cacerts[0]", "nope.crt"),
    (('local_key = "gw.key"', 'local_key = "other.key"'), "local_key",
     "does not match the certificate"),
    (('remote_cacerts = ["ca.crt"]', ""), "remote_cacerts", "at least one CA"),
    (('local_cert = "gw.crt"', ""), "local_cert", "a PEM file"),
    (('local_auth = "pubkey"', 'local_auth = "rsa/pss"'), "local_key",
     "rsa/pss needs an RSA key"),
])
def test_config_errors_name_key_and_file(tmp_path: Path, change: tuple[str, str], key: str,
                                         words: str) -> None:
    path = _files(tmp_path)
    make_cert(CA, "C=CH, CN=other", "p256").write(tmp_path, "other")
    with pytest.raises(ConfigError) as err:
        _load(path, CONFIG.replace(*change))
    text = str(err.value)
    assert f"connections.gw.{key}" in text and words in text and "\n" not in text


def test_config_rsa_pss(tmp_path: Path) -> None:
    path = _files(tmp_path)
    make_cert(CA, "C=CH, O=Test, CN=gw", "rsa2048", sans=("@gw.test",)).write(tmp_path, "gw")
    cfg = _load(path, CONFIG.replace('local_auth = "pubkey"', 'local_auth = "rsa/pss"'))
    [pol] = policies_from_config(cfg.connections)
    assert pol.local_auth == "pubkey" and pol.credential is not None and pol.credential.rsa_pss
