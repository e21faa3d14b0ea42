"""The dispatcher's records of its members, beside the membership machine.

Who is in the cluster, which incarnation is alive and which member owns
which segment is the machine's (common/cluster/membership.py, held by
``Dispatcher.membership``); what is here is the I/O side of it: each
incarnation's connection and what it reported, and the child SAs the
dispatcher routes cleartext to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.cluster.membership import Incarnation
from common.cluster.stats import MemberStats
from common.cluster.wire import Datagram, StreamSeq
from common.ike.ts import TrafficSelector


@dataclass(slots=True)
class MemberInfo:
    """The dispatcher's end of one member incarnation: its live connection
    (ZeroMQ routing id, stream sequence numbers), what it last reported, the
    batches on their way to it. Who it is and whether it is alive is the
    machine's ``incarnation`` (read through the properties)."""

    incarnation: Incarnation
    identity: bytes
    #: its last heartbeat's figures
    stats: MemberStats = field(default_factory=MemberStats)
    tx: StreamSeq = field(default_factory=StreamSeq)
    rx: StreamSeq = field(default_factory=StreamSeq)
    gaps: int = 0
    datagrams: list[Datagram] = field(default_factory=list)
    inner: list[bytes] = field(default_factory=list)

    @property
    def member_id(self) -> int:
        return self.incarnation.member_id

    @property
    def sender_id(self) -> int:
        return self.incarnation.sender_id

    @property
    def pid(self) -> int:
        return self.incarnation.pid

    @property
    def host(self) -> str:
        return self.incarnation.host

    @property
    def last_seen(self) -> float:
        return self.incarnation.last_seen

    @property
    def alive(self) -> bool:
        return self.incarnation.alive

    @property
    def token(self) -> int:
        return self.incarnation.token


@dataclass(slots=True)
class RouteInfo:
    """A child SA the dispatcher routes cleartext to: the member carrying it
    and its selectors."""

    member: int
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
