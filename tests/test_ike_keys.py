"""IKEv2 key derivation: known answers and independent recomputations.

Vectors:
- RFC 4231 §4.2-§4.4, §4.7 (HMAC-SHA-256/384/512) for ``prf``.
- NIST CAVS SP 800-135 IKEv2 KDF, SHA-1 case (ikev2.zip, the case also quoted
  by OpenSSL's IKEV2KDF negative tests): 8-octet nonces, 1024-bit g^ir.
- OpenSSL ``test/recipes/30-test_evp_data/evpkdf_ikev2.txt``, "self_test_data.c"
  SHA-256 cases (GEN, DKM, DKM(Child_SA), DKM(Child_DH), rekey), same inputs.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest

from common.errors import LocalProtocolError
from common.ike.constants import DhId, EncrId, IntegId, PrfId
from common.ike.keys import (
    IkeKeys,
    derive_child_keymat,
    derive_ike_keys,
    derive_rekeyed_ike_keys,
    nat_detection_hash,
    prf,
    prf_plus,
    psk_auth,
)
from common.ike.proposals import EspSuite, IkeSuite, prf_length


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


SHA256 = PrfId.PRF_HMAC_SHA2_256
SHA384 = PrfId.PRF_HMAC_SHA2_384
SHA512 = PrfId.PRF_HMAC_SHA2_512
SHA1 = PrfId.PRF_HMAC_SHA1

# -- RFC 4231 ------------------------------------------------------------------

RFC4231 = [
    # §4.2 Test Case 1
    (
        b"\x0b" * 20,
        b"Hi There",
        {
            SHA256: "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            SHA384: "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59c"
            "faea9ea9076ede7f4af152e8b2fa9cb6",
            SHA512: "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
            "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
        },
    ),
    # §4.3 Test Case 2
    (
        b"Jefe",
        b"what do ya want for nothing?",
        {
            SHA256: "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            SHA384: "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
            "8e2240ca5e69e2c78b3239ecfab21649",
            SHA512: "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
            "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
        },
    ),
    # §4.4 Test Case 3
    (
        b"\xaa" * 20,
        b"\xdd" * 50,
        {
            SHA256: "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
            SHA384: "88062608d3e6ad8a0aa2ace014c8a86f0aa635d947ac9febe83ef4e55966144b"
            "2a5ab39dc13814b94e3ab6e101a34f27",
            SHA512: "fa73b0089d56a284efb0f0756c890be9b1b5dbdd8ee81a3655f83e33b2279d39"
            "bf3e848279a722c806b485a47e67c807b946a337bee8942674278859e13292fb",
        },
    ),
    # §4.7 Test Case 6: key longer than the block size
    (
        b"\xaa" * 131,
        b"Test Using Larger Than Block-Size Key - Hash Key First",
        {SHA256: "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"},
    ),
]


@pytest.mark.parametrize(
    ("key", "data", "prf_id", "expected"),
    [(k, d, p, e) for k, d, answers in RFC4231 for p, e in answers.items()],
)
def test_prf_rfc4231(key: bytes, data: bytes, prf_id: PrfId, expected: str) -> None:
    assert prf(prf_id, key, data) == h(expected)


def test_prf_lengths() -> None:
    assert [prf_length(p) for p in (SHA1, SHA256, SHA384, SHA512)] == [20, 32, 48, 64]


def test_unknown_prf_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError):
        prf(PrfId(99), b"k", b"d")


# -- prf+ (RFC 7296 §2.13) -----------------------------------------------------


def independent_prf_plus(digest: str, key: bytes, seed: bytes, length: int) -> bytes:
    """T1 = prf(K, S | 0x01); Tn = prf(K, Tn-1 | S | n), written out again."""
    out = b""
    previous = b""
    n = 1
    while len(out) < length:
        previous = hmac.new(key, previous + seed + bytes([n]), digest).digest()
        out += previous
        n += 1
    return out[:length]


@pytest.mark.parametrize(
    ("prf_id", "digest"), [(SHA1, "sha1"), (SHA256, "sha256"), (SHA512, "sha512")]
)
@pytest.mark.parametrize("length", [0, 1, 20, 32, 33, 200, 1000])
def test_prf_plus_matches_independent_loop(prf_id: PrfId, digest: str, length: int) -> None:
    key, seed = b"K" * 17, b"seed" * 9
    assert prf_plus(prf_id, key, seed, length) == independent_prf_plus(digest, key, seed, length)


def test_prf_plus_refuses_more_than_255_blocks() -> None:
    assert len(prf_plus(SHA256, b"k", b"s", 255 * 32)) == 255 * 32
    with pytest.raises(LocalProtocolError):
        prf_plus(SHA256, b"k", b"s", 255 * 32 + 1)


# -- NIST CAVS / OpenSSL IKEv2 KDF vectors --------------------------------------

NI = h("3651fef5c9c35e93")
NR = h("c09a8b90a3f04d59")
SPI_I = h("8e5c3ae507221684")
SPI_R = h("b1f201bb155c3acd")
GIR = h(
    "d084a30166a50fb7325c3960874a839449ef9741c2f4f947d0201dd8c1269273d79509f37e3ca3eb4fa2fe2a"
    "28254e289cd3f34dad4eb4df1a07685a4b8a94fa61e2491f7598b3ce65547ff133b3f63d1ac4175eaa695033"
    "f3cedb026a6873a36455172a8540b8a5d23a0143bed0390ee49b168269d75fffee9fb62be965993c"
)
GIR_NEW = h(
    "52f00ab174c25d5b7139ae5ff4e8e9eddee5992d2e36adf8a559ffd90dab1442e4fbe429d320c0f33552a17d"
    "1557fa41ea70e8fb916c4fa27ed52b5f8ebd8461afa78f1159159a64055ac5f6319e29c28eae58cbc6847770"
    "f32c3fed1d04750484f854790f95e9ec01bc5bc461f24966462e359511329305038e94deb6dd42c2"
)

# NIST CAVS SP 800-135 ikev2, SHA-1.
SHA1_SKEYSEED = h("cd2e8050137832245f1dbacc6e4f0a92f94d45d6")
SHA1_DKM = h(
    "6f1b12cad3cbe097b35430356d869d54cddb0198ec859174d53ceb92dddedbe2436db69f60977c58fa63bbb6"
    "67f8d36920b109baae8f6c61a9ac49feda01843225d080ec5539d5881a25521ffb2a0a91874a9c0a27fcc2d7"
    "17eb8963a9e3a89c7ab264757284c28cf8c3ca40576f4220b052b1fb8e9ad60ba3c80557323331a8cbb89f20"
)
SHA1_DKM_CHILD = h(
    "4727dc0ef94eb326ce131cf282fb652faa638ad0ddae3786a11bcc0309876009f8c485de011ad962c5b1ca8a"
    "41ff8145445749079c5686e26ffebbc342f06981f3da745e11ca0976424d1f8caec623d59dc7186deb20a27b"
    "411d1dcb70a365440bf7de905088b0692e8addc094e18d1939bdb67e89798ca6b239e2ccb81c2409dac0106c"
)
SHA1_DKM_CHILD_DH = h(
    "b109c21ad4c0797768c1cec9e63554681e48f224bca7f23c20c4ea7041983451e9aa1d5408656c8a975ff1b9"
    "d9a12c75ffeb64bdecb30174664cccb4e14f1c377b7f6d1525af77c7092aac3e47f917ebae8297fb5539d200"
    "8ce830823a09cc197361d4a289c72745f6ce9fefe812be5bf55b3200fbb82e41a4a40877d3fe106db909707b"
)
SHA1_SKEYSEED_REKEY = h("3b03bce748c96d5e8306918d2ff89b68f0648da3")

# OpenSSL evpkdf_ikev2.txt, self_test_data.c SHA-256 cases.
SHA256_SKEYSEED = h("efaa7ab0eaa85a3d0be2100cd4b6fe00ff5025a9eafddb3ef518e9f0d3fe60e6")
SHA256_DKM = h(
    "462B9DD525D4FD71169174272779E704BAF62C6231779AE9EFE8C58B21916B42010164AF2111EBD762F6916C"
    "A9A6F0EE05C8B320E4EE27705521DE2589ADEA1878F1A551738AF7C88DC4F0BB0C096A3F7D1F1A670FC79F49"
    "F678D60D665BB3710C8657F03BA9F62B9A818D7A228968C506E237AE9502AA6DB395C61EA6A3E79504F86B73"
    "68BFB5423DF79E48809BBCCD49FD826D024F63D7C2A5566400A12E736AA034510428F5EA008FE2FC16886FA3"
    "88274EA6C2B4FCFC6141BF04F8207EF8AFC224EA1059CB220DC0B23AC0E4CCDA495A4E131B1D56E223ABA5A4"
    "8E8ED1F5"
)
SHA256_DKM_CHILD = h(
    "23647677E7D403FA1E3006F19840AEE18AD9FECC4215814C4131BDEBA98433D8B0E31BFBBDDF822ABCCE5E06"
    "486AA388022B75E27E1E68AA5983028B65282C730C5D49EF7606770376CFDEC41F7CC435D816029989BC353D"
    "3B67B9FD1168DDCB8978850DA9B752AEE6A30D0086D2C4D74EC0E03648A0DAD334FAF5FE88084E67B0F3E8FE"
    "E8B5E1BD3850DB540F1FB8CFFE23C9E92CDA209373F354880C246C753E2A0ECA9CB73B9910A8531C4010E676"
    "8FA29F909E60AF777FED6E739C3CFDA03467E915D6F03FCE9C41F5F9D578F8912D66A75457E79EE1D5BCC2BE"
    "5C2F9BAE"
)
SHA256_DKM_CHILD_DH = h(
    "6A919387A5FA2835FE8A8237E4A14845BD2B9930DB87EFF7ADF268F62186004902DBA9AA942D0259A0EDC412"
    "0B932A503865B57BA8FB88117EF5DF7B26799CD8BA37AA5438108CB1A4FE117907C9D0597B708C3F11151FEF"
    "D624D2317202B7C81430600E6FCBB6E1A8DF2B4861EF2363D53DE1BE69057B0CF6634A7E7BFA97B3C2810623"
    "E2BD6757738777177036E9C3A39794456954BD41FC444A12507AB9CAC69A0540D13C29DB8510F566A691691B"
    "AA2D9569DACC990D56A454BB444BCBBE8751B0550A5278812FC5AB4F28990DD6D608538D7DDDE24DC81BDAAC"
    "A7751FDE"
)
SHA256_SKEYSEED_REKEY = h("90722C42BD849E9B72D240FC254174270FA8295DE6F0338DAFC303A9EC104F12")

# A suite whose seven keys add up to exactly the vector's DKM length:
# SHA-1: 3 x 20 (prf) + 2 x 20 (HMAC-SHA1-96) + 2 x 16 (AES-128) = 132 octets.
SHA1_SUITE = IkeSuite(EncrId.ENCR_AES_CBC, 128, SHA1, IntegId.AUTH_HMAC_SHA1_96, DhId.MODP_2048)
# SHA-256: 3 x 32 + 2 x 32 (HMAC-SHA2-256-128) + 2 x 32 (AES-256) = 224 octets.
SHA256_SUITE = IkeSuite(
    EncrId.ENCR_AES_CBC, 256, SHA256, IntegId.AUTH_HMAC_SHA2_256_128, DhId.MODP_2048
)

CTR128 = EspSuite(
    "aes128ctr-sha256", EncrId.ENCR_AES_CTR, 128, IntegId.AUTH_HMAC_SHA2_256_128, DhId.NONE, False
)
CTR256 = EspSuite(
    "aes256ctr-sha256", EncrId.ENCR_AES_CTR, 256, IntegId.AUTH_HMAC_SHA2_256_128, DhId.NONE, False
)
GCM128 = EspSuite("aes128gcm16", EncrId.ENCR_AES_GCM_16, 128, IntegId.NONE, DhId.NONE, False)


def concat(keys: IkeKeys) -> bytes:
    return keys.sk_d + keys.sk_ai + keys.sk_ar + keys.sk_ei + keys.sk_er + keys.sk_pi + keys.sk_pr


@pytest.mark.parametrize(("prf_id", "skeyseed"), [(SHA1, SHA1_SKEYSEED), (SHA256, SHA256_SKEYSEED)])
def test_skeyseed_vector(prf_id: PrfId, skeyseed: bytes) -> None:
    # RFC 7296 §2.14: SKEYSEED = prf(Ni | Nr, g^ir)
    assert prf(prf_id, NI + NR, GIR) == skeyseed


@pytest.mark.parametrize(("suite", "dkm"), [(SHA1_SUITE, SHA1_DKM), (SHA256_SUITE, SHA256_DKM)])
def test_ike_keys_vector(suite: IkeSuite, dkm: bytes) -> None:
    keys = derive_ike_keys(suite, NI, NR, GIR, SPI_I, SPI_R)
    assert concat(keys) == dkm
    p, a, e = suite.prf_len, suite.sk_a_len, suite.sk_e_len
    assert keys.sk_d == dkm[:p]
    assert keys.sk_ai == dkm[p : p + a]
    assert keys.sk_er == dkm[p + 2 * a + e : p + 2 * a + 2 * e]
    assert keys.sk_pr == dkm[-p:]


@pytest.mark.parametrize(
    ("prf_id", "sk_d", "dkm", "esp"),
    [
        (SHA1, SHA1_DKM[:20], SHA1_DKM_CHILD, CTR128),
        (SHA256, SHA256_DKM[:32], SHA256_DKM_CHILD, CTR256),
    ],
)
def test_child_keymat_vector(prf_id: PrfId, sk_d: bytes, dkm: bytes, esp: EspSuite) -> None:
    # RFC 7296 §2.17: KEYMAT = prf+(SK_d, Ni | Nr); i->r SA first, then r->i.
    i2r, r2i = derive_child_keymat(prf_id, sk_d, NI, NR, esp, None)
    n = esp.keymat_len
    assert (i2r, r2i) == (dkm[:n], dkm[n : 2 * n])


@pytest.mark.parametrize(
    ("prf_id", "sk_d", "dkm"),
    [(SHA1, SHA1_DKM[:20], SHA1_DKM_CHILD_DH), (SHA256, SHA256_DKM[:32], SHA256_DKM_CHILD_DH)],
)
def test_child_keymat_with_pfs_vector(prf_id: PrfId, sk_d: bytes, dkm: bytes) -> None:
    # RFC 7296 §2.17: KEYMAT = prf+(SK_d, g^ir (new) | Ni | Nr)
    i2r, r2i = derive_child_keymat(prf_id, sk_d, NI, NR, CTR128, GIR_NEW)
    assert i2r + r2i == dkm[:104]


@pytest.mark.parametrize(
    ("suite", "sk_d", "skeyseed"),
    [
        (SHA1_SUITE, SHA1_DKM[:20], SHA1_SKEYSEED_REKEY),
        (SHA256_SUITE, SHA256_DKM[:32], SHA256_SKEYSEED_REKEY),
    ],
)
def test_rekeyed_ike_keys_vector(suite: IkeSuite, sk_d: bytes, skeyseed: bytes) -> None:
    # RFC 7296 §2.18: SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr), then §2.14's prf+.
    spi_i, spi_r = b"\x11" * 8, b"\x22" * 8
    keys = derive_rekeyed_ike_keys(suite.prf, sk_d, suite, NI, NR, GIR_NEW, spi_i, spi_r)
    total = len(concat(keys))
    assert concat(keys) == prf_plus(suite.prf, skeyseed, NI + NR + spi_i + spi_r, total)


def test_rekey_uses_old_prf_for_skeyseed_and_new_prf_for_prf_plus() -> None:
    new_suite = IkeSuite(EncrId.ENCR_AES_GCM_16, 256, SHA384, IntegId.NONE, DhId.ECP_384)
    old_sk_d = SHA1_DKM[:20]
    keys = derive_rekeyed_ike_keys(SHA1, old_sk_d, new_suite, NI, NR, GIR_NEW, SPI_I, SPI_R)
    seed = NI + NR + SPI_I + SPI_R
    # SKEYSEED with the OLD (SHA-1) PRF is the NIST rekey answer ...
    expected = independent_prf_plus("sha384", SHA1_SKEYSEED_REKEY, seed, 48 * 3 + 36 * 2)
    # ... and prf+ runs with the NEW one (SHA-384), SK_e with the 4-octet GCM salt.
    assert concat(keys) == expected
    assert len(keys.sk_ei) == 36 and keys.sk_ai == b"" and len(keys.sk_pr) == 48


# -- a whole IKE_SA_INIT + first Child SA, step by step --------------------------


def test_full_derivation_step_by_step() -> None:
    suite = IkeSuite(EncrId.ENCR_AES_GCM_16, 128, SHA256, IntegId.NONE, DhId.ECP_256)
    ni, nr = bytes(range(32)), bytes(range(100, 132))
    spi_i, spi_r = h("0123456789abcdef"), h("fedcba9876543210")
    gir = bytes(range(7, 39))

    keys = derive_ike_keys(suite, ni, nr, gir, spi_i, spi_r)

    skeyseed = hmac.new(ni + nr, gir, hashlib.sha256).digest()
    stream = independent_prf_plus("sha256", skeyseed, ni + nr + spi_i + spi_r, 32 * 3 + 20 * 2)
    # {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr}, no SK_a with AEAD
    assert keys == IkeKeys(
        stream[0:32], b"", b"", stream[32:52], stream[52:72], stream[72:104], stream[104:136]
    )

    i2r, r2i = derive_child_keymat(SHA256, keys.sk_d, ni, nr, GCM128, None)
    keymat = independent_prf_plus("sha256", keys.sk_d, ni + nr, 40)
    # RFC 4106 §8.1: each SA takes 16 key octets then 4 salt octets.
    assert i2r == keymat[:20] and r2i == keymat[20:40]


def test_ctr_keymat_layout_for_esp() -> None:
    sk_d = b"D" * 32
    i2r, r2i = derive_child_keymat(SHA256, sk_d, NI, NR, CTR128, None)
    stream = independent_prf_plus("sha256", sk_d, NI + NR, 2 * 52)
    # RFC 7296 §2.17: initiator->responder encryption key (+nonce), then its
    # integrity key; then the same for responder->initiator.
    assert i2r[:16] + i2r[16:20] + i2r[20:] == stream[:52]
    assert r2i == stream[52:104]
    assert (len(i2r), len(r2i)) == (52, 52)


# -- AUTH and NAT detection ------------------------------------------------------


def test_psk_auth_formula() -> None:
    psk = b"correct horse battery staple"
    message = b"\x00" * 28 + b"IKE_SA_INIT request bytes"
    nr = b"N" * 32
    sk_pi = b"P" * 32
    id_body = bytes([2, 0, 0, 0]) + b"gw.example.org"  # ID_FQDN

    def mac(key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, hashlib.sha256).digest()

    # RFC 7296 §2.15: AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), <InitiatorSignedOctets>)
    # InitiatorSignedOctets = RealMessage1 | NonceRData | MACedIDForI
    expected = mac(mac(psk, b"Key Pad for IKEv2"), message + nr + mac(sk_pi, id_body))
    assert psk_auth(SHA256, psk, message, nr, sk_pi, id_body) == expected
    assert psk_auth(SHA256, psk + b"x", message, nr, sk_pi, id_body) != expected


def test_nat_detection_hash() -> None:
    spi_i, spi_r = h("0011223344556677"), bytes(8)
    ip = bytes([192, 0, 2, 1])
    expected = hashlib.sha1(spi_i + spi_r + ip + (4500).to_bytes(2, "big")).digest()
    assert nat_detection_hash(spi_i, spi_r, ip, 4500) == expected
    assert len(expected) == 20
    assert nat_detection_hash(spi_i, spi_r, ip, 500) != expected


def test_keys_never_in_repr() -> None:
    keys = derive_ike_keys(SHA256_SUITE, NI, NR, GIR, SPI_I, SPI_R)
    text = repr(keys)
    assert keys.sk_d.hex() not in text and repr(keys.sk_d) not in text
    assert "sk_d" not in text
