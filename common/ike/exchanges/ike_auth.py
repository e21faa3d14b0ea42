"""IKE_AUTH with pre-shared keys or certificates, and the first child SA
(RFC 7296 §1.2, §2.15; RFC 7427 signatures, see common/ike/certs.py).

    Initiator                         Responder
    HDR, SK {IDi, [CERT,] [CERTREQ,] [IDr,] AUTH, SAi2, TSi, TSr,
             N(IKEV2_MESSAGE_ID_SYNC_SUPPORTED)}  -->
                          <--    HDR, SK {IDr, [CERT,] AUTH, SAr2, TSi, TSr,
                                          N(IKEV2_MESSAGE_ID_SYNC_SUPPORTED)}

Each side proves itself as its connection says (``local_auth``) and checks the
other as it says (``remote_auth``): PSK one way and a certificate the other is
fine. A failed check ends the half-open SA: the responder answers
N(AUTHENTICATION_FAILED) and logs one line naming the identity and the check.
EAP (an IKE_AUTH request without AUTH) is refused the same way.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass

from common.errors import LocalProtocolError
from common.ike.certs import check_peer, sign_auth
from common.ike.constants import (
    AuthMethod,
    CertEncoding,
    CfgAttr,
    CfgType,
    ExchangeType,
    IdType,
    NotifyType,
)
from common.ike.exchanges.child_sa import (
    ChildOffer,
    finish_initiated_child,
    offer_child,
    respond_child,
)
from common.ike.keys import KEY_PAD, auth_octets, prf
from common.ike.message import IkeMessage
from common.ike.payloads import (
    AuthPayload,
    CertPayload,
    CertReqPayload,
    CfgAttribute,
    CpPayload,
    IdiPayload,
    IdrPayload,
    NotifyPayload,
    Payload,
)
from common.ike.policy import ChildPolicy, IkePolicy, format_identity
from common.ike.refusals import ChildRefused, Refused, notify_for
from common.ike.sa import IkeSa

log = logging.getLogger("ipsec_cluster.ike")


def id_body(id_type: IdType, data: bytes) -> bytes:
    """RestOfIDPayload of RFC 7296 §2.15: ID type, three reserved bytes, data."""
    return bytes([int(id_type), 0, 0, 0]) + data


def _octets(sa: IkeSa, *, ours: bool, ident: tuple[IdType, bytes]) -> bytes:
    """What the signer of an AUTH payload signs or MACs (RFC 7296 §2.15)."""
    if sa.suite is None or sa.keys is None:
        raise LocalProtocolError("IKE_AUTH before keys")
    # The signer's first message and the other side's nonce (§2.15).
    signer_is_initiator = sa.initiator if ours else not sa.initiator
    message = sa.init_request if signer_is_initiator else sa.init_response
    nonce = sa.nr if signer_is_initiator else sa.ni
    sk_p = sa.keys.sk_pi if signer_is_initiator else sa.keys.sk_pr
    return auth_octets(sa.suite.prf, message, nonce, sk_p, id_body(*ident))


def _psk_mac(sa: IkeSa, policy: IkePolicy, octets: bytes) -> bytes:
    """prf(prf(Shared Secret, "Key Pad for IKEv2"), <octets>) (RFC 7296 §2.15)."""
    if sa.suite is None:
        raise LocalProtocolError("IKE_AUTH before keys")
    return prf(sa.suite.prf, prf(sa.suite.prf, policy.psk, KEY_PAD), octets)


def _our_proof(sa: IkeSa, policy: IkePolicy) -> tuple[list[Payload], AuthPayload]:
    """Our CERT payloads (if we use a certificate) and AUTH payload."""
    octets = _octets(sa, ours=True, ident=policy.local_id)
    if policy.local_auth != "pubkey":
        return [], AuthPayload(AuthMethod.SHARED_KEY_MIC, _psk_mac(sa, policy, octets))
    if policy.credential is None:
        raise LocalProtocolError(f"connection {policy.name}: pubkey without a credential")
    method, data = sign_auth(policy.credential, octets, sa.peer_hash_algs)
    certs: list[Payload] = [CertPayload(CertEncoding.X509_SIGNATURE, der)
                            for der in policy.credential.chain]
    return certs, AuthPayload(method, data)


def _certreq(policy: IkePolicy) -> list[Payload]:
    if policy.remote_auth != "pubkey" or policy.anchors is None:
        return []
    return [CertReqPayload(CertEncoding.X509_SIGNATURE, policy.anchors.certreq_data())]


def _kind(policy: IkePolicy) -> str:
    return "PSK" if policy.remote_auth == "psk" else "certificate"


def _check_peer(sa: IkeSa, policy: IkePolicy, msg: IkeMessage, ident: tuple[IdType, bytes],
                auth: AuthPayload) -> str:
    """Why the peer's proof fails (one phrase for the log), "" when it holds."""
    octets = _octets(sa, ours=False, ident=ident)
    if policy.remote_auth != "pubkey":
        if auth.method != AuthMethod.SHARED_KEY_MIC:
            return f"it uses auth method {auth.method.name}; the connection expects a PSK"
        if not hmac.compare_digest(_psk_mac(sa, policy, octets), auth.data):
            return "AUTH payload does not match (wrong pre-shared key?)"
        return ""
    if auth.method == AuthMethod.SHARED_KEY_MIC:
        return "it uses a PSK; the connection expects a certificate (remote_auth = pubkey)"
    utc_now = sa.ctx.options.utc_now
    if policy.anchors is None or utc_now is None:
        return "no trust anchors or no wall clock to check certificates with"
    certs = [c.data for c in msg.get_all(CertPayload)
             if c.encoding == CertEncoding.X509_SIGNATURE]
    return check_peer(certs, policy.anchors, utc_now(), ident, format_identity(*ident),
                      auth.method, auth.data, octets)


