"""Proposal strings, negotiation and negotiated suites (RFC 7296 §2.7, §3.3).

Rules of this file:
- Configuration strings use strongSwan's syntax ("aes128gcm16-prfsha256-ecp256");
  an unknown token is a ValueError naming it and listing what is supported.
- Negotiation works on ``Proposal``/``Transform`` data only. A proposal with
  a transform type we do not know for its protocol is unacceptable (RFC 7296
  §3.3.6), whatever else it holds: it never matches, so nothing downstream
  (``ike_suite``/``esp_suite``) sees a type it cannot run. A transform type
  absent from a proposal counts as the single transform ID 0 (NONE / NO_ESN),
  the same as RFC 7296 §3.3.3 lets a peer write "DH: NONE" explicitly; ENCR and
  PRF have no ID 0, so they always have to be there.
- The responder picks in OUR configured order (outer loop over our proposals,
  then the peer's; inside a proposal our transform order wins), like
  strongSwan's default ``prefer_configured_proposals = yes``.
- Status names (``format_*``) are strongSwan's ``ipsec statusall`` style:
  "AES_GCM_16_128/PRF_HMAC_SHA2_256/ECP_256",
  "AES_CBC_128/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/MODP_2048",
  "AES_CTR_256/HMAC_SHA2_256_128/ECP_256/ESN".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from common.errors import LocalProtocolError
from common.ike.constants import DhId, EncrId, EsnId, IntegId, PrfId, ProtocolId, TransformType
from common.ike.transforms import Proposal, Transform

_T = TransformType

#: PRF transform id -> hashlib digest name (RFC 7296 §3.3.2, RFC 4868); the
#: PRFs themselves are common/ike/keys.py's.
_PRF_DIGESTS: dict[PrfId, str] = {
    PrfId.PRF_HMAC_SHA1: "sha1",
    PrfId.PRF_HMAC_SHA2_256: "sha256",
    PrfId.PRF_HMAC_SHA2_384: "sha384",
    PrfId.PRF_HMAC_SHA2_512: "sha512",
}

#: Combined-mode (AEAD) ciphers: no INTEG transform beside them (RFC 5282 §8).
AEAD_ENCR = frozenset(
    {
        EncrId.ENCR_AES_GCM_8,
        EncrId.ENCR_AES_GCM_12,
        EncrId.ENCR_AES_GCM_16,
        EncrId.ENCR_CHACHA20_POLY1305,
    }
)

#: The 4-octet salt (GCM, RFC 5282 §7.1 / RFC 4106 §8.1) or nonce (CTR, RFC 3686
#: §5.1) taken from the keying material right after an encryption key.
SALT_LEN = 4

_INTEG_KEY_LEN = {
    IntegId.NONE: 0,
    IntegId.AUTH_HMAC_SHA1_96: 20,
    IntegId.AUTH_HMAC_SHA2_256_128: 32,  # RFC 4868 §2.1.1: key = hash output length
    IntegId.AUTH_HMAC_SHA2_384_192: 48,
    IntegId.AUTH_HMAC_SHA2_512_256: 64,
}
_INTEG_ICV_LEN = {
    IntegId.NONE: 0,
    IntegId.AUTH_HMAC_SHA1_96: 12,
    IntegId.AUTH_HMAC_SHA2_256_128: 16,
    IntegId.AUTH_HMAC_SHA2_384_192: 24,
    IntegId.AUTH_HMAC_SHA2_512_256: 32,
}
_AEAD_ICV_LEN = {
    EncrId.ENCR_AES_GCM_8: 8,
    EncrId.ENCR_AES_GCM_12: 12,
    EncrId.ENCR_AES_GCM_16: 16,
    EncrId.ENCR_CHACHA20_POLY1305: 16,  # RFC 7634 §2
}
#: RFC 7634 §2/§3: ENCR_CHACHA20_POLY1305 has a fixed 256-bit key and its
#: transform carries no Key Length attribute.
CHACHA20_KEY_BITS = 256
#: Ciphers whose keying material has no salt or nonce after the key.
_NO_SALT_ENCR = frozenset({EncrId.ENCR_AES_CBC})

# strongSwan tokens -> transforms.
_IKE_ENCR: dict[str, Transform] = {
    "aes128gcm16": Transform(_T.ENCR, EncrId.ENCR_AES_GCM_16, 128),
    "aes256gcm16": Transform(_T.ENCR, EncrId.ENCR_AES_GCM_16, 256),
    "chacha20poly1305": Transform(_T.ENCR, EncrId.ENCR_CHACHA20_POLY1305),
    "aes128": Transform(_T.ENCR, EncrId.ENCR_AES_CBC, 128),
    "aes256": Transform(_T.ENCR, EncrId.ENCR_AES_CBC, 256),
}
_IKE_INTEG: dict[str, Transform] = {
    "sha1": Transform(_T.INTEG, IntegId.AUTH_HMAC_SHA1_96),
    "sha256": Transform(_T.INTEG, IntegId.AUTH_HMAC_SHA2_256_128),
    "sha384": Transform(_T.INTEG, IntegId.AUTH_HMAC_SHA2_384_192),
    "sha512": Transform(_T.INTEG, IntegId.AUTH_HMAC_SHA2_512_256),
}
_PRF: dict[str, Transform] = {
    "prfsha1": Transform(_T.PRF, PrfId.PRF_HMAC_SHA1),
    "prfsha256": Transform(_T.PRF, PrfId.PRF_HMAC_SHA2_256),
    "prfsha384": Transform(_T.PRF, PrfId.PRF_HMAC_SHA2_384),
    "prfsha512": Transform(_T.PRF, PrfId.PRF_HMAC_SHA2_512),
}
#: strongSwan: without an explicit prf, "sha256" also stands for PRF_HMAC_SHA2_256.
_INTEG_TO_PRF = {
    IntegId.AUTH_HMAC_SHA1_96: PrfId.PRF_HMAC_SHA1,
    IntegId.AUTH_HMAC_SHA2_256_128: PrfId.PRF_HMAC_SHA2_256,
    IntegId.AUTH_HMAC_SHA2_384_192: PrfId.PRF_HMAC_SHA2_384,
    IntegId.AUTH_HMAC_SHA2_512_256: PrfId.PRF_HMAC_SHA2_512,
}
_DH: dict[str, Transform] = {
    "ecp256": Transform(_T.DH, DhId.ECP_256),
    "ecp384": Transform(_T.DH, DhId.ECP_384),
    "ecp521": Transform(_T.DH, DhId.ECP_521),
    "curve25519": Transform(_T.DH, DhId.CURVE_25519),
    "x25519": Transform(_T.DH, DhId.CURVE_25519),
    "modp2048": Transform(_T.DH, DhId.MODP_2048),
    "modp3072": Transform(_T.DH, DhId.MODP_3072),
    "modp4096": Transform(_T.DH, DhId.MODP_4096),
}
_ESP_ENCR: dict[str, Transform] = {
    "aes128gcm16": Transform(_T.ENCR, EncrId.ENCR_AES_GCM_16, 128),
    "aes256gcm16": Transform(_T.ENCR, EncrId.ENCR_AES_GCM_16, 256),
    "chacha20poly1305": _IKE_ENCR["chacha20poly1305"],
    "aes128ctr": Transform(_T.ENCR, EncrId.ENCR_AES_CTR, 128),
    "aes256ctr": Transform(_T.ENCR, EncrId.ENCR_AES_CTR, 256),
    "aes128": _IKE_ENCR["aes128"],
    "aes256": _IKE_ENCR["aes256"],
    # Not strongSwan's: the spelling of common.esp.transforms's transform names.
    "aes128cbc": _IKE_ENCR["aes128"],
    "aes256cbc": _IKE_ENCR["aes256"],
}
_ESP_INTEG: dict[str, Transform] = {
    name: _IKE_INTEG[name] for name in ("sha1", "sha256", "sha384", "sha512")
}
_ESN: dict[str, Transform] = {
    "esn": Transform(_T.ESN, EsnId.ESN),
    "noesn": Transform(_T.ESN, EsnId.NO_ESN),
}

#: The data plane's transform names (common.esp.transforms) -> (ENCR id, key bits, INTEG id).
ESP_TRANSFORMS: dict[str, tuple[EncrId, int, IntegId]] = {
    "aes128gcm16": (EncrId.ENCR_AES_GCM_16, 128, IntegId.NONE),
    "aes256gcm16": (EncrId.ENCR_AES_GCM_16, 256, IntegId.NONE),
    "chacha20poly1305": (EncrId.ENCR_CHACHA20_POLY1305, CHACHA20_KEY_BITS, IntegId.NONE),
    "aes128ctr-sha256": (EncrId.ENCR_AES_CTR, 128, IntegId.AUTH_HMAC_SHA2_256_128),
    "aes256ctr-sha256": (EncrId.ENCR_AES_CTR, 256, IntegId.AUTH_HMAC_SHA2_256_128),
    **{
        f"aes{bits}cbc-{name}": (EncrId.ENCR_AES_CBC, bits, IntegId(integ.id))
        for bits in (128, 256)
        for name, integ in _ESP_INTEG.items()
    },
}
_ESP_ALGS = frozenset(ESP_TRANSFORMS.values())

#: strongSwan 5.9's ``default`` proposal keyword (proposal_create_default,
#: then proposal_create_default_aead), in the order charon 5.9.8 with the
#: openssl plugin sends it, restricted to what we implement (no AES-192,
#: AES-CTR/Camellia/3DES in IKE, AES-CCM, AES-GCM-8/12, AES-XCBC, Brainpool,
#: curve448, MODP 6144/8192).
_DEFAULT_DH = "curve25519-ecp256-ecp384-ecp521-modp3072-modp4096-modp2048"
_DEFAULT_PRF = "prfsha256-prfsha384-prfsha512-prfsha1"
DEFAULT_KEYWORD = "default"
STRONGSWAN_DEFAULT_IKE: tuple[str, ...] = (
    f"aes128-aes256-sha256-sha384-sha512-sha1-{_DEFAULT_PRF}-{_DEFAULT_DH}",
    f"aes128gcm16-aes256gcm16-chacha20poly1305-{_DEFAULT_PRF}-{_DEFAULT_DH}",
)
STRONGSWAN_DEFAULT_ESP: tuple[str, ...] = (
    "aes128-aes256-sha256-sha384-sha512-sha1-noesn",
    "aes128gcm16-aes256gcm16-noesn",
)
_IKE_DH = frozenset(t.id for t in _DH.values())


def prf_digest(prf_id: PrfId) -> str:
    """The hashlib name of an HMAC PRF's hash."""
    try:
        return _PRF_DIGESTS[prf_id]
    except KeyError:
        raise LocalProtocolError(f"unsupported PRF {prf_id!r}") from None


