"""Which handler answers a request from the peer, and which task an IKE SA
starts by itself: the exchange layer as an IKE SA calls it (``Exchanges`` in
common/ike/context.py; the engine puts ``EXCHANGES`` in its context).

``REQUEST_HANDLERS`` is the dispatch table, built at import:
(state of the IKE SA, kind of request) -> handler. A pair that is not in it
is answered with N(INVALID_SYNTAX) (``UnexpectedExchange``, RFC 7296 §2.21).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from common.ike.constants import ExchangeType, NotifyType, ProtocolId
from common.ike.context import IkeState
from common.ike.exchanges import child_sa, ike_auth, ike_rekey, informational
from common.ike.exchanges.child_sa import ChildRekeyTask
from common.ike.exchanges.ike_rekey import IkeRekeyTask
from common.ike.exchanges.informational import DpdTask, IkeDeleteTask
from common.ike.message import IkeMessage
from common.ike.payloads import DeletePayload, Payload, SaPayload
from common.ike.refusals import UnexpectedExchange
from common.ike.sa import IkeSa

Handler = Callable[[IkeSa, IkeMessage, float], list[Payload]]


class RequestKind(Enum):
    """What a request asks for: the second key of the dispatch table."""

    AUTH = "auth"
    CHILD_NEW = "child_new"
    CHILD_REKEY = "child_rekey"
    IKE_REKEY = "ike_rekey"
    DELETE = "delete"
    DPD = "dpd"
    MID_SYNC = "mid_sync"
    OTHER = "other"


def classify(msg: IkeMessage) -> RequestKind:
    """The kind of request (its exchange type and what it carries)."""
    if msg.exchange == ExchangeType.CREATE_CHILD_SA:
        sa = msg.get(SaPayload)
        if sa is not None and sa.proposals and sa.proposals[0].protocol == ProtocolId.IKE:
            return RequestKind.IKE_REKEY
        if msg.has_notify(NotifyType.REKEY_SA):
            return RequestKind.CHILD_REKEY
        return RequestKind.CHILD_NEW
    if msg.exchange == ExchangeType.INFORMATIONAL:
        if msg.has_notify(NotifyType.IKEV2_MESSAGE_ID_SYNC):
            return RequestKind.MID_SYNC
        if msg.get(DeletePayload) is not None:
            return RequestKind.DELETE
        return RequestKind.DPD
    if msg.exchange == ExchangeType.IKE_AUTH:
        return RequestKind.AUTH
    return RequestKind.OTHER


_S, _K = IkeState, RequestKind

REQUEST_HANDLERS: dict[tuple[IkeState, RequestKind], Handler] = {
    (_S.HALF_OPEN, _K.AUTH): ike_auth.handle_auth_request,
    (_S.ESTABLISHED, _K.CHILD_NEW): child_sa.handle_new_child,
    (_S.ESTABLISHED, _K.CHILD_REKEY): child_sa.handle_child_rekey,
    (_S.ESTABLISHED, _K.IKE_REKEY): ike_rekey.handle_ike_rekey,
    (_S.ESTABLISHED, _K.DELETE): informational.handle_delete,
    (_S.ESTABLISHED, _K.DPD): informational.handle_dpd,
    (_S.ESTABLISHED, _K.MID_SYNC): informational.handle_mid_sync,
    (_S.REKEYED, _K.DELETE): informational.handle_delete,
    (_S.REKEYED, _K.DPD): informational.handle_dpd,
    (_S.REKEYED, _K.CHILD_NEW): informational.handle_temporary_failure,
    (_S.REKEYED, _K.CHILD_REKEY): informational.handle_temporary_failure,
    (_S.REKEYED, _K.IKE_REKEY): informational.handle_temporary_failure,
    (_S.REKEYED, _K.MID_SYNC): informational.handle_mid_sync,
    (_S.DELETING, _K.DELETE): informational.handle_delete,
    (_S.DELETING, _K.DPD): informational.handle_dpd,
    (_S.DELETING, _K.CHILD_NEW): informational.handle_temporary_failure,
    (_S.DELETING, _K.CHILD_REKEY): informational.handle_temporary_failure,
    (_S.DELETING, _K.IKE_REKEY): informational.handle_temporary_failure,
    (_S.DELETING, _K.MID_SYNC): informational.handle_mid_sync,
}


class ExchangeTable:
    """``Exchanges`` over ``REQUEST_HANDLERS`` and the exchange modules' tasks."""

    def handle_request(self, sa: IkeSa, msg: IkeMessage, now: float) -> list[Payload]:
        kind = classify(msg)
        handler = REQUEST_HANDLERS.get((sa.state, kind))
        if handler is None:
            raise UnexpectedExchange(
                f"{msg.exchange.name} ({kind.value}) not allowed in state {sa.state.name}")
        return handler(sa, msg, now)

    def rekey_ike(self) -> IkeRekeyTask:
        return IkeRekeyTask()

    def rekey_child(self, spi_in: int) -> ChildRekeyTask:
        return ChildRekeyTask(spi_in)

    def dpd(self) -> DpdTask:
        return DpdTask()

    def delete_ike(self, reason: str) -> IkeDeleteTask:
        return IkeDeleteTask(reason)


EXCHANGES = ExchangeTable()
