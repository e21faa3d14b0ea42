"""Requests we refuse, and the one place an error becomes a Notify payload
(RFC 7296 §2.21; docs/design.md "Code conventions", as in h2's exceptions).

A refused request is answered with the error's notify (``notify_for``) and
the IKE SA lives on unless the handler ended it; a ``DropRequest`` gets no
answer at all.
"""

from __future__ import annotations

from common.errors import RemoteProtocolError
from common.ike.constants import NotifyType, ProtocolId
from common.ike.payloads import NotifyPayload


class Refused(RemoteProtocolError):
    """A request we answer with an error notify (the IKE SA lives on unless the
    handler ended it): NO_PROPOSAL_CHOSEN, TEMPORARY_FAILURE, ..."""

    def __init__(self, notify: NotifyType, reason: str = "", data: bytes = b"", *,
                 protocol: int = 0, spi: bytes = b"") -> None:
        super().__init__(reason or notify.name)
        self.notify_type = int(notify)
        self.notify_data = data
        self.notify_protocol = protocol
        self.notify_spi = spi

    drop_reason = "refused"


class ChildRefused(Refused):
    """A child SA request we answer with an error notify (the IKE SA lives on)."""


class UnexpectedExchange(RemoteProtocolError):
    """A request that this IKE SA cannot take in its state (RFC 7296 §2.21)."""

    notify_type = int(NotifyType.INVALID_SYNTAX)
    drop_reason = "unexpected_exchange"


class DropRequest(RemoteProtocolError):
    """A request that must be dropped silently, without an answer (e.g. an
    RFC 6311 §5.1 sync whose M1 is not above what we have seen)."""

    drop_reason = "request_dropped"


def notify_for(exc: RemoteProtocolError) -> NotifyPayload:
    """The one place an error becomes a Notify payload: its type
    (INVALID_SYNTAX when it names none), data, and the protocol and SPI it
    is about."""
    return NotifyPayload(NotifyType(exc.notify_type or NotifyType.INVALID_SYNTAX),
                         ProtocolId(exc.notify_protocol), exc.notify_spi, exc.notify_data)
