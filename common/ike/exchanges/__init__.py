"""One module per exchange (strongSwan ``libcharon/sa/ikev2/tasks``).

``dispatch_request`` picks the responder handler for a request from the
table below: (exchange type, what the request carries) -> handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from common.errors import RemoteProtocolError
from common.ike.constants import ExchangeType, NotifyType, ProtocolId
from common.ike.message import IkeMessage
from common.ike.payloads import DeletePayload, NotifyPayload, Payload, SaPayload

if TYPE_CHECKING:
    from common.ike.sa import IkeSa

Handler = Callable[["IkeSa", IkeMessage, float], list[Payload]]


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


def classify(msg: IkeMessage) -> str:
    """The kind of request, the second column of the dispatch table."""
    if msg.exchange == ExchangeType.CREATE_CHILD_SA:
        sa = msg.get(SaPayload)
        if sa is not None and sa.proposals and sa.proposals[0].protocol == ProtocolId.IKE:
            return "ike_rekey"
        if msg.has_notify(NotifyType.REKEY_SA):
            return "child_rekey"
        return "child_new"
    if msg.exchange == ExchangeType.INFORMATIONAL:
        if msg.has_notify(NotifyType.IKEV2_MESSAGE_ID_SYNC):
            return "mid_sync"
        if msg.get(DeletePayload) is not None:
            return "delete"
        return "dpd"
    if msg.exchange == ExchangeType.IKE_AUTH:
        return "auth"
    return "other"


def _table() -> dict[tuple[str, str], Handler]:
    from common.ike.exchanges import child_sa, ike_auth, ike_rekey, informational

    return {
        ("HALF_OPEN", "auth"): ike_auth.handle_auth_request,
        ("ESTABLISHED", "child_new"): child_sa.handle_new_child,
        ("ESTABLISHED", "child_rekey"): child_sa.handle_child_rekey,
        ("ESTABLISHED", "ike_rekey"): ike_rekey.handle_ike_rekey,
        ("ESTABLISHED", "delete"): informational.handle_delete,
        ("ESTABLISHED", "dpd"): informational.handle_dpd,
        ("ESTABLISHED", "mid_sync"): informational.handle_mid_sync,
        ("REKEYED", "delete"): informational.handle_delete,
        ("REKEYED", "dpd"): informational.handle_dpd,
        ("REKEYED", "child_new"): informational.handle_temporary_failure,
        ("REKEYED", "child_rekey"): informational.handle_temporary_failure,
        ("REKEYED", "ike_rekey"): informational.handle_temporary_failure,
        ("REKEYED", "mid_sync"): informational.handle_mid_sync,
        ("DELETING", "delete"): informational.handle_delete,
        ("DELETING", "dpd"): informational.handle_dpd,
        ("DELETING", "child_new"): informational.handle_temporary_failure,
        ("DELETING", "child_rekey"): informational.handle_temporary_failure,
        ("DELETING", "ike_rekey"): informational.handle_temporary_failure,
        ("DELETING", "mid_sync"): informational.handle_mid_sync,
    }


_TABLE: dict[tuple[str, str], Handler] | None = None


def dispatch_request(sa: IkeSa, msg: IkeMessage, now: float) -> list[Payload]:
    global _TABLE
    if _TABLE is None:
        _TABLE = _table()
    handler = _TABLE.get((sa.state.name, classify(msg)))
    if handler is None:
        raise UnexpectedExchange(
            f"{msg.exchange.name} ({classify(msg)}) not allowed in state {sa.state.name}")
    return handler(sa, msg, now)


def notify_for(exc: RemoteProtocolError) -> NotifyPayload:
    """The one place an error becomes a Notify payload (docs/design.md "Code
    conventions", as in h2's exceptions): its type (INVALID_SYNTAX when it
    names none), data, and the protocol and SPI it is about."""
    return NotifyPayload(NotifyType(exc.notify_type or NotifyType.INVALID_SYNTAX),
                         ProtocolId(exc.notify_protocol), exc.notify_spi, exc.notify_data)
