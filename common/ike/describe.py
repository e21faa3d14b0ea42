"""A compact description of an IKE message for debug logs, as charon writes
it: ``IKE_AUTH request 1 [ IDi AUTH SA TSi TSr N(INIT_CONTACT) ]``.

Only called behind ``log.isEnabledFor(logging.DEBUG)``: the hot path does
not pay for it. Names types, never contents (no key material in logs).
"""

from __future__ import annotations

from common.ike.constants import EncrId, NotifyType, PayloadType, TransformType
from common.ike.message import IkeMessage
from common.ike.payloads import NotifyPayload, Payload
from common.ike.proposals import _DH, _ESN, _IKE_INTEG, _PRF
from common.ike.transforms import Proposal, Transform

#: charon's short payload names
_PAYLOAD = {
    PayloadType.SA: "SA", PayloadType.KE: "KE", PayloadType.IDI: "IDi",
    PayloadType.IDR: "IDr", PayloadType.CERT: "CERT", PayloadType.CERTREQ: "CERTREQ",
    PayloadType.AUTH: "AUTH", PayloadType.NONCE: "No", PayloadType.DELETE: "D",
    PayloadType.VENDOR_ID: "V", PayloadType.TSI: "TSi", PayloadType.TSR: "TSr",
    PayloadType.CP: "CP", PayloadType.EAP: "EAP",
}
#: charon's short notify names, for the common ones
_NOTIFY = {
    NotifyType.INITIAL_CONTACT: "INIT_CONTACT",
    NotifyType.NAT_DETECTION_SOURCE_IP: "NATD_S_IP",
    NotifyType.NAT_DETECTION_DESTINATION_IP: "NATD_D_IP",
    NotifyType.IKEV2_FRAGMENTATION_SUPPORTED: "FRAG_SUP",
    NotifyType.MULTIPLE_AUTH_SUPPORTED: "MULT_AUTH",
    NotifyType.EAP_ONLY_AUTHENTICATION: "EAP_ONLY",
    NotifyType.SIGNATURE_HASH_ALGORITHMS: "HASH_ALG",
    NotifyType.MOBIKE_SUPPORTED: "MOBIKE_SUP",
    NotifyType.ESP_TFC_PADDING_NOT_SUPPORTED: "ESP_TFC_PAD_N",
    NotifyType.NON_FIRST_FRAGMENTS_ALSO: "NON_FIRST_FRAG",
    NotifyType.REDIRECT_SUPPORTED: "REDIR_SUP",
    NotifyType.NO_PROPOSAL_CHOSEN: "NO_PROP",
    NotifyType.AUTHENTICATION_FAILED: "AUTH_FAILED",
    NotifyType.TS_UNACCEPTABLE: "TS_UNACCEPT",
    NotifyType.INVALID_KE_PAYLOAD: "INVAL_KE",
    NotifyType.USE_TRANSPORT_MODE: "USE_TRANSP",
    NotifyType.IKEV2_MESSAGE_ID_SYNC_SUPPORTED: "MSG_ID_SYN_SUP",
}


def payload_name(p: Payload) -> str:
    if isinstance(p, NotifyPayload):
        nt = NotifyType(p.notify_type)
        return f"N({_NOTIFY.get(nt, nt.name)})"
    pt = PayloadType(p.payload_type)
    return _PAYLOAD.get(pt, pt.name)


def describe(msg: IkeMessage) -> str:
    kind = "response" if msg.is_response else "request"
    names = " ".join(payload_name(p) for p in msg.payloads)
    return f"{msg.exchange.name} {kind} {msg.message_id} [ {names} ]"


# -- proposals in strongSwan's syntax (for NO_PROPOSAL_CHOSEN logs) ---------------------

_EXTRA_NAMES: dict[tuple[TransformType, int], str] = {
    (TransformType.ENCR, 3): "3des",
    (TransformType.INTEG, 1): "md5",
    (TransformType.INTEG, 5): "aesxcbc",
    (TransformType.PRF, 1): "prfmd5",
    (TransformType.PRF, 4): "prfaesxcbc",
    (TransformType.DH, 2): "modp1024",
    (TransformType.DH, 5): "modp1536",
    (TransformType.DH, 32): "curve448",
}
_GCM_ICV = {EncrId.ENCR_AES_GCM_8: 8, EncrId.ENCR_AES_GCM_12: 12, EncrId.ENCR_AES_GCM_16: 16}
_TYPE_ORDER = (TransformType.ENCR, TransformType.INTEG, TransformType.PRF, TransformType.DH,
               TransformType.ESN)


def _names() -> dict[tuple[TransformType, int], str]:
    names = dict(_EXTRA_NAMES)
    for table in (_IKE_INTEG, _PRF, _DH, _ESN):
        for token, t in table.items():
            names.setdefault((t.type, t.id), token)
    return names


_NAMES = _names()


def transform_token(t: Transform) -> str:
    """One transform as a strongSwan proposal token ("aes256", "sha256",
    "prfsha256", "ecp256", "noesn"); an unknown one as its type and ID."""
    tt = TransformType(t.type)
    if tt == TransformType.ENCR:
        bits = t.key_length or 0
        if t.id == EncrId.ENCR_AES_CBC:
            return f"aes{bits}"
        if t.id == EncrId.ENCR_AES_CTR:
            return f"aes{bits}ctr"
        if t.id in _GCM_ICV:
            return f"aes{bits}gcm{_GCM_ICV[EncrId(t.id)]}"
        if t.id == EncrId.ENCR_CHACHA20_POLY1305:
            return "chacha20poly1305"
    name = _NAMES.get((tt, t.id))
    if name is not None:
        return name
    return f"{tt.name.lower()}{t.id}" + (f"_{t.key_length}" if t.key_length else "")


def format_proposal(p: Proposal) -> str:
    """A proposal in strongSwan's syntax, e.g. "aes128-sha256-prfsha256-modp2048"."""
    ordered = sorted(p.transforms, key=lambda t: _TYPE_ORDER.index(t.type)
                     if t.type in _TYPE_ORDER else len(_TYPE_ORDER))
    return "-".join(transform_token(t) for t in ordered) or "(empty)"


#: a peer's proposals in one log line, at most (the rest are counted)
MAX_LOGGED_PROPOSALS = 8


def format_proposals(proposals: list[Proposal]) -> str:
    """Proposals as strongSwan writes them in a config, comma-separated; a
    hostile peer's long list is cut after MAX_LOGGED_PROPOSALS."""
    text = ", ".join(format_proposal(p) for p in proposals[:MAX_LOGGED_PROPOSALS])
    more = len(proposals) - MAX_LOGGED_PROPOSALS
    return (text or "(none)") + (f" (+{more} more)" if more > 0 else "")
