"""IANA registries of IKEv2 (RFC 7296 §3 and the IKEv2 parameters registry).

The enums tolerate unknown values (``_missing_`` makes a pseudo-member), because
a peer may send numbers we do not know and the codec must carry them through.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Any


class _OpenEnum(IntEnum):
    """An IntEnum that accepts unknown values instead of raising."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if not isinstance(value, int):
            return None
        member = int.__new__(cls, value)
        member._name_ = f"{cls.__name__.upper()}_{value}"
        member._value_ = value
        return member


IKE_VERSION = 0x20  # major 2, minor 0 (RFC 7296 §3.1)
IKE_HEADER_LEN = 28
GENERIC_PAYLOAD_HEADER_LEN = 4
NON_ESP_MARKER = b"\x00\x00\x00\x00"  # RFC 3948 §2.2


class ExchangeType(_OpenEnum):
    IKE_SA_INIT = 34
    IKE_AUTH = 35
    CREATE_CHILD_SA = 36
    INFORMATIONAL = 37
    IKE_SESSION_RESUME = 38
    # RFC 6311 §4: IKEV2_MESSAGE_ID_SYNC notifications travel in INFORMATIONAL.


class HeaderFlag(IntFlag):
    """RFC 7296 §3.1 Flags."""

    INITIATOR = 0x08
    VERSION = 0x10
    RESPONSE = 0x20


class PayloadType(_OpenEnum):
    NONE = 0
    SA = 33
    KE = 34
    IDI = 35
    IDR = 36
    CERT = 37
    CERTREQ = 38
    AUTH = 39
    NONCE = 40
    NOTIFY = 41
    DELETE = 42
    VENDOR_ID = 43
    TSI = 44
    TSR = 45
    SK = 46
    CP = 47
    EAP = 48
    SKF = 53  # RFC 7383


class ProtocolId(_OpenEnum):
    NONE = 0
    IKE = 1
    AH = 2
    ESP = 3


class TransformType(_OpenEnum):
    ENCR = 1
    PRF = 2
    INTEG = 3
    DH = 4
    ESN = 5
    # RFC 9370 §3.2.2: Additional Key Exchange 1..7 (we offer none; an
    # initiator's NONE for them is accepted, anything else is no match)
    ADDKE1 = 6
    ADDKE2 = 7
    ADDKE3 = 8
    ADDKE4 = 9
    ADDKE5 = 10
    ADDKE6 = 11
    ADDKE7 = 12


class EncrId(_OpenEnum):
    ENCR_AES_CBC = 12
    ENCR_AES_CTR = 13
    ENCR_AES_GCM_8 = 18
    ENCR_AES_GCM_12 = 19
    ENCR_AES_GCM_16 = 20
    ENCR_CHACHA20_POLY1305 = 28


class PrfId(_OpenEnum):
    PRF_HMAC_SHA1 = 2
    PRF_HMAC_SHA2_256 = 5
    PRF_HMAC_SHA2_384 = 6
    PRF_HMAC_SHA2_512 = 7


class IntegId(_OpenEnum):
    NONE = 0
    AUTH_HMAC_SHA1_96 = 2
    AUTH_HMAC_SHA2_256_128 = 12
    AUTH_HMAC_SHA2_384_192 = 13
    AUTH_HMAC_SHA2_512_256 = 14


class DhId(_OpenEnum):
    NONE = 0
    MODP_2048 = 14
    MODP_3072 = 15
    MODP_4096 = 16
    ECP_256 = 19
    ECP_384 = 20
    ECP_521 = 21
    CURVE_25519 = 31


class EsnId(_OpenEnum):
    NO_ESN = 0
    ESN = 1


class TransformAttr(_OpenEnum):
    KEY_LENGTH = 14  # RFC 7296 §3.3.5, TV format (AF bit set)


class IdType(_OpenEnum):
    ID_IPV4_ADDR = 1
    ID_FQDN = 2
    ID_RFC822_ADDR = 3
    ID_IPV6_ADDR = 5
    ID_DER_ASN1_DN = 9
    ID_DER_ASN1_GN = 10
    ID_KEY_ID = 11


class AuthMethod(_OpenEnum):
    RSA_SIG = 1  # RFC 7296 §3.8: PKCS#1 v1.5 with SHA-1
    SHARED_KEY_MIC = 2
    DSS_SIG = 3
    ECDSA_SHA256_P256 = 9  # RFC 4754 §7: r | s, fixed length
    ECDSA_SHA384_P384 = 10
    ECDSA_SHA512_P521 = 11
    DIGITAL_SIGNATURE = 14  # RFC 7427


