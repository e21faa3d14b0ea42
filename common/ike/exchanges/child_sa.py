"""Child SAs: the first one in IKE_AUTH, new ones and rekeys in CREATE_CHILD_SA
(RFC 7296 §1.3.1, §1.3.3, §2.8, §2.9, §2.17).

    Initiator                         Responder
    HDR, SK {[N(REKEY_SA),] SA, Ni, [KEi,] TSi, TSr}  -->
                          <--    HDR, SK {SA, Nr, [KEr,] TSi, TSr}

Rekey collisions (§2.8.1): when both ends rekey the same child at once, the
new SA created with the lowest of the four nonces is redundant and is deleted
by the end that created it; the other end's initiator deletes the old SA.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field

from common.errors import LocalProtocolError, RemoteProtocolError
from common.ike.child import ChildSa
from common.ike.constants import DhId, ExchangeType, NotifyType, ProtocolId, TransformType
from common.ike.context import ChildInput, ChildState, IkeContext
from common.ike.describe import format_proposals
from common.ike.dh import DhKeyPair, dh_generate
from common.ike.events import ChildSaFailed, ChildSaInstalled
from common.ike.exchanges.informational import ChildDeleteTask, RefusedChildDeleteTask
from common.ike.keys import derive_child_keymat
from common.ike.limits import CHILD_SA_MAX_PER_IKE_SA, DROP_NO_ADDITIONAL_SAS
from common.ike.message import IkeMessage
from common.ike.payloads import (
    MAX_SELECTORS,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
    TsiPayload,
    TsrPayload,
)
from common.ike.policy import ChildPolicy
from common.ike.proposals import EspSuite, choose_proposal, esp_suite, proposal_matches
from common.ike.refusals import ChildRefused, Refused
from common.ike.sa import IkeSa
from common.ike.transforms import Proposal, Transform
from common.ike.ts import TrafficSelector, narrow, ts_from_cidr, within

log = logging.getLogger("ipsec_cluster.ike")

#: a refused child rekey is tried again this much later
REKEY_RETRY_S = 10.0


#: We run tunnel mode only (the data plane has no transport mode).
TRANSPORT_MODE_REFUSED = "transport mode requested, not supported"


class ChildUnacceptable(ChildRefused):
    """The responder's answer created a child we cannot take (traffic
    selectors wider than we offered, RFC 7296 §2.9; transport mode we did not
    ask for, §1.3.1): we delete it."""

    def __init__(self, reason: str, notify: NotifyType = NotifyType.TS_UNACCEPTABLE) -> None:
        super().__init__(notify, reason)


def _strip_dh(p: Proposal) -> list[Transform]:
    return [t for t in p.transforms if t.type != TransformType.DH]


def esp_proposals(policy: ChildPolicy, spi: int, *, in_auth: bool) -> list[Proposal]:
    """Our ESP proposals, numbered, with our inbound SPI. IKE_AUTH carries no
    KE, so DH transforms (PFS) are left out there (RFC 7296 §1.2)."""
    out = []
    for i, p in enumerate(policy.esp_proposals, 1):
        transforms = _strip_dh(p) if in_auth else list(p.transforms)
        out.append(Proposal(i, ProtocolId.ESP, spi.to_bytes(4, "big"), transforms))
    return out


def _pfs_group(proposals: list[Proposal]) -> DhId:
    for p in proposals:
        for t in p.of_type(TransformType.DH):
            if t.id != DhId.NONE:
                return DhId(t.id)
    return DhId.NONE


@dataclass(slots=True)
class ChildOffer:
    """What we proposed for one child SA, kept until the answer comes."""

    ctx: IkeContext[IkeSa]
    policy: ChildPolicy
    spi_in: int
    proposals: list[Proposal]
    local_ts: list[TrafficSelector]
    remote_ts: list[TrafficSelector]
    ni: bytes = b""
    dh: DhKeyPair | None = None
    replaces: int | None = None
    payloads: list[Payload] = field(default_factory=list)
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.ctx.spis.release_esp(self.spi_in)


def offer_child(sa: IkeSa, policy: ChildPolicy, *, in_auth: bool,
                group: DhId | None = None, replaces: ChildSa | None = None) -> ChildOffer:
    spi = sa.ctx.spis.allocate_esp()
    proposals = esp_proposals(policy, spi, in_auth=in_auth)
    local_ts = list(replaces.local_ts) if replaces else list(policy.local_ts)
    remote_ts = list(replaces.remote_ts) if replaces else list(policy.remote_ts)
    offer = ChildOffer(sa.ctx, policy, spi, proposals, local_ts, remote_ts,
                       replaces=replaces.spi_in if replaces else None)
    payloads: list[Payload] = []
    if replaces is not None:
        payloads.append(NotifyPayload(NotifyType.REKEY_SA, ProtocolId.ESP,
                                      replaces.spi_in.to_bytes(4, "big")))
    payloads.append(SaPayload(proposals))
    if not in_auth:
        offer.ni = sa.nonce()
        payloads.append(NoncePayload(offer.ni))
        pfs = group if group is not None else _pfs_group(proposals)
        if pfs != DhId.NONE:
            offer.dh = dh_generate(pfs, sa.ctx.random)
            payloads.append(KePayload(pfs, offer.dh.public))
    payloads += [TsiPayload(local_ts), TsrPayload(remote_ts)]
    offer.payloads = payloads
    return offer


def install_child(sa: IkeSa, policy: ChildPolicy, suite: EspSuite, spi_in: int, spi_out: int,
                  keymat_in: bytes, keymat_out: bytes, local_ts: list[TrafficSelector],
                  remote_ts: list[TrafficSelector], now: float,
                  replaces: int | None, *, initiator: bool = True) -> ChildSa:
    child = ChildSa(policy.name, spi_in, spi_out, suite, tuple(local_ts), tuple(remote_ts),
                    keymat_in, keymat_out, installed_at=now)
    if policy.rekey_time > 0:
        child.rekey_at = now + policy.rekey_time
    sa.children[spi_in] = child
    sa.ctx.events.append(ChildSaInstalled(
        sa.ike_id, policy.name, spi_in, spi_out, suite.transform, suite.esn, keymat_in,
        keymat_out, child.local_ts, child.remote_ts, sa.remote, replaces, initiator))
    return child


def _keymat(sa: IkeSa, suite: EspSuite, ni: bytes, nr: bytes,
            shared: bytes | None) -> tuple[bytes, bytes]:
    if sa.suite is None or sa.keys is None:
        raise LocalProtocolError("child SA keys before IKE keys")
    return derive_child_keymat(sa.suite.prf, sa.keys.sk_d, ni, nr, suite, shared)


def finish_initiated_child(sa: IkeSa, offer: ChildOffer, msg: IkeMessage, now: float, *,
                           in_auth: bool) -> ChildSa | None:
    """Initiator: take the responder's answer to our child SA offer."""
    try:
        return _finish(sa, offer, msg, now, in_auth=in_auth)
    except ChildUnacceptable as exc:
        # The SPI stays ours until the peer has deleted its half.
        sa.queue_task(RefusedChildDeleteTask(offer.spi_in), now)
        offer.released = True
        sa.ctx.events.append(ChildSaFailed(sa.ike_id, offer.policy.name,
                                           f"{exc} ({NotifyType(exc.notify_type).name})"))
        return None
    except (RemoteProtocolError, ValueError) as exc:
        offer.release()
        sa.ctx.events.append(ChildSaFailed(sa.ike_id, offer.policy.name, str(exc)))
        return None