def prf_length(prf_id: PrfId) -> int:
    """Output length of the PRF in octets; also the preferred key length of
    SK_d, SK_pi and SK_pr (RFC 7296 §2.13, §2.14)."""
    return hashlib.new(prf_digest(prf_id)).digest_size


@dataclass(slots=True, frozen=True)
class IkeSuite:
    """The negotiated algorithms of an IKE SA. ``integ`` is NONE for AEAD."""

    encr: EncrId
    key_bits: int
    prf: PrfId
    integ: IntegId
    dh: DhId

    @property
    def is_aead(self) -> bool:
        return self.encr in AEAD_ENCR

    @property
    def sk_e_len(self) -> int:
        """Length of SK_ei/SK_er: key plus, for AEAD, the salt (RFC 5282 §7.1)."""
        return self.key_bits // 8 + (SALT_LEN if self.is_aead else 0)

    @property
    def sk_a_len(self) -> int:
        return _INTEG_KEY_LEN[self.integ]

    @property
    def prf_len(self) -> int:
        return prf_length(self.prf)

    @property
    def icv_len(self) -> int:
        """Length of the integrity checksum / AEAD tag ending an SK payload."""
        if self.is_aead:
            return _AEAD_ICV_LEN[self.encr]
        return _INTEG_ICV_LEN[self.integ]


