"""Child SA records kept by the IKE SA that negotiated them (RFC 7296 §1.3).

The IKE core keeps what it needs to rekey and delete a child; the ESP
state itself (sequence numbers, replay windows) lives in the data plane.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

from common.errors import LocalProtocolError
from common.ike.proposals import EspSuite
from common.ike.ts import TrafficSelector


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


@dataclass(slots=True)
class ChildSa:
    name: str
    spi_in: int
    spi_out: int
    suite: EspSuite
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    keymat_in: bytes = field(repr=False)
    keymat_out: bytes = field(repr=False)
    installed_at: float
    rekey_at: float | None = None
    state: ChildState = ChildState.INSTALLED
    #: RFC 7296 §2.8.1 collision bookkeeping: nonces of the peer's rekey
    #: exchange for this child and the child it created.
    peer_rekey_nonces: tuple[bytes, bytes] | None = None
    peer_rekey_child: int | None = None

    def apply(self, event: ChildInput) -> None:
        nxt = CHILD_TRANSITIONS.get((self.state, event))
        if nxt is None:
            # A bug in the core: end the child (terminal state), then raise.
            old = self.state
            self.state = ChildState.DELETED
            raise LocalProtocolError(
                f"child {self.name} {self.spi_in:08x}: {event.name} in state {old.name}")
        self.state = nxt

    @property
    def alive(self) -> bool:
        return self.state in (ChildState.INSTALLED, ChildState.REKEYING)