def _finish(sa: IkeSa, offer: ChildOffer, msg: IkeMessage, now: float, *,
            in_auth: bool) -> ChildSa:
    for n in msg.get_all(NotifyPayload):
        if n.notify_type.is_error:
            raise ChildRefused(n.notify_type, f"peer refused the child SA: {n.notify_type.name}")
    sa_p, tsi, tsr = msg.get(SaPayload), msg.get(TsiPayload), msg.get(TsrPayload)
    if sa_p is None or tsi is None or tsr is None or len(sa_p.proposals) != 1:
        raise ChildRefused(NotifyType.INVALID_SYNTAX, "child SA answer without SA, TSi or TSr")
    if msg.has_notify(NotifyType.USE_TRANSPORT_MODE):
        # §1.3.1: only an answer to a request that asked for it may say so;
        # the peer's half would not be the tunnel ours is.
        raise ChildUnacceptable("peer answered in transport mode, which we did not request",
                                NotifyType.NO_PROPOSAL_CHOSEN)
    chosen = sa_p.proposals[0]
    if not proposal_matches(offer.proposals, chosen) or len(chosen.spi) != 4:
        raise ChildRefused(NotifyType.NO_PROPOSAL_CHOSEN, "peer chose an ESP proposal we "
                           "did not offer")
    suite = esp_suite(chosen)
    if not (tsi.selectors and tsr.selectors and within(tsi.selectors, offer.local_ts)
            and within(tsr.selectors, offer.remote_ts)):
        # §2.9: the responder may narrow, never widen. It has installed the
        # child already: refuse it and delete it (ChildUnacceptable).
        raise ChildUnacceptable("peer widened the traffic selectors")
    local_ts = list(tsi.selectors)
    remote_ts = list(tsr.selectors)
    shared: bytes | None = None
    if in_auth:
        ni, nr = sa.ni, sa.nr
    else:
        nonce = msg.get(NoncePayload)
        if nonce is None:
            raise ChildRefused(NotifyType.INVALID_SYNTAX, "CREATE_CHILD_SA answer without Nr")
        ni, nr = offer.ni, nonce.data
        if suite.dh != DhId.NONE:
            ke = msg.get(KePayload)
            if offer.dh is None or ke is None or ke.group != offer.dh.group:
                raise ChildRefused(NotifyType.INVALID_KE_PAYLOAD, "PFS KE payload missing "
                                   "or of the wrong group")
            shared = offer.dh.shared_secret(ke.data)
    i2r, r2i = _keymat(sa, suite, ni, nr, shared)
    offer.released = True  # the SPI now belongs to the installed child
    return install_child(sa, offer.policy, suite, offer.spi_in,
                         int.from_bytes(chosen.spi, "big"), r2i, i2r, local_ts, remote_ts,
                         now, offer.replaces)


