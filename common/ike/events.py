"""Events the IKE core hands to its shell: past-tense facts (docs/design.md "Code conventions").

The shell drains them with ``IkeEngine.next_event()`` and acts: install ESP
SAs, log, count, replicate to a backup (failover issue).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.ike.ts import TrafficSelector


@dataclass(slots=True, frozen=True)
class IkeSaEstablished:
    ike_id: int
    name: str
    spi_i: bytes
    spi_r: bytes
    remote: tuple[str, int]
    initiator: bool
    suite: str
    local_id: str
    remote_id: str


@dataclass(slots=True, frozen=True)
class IkeSaRekeyed:
    old_ike_id: int
    new_ike_id: int
    spi_i: bytes
    spi_r: bytes


@dataclass(slots=True, frozen=True)
class IkeSaDeleted:
    ike_id: int
    name: str
    reason: str


@dataclass(slots=True, frozen=True)
class IkeSaFailed:
    """An IKE SA could not be set up (or died): authentication failure, no
    proposal, peer unreachable. ``reason`` is the log line."""

    ike_id: int
    name: str
    remote: tuple[str, int]
    reason: str


@dataclass(slots=True, frozen=True)
class ChildSaInstalled:
    """A child SA pair is ready: the shell builds ``InboundSA(spi_in, keymat_in)``
    and ``OutboundSA(spi_out, keymat_out)``. ``replaces`` names the inbound SPI
    of the child SA this one rekeys, if any."""

    ike_id: int
    name: str
    spi_in: int
    spi_out: int
    transform: str
    esn: bool
    keymat_in: bytes = field(repr=False)
    keymat_out: bytes = field(repr=False)
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    remote: tuple[str, int]
    replaces: int | None = None
    #: we initiated the exchange that created it (RFC 7296 §2.8: as responder
    #: of a rekey, send on the new SA only once the peer is known to have it)
    initiator: bool = True


@dataclass(slots=True, frozen=True)
class ChildSaDeleted:
    ike_id: int
    name: str
    spi_in: int
    spi_out: int
    reason: str


@dataclass(slots=True, frozen=True)
class ChildSaFailed:
    ike_id: int
    name: str
    reason: str


@dataclass(slots=True, frozen=True)
class MessageIdsSynced:
    """RFC 6311 exchange completed."""

    ike_id: int
    send_mid: int
    recv_mid: int


@dataclass(slots=True, frozen=True)
class DpdSucceeded:
    ike_id: int


IkeEvent = (
    IkeSaEstablished | IkeSaRekeyed | IkeSaDeleted | IkeSaFailed | ChildSaInstalled
    | ChildSaDeleted | ChildSaFailed | MessageIdsSynced | DpdSucceeded
)
