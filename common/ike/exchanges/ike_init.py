"""IKE_SA_INIT (RFC 7296 §1.2, §2.6 cookies, §2.23 NAT traversal).

    Initiator                         Responder
    HDR, SAi1, KEi, Ni,
      N(NAT_DETECTION_*)    -->
                          <--    HDR, SAr1, KEr, Nr, N(NAT_DETECTION_*)

We always use UDP encapsulation (RFC 3948), as strongSwan's libipsec does: our
NAT_DETECTION_SOURCE_IP hash is random, so both sides see a NAT and float to
the NAT-T port. The data plane therefore never needs raw ESP sockets.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field

from common.errors import LocalProtocolError, RemoteProtocolError
from common.ike.certs import hash_algorithms_data, parse_hash_algorithms
from common.ike.constants import (
    CertEncoding,
    DhId,
    ExchangeType,
    NotifyType,
    ProtocolId,
    TransformType,
)
from common.ike.context import Address, IkeContext, IkeInput, IkeState
from common.ike.cookies import CookieJar
from common.ike.describe import format_proposals
from common.ike.dh import dh_generate
from common.ike.events import IkeSaFailed
from common.ike.keys import derive_ike_keys, nat_detection_hash
from common.ike.limits import EngineLimits
from common.ike.message import IkeMessage, encode_message
from common.ike.payloads import (
    CertReqPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
)
from common.ike.policy import IkePolicy
from common.ike.proposals import choose_proposal, ike_suite, proposal_matches
from common.ike.refusals import Refused, notify_for
from common.ike.sa import IkeSa
from common.ike.transforms import Proposal

log = logging.getLogger("ipsec_cluster.ike")

ZERO_SPI = b"\x00" * 8
MAX_INIT_RETRIES = 4


def numbered(proposals: list[Proposal], spi: bytes = b"") -> list[Proposal]:
    """Our proposals renumbered 1..n with the given SPI (RFC 7296 §3.3.1)."""
    return [Proposal(i, p.protocol, spi, list(p.transforms))
            for i, p in enumerate(proposals, 1)]


def first_group(proposals: list[Proposal]) -> DhId:
    for p in proposals:
        for t in p.of_type(TransformType.DH):
            if t.id != DhId.NONE:
                return DhId(t.id)
    return DhId.NONE


def nat_payloads(ctx: IkeContext[IkeSa], spi_i: bytes, spi_r: bytes, dst: Address) -> list[Payload]:
    """NAT_DETECTION_SOURCE_IP with a random hash (forces NAT-T, like
    libipsec), NAT_DETECTION_DESTINATION_IP with the real hash."""
    dst_ip = ipaddress.ip_address(dst[0]).packed
    return [
        NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, data=ctx.random(20)),
        NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP,
                      data=nat_detection_hash(spi_i, spi_r, dst_ip, dst[1])),
    ]


@dataclass(slots=True)
class IkeInitTask:
    exchange = ExchangeType.IKE_SA_INIT
    name = "ike_init"
    group: DhId = DhId.NONE
    cookie: bytes = b""
    retries: int = 0
    nat: list[Payload] = field(default_factory=list)

    def build(self, sa: IkeSa, now: float) -> list[Payload] | None:
        if sa.policy is None:
            return None
        if self.group == DhId.NONE:
            self.group = first_group(sa.policy.proposals)
        # RFC 7296 §2.6: a retry after COOKIE is the same request with the
        # cookie in front: same KE value, nonce and NAT hashes. Only an
        # INVALID_KE_PAYLOAD retry (another group) needs a new KE value.
        if sa.dh is None or sa.dh.group != self.group:
            sa.dh = dh_generate(self.group, sa.ctx.random)
        if not sa.ni:
            sa.ni = sa.nonce()
        if not self.nat:
            self.nat = nat_payloads(sa.ctx, sa.spi_i, ZERO_SPI, sa.remote)
        payloads: list[Payload] = []
        if self.cookie:
            # RFC 7296 §2.6: the COOKIE notify comes first.
            payloads.append(NotifyPayload(NotifyType.COOKIE, data=self.cookie))
        payloads += [
            SaPayload(numbered(sa.policy.proposals)),
            KePayload(self.group, sa.dh.public),
            NoncePayload(sa.ni),
        ]
        payloads += self.nat
        if sa.policy.fragmentation != "no":
            # RFC 7383 §2.3
            payloads.append(NotifyPayload(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED))
        payloads += certificate_payloads([sa.policy], None)
        return payloads

    def process(self, sa: IkeSa, msg: IkeMessage, now: float) -> None:
        if sa.policy is None:
            return
        cookie = msg.notify(NotifyType.COOKIE)
        invalid_ke = msg.notify(NotifyType.INVALID_KE_PAYLOAD)
        if (cookie is not None or invalid_ke is not None) and self.retries < MAX_INIT_RETRIES:
            self.retries += 1
            if cookie is not None:
                self.cookie = cookie.data
            if invalid_ke is not None:
                # RFC 7296 §3.10.1: two octets; anything else names no group.
                wanted = int.from_bytes(invalid_ke.data, "big") if len(
                    invalid_ke.data) == 2 else -1
                if wanted == self.group or not offered_group(sa.policy, wanted):
                    sa.fail(f"peer wants DH group {wanted}, which we did not offer")
                    return
                self.group = DhId(wanted)
            sa.apply(IkeInput.RETRY_INIT)
            payloads = self.build(sa, now)
            if payloads is not None:
                # RFC 7296 §2.6 / §1.2: the retry starts over with message ID 0.
                sa.mids.send_next = 1
                sa.restart_request(self, payloads, now, 0)
            return
        for n in msg.get_all(NotifyPayload):
            if n.notify_type.is_error:
                sa.fail(f"peer refused IKE_SA_INIT: {n.notify_type.name}")
                return
        try:
            self._complete(sa, msg)
        except (RemoteProtocolError, ValueError) as exc:
            sa.fail(f"bad IKE_SA_INIT response: {exc}")
            return
        sa.apply(IkeInput.INIT_DONE)
        # Float to the NAT-T port (RFC 7296 §2.23, RFC 3948).
        opts = sa.ctx.options
        sa.local_port = opts.natt_port
        if sa.remote[1] == 500:
            sa.remote = (sa.remote[0], 4500)

    def failed(self, sa: IkeSa, now: float) -> None:
        pass

    def _complete(self, sa: IkeSa, msg: IkeMessage) -> None:
        if sa.policy is None or sa.dh is None:
            raise LocalProtocolError("IKE_SA_INIT response before our request was built")
        sa_p, ke, nonce = msg.get(SaPayload), msg.get(KePayload), msg.get(NoncePayload)
        if sa_p is None or ke is None or nonce is None or len(sa_p.proposals) != 1:
            raise RemoteProtocolError("IKE_SA_INIT response lacks SA, KE or Nonce")
        chosen = sa_p.proposals[0]
        if not proposal_matches(numbered(sa.policy.proposals), chosen):
            raise RemoteProtocolError("responder chose a proposal we did not offer")
        suite = ike_suite(chosen)
        if ke.group != suite.dh or ke.group != self.group:
            raise RemoteProtocolError(f"KE group {ke.group} does not match {suite.dh}")
        shared = sa.dh.shared_secret(ke.data)
        sa.nr = nonce.data
        sa.peer_hash_algs = peer_hash_algorithms(msg)
        sa.spi_r = msg.spi_r
        sa.init_request = sa.last_request
        sa.init_response = sa.last_message
        sa.peer_fragmentation = (sa.policy.fragmentation != "no" and msg.has_notify(
            NotifyType.IKEV2_FRAGMENTATION_SUPPORTED))
        sa.install_keys(suite, derive_ike_keys(suite, sa.ni, sa.nr, shared, sa.spi_i, sa.spi_r))


def peer_hash_algorithms(msg: IkeMessage) -> frozenset[int] | None:
    n = msg.notify(NotifyType.SIGNATURE_HASH_ALGORITHMS)
    return None if n is None else parse_hash_algorithms(n.data)


def certificate_payloads(policies: list[IkePolicy], request: IkeMessage | None) -> list[Payload]:
    """N(SIGNATURE_HASH_ALGORITHMS) when certificates may be used (RFC 7427
    §4; the responder answers only an initiator that sent it), and in a
    response, CERTREQ naming our trust anchors (RFC 7296 §3.7) so that the
    initiator sends its certificate."""
    out: list[Payload] = []
    if any(p.uses_certificates for p in policies) and (
            request is None or peer_hash_algorithms(request) is not None):
        out.append(NotifyPayload(NotifyType.SIGNATURE_HASH_ALGORITHMS,
                                 data=hash_algorithms_data()))
    if request is not None:
        hashes = b"".join(dict.fromkeys(p.anchors.certreq_data() for p in policies
                                        if p.anchors is not None and p.remote_auth == "pubkey"))
        if hashes:
            out.append(CertReqPayload(CertEncoding.X509_SIGNATURE, hashes))
    return out


def offered_group(policy: IkePolicy, group: int) -> bool:
    return any(t.id == group for p in policy.proposals for t in p.of_type(TransformType.DH))


@dataclass(slots=True)
class InitResult:
    """What the engine does with an IKE_SA_INIT request: a new half-open SA,
    or just an unprotected answer (COOKIE, INVALID_KE_PAYLOAD, an error)."""

    sa: IkeSa | None
    response: bytes
    #: why no SA was made and nothing is answered (a common/ike/limits.py reason)
    refused: str = ""


def error_answer(spi_i: bytes, exchange: ExchangeType, message_id: int,
                 exc: RemoteProtocolError) -> bytes:
    """An unprotected answer carrying the notify for ``exc``, with no state
    kept (RFC 7296 §2.6, §2.21.1; §1.5 for INVALID_MAJOR_VERSION)."""
    answer = IkeMessage(spi_i=spi_i, spi_r=ZERO_SPI, exchange=exchange, message_id=message_id,
                        is_response=True, is_initiator=False, payloads=[notify_for(exc)])
    return encode_message(answer)


def _error_answer(msg: IkeMessage, notify: NotifyType, data: bytes = b"") -> bytes:
    return error_answer(msg.spi_i, ExchangeType.IKE_SA_INIT, 0, Refused(notify, data=data))


def handle_init_request(ctx: IkeContext[IkeSa], policies: list[IkePolicy], cookies: CookieJar,
                        half_open: int, msg: IkeMessage, raw: bytes, remote: Address,
                        local_port: int, now: float,
                        limits: EngineLimits | None = None) -> InitResult:
    """Responder side of IKE_SA_INIT. ``limits``: the caps and per-source rate
    a new half-open SA must pass (RFC 8019 §4), checked before any state or
    Diffie-Hellman work."""
    candidates = [p for p in policies if p.matches_address(remote[0])]
    if not candidates:
        log.info("IKE_SA_INIT from %s: no connection for this address", remote[0])
        return InitResult(None, _error_answer(msg, NotifyType.NO_PROPOSAL_CHOSEN))
    sa_p, ke, nonce = msg.get(SaPayload), msg.get(KePayload), msg.get(NoncePayload)
    if sa_p is None or ke is None or nonce is None:
        return InitResult(None, _error_answer(msg, NotifyType.INVALID_SYNTAX))
    ip = ipaddress.ip_address(remote[0]).packed
    if half_open >= ctx.options.cookie_threshold:
        first = msg.payloads[0] if msg.payloads else None
        if not (isinstance(first, NotifyPayload) and first.notify_type == NotifyType.COOKIE
                and cookies.check(first.data, nonce.data, ip, msg.spi_i)):
            # RFC 7296 §2.6: under load, ask for a cookie before keeping state.
            return InitResult(None, _error_answer(
                msg, NotifyType.COOKIE, cookies.make(nonce.data, ip, msg.spi_i)))
    ours = [p for c in candidates for p in c.proposals]
    theirs = [p for p in sa_p.proposals if p.protocol == ProtocolId.IKE]
    chosen = choose_proposal(numbered(ours), theirs)
    if chosen is None:
        reason = (f"no common proposal (NO_PROPOSAL_CHOSEN): received proposals: "
                  f"{format_proposals(theirs)}; configured proposals: {format_proposals(ours)}")
        log.info("IKE_SA_INIT from %s: %s", remote[0], reason)
        # no SA is kept (ike_id 0), yet the attempt failed: an event (IKE_FAILED)
        ctx.events.append(IkeSaFailed(0, candidates[0].name, remote, reason))
        return InitResult(None, _error_answer(msg, NotifyType.NO_PROPOSAL_CHOSEN))
    suite = ike_suite(chosen)
    if ke.group != suite.dh:
        return InitResult(None, _error_answer(
            msg, NotifyType.INVALID_KE_PAYLOAD, int(suite.dh).to_bytes(2, "big")))
    timeout = ctx.options.half_open_timeout_s
    if limits is not None:
        refused = limits.admit_half_open(remote[0], half_open, now, 2 * len(raw),
                                         pressure=half_open >= ctx.options.cookie_threshold)
        if refused is not None:
            return InitResult(None, b"", refused)
        timeout = limits.half_open_timeout(timeout, half_open, ctx.options.cookie_threshold)
    sa = IkeSa(ctx, initiator=False, spi_i=msg.spi_i, spi_r=ctx.spis.allocate_ike(),
               remote=remote, local_port=local_port, state=IkeState.HALF_OPEN,
               policy=candidates[0], candidates=candidates)
    sa.created_at = sa.last_heard = now
    sa.half_open_deadline = now + timeout
    dh = dh_generate(suite.dh, ctx.random)
    shared = dh.shared_secret(ke.data)
    sa.ni, sa.nr = nonce.data, sa.nonce()
    sa.install_keys(suite, derive_ike_keys(suite, sa.ni, sa.nr, shared, sa.spi_i, sa.spi_r))
    # install_keys set sk_out, but IKE_SA_INIT itself goes out in clear.
    sk_out, sa.sk_out = sa.sk_out, None
    payloads: list[Payload] = [SaPayload([chosen]), KePayload(suite.dh, dh.public),
                               NoncePayload(sa.nr)]
    payloads += nat_payloads(ctx, sa.spi_i, sa.spi_r, remote)
    # RFC 7383 §2.3: announced back only to a peer that announced it.
    if msg.has_notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) and any(
            p.fragmentation != "no" for p in candidates):
        sa.peer_fragmentation = True
        payloads.append(NotifyPayload(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED))
    payloads += certificate_payloads(candidates, msg)
    sa.peer_hash_algs = peer_hash_algorithms(msg)
    response = sa.encode(ExchangeType.IKE_SA_INIT, 0, True, payloads)
    sa.sk_out = sk_out
    sa.init_request, sa.init_response = raw, response
    sa.mids.sent_response(0, response)
    return InitResult(sa, response)