def peer_allowed(sa: IkeSa, policy: ChildPolicy) -> list[TrafficSelector]:
    """The peer's side a child may have: the policy's remote_ts, or, when the
    peer holds virtual IPs, those addresses inside it (RFC 7296 §2.9: an
    initiator asking for a virtual IP proposes 0.0.0.0/0 and the responder
    narrows TSi to the leased address)."""
    if not sa.leases:
        return policy.remote_ts
    return narrow([ts_from_cidr(ipaddress.ip_network(lease.address))
                   for lease in sa.leases], policy.remote_ts)


def respond_child(sa: IkeSa, msg: IkeMessage, now: float, *, in_auth: bool,
                  rekeyed: ChildSa | None) -> list[Payload]:
    """Responder: negotiate one child SA; raises ChildRefused with the notify."""
    if sa.policy is None:
        raise LocalProtocolError("child SA on an IKE SA without policy")
    sa_p, tsi, tsr = msg.get(SaPayload), msg.get(TsiPayload), msg.get(TsrPayload)
    if sa_p is None or tsi is None or tsr is None:
        raise ChildRefused(NotifyType.INVALID_SYNTAX, "child SA request without SA, TSi or TSr")
    policies = list(sa.policy.children.values())
    if rekeyed is not None:
        policies = [p for p in policies if p.name == rekeyed.name] or policies
    if msg.has_notify(NotifyType.USE_TRANSPORT_MODE):
        # RFC 7296 §1.3.1: a responder that cannot do transport mode refuses
        # the child rather than answering in tunnel mode (which the peer
        # would install as transport). In IKE_AUTH the IKE SA still comes up.
        name = next((p.name for p in policies if narrow(tsi.selectors, p.remote_ts)
                     and narrow(tsr.selectors, p.local_ts)), "")
        sa.ctx.events.append(ChildSaFailed(sa.ike_id, name, TRANSPORT_MODE_REFUSED))
        raise ChildRefused(NotifyType.NO_PROPOSAL_CHOSEN, TRANSPORT_MODE_REFUSED)
    theirs = [Proposal(p.number, p.protocol, p.spi, _strip_dh(p) if in_auth else p.transforms)
              for p in sa_p.proposals if p.protocol == ProtocolId.ESP and len(p.spi) == 4]
    reason = NotifyType.TS_UNACCEPTABLE
    configured: list[Proposal] = []   # of the children whose selectors fit, for the log
    for policy in policies:
        # Narrowing may give more selectors than were proposed (each of up to
        # 255 with each of ours); a TS payload holds 255 (§3.13), and a
        # subset is still a narrowing (§2.9).
        remote_ts = narrow(tsi.selectors, peer_allowed(sa, policy))[:MAX_SELECTORS]
        local_ts = narrow(tsr.selectors, policy.local_ts)[:MAX_SELECTORS]
        if not remote_ts or not local_ts:
            continue
        ours = esp_proposals(policy, 0, in_auth=in_auth)
        chosen = choose_proposal(ours, theirs)
        if chosen is None:
            reason = NotifyType.NO_PROPOSAL_CHOSEN
            configured += ours
            continue
        return _accept(sa, msg, now, policy, chosen, local_ts, remote_ts, in_auth, rekeyed)
    if reason == NotifyType.NO_PROPOSAL_CHOSEN:
        log.info("IKE SA %d: child SA refused: no common proposal (NO_PROPOSAL_CHOSEN): "
                 "received proposals: %s; configured proposals: %s", sa.ike_id,
                 format_proposals(theirs), format_proposals(configured))
    else:
        log.info("IKE SA %d: child SA refused: %s", sa.ike_id, reason.name)
    raise ChildRefused(reason, f"no child config accepts the request ({reason.name})")


