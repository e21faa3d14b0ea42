"""An IKE SA as the synch channel carries it, and back (RFC 6027 §3.2, §3.3).

``snapshot`` takes what a backup needs to continue an established IKE SA:
keys, message IDs both ways, the last response (retransmits are answered byte
for byte), the peer's identity, the children's records. ``restore`` builds a
live ``IkeSa`` from it on the member that takes over, which then hands it to
``IkeEngine.adopt`` (the IKE core knows nothing of this record). An exchange we had
initiated and not yet seen answered is not carried (its DH secret stays with
the dead owner): the new owner keeps the message IDs right and starts over.
"""

from __future__ import annotations

import functools
import ipaddress

from common.cluster.pools import Lease
from common.cluster.sync import ChildRecord, IkeSaState
from common.ike.child import ChildSa
from common.ike.constants import DhId, EncrId, IdType, IntegId, PrfId
from common.ike.context import ChildState, IkeState
from common.ike.engine import IkeEngine
from common.ike.keys import IkeKeys
from common.ike.proposals import ESP_TRANSFORMS, EspSuite, IkeSuite
from common.ike.sa import IkeSa


def _rel(deadline: float | None, now: float) -> float:
    return -1.0 if deadline is None else max(0.0, deadline - now)


@functools.lru_cache(maxsize=65536)
def _packed(address: str) -> bytes:
    """The packed form of a peer's address (parsing it is most of a snapshot's
    cost in a bulk transfer; peers keep their addresses)."""
    return ipaddress.ip_address(address).packed


def snapshot(sa: IkeSa, now: float, *, stale: bool = False) -> IkeSaState:
    if sa.suite is None or sa.keys is None:
        raise ValueError(f"IKE SA {sa.ike_id} has no keys yet (half-open SAs are not synced)")
    k, s = sa.keys, sa.suite
    children = tuple(
        ChildRecord(c.name, c.spi_in, c.spi_out, c.suite.transform, c.suite.esn,
                    int(c.suite.dh), c.state.value, _rel(c.rekey_at, now), c.local_ts,
                    c.remote_ts)
        for c in sa.children.values())
    peer_type, peer_id = sa.peer_id if sa.peer_id is not None else (IdType(0), b"")
    return IkeSaState(
        sa.spi_i, sa.spi_r, sa.initiator, sa.state.value, sa.name,
        _packed(sa.remote[0]), sa.remote[1], sa.local_port,
        int(s.encr), s.key_bits, int(s.prf), int(s.integ), int(s.dh),
        k.sk_d, k.sk_ai, k.sk_ar, k.sk_ei, k.sk_er, k.sk_pi, k.sk_pr,
        int(peer_type), peer_id, sa.peer_mid_sync,
        sa.mids.send_next, sa.mids.recv_next,
        sa.mids.response_id if sa.mids.response is not None else -1,
        sa.mids.response or b"", sa.mids.response_digest,
        _rel(sa.rekey_at, now), children, stale,
        tuple((lease.pool, lease.address.packed) for lease in sa.leases))


def esp_suite_of(transform: str, esn: bool, dh: int) -> EspSuite:
    encr, bits, integ = ESP_TRANSFORMS[transform]
    return EspSuite(transform, encr, bits, integ, DhId(dh), esn)


def restore(engine: IkeEngine, st: IkeSaState, now: float) -> IkeSa:
    """A live IKE SA from a replica, in ``engine``'s context and with its
    connection of that name; ``engine.adopt`` then takes it over."""
    state = IkeState(st.state)
    if state not in (IkeState.ESTABLISHED, IkeState.REKEYED, IkeState.DELETING):
        state = IkeState.ESTABLISHED
    sa = IkeSa(engine.ctx, initiator=st.initiator, spi_i=st.spi_i, spi_r=st.spi_r,
               remote=(str(ipaddress.ip_address(st.remote_ip)), st.remote_port),
               local_port=st.local_port, state=state, policy=engine.policies.get(st.policy))
    suite = IkeSuite(EncrId(st.encr), st.key_bits, PrfId(st.prf), IntegId(st.integ),
                     DhId(st.dh))
    sa.install_keys(suite, IkeKeys(st.sk_d, st.sk_ai, st.sk_ar, st.sk_ei, st.sk_er, st.sk_pi,
                                   st.sk_pr))
    sa.peer_id = (IdType(st.peer_id_type), st.peer_id) if st.peer_id_type else None
    sa.peer_mid_sync = st.peer_mid_sync
    # The engine claims these in its pools when it adopts the SA.
    sa.leases = tuple(Lease(pool, ipaddress.ip_address(addr)) for pool, addr in st.leases)
    sa.mids.send_next = st.send_next
    sa.mids.recv_next = st.recv_next
    if st.response_id >= 0 and st.response:
        sa.mids.response = st.response
        sa.mids.response_id = st.response_id
        sa.mids.response_digest = st.request_digest
    sa.created_at = sa.established_at = sa.last_heard = now
    sa.rekey_at = None if st.rekey_in < 0 else now + st.rekey_in
    for c in st.children:
        child = ChildSa(c.name, c.spi_in, c.spi_out, esp_suite_of(c.transform, c.esn, c.dh),
                        c.local_ts, c.remote_ts, b"", b"", installed_at=now,
                        rekey_at=None if c.rekey_in < 0 else now + c.rekey_in)
        child.state = ChildState(c.state)
        if child.state is ChildState.REKEYING:
            # Our rekey request died with the old owner: start it over.
            child.state = ChildState.INSTALLED
            child.rekey_at = now
        sa.children[c.spi_in] = child
    return sa