@dataclass(slots=True, frozen=True)
class EspSuite:
    """The negotiated algorithms of a Child SA. ``transform`` is the common.esp.transforms
    name; ``dh`` is NONE without PFS."""

    transform: str
    encr: EncrId
    key_bits: int
    integ: IntegId
    dh: DhId
    esn: bool

    @property
    def keymat_len(self) -> int:
        """Octets of KEYMAT per direction: encr key | salt | [integ key]
        (AES-CBC has no salt, RFC 3602)."""
        salt = 0 if self.encr in _NO_SALT_ENCR else SALT_LEN
        return self.key_bits // 8 + salt + _INTEG_KEY_LEN[self.integ]


# -- parsing -------------------------------------------------------------------


def _tokens(text: str, kind: str) -> list[str]:
    tokens = text.strip().lower().split("-")
    if any(not t for t in tokens):
        raise ValueError(f"empty algorithm in {kind} proposal {text!r}")
    return tokens


def _unknown(token: str, text: str, kind: str, tables: list[dict[str, Transform]]) -> ValueError:
    supported = ", ".join(name for table in tables for name in table)
    return ValueError(
        f"unknown algorithm {token!r} in {kind} proposal {text!r}; supported: {supported}"
    )


def _unique(transforms: list[Transform]) -> list[Transform]:
    return list(dict.fromkeys(transforms))