def _accept(sa: IkeSa, msg: IkeMessage, now: float, policy: ChildPolicy, chosen: Proposal,
            local_ts: list[TrafficSelector], remote_ts: list[TrafficSelector], in_auth: bool,
            rekeyed: ChildSa | None) -> list[Payload]:
    suite = esp_suite(chosen)
    shared: bytes | None = None
    ke_out: list[Payload] = []
    if in_auth:
        ni, nr = sa.ni, sa.nr
    else:
        nonce = msg.get(NoncePayload)
        if nonce is None:
            raise ChildRefused(NotifyType.INVALID_SYNTAX, "CREATE_CHILD_SA without Ni")
        ni, nr = nonce.data, sa.nonce()
        if suite.dh != DhId.NONE:
            ke = msg.get(KePayload)
            if ke is None or ke.group != suite.dh:
                # RFC 7296 §1.3: tell the initiator which group we want.
                raise ChildRefused(NotifyType.INVALID_KE_PAYLOAD, "wrong PFS group",
                                   int(suite.dh).to_bytes(2, "big"))
            dh = dh_generate(suite.dh, sa.ctx.random)
            shared = dh.shared_secret(ke.data)
            ke_out = [KePayload(suite.dh, dh.public)]
    spi_in = sa.ctx.spis.allocate_esp()
    i2r, r2i = _keymat(sa, suite, ni, nr, shared)
    child = install_child(sa, policy, suite, spi_in, int.from_bytes(chosen.spi, "big"), i2r,
                          r2i, local_ts, remote_ts, now,
                          rekeyed.spi_in if rekeyed is not None else None, initiator=False)
    if rekeyed is not None:
        if rekeyed.state is ChildState.REKEYING:
            # §2.8.1 collision: decided when our own rekey answer arrives.
            rekeyed.peer_rekey_nonces = (ni, nr)
            rekeyed.peer_rekey_child = child.spi_in
        else:
            rekeyed.apply(ChildInput.REPLACED)
    answer: list[Payload] = [SaPayload([Proposal(chosen.number, ProtocolId.ESP,
                                                 spi_in.to_bytes(4, "big"),
                                                 list(chosen.transforms))])]
    if not in_auth:
        answer.append(NoncePayload(nr))
    answer += ke_out
    answer += [TsiPayload(remote_ts), TsrPayload(local_ts)]
    return answer


