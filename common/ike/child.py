"""Child SA records kept by the IKE SA that negotiated them (RFC 7296 §1.3).

The IKE core keeps what it needs to rekey and delete a child; the ESP
state itself (sequence numbers, replay windows) lives in the data plane.
The child's state machine (``CHILD_TRANSITIONS``) is in common/ike/context.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import LocalProtocolError
from common.ike.context import CHILD_TRANSITIONS, ChildInput, ChildState
from common.ike.proposals import EspSuite
from common.ike.ts import TrafficSelector


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
