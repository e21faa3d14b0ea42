"""The vocabulary of the IKE core: the state machines of IKE and child SAs,
the task protocol, and the context every IKE SA of one engine shares.

Rules of this file:
- It sits below everything else in common/ike: it imports only constants and
  leaf codecs (messages, payloads, fragments, message IDs, events), never an
  SA, an exchange or the engine. Every other module imports these names from
  here.
- It cannot name the IKE SA class (common/ike/sa.py, above it), so the task
  protocol, the exchange protocol and the context are generic in the SA type;
  the rest of the core uses them as ``Task[IkeSa]``, ``IkeContext[IkeSa]``.
- A state changes only by a (state, input) pair of its table; an unknown pair
  is a bug in the core (``IkeSa.apply``, ``ChildSa.apply``).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, auto
from typing import Generic, Protocol, TypeVar

from common.cluster.pools import PoolSet
from common.ike.constants import ExchangeType
from common.ike.events import IkeEvent
from common.ike.fragments import FRAGMENT_SIZE_DEFAULT, Reassembly
from common.ike.message import IkeMessage
from common.ike.msgid import RetransmitPolicy
from common.ike.payloads import Payload
from common.rand import RandomBytes

Address = tuple[str, int]

#: The IKE SA type (``common.ike.sa.IkeSa``).
SaT = TypeVar("SaT")
SaT_contra = TypeVar("SaT_contra", contravariant=True)


# -- IKE SA states (RFC 7296 §1.2, §1.3.2, §1.4.1) -------------------------------


class IkeState(Enum):
    INIT_SENT = auto()      # initiator: IKE_SA_INIT request out
    AUTH_SENT = auto()      # initiator: IKE_AUTH request out
    HALF_OPEN = auto()      # responder: IKE_SA_INIT answered, waiting for IKE_AUTH
    ESTABLISHED = auto()
    REKEYED = auto()        # replaced by a new IKE SA, waiting for the delete
    DELETING = auto()       # our delete request is out
    DELETED = auto()        # terminal
    FAILED = auto()         # terminal


class IkeInput(Enum):
    INIT_DONE = auto()
    AUTH_DONE = auto()
    REKEYED = auto()
    DELETE_STARTED = auto()
    DELETED = auto()
    FAILED = auto()
    RETRY_INIT = auto()


IKE_TRANSITIONS: dict[tuple[IkeState, IkeInput], IkeState] = {
    (IkeState.INIT_SENT, IkeInput.RETRY_INIT): IkeState.INIT_SENT,
    (IkeState.INIT_SENT, IkeInput.INIT_DONE): IkeState.AUTH_SENT,
    (IkeState.INIT_SENT, IkeInput.FAILED): IkeState.FAILED,
    (IkeState.INIT_SENT, IkeInput.DELETED): IkeState.DELETED,
    (IkeState.AUTH_SENT, IkeInput.AUTH_DONE): IkeState.ESTABLISHED,
    (IkeState.AUTH_SENT, IkeInput.FAILED): IkeState.FAILED,
    (IkeState.AUTH_SENT, IkeInput.DELETED): IkeState.DELETED,
    (IkeState.HALF_OPEN, IkeInput.AUTH_DONE): IkeState.ESTABLISHED,
    (IkeState.HALF_OPEN, IkeInput.FAILED): IkeState.FAILED,
    (IkeState.HALF_OPEN, IkeInput.DELETED): IkeState.DELETED,
    (IkeState.ESTABLISHED, IkeInput.REKEYED): IkeState.REKEYED,
    (IkeState.ESTABLISHED, IkeInput.DELETE_STARTED): IkeState.DELETING,
    (IkeState.ESTABLISHED, IkeInput.DELETED): IkeState.DELETED,
    (IkeState.ESTABLISHED, IkeInput.FAILED): IkeState.FAILED,
    (IkeState.REKEYED, IkeInput.REKEYED): IkeState.REKEYED,
    (IkeState.REKEYED, IkeInput.DELETE_STARTED): IkeState.DELETING,
    (IkeState.REKEYED, IkeInput.DELETED): IkeState.DELETED,
    (IkeState.REKEYED, IkeInput.FAILED): IkeState.FAILED,
    (IkeState.DELETING, IkeInput.DELETE_STARTED): IkeState.DELETING,
    (IkeState.DELETING, IkeInput.REKEYED): IkeState.DELETING,
    (IkeState.DELETING, IkeInput.DELETED): IkeState.DELETED,
    (IkeState.DELETING, IkeInput.FAILED): IkeState.FAILED,
}

TERMINAL = frozenset({IkeState.DELETED, IkeState.FAILED})


# -- child SA states (RFC 7296 §1.3.3, §2.8, §1.4.1) -----------------------------


class ChildState(Enum):
    INSTALLED = auto()
    REKEYING = auto()   # our rekey request is under way
    REKEYED = auto()    # replaced by a newer child, waiting for its delete
    DELETING = auto()   # our delete request is under way
    DELETED = auto()    # terminal


class ChildInput(Enum):
    REKEY_STARTED = auto()
    REKEY_ABORTED = auto()
    REPLACED = auto()
    DELETE_STARTED = auto()
    DELETED = auto()


#: (state, input) -> next state. Anything else is a bug in the core.
CHILD_TRANSITIONS: dict[tuple[ChildState, ChildInput], ChildState] = {
    (ChildState.INSTALLED, ChildInput.REKEY_STARTED): ChildState.REKEYING,
    (ChildState.INSTALLED, ChildInput.REPLACED): ChildState.REKEYED,
    (ChildState.INSTALLED, ChildInput.DELETE_STARTED): ChildState.DELETING,
    (ChildState.INSTALLED, ChildInput.DELETED): ChildState.DELETED,
    (ChildState.REKEYING, ChildInput.REKEY_ABORTED): ChildState.INSTALLED,
    (ChildState.REKEYING, ChildInput.REPLACED): ChildState.REKEYED,
    (ChildState.REKEYING, ChildInput.DELETE_STARTED): ChildState.DELETING,
    (ChildState.REKEYING, ChildInput.DELETED): ChildState.DELETED,
    (ChildState.REKEYED, ChildInput.REPLACED): ChildState.REKEYED,
    (ChildState.REKEYED, ChildInput.DELETE_STARTED): ChildState.DELETING,
    (ChildState.REKEYED, ChildInput.DELETED): ChildState.DELETED,
    (ChildState.DELETING, ChildInput.DELETED): ChildState.DELETED,
    (ChildState.DELETING, ChildInput.REPLACED): ChildState.DELETING,
    (ChildState.DELETING, ChildInput.DELETE_STARTED): ChildState.DELETING,
}


# -- tasks and the exchange layer --------------------------------------------------


class Task(Protocol[SaT_contra]):
    """An exchange we initiate (strongSwan's task_t, initiator half)."""

    exchange: ExchangeType
    name: str

    def build(self, sa: SaT_contra, now: float) -> list[Payload] | None:
        """Payloads of the request, or None when the task became moot."""

    def process(self, sa: SaT_contra, msg: IkeMessage, now: float) -> None:
        """Handle the response."""

    def failed(self, sa: SaT_contra, now: float) -> None:
        """The request was never answered (retransmits exhausted)."""


class Exchanges(Protocol[SaT_contra]):
    """What an IKE SA asks of the exchange modules, which sit above it: the
    answer to a request from the peer, and the tasks an SA starts by itself
    (timers, the end of its message IDs). ``common/ike/exchanges/dispatch.py``
    holds the one implementation; the engine puts it in the context."""

    def handle_request(self, sa: SaT_contra, msg: IkeMessage, now: float) -> list[Payload]:
        """Payloads of the answer; a RemoteProtocolError refuses the request
        (answered with its notify, or dropped for a DropRequest)."""

    def rekey_ike(self) -> Task[SaT_contra]:
        """CREATE_CHILD_SA rekeying the IKE SA (RFC 7296 §1.3.2)."""

    def rekey_child(self, spi_in: int) -> Task[SaT_contra]:
        """CREATE_CHILD_SA rekeying the child SA ``spi_in`` (RFC 7296 §1.3.3)."""

    def dpd(self) -> Task[SaT_contra]:
        """An empty INFORMATIONAL: is the peer alive (RFC 7296 §2.4)?"""

    def delete_ike(self, reason: str) -> Task[SaT_contra]:
        """INFORMATIONAL deleting the IKE SA (RFC 7296 §1.4.1)."""


# -- what the IKE SAs of one engine share --------------------------------------------


@dataclass(slots=True)
class Outgoing:
    """A datagram the shell must send: IKE bytes without the non-ESP marker
    (the shell adds it on every port but 500, RFC 3948 §2.2)."""

    data: bytes
    remote: Address
    local_port: int
    #: the IKE SA it belongs to (0: none yet), so that a cluster member can
    #: hold it until the backup has that SA's new state (RFC 6027 §3.6)
    ike_id: int = 0


class SpiSource(Protocol):
    """Where SPIs come from: the member's segment-aware allocator."""

    def allocate_ike(self, segment: int | None = None) -> bytes: ...

    def allocate_esp(self) -> int: ...

    def release_esp(self, spi: int) -> None: ...


@dataclass(slots=True)
class IkeOptions:
    ike_port: int = 500
    natt_port: int = 4500
    retransmit: RetransmitPolicy = field(default_factory=RetransmitPolicy)
    half_open_timeout_s: float = 30.0
    cookie_threshold: int = 100
    nonce_len: int = 32
    #: IP datagram size of the RFC 7383 fragments we send (§2.5.1)
    fragment_size: int = FRAGMENT_SIZE_DEFAULT
    #: wall-clock UTC time for certificate validity (the shell passes
    #: ``lambda: datetime.now(timezone.utc)``); None refuses certificates
    utc_now: Callable[[], datetime] | None = None


@dataclass(slots=True)
class IkeContext(Generic[SaT]):
    """What every IKE SA of one engine shares."""

    random: RandomBytes
    spis: SpiSource
    options: IkeOptions
    #: the exchange modules, as the SAs call them (``Exchanges``)
    exchanges: Exchanges[SaT]
    outbox: list[Outgoing] = field(default_factory=list)
    events: deque[IkeEvent] = field(default_factory=deque)
    #: IKE SAs created by rekeys, for the engine to index by SPI
    created: list[SaT] = field(default_factory=list)
    #: IKE SAs whose timers or state may have changed in the current engine
    #: call; the engine recomputes their deadlines (and nothing else's)
    touched: set[SaT] = field(default_factory=set)
    #: IKE SAs established with N(INITIAL_CONTACT) from the peer (RFC 7296
    #: §2.4): the engine deletes the other IKE SAs of the same identities
    initial_contact: list[SaT] = field(default_factory=list)
    #: peer input refused, by stable reason (``RemoteProtocolError.drop_reason``);
    #: the engine's ``drops``
    drops: Counter[str] = field(default_factory=Counter)
    #: RFC 7383 partial messages of every IKE SA, bounded (common/ike/fragments.py)
    reassembly: Reassembly = field(default_factory=Reassembly)
    #: virtual IP pools for CP requests (RFC 7296 §3.15); None: no pools
    pools: PoolSet | None = None
    next_id: int = 1

    def new_id(self) -> int:
        i = self.next_id
        self.next_id += 1
        return i