@dataclass(slots=True)
class ChildCreateTask:
    """CREATE_CHILD_SA for a new child (RFC 7296 §1.3.1)."""

    policy: ChildPolicy
    group: DhId | None = None
    offer: ChildOffer | None = None
    exchange = ExchangeType.CREATE_CHILD_SA
    name = "child_create"

    def build(self, sa: IkeSa, now: float) -> list[Payload] | None:
        self.offer = offer_child(sa, self.policy, in_auth=False, group=self.group)
        return self.offer.payloads

    def process(self, sa: IkeSa, msg: IkeMessage, now: float) -> None:
        if self.offer is None:
            return
        retry = _invalid_ke_retry(msg, self.offer)
        if retry is not None and self.group is None:
            self.offer.release()
            sa.queue_task(ChildCreateTask(self.policy, retry), now, first=True)
            return
        finish_initiated_child(sa, self.offer, msg, now, in_auth=False)

    def failed(self, sa: IkeSa, now: float) -> None:
        if self.offer is not None:
            self.offer.release()


def _invalid_ke_retry(msg: IkeMessage, offer: ChildOffer) -> DhId | None:
    """The group to retry a CREATE_CHILD_SA with after INVALID_KE_PAYLOAD
    (RFC 7296 §1.3): one we offered and did not send; None for any other
    (the child then fails like any refused one)."""
    n = msg.notify(NotifyType.INVALID_KE_PAYLOAD)
    if n is None or len(n.data) != 2:
        return None
    wanted = int.from_bytes(n.data, "big")
    offered = {t.id for p in offer.proposals for t in p.of_type(TransformType.DH)}
    sent = offer.dh.group if offer.dh is not None else DhId.NONE
    return DhId(wanted) if wanted in offered and wanted not in (sent, DhId.NONE) else None