def _check_aead(encr: list[Transform], text: str, kind: str) -> bool:
    if not encr:
        raise ValueError(f"{kind} proposal {text!r} has no encryption algorithm")
    aead = [t for t in encr if t.id in AEAD_ENCR]
    if aead and len(aead) != len(encr):
        raise ValueError(
            f"{kind} proposal {text!r} mixes AEAD and non-AEAD encryption; "
            "write them as two proposals"
        )
    return bool(aead)


def parse_ike_proposal(text: str, number: int = 1) -> Proposal:
    """One IKE proposal from a strongSwan string, e.g. "aes256gcm16-prfsha384-ecp384".

    As in strongSwan, an integrity token ("sha256") also supplies the PRF when
    no "prf..." token is given, and is dropped (after supplying the PRF) from an
    AEAD proposal.
    """
    tables = [_IKE_ENCR, _IKE_INTEG, _PRF, _DH]
    encr: list[Transform] = []
    integ: list[Transform] = []
    prfs: list[Transform] = []
    dhs: list[Transform] = []
    for token in _tokens(text, "IKE"):
        for table, bucket in zip(tables, (encr, integ, prfs, dhs), strict=True):
            if token in table:
                bucket.append(table[token])
                break
        else:
            raise _unknown(token, text, "IKE", tables)
    aead = _check_aead(encr, text, "IKE")
    if not prfs:
        prfs = [Transform(_T.PRF, _INTEG_TO_PRF[IntegId(t.id)]) for t in integ]
    if aead:
        integ = []
    elif not integ:
        raise ValueError(f"IKE proposal {text!r} needs an integrity algorithm (e.g. sha256)")
    if not prfs:
        raise ValueError(f"IKE proposal {text!r} has no PRF (e.g. prfsha256)")
    if not dhs:
        raise ValueError(f"IKE proposal {text!r} has no key exchange group (e.g. ecp256)")
    return Proposal(number, ProtocolId.IKE, b"", _unique(encr + integ + prfs + dhs))


