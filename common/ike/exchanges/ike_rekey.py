"""IKE SA rekey with CREATE_CHILD_SA (RFC 7296 §1.3.2, §2.18, collisions §2.8.2).

    Initiator                         Responder
    HDR, SK {SA(IKE, new SPIi), Ni, KEi}  -->
                          <--    HDR, SK {SA(IKE, new SPIr), Nr, KEr}
    HDR(old), SK {D(IKE)}  -->   <--  HDR(old), SK {}

The end that initiated the rekey is the original initiator of the new IKE SA;
message IDs of the new SA start at 0; the children move to the new SA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from common.errors import RemoteProtocolError
from common.ike.constants import DhId, ExchangeType, NotifyType, ProtocolId
from common.ike.context import ChildState, IkeState
from common.ike.dh import DhKeyPair, dh_generate
from common.ike.exchanges.ike_init import numbered, offered_group
from common.ike.exchanges.informational import IkeDeleteTask
from common.ike.keys import derive_rekeyed_ike_keys
from common.ike.message import IkeMessage
from common.ike.payloads import KePayload, NoncePayload, NotifyPayload, Payload, SaPayload
from common.ike.proposals import choose_proposal, ike_suite, proposal_matches
from common.ike.refusals import Refused
from common.ike.sa import IkeSa
from common.ike.transforms import Proposal

log = logging.getLogger("ipsec_cluster.ike")

RETRY_AFTER_S = 10.0


def _successor(old: IkeSa, *, initiator: bool, spi_i: bytes, spi_r: bytes, chosen: Proposal,
               ni: bytes, nr: bytes, shared: bytes, now: float) -> IkeSa:
    if old.suite is None or old.keys is None:
        raise RemoteProtocolError("rekey of an IKE SA without keys")
    suite = ike_suite(chosen)
    new = IkeSa(old.ctx, initiator=initiator, spi_i=spi_i, spi_r=spi_r, remote=old.remote,
                local_port=old.local_port, state=IkeState.ESTABLISHED, policy=old.policy)
    new.ni, new.nr = ni, nr
    # Just heard from the peer: a new SA that loses a collision (and never gets
    # children) must not be due for DPD at once.
    new.created_at = new.last_heard = now
    new.peer_id = old.peer_id
    new.peer_mid_sync = old.peer_mid_sync
    new.peer_fragmentation = old.peer_fragmentation  # RFC 7383 §2.3: negotiated once
    new.on_response = old.on_response
    new.install_keys(suite, derive_rekeyed_ike_keys(old.suite.prf, old.keys.sk_d, suite, ni, nr,
                                                    shared, spi_i, spi_r))
    old.ctx.created.append(new)
    return new


def lease_segment(sa: IkeSa) -> int | None:
    """The segment a rekeyed IKE SA must stay in: its virtual IPs come from
    that segment's partition of the pool (common/cluster/pools.py), which only the
    segment's owner leases from and rebuilds on a takeover."""
    pools = sa.ctx.pools
    if not sa.leases or pools is None:
        return None
    return pools.segment_of_spi(sa.spi_i if sa.initiator else sa.spi_r)