@dataclass(slots=True)
class IkeAuthTask:
    exchange = ExchangeType.IKE_AUTH
    name = "ike_auth"
    child: ChildPolicy | None = None
    offer: ChildOffer | None = None
    #: RFC 7296 §2.4: "this is the only IKE SA between us": the responder may
    #: delete the others of the same identities. Off for a second, parallel SA.
    initial_contact: bool = True

    def build(self, sa: IkeSa, now: float) -> list[Payload] | None:
        policy = sa.policy
        if policy is None:
            return None
        certs, auth = _our_proof(sa, policy)
        payloads: list[Payload] = [IdiPayload(*policy.local_id), *certs, *_certreq(policy)]
        if self.initial_contact:
            payloads.append(NotifyPayload(NotifyType.INITIAL_CONTACT))
        if policy.remote_id is not None:
            payloads.append(IdrPayload(*policy.remote_id))
        payloads.append(auth)
        if self.child is not None:
            self.offer = offer_child(sa, self.child, in_auth=True)
            payloads += self.offer.payloads
        payloads.append(NotifyPayload(NotifyType.IKEV2_MESSAGE_ID_SYNC_SUPPORTED))
        return payloads

    def process(self, sa: IkeSa, msg: IkeMessage, now: float) -> None:
        policy = sa.policy
        if policy is None:
            return
        if msg.has_notify(NotifyType.AUTHENTICATION_FAILED):
            self._release()
            hint = ("wrong PSK or identity?" if policy.local_auth == "psk"
                    else "our certificate refused or wrong identity?")
            sa.fail(f"peer answered AUTHENTICATION_FAILED ({hint})")
            return
        idr, auth = msg.get(IdrPayload), msg.get(AuthPayload)
        if idr is None or auth is None:
            self._release()
            sa.fail("IKE_AUTH response without IDr or AUTH")
            return
        ident = (idr.id_type, idr.data)
        if not policy.matches_remote_id(*ident):
            self._release()
            sa.fail(f"responder identity {format_identity(*ident)} is not the configured one")
            return
        problem = _check_peer(sa, policy, msg, ident, auth)
        if problem:
            self._release()
            sa.fail(f"responder {format_identity(*ident)} failed {_kind(policy)} "
                    f"authentication: {problem}")
            return
        sa.peer_id = ident
        sa.peer_mid_sync = msg.has_notify(NotifyType.IKEV2_MESSAGE_ID_SYNC_SUPPORTED)
        sa.establish(now)
        if self.offer is not None:
            finish_initiated_child(sa, self.offer, msg, now, in_auth=True)

    def failed(self, sa: IkeSa, now: float) -> None:
        self._release()

    def _release(self) -> None:
        if self.offer is not None:
            self.offer.release()


#: RFC 7296 §3.15.1: the address attribute and the DNS attribute of each family;
#: an INTERNAL_IP6_ADDRESS value is the address and a one-octet prefix length.
_ADDR_ATTR = {4: CfgAttr.INTERNAL_IP4_ADDRESS, 6: CfgAttr.INTERNAL_IP6_ADDRESS}
_DNS_ATTR = {4: CfgAttr.INTERNAL_IP4_DNS, 6: CfgAttr.INTERNAL_IP6_DNS}
_ADDR_LEN = {4: 4, 6: 17}
_IP6_PREFIX_LEN = 128


def _requested(attr: CfgAttribute, version: int) -> ipaddress.IPv4Address | \
        ipaddress.IPv6Address | None:
    """The address a CFG_REQUEST asks for (None: any, or a malformed value,
    which we answer like "any")."""
    if len(attr.value) != _ADDR_LEN[version]:
        return None
    raw = attr.value[:4] if version == 4 else attr.value[:16]
    addr = ipaddress.ip_address(raw)
    return None if addr.is_unspecified else addr