def parse_esp_proposal(text: str, number: int = 1) -> Proposal:
    """One ESP proposal from a strongSwan string, e.g. "aes128gcm16-ecp256-esn".

    DH groups ask for PFS in CREATE_CHILD_SA. ESN defaults to "noesn"; giving
    both "esn" and "noesn" offers both.
    """
    tables = [_ESP_ENCR, _ESP_INTEG, _DH, _ESN]
    encr: list[Transform] = []
    integ: list[Transform] = []
    dhs: list[Transform] = []
    esns: list[Transform] = []
    for token in _tokens(text, "ESP"):
        for table, bucket in zip(tables, (encr, integ, dhs, esns), strict=True):
            if token in table:
                bucket.append(table[token])
                break
        else:
            raise _unknown(token, text, "ESP", tables)
    aead = _check_aead(encr, text, "ESP")
    if aead and integ:
        raise ValueError(f"ESP proposal {text!r} combines AEAD with an integrity algorithm")
    if not aead and not integ:
        raise ValueError(f"ESP proposal {text!r} needs an integrity algorithm (sha256)")
    _check_esp_combinations(encr, integ, text)
    if not esns:
        esns = [_ESN["noesn"]]
    return Proposal(number, ProtocolId.ESP, b"", _unique(encr + integ + dhs + esns))


def _check_esp_combinations(encr: list[Transform], integ: list[Transform], text: str) -> None:
    """Every encryption/integrity pair a proposal allows must be one common.esp.transforms
    runs, or a peer could pick a pair we cannot serve."""
    for e in encr:
        for i in integ or [Transform(_T.INTEG, IntegId.NONE)]:
            if (EncrId(e.id), _key_bits(e), IntegId(i.id)) not in _ESP_ALGS:
                raise ValueError(
                    f"ESP proposal {text!r} allows {_encr_name(EncrId(e.id), _key_bits(e))} "
                    f"with {IntegId(i.id).name}, which is not supported; supported: "
                    f"{', '.join(ESP_TRANSFORMS)}"
                )


def expand_ike_proposal(text: str, first_number: int = 1) -> list[Proposal]:
    """One configured IKE proposal string: strongSwan's ``default`` keyword
    stands for several proposals (``STRONGSWAN_DEFAULT_IKE``), anything else
    for one.  Numbered from ``first_number``."""
    if text.strip().lower() == DEFAULT_KEYWORD:
        return [parse_ike_proposal(p, n)
                for n, p in enumerate(STRONGSWAN_DEFAULT_IKE, start=first_number)]
    return [parse_ike_proposal(text, first_number)]


def expand_esp_proposal(text: str, first_number: int = 1) -> list[Proposal]:
    """One configured ESP proposal string, ``default`` expanded
    (``STRONGSWAN_DEFAULT_ESP``)."""
    if text.strip().lower() == DEFAULT_KEYWORD:
        return [parse_esp_proposal(p, n)
                for n, p in enumerate(STRONGSWAN_DEFAULT_ESP, start=first_number)]
    return [parse_esp_proposal(text, first_number)]


def parse_ike_proposals(text: str) -> list[Proposal]:
    """Comma-separated IKE proposals, numbered from 1 in the order given."""
    out: list[Proposal] = []
    for part in text.split(","):
        out += expand_ike_proposal(part, len(out) + 1)
    return out


def parse_esp_proposals(text: str) -> list[Proposal]:
    """Comma-separated ESP proposals, numbered from 1 in the order given."""
    out: list[Proposal] = []
    for part in text.split(","):
        out += expand_esp_proposal(part, len(out) + 1)
    return out


# -- negotiation ---------------------------------------------------------------


#: RFC 9370 additional key exchanges: known, but only NONE (ID 0) is ours.
ADDKE_TYPES = frozenset({_T.ADDKE1, _T.ADDKE2, _T.ADDKE3, _T.ADDKE4, _T.ADDKE5,
                         _T.ADDKE6, _T.ADDKE7})

#: The transform types each protocol has (RFC 7296 §3.3.3, RFC 9370 §2.2.2).
KNOWN_TYPES: dict[ProtocolId, frozenset[TransformType]] = {
    ProtocolId.IKE: frozenset({_T.ENCR, _T.PRF, _T.INTEG, _T.DH}) | ADDKE_TYPES,
    ProtocolId.ESP: frozenset({_T.ENCR, _T.INTEG, _T.DH, _T.ESN}) | ADDKE_TYPES,
}


def _no_addke(chosen: Proposal) -> bool:
    """A chosen proposal asks for no additional key exchange (NONE or absent)."""
    return all(t.id == 0 for t in chosen.transforms if t.type in ADDKE_TYPES)