@dataclass(slots=True)
class ChildRekeyTask:
    """CREATE_CHILD_SA with N(REKEY_SA) (RFC 7296 §1.3.3)."""

    spi_in: int
    group: DhId | None = None
    offer: ChildOffer | None = None
    exchange = ExchangeType.CREATE_CHILD_SA
    name = "child_rekey"

    def build(self, sa: IkeSa, now: float) -> list[Payload] | None:
        old = sa.children.get(self.spi_in)
        if old is None or old.state is not ChildState.INSTALLED or sa.policy is None:
            return None
        policy = sa.policy.children.get(old.name)
        if policy is None:
            return None
        old.apply(ChildInput.REKEY_STARTED)
        self.offer = offer_child(sa, policy, in_auth=False, group=self.group, replaces=old)
        return self.offer.payloads

    def process(self, sa: IkeSa, msg: IkeMessage, now: float) -> None:
        old = sa.children.get(self.spi_in)
        if self.offer is None or old is None:
            if self.offer is not None:
                self.offer.release()
            return
        retry = _invalid_ke_retry(msg, self.offer)
        if retry is not None and self.group is None and old.peer_rekey_child is None:
            self.offer.release()
            old.apply(ChildInput.REKEY_ABORTED)
            sa.queue_task(ChildRekeyTask(self.spi_in, retry), now, first=True)
            return
        new = finish_initiated_child(sa, self.offer, msg, now, in_auth=False)
        if new is None:
            if old.state is ChildState.REKEYING:
                _rekey_aborted(old, now)
            return
        if old.peer_rekey_nonces is not None:
            ours = (self.offer.ni, msg.get(NoncePayload).data)  # type: ignore[union-attr]
            lowest = min((*ours, *old.peer_rekey_nonces))
            old.apply(ChildInput.REPLACED)
            if lowest in ours:
                # Our new SA is the redundant one: we created it, we delete it.
                log.info("IKE SA %d: rekey collision on %08x, ours loses", sa.ike_id, old.spi_in)
                sa.queue_task(ChildDeleteTask([new.spi_in]), now)
                return
            log.info("IKE SA %d: rekey collision on %08x, ours wins", sa.ike_id, old.spi_in)
        else:
            old.apply(ChildInput.REPLACED)
        sa.queue_task(ChildDeleteTask([old.spi_in]), now)

    def failed(self, sa: IkeSa, now: float) -> None:
        if self.offer is not None:
            self.offer.release()
        old = sa.children.get(self.spi_in)
        if old is not None and old.state is ChildState.REKEYING:
            _rekey_aborted(old, now)


def _rekey_aborted(old: ChildSa, now: float) -> None:
    """Our rekey of ``old`` failed. If the peer's rekey of the same child
    went through meanwhile (§2.8.1, we answered it), the child is replaced and
    the peer deletes it; otherwise it goes on and is rekeyed again later. The
    collision bookkeeping goes either way: a stale record would decide a
    later rekey of this child by nonces of an exchange long done."""
    if old.peer_rekey_child is not None:
        old.apply(ChildInput.REPLACED)
    else:
        old.apply(ChildInput.REKEY_ABORTED)
        old.rekey_at = now + REKEY_RETRY_S  # try again later (e.g. TEMPORARY_FAILURE)
    old.peer_rekey_nonces = None
    old.peer_rekey_child = None


def handle_new_child(sa: IkeSa, msg: IkeMessage, now: float) -> list[Payload]:
    # RFC 7296 §3.10.1: beyond our per-IKE-SA limit, NO_ADDITIONAL_SAS (the
    # IKE SA lives on); counted for the engine's drops (common/ike/limits.py).
    if sum(c.state is not ChildState.DELETED for c in sa.children.values()) \
            >= CHILD_SA_MAX_PER_IKE_SA:
        sa.counters[DROP_NO_ADDITIONAL_SAS] = sa.counters.get(DROP_NO_ADDITIONAL_SAS, 0) + 1
        raise ChildRefused(NotifyType.NO_ADDITIONAL_SAS, "child SA limit of this IKE SA")
    # A ChildRefused becomes the answer's notify in IkeSa.receive_request.
    return respond_child(sa, msg, now, in_auth=False, rekeyed=None)


def handle_child_rekey(sa: IkeSa, msg: IkeMessage, now: float) -> list[Payload]:
    n = msg.notify(NotifyType.REKEY_SA)
    spi = int.from_bytes(n.spi, "big") if n is not None and len(n.spi) == 4 else None
    # The SPI is the one the initiator receives on: our outbound SPI (§1.3.3).
    old = sa.child_by_out(spi) if spi is not None else None
    if old is None or old.state is ChildState.DELETED:
        raise ChildRefused(NotifyType.CHILD_SA_NOT_FOUND, "rekey of an unknown child",
                           protocol=ProtocolId.ESP, spi=n.spi if n is not None else b"")
    if old.state not in (ChildState.INSTALLED, ChildState.REKEYING):
        raise Refused(NotifyType.TEMPORARY_FAILURE, "child is being rekeyed or deleted")
    return respond_child(sa, msg, now, in_auth=False, rekeyed=old)