class CertEncoding(_OpenEnum):
    """RFC 7296 §3.6 Certificate Encoding (CERT and CERTREQ payloads)."""

    X509_SIGNATURE = 4


class HashAlgorithm(_OpenEnum):
    """RFC 7427 §7 hash algorithms of N(SIGNATURE_HASH_ALGORITHMS)."""

    SHA1 = 1
    SHA2_256 = 2
    SHA2_384 = 3
    SHA2_512 = 4
    IDENTITY = 5  # RFC 8420: Ed25519/Ed448 sign the message itself


class TsType(_OpenEnum):
    TS_IPV4_ADDR_RANGE = 7
    TS_IPV6_ADDR_RANGE = 8


class CfgType(_OpenEnum):
    """RFC 7296 §3.15: CFG Type of a Configuration payload."""

    CFG_REQUEST = 1
    CFG_REPLY = 2
    CFG_SET = 3
    CFG_ACK = 4


class CfgAttr(_OpenEnum):
    """RFC 7296 §3.15.1 Configuration Attribute types (the ones we answer)."""

    INTERNAL_IP4_ADDRESS = 1
    INTERNAL_IP4_NETMASK = 2
    INTERNAL_IP4_DNS = 3
    INTERNAL_IP4_NBNS = 4
    INTERNAL_IP4_DHCP = 6
    APPLICATION_VERSION = 7
    INTERNAL_IP6_ADDRESS = 8
    INTERNAL_IP6_DNS = 10
    INTERNAL_IP6_DHCP = 12
    INTERNAL_IP4_SUBNET = 13
    SUPPORTED_ATTRIBUTES = 14
    INTERNAL_IP6_SUBNET = 15


class NotifyType(_OpenEnum):
    # Error types (RFC 7296 §3.10.1), < 16384
    UNSUPPORTED_CRITICAL_PAYLOAD = 1
    INVALID_IKE_SPI = 4
    INVALID_MAJOR_VERSION = 5
    INVALID_SYNTAX = 7
    INVALID_MESSAGE_ID = 9
    INVALID_SPI = 11
    NO_PROPOSAL_CHOSEN = 14
    INVALID_KE_PAYLOAD = 17
    AUTHENTICATION_FAILED = 24
    SINGLE_PAIR_REQUIRED = 34
    NO_ADDITIONAL_SAS = 35
    INTERNAL_ADDRESS_FAILURE = 36
    FAILED_CP_REQUIRED = 37
    TS_UNACCEPTABLE = 38
    INVALID_SELECTORS = 39
    TEMPORARY_FAILURE = 43
    CHILD_SA_NOT_FOUND = 44
    # Status types, >= 16384
    INITIAL_CONTACT = 16384
    SET_WINDOW_SIZE = 16385
    ADDITIONAL_TS_POSSIBLE = 16386
    IPCOMP_SUPPORTED = 16387
    NAT_DETECTION_SOURCE_IP = 16388
    NAT_DETECTION_DESTINATION_IP = 16389
    COOKIE = 16390
    USE_TRANSPORT_MODE = 16391
    HTTP_CERT_LOOKUP_SUPPORTED = 16392
    REKEY_SA = 16393
    ESP_TFC_PADDING_NOT_SUPPORTED = 16394
    NON_FIRST_FRAGMENTS_ALSO = 16395
    MOBIKE_SUPPORTED = 16396
    MULTIPLE_AUTH_SUPPORTED = 16404
    REDIRECT_SUPPORTED = 16406
    EAP_ONLY_AUTHENTICATION = 16417
    IKEV2_MESSAGE_ID_SYNC_SUPPORTED = 16420  # RFC 6311
    IPSEC_REPLAY_COUNTER_SYNC_SUPPORTED = 16421  # RFC 6311
    IKEV2_MESSAGE_ID_SYNC = 16422  # RFC 6311
    IPSEC_REPLAY_COUNTER_SYNC = 16423  # RFC 6311
    IKEV2_FRAGMENTATION_SUPPORTED = 16430  # RFC 7383
    SIGNATURE_HASH_ALGORITHMS = 16431  # RFC 7427

    @property
    def is_error(self) -> bool:
        return int(self) < 16384