def understood(proposal: Proposal) -> bool:
    """Every transform type of ``proposal`` is one its protocol has."""
    known = KNOWN_TYPES.get(proposal.protocol, frozenset())
    return all(t.type in known for t in proposal.transforms)


def _options(proposal: Proposal, ttype: TransformType) -> list[Transform]:
    """The transforms of one type; an absent type is the single ID 0 (NONE)."""
    return proposal.of_type(ttype) or [Transform(ttype, 0)]


def _select(mine: Proposal, offered: Proposal) -> Proposal | None:
    if mine.protocol != offered.protocol or not understood(offered):
        return None  # RFC 7296 §3.3.6: an unknown transform type
    types = sorted({t.type for t in mine.transforms} | {t.type for t in offered.transforms})
    picked: list[Transform] = []
    for ttype in types:
        theirs = _options(offered, ttype)
        match = next((t for t in _options(mine, ttype) if t in theirs), None)
        if match is None:
            return None
        if match.id == 0 and not offered.of_type(ttype):
            continue  # the peer left the type out: so does the answer
        picked.append(match)
    return Proposal(offered.number, offered.protocol, offered.spi, picked)


def choose_proposal(ours: list[Proposal], theirs: list[Proposal]) -> Proposal | None:
    """Responder side (RFC 7296 §2.7, §3.3.6): the first of OUR proposals, in
    our order, that one of the peer's proposals can satisfy.

    The result has exactly one transform of each type the peer used, the peer's
    proposal number and the peer's SPI (the sender's SPI on the wire: the caller
    reads the peer's SPI from it, then puts its own before sending the answer).
    None means NO_PROPOSAL_CHOSEN.
    """
    for mine in ours:
        for offered in theirs:
            chosen = _select(mine, offered)
            if chosen is not None:
                return chosen
    return None


def proposal_matches(offered: Proposal | list[Proposal], chosen: Proposal) -> bool:
    """Initiator side: is the responder's answer a valid pick from what we
    offered in the proposal with the same number (RFC 7296 §3.3.6)? ``offered``
    may be that one proposal or our whole list (the number then selects)."""
    if isinstance(offered, list):
        return any(proposal_matches(p, chosen) for p in offered if p.number == chosen.number)
    if chosen.protocol != offered.protocol or chosen.number != offered.number:
        return False
    if not understood(chosen):
        return False
    types = [t.type for t in chosen.transforms]
    if len(types) != len(set(types)):
        return False
    for transform in chosen.transforms:
        if transform not in _options(offered, transform.type):
            return False
    for ttype in {t.type for t in offered.transforms}:
        if ttype not in types and Transform(ttype, 0) not in offered.of_type(ttype):
            return False
    return True


# -- negotiated suites ---------------------------------------------------------


def _maybe(chosen: Proposal, ttype: TransformType) -> Transform | None:
    found = chosen.of_type(ttype)
    if len(found) > 1:
        raise ValueError(f"chosen proposal has {len(found)} {ttype.name} transforms")
    return found[0] if found else None


def _one(chosen: Proposal, ttype: TransformType) -> Transform:
    found = _maybe(chosen, ttype)
    if found is None:
        raise ValueError(f"chosen proposal has no {ttype.name} transform")
    return found


def _key_bits(encr: Transform) -> int:
    if encr.id == EncrId.ENCR_CHACHA20_POLY1305 and encr.key_length is None:
        return CHACHA20_KEY_BITS
    if encr.key_length is None:
        raise ValueError(f"encryption transform {encr.id!r} has no key length")
    return encr.key_length