def answer_cp(sa: IkeSa, msg: IkeMessage) -> list[Payload]:
    """RFC 7296 §3.15: a CFG_REQUEST for INTERNAL_IP4/IP6_ADDRESS gets a
    CFG_REPLY with an address from the connection's pools (the partition of
    this IKE SA's segment) and their DNS servers. Without pools the request is
    ignored (§3.15.4: the responder may). No address free: the child is
    refused with INTERNAL_ADDRESS_FAILURE; the IKE SA stays (§3.15.4)."""
    cp, policy, pools = msg.get(CpPayload), sa.policy, sa.ctx.pools
    if cp is None or cp.cfg_type != CfgType.CFG_REQUEST or policy is None \
            or not policy.pools or pools is None:
        return []
    holder = sa.peer_id[1] if sa.peer_id is not None else b""
    segment = pools.segment_of_spi(sa.spi_i if sa.initiator else sa.spi_r)
    wanted = {a.attr_type for a in cp.attributes}
    reply: list[CfgAttribute] = []
    for version in (4, 6):
        ask = next((a for a in cp.attributes if a.attr_type == _ADDR_ATTR[version]), None)
        if ask is None:
            continue
        lease = pools.lease(policy.pools, version, segment, holder, _requested(ask, version))
        if lease is None:
            continue
        sa.leases += (lease,)
        value = lease.address.packed + (b"" if version == 4 else bytes([_IP6_PREFIX_LEN]))
        reply.append(CfgAttribute(_ADDR_ATTR[version], value))
        log.info("IKE SA %d: leased %s from pool %s to %s", sa.ike_id, lease.address,
                 lease.pool, format_identity(*sa.peer_id) if sa.peer_id else "?")
    if not reply:
        log.info("IKE SA %d: no address free in pools %s (segment %d)", sa.ike_id,
                 ",".join(policy.pools), segment)
        raise ChildRefused(NotifyType.INTERNAL_ADDRESS_FAILURE, "address pools exhausted")
    for version in (4, 6):
        if _DNS_ATTR[version] in wanted or any(le.address.version == version
                                               for le in sa.leases):
            reply += [CfgAttribute(_DNS_ATTR[version], a.packed)
                      for a in pools.dns(policy.pools, version)]
    return [CpPayload(CfgType.CFG_REPLY, reply)]


def handle_auth_request(sa: IkeSa, msg: IkeMessage, now: float) -> list[Payload]:
    idi, auth, idr = msg.get(IdiPayload), msg.get(AuthPayload), msg.get(IdrPayload)
    if idi is None or auth is None:
        sa.fail(f"IKE_AUTH from {sa.remote[0]} without IDi or AUTH: EAP is not supported")
        raise Refused(NotifyType.AUTHENTICATION_FAILED)
    ident = (idi.id_type, idi.data)
    who = format_identity(*ident)
    policy = next((p for p in sa.candidates if p.matches_remote_id(*ident) and (
        idr is None or p.local_id == (idr.id_type, idr.data))), None)
    if policy is None:
        sa.fail(f"no connection matches IDi={who} from {sa.remote[0]}")
        raise Refused(NotifyType.AUTHENTICATION_FAILED)
    sa.policy = policy
    problem = _check_peer(sa, policy, msg, ident, auth)
    if problem:
        sa.fail(f"peer {who} at {sa.remote[0]} failed {_kind(policy)} authentication for "
                f"connection '{policy.name}': {problem}")
        raise Refused(NotifyType.AUTHENTICATION_FAILED)
    sa.peer_id = ident
    sa.peer_mid_sync = msg.has_notify(NotifyType.IKEV2_MESSAGE_ID_SYNC_SUPPORTED)
    sa.establish(now)
    if msg.has_notify(NotifyType.INITIAL_CONTACT):
        # RFC 7296 §2.4: the peer holds no other IKE SA with us (it restarted).
        sa.ctx.initial_contact.append(sa)
    certs, our_auth = _our_proof(sa, policy)
    payloads: list[Payload] = [IdrPayload(*policy.local_id), *certs, our_auth]
    try:
        payloads += answer_cp(sa, msg)
        payloads += respond_child(sa, msg, now, in_auth=True, rekeyed=None)
    except ChildRefused as exc:
        # The IKE SA is up; only the child is refused (RFC 7296 §1.2).
        payloads.append(notify_for(exc))
    payloads.append(NotifyPayload(NotifyType.IKEV2_MESSAGE_ID_SYNC_SUPPORTED))
    return payloads