@dataclass(slots=True)
class IkeRekeyTask:
    exchange = ExchangeType.CREATE_CHILD_SA
    name = "ike_rekey"
    group: DhId | None = None
    spi: bytes = b""
    ni: bytes = b""
    dh: DhKeyPair | None = None

    def build(self, sa: IkeSa, now: float) -> list[Payload] | None:
        if sa.state is not IkeState.ESTABLISHED or sa.policy is None or sa.suite is None:
            return None
        self.spi = sa.ctx.spis.allocate_ike(lease_segment(sa))
        self.ni = sa.nonce()
        group = self.group if self.group is not None else sa.suite.dh
        self.dh = dh_generate(group, sa.ctx.random)
        return [SaPayload(numbered(sa.policy.proposals, self.spi)), NoncePayload(self.ni),
                KePayload(group, self.dh.public)]

    def process(self, sa: IkeSa, msg: IkeMessage, now: float) -> None:
        if sa.policy is None or self.dh is None:
            return
        invalid_ke = msg.notify(NotifyType.INVALID_KE_PAYLOAD)
        wanted = _wanted_group(invalid_ke)
        if (invalid_ke is not None and self.group is None and wanted != self.dh.group
                and offered_group(sa.policy, wanted)):
            # RFC 7296 §1.3.2/§2.7: retry once with the group the peer asks
            # for, if we offered it; any other INVALID_KE fails this rekey
            # like any refusal (below), never the IKE SA or the engine.
            sa.queue_task(IkeRekeyTask(DhId(wanted)), now, first=True)
            return
        errors = [n for n in msg.get_all(NotifyPayload) if n.notify_type.is_error]
        if errors and sa.peer_rekey is not None:
            # Refused because the peer's own rekey (which we answered) is done.
            sa.peer_rekey_won(now)
            return
        if errors:
            log.info("IKE SA %d: rekey refused (%s), retrying later", sa.ike_id,
                     errors[0].notify_type.name)
            sa.rekey_at = now + RETRY_AFTER_S
            return
        try:
            new = self._complete(sa, msg, now)
        except (RemoteProtocolError, ValueError) as exc:
            log.warning("IKE SA %d: bad IKE rekey answer: %s", sa.ike_id, exc)
            sa.rekey_at = now + RETRY_AFTER_S
            return
        nonce = msg.get(NoncePayload)
        ours = (self.ni, nonce.data if nonce else b"")
        if sa.peer_rekey is not None:
            peer_ni, peer_nr, theirs = sa.peer_rekey
            lowest = min((*ours, peer_ni, peer_nr))
            if lowest in ours:
                # §2.8.2: our new SA is redundant; we delete it, the peer deletes the old.
                log.info("IKE SA %d: IKE rekey collision, ours loses", sa.ike_id)
                sa.move_children(theirs, now)
                new.queue_task(IkeDeleteTask("redundant after rekey collision"), now)
                theirs.kick(now)
                return
            log.info("IKE SA %d: IKE rekey collision, ours wins", sa.ike_id)
        sa.move_children(new, now)
        sa.queue_task(IkeDeleteTask("rekeyed"), now)
        new.kick(now)

    def _complete(self, sa: IkeSa, msg: IkeMessage, now: float) -> IkeSa:
        if sa.policy is None or self.dh is None:
            raise RemoteProtocolError("no rekey in progress")
        sa_p, ke, nonce = msg.get(SaPayload), msg.get(KePayload), msg.get(NoncePayload)
        if sa_p is None or ke is None or nonce is None or len(sa_p.proposals) != 1:
            raise RemoteProtocolError("IKE rekey answer without SA, KE or Nonce")
        chosen = sa_p.proposals[0]
        if len(chosen.spi) != 8 or not proposal_matches(
                numbered(sa.policy.proposals, self.spi), chosen):
            raise RemoteProtocolError("peer chose an IKE proposal we did not offer")
        if ke.group != self.dh.group:
            raise RemoteProtocolError("KE group differs from the one we sent")
        shared = self.dh.shared_secret(ke.data)
        return _successor(sa, initiator=True, spi_i=self.spi, spi_r=chosen.spi, chosen=chosen,
                          ni=self.ni, nr=nonce.data, shared=shared, now=now)

    def failed(self, sa: IkeSa, now: float) -> None:
        pass


def _wanted_group(n: NotifyPayload | None) -> int:
    """The group an INVALID_KE_PAYLOAD names (two octets, RFC 7296 §3.10.1),
    or -1 when it names none."""
    if n is None or len(n.data) != 2:
        return -1
    return int.from_bytes(n.data, "big")


def handle_ike_rekey(sa: IkeSa, msg: IkeMessage, now: float) -> list[Payload]:
    if sa.policy is None or sa.suite is None:
        raise Refused(NotifyType.NO_PROPOSAL_CHOSEN)
    if (sa.children and any(c.state in (ChildState.REKEYING, ChildState.DELETING)
                            for c in sa.children.values())) or (
            sa.active is not None and sa.active.name == "child_create"):
        # RFC 7296 §2.25.2: finish the child exchanges first (a child created
        # by an answer that arrives after the move would land on the old SA).
        raise Refused(NotifyType.TEMPORARY_FAILURE, "child exchanges under way")
    sa_p, ke, nonce = msg.get(SaPayload), msg.get(KePayload), msg.get(NoncePayload)
    if sa_p is None or ke is None or nonce is None:
        raise Refused(NotifyType.INVALID_SYNTAX, "IKE rekey without SA, KE or Nonce")
    theirs = [p for p in sa_p.proposals if p.protocol == ProtocolId.IKE and len(p.spi) == 8]
    chosen = choose_proposal(numbered(sa.policy.proposals), theirs)
    if chosen is None:
        raise Refused(NotifyType.NO_PROPOSAL_CHOSEN)
    suite = ike_suite(chosen)
    if ke.group != suite.dh:
        raise Refused(NotifyType.INVALID_KE_PAYLOAD, "wrong KE group",
                      int(suite.dh).to_bytes(2, "big"))
    dh = dh_generate(suite.dh, sa.ctx.random)
    shared = dh.shared_secret(ke.data)
    spi_r = sa.ctx.spis.allocate_ike(lease_segment(sa))
    nr = sa.nonce()
    new = _successor(sa, initiator=False, spi_i=chosen.spi, spi_r=spi_r, chosen=chosen,
                     ni=nonce.data, nr=nr, shared=shared, now=now)
    ours_in_flight = isinstance(sa.active, IkeRekeyTask)
    if ours_in_flight:
        sa.peer_rekey = (nonce.data, nr, new)
    else:
        sa.move_children(new, now)
    return [SaPayload([Proposal(chosen.number, ProtocolId.IKE, spi_r, list(chosen.transforms))]),
            NoncePayload(nr), KePayload(suite.dh, dh.public)]