def ike_suite(chosen: Proposal) -> IkeSuite:
    """The IkeSuite of a negotiated IKE proposal; ValueError if we do not support it."""
    if chosen.protocol != ProtocolId.IKE or not understood(chosen) or not _no_addke(chosen):
        raise ValueError(f"not an IKE proposal we support: {chosen!r}")
    encr = _one(chosen, _T.ENCR)
    prf = _one(chosen, _T.PRF)
    dh = _one(chosen, _T.DH)
    integ = _maybe(chosen, _T.INTEG)
    if encr not in _IKE_ENCR.values():
        raise ValueError(f"unsupported IKE encryption {EncrId(encr.id)!r}/{encr.key_length}")
    integ_id = IntegId(integ.id) if integ is not None else IntegId.NONE
    aead = encr.id in AEAD_ENCR
    if aead and integ_id != IntegId.NONE:
        raise ValueError("AEAD encryption with an integrity algorithm")
    if not aead and integ_id not in _INTEG_TO_PRF:
        raise ValueError(f"unsupported IKE integrity {integ_id!r}")
    if prf not in _PRF.values():
        raise ValueError(f"unsupported PRF {PrfId(prf.id)!r}")
    if dh.id not in _IKE_DH:
        raise ValueError(f"unsupported key exchange group {DhId(dh.id)!r}")
    return IkeSuite(EncrId(encr.id), _key_bits(encr), PrfId(prf.id), integ_id, DhId(dh.id))


def esp_suite(chosen: Proposal) -> EspSuite:
    """The EspSuite of a negotiated ESP proposal; ValueError if common.esp.transforms
    cannot run it. An absent DH means no PFS, an absent ESN means NO_ESN."""
    if chosen.protocol != ProtocolId.ESP or not understood(chosen) or not _no_addke(chosen):
        raise ValueError(f"not an ESP proposal we support: {chosen!r}")
    encr = _one(chosen, _T.ENCR)
    integ = _maybe(chosen, _T.INTEG)
    dh = _maybe(chosen, _T.DH)
    esn = _maybe(chosen, _T.ESN)
    integ_id = IntegId(integ.id) if integ is not None else IntegId.NONE
    key_bits = _key_bits(encr)
    name = next(
        (n for n, algs in ESP_TRANSFORMS.items() if algs == (encr.id, key_bits, integ_id)), None
    )
    if name is None:
        raise ValueError(
            f"unsupported ESP transform {EncrId(encr.id)!r}/{key_bits} with {integ_id!r}"
        )
    dh_id = DhId(dh.id) if dh is not None else DhId.NONE
    if dh_id != DhId.NONE and dh_id not in _IKE_DH:
        raise ValueError(f"unsupported PFS group {dh_id!r}")
    esn_id = esn.id if esn is not None else EsnId.NO_ESN
    if esn_id not in (EsnId.NO_ESN, EsnId.ESN):
        raise ValueError(f"unknown ESN transform {esn_id}")
    return EspSuite(name, EncrId(encr.id), key_bits, integ_id, dh_id, esn_id == EsnId.ESN)


# -- status names --------------------------------------------------------------


def _encr_name(encr: EncrId, key_bits: int) -> str:
    if encr == EncrId.ENCR_CHACHA20_POLY1305:
        return "CHACHA20_POLY1305"  # strongSwan shows no key size for it
    return f"{encr.name.removeprefix('ENCR_')}_{key_bits}"


def format_ike_suite(suite: IkeSuite) -> str:
    """e.g. "AES_GCM_16_256/PRF_HMAC_SHA2_384/ECP_384" (strongSwan statusall style)."""
    parts = [_encr_name(suite.encr, suite.key_bits)]
    if suite.integ != IntegId.NONE:
        parts.append(suite.integ.name.removeprefix("AUTH_"))
    parts += [suite.prf.name, suite.dh.name]
    return "/".join(parts)


def format_esp_suite(suite: EspSuite) -> str:
    """e.g. "AES_CTR_128/HMAC_SHA2_256_128/ECP_256/ESN"; the DH group shows only with PFS."""
    parts = [_encr_name(suite.encr, suite.key_bits)]
    if suite.integ != IntegId.NONE:
        parts.append(suite.integ.name.removeprefix("AUTH_"))
    if suite.dh != DhId.NONE:
        parts.append(suite.dh.name)
    if suite.esn:
        parts.append("ESN")
    return "/".join(parts)
