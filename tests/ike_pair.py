"""Two in-memory IKE engines wired back to back, with time as data
(aioquic ``client_and_server()``, h11 ``ConnectionPair``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.ike.constants import IdType
from common.ike.engine import IkeEngine
from common.ike.events import IkeEvent
from common.ike.policy import ChildPolicy, IkePolicy
from common.ike.proposals import parse_esp_proposal, parse_ike_proposal
from common.ike.sa import IkeOptions, Outgoing
from common.ike.spis import SegmentSpis
from common.ike.ts import ts_from_cidr
from common.rand import deterministic_random
from common.spi import SpiAllocator

A_ADDR = ("198.18.0.1", 500)
B_ADDR = ("198.18.0.2", 500)


def child(name: str, local: str, remote: str, esp: str = "aes128gcm16",
          rekey_time: float = 3600.0) -> ChildPolicy:
    return ChildPolicy(name, [ts_from_cidr(local)], [ts_from_cidr(remote)],
                       [parse_esp_proposal(p) for p in esp.split(",")], rekey_time)


def policy(name: str, local_id: str, remote_id: str | None, psk: bytes,
           children: list[ChildPolicy], ike: str = "aes128gcm16-prfsha256-ecp256",
           remote_addrs: list[str] | None = None, dpd_delay: float = 10.0,
           rekey_time: float = 14400.0) -> IkePolicy:
    return IkePolicy(name, (IdType.ID_FQDN, local_id.encode()),
                     (IdType.ID_FQDN, remote_id.encode()) if remote_id else None, psk,
                     [parse_ike_proposal(p) for p in ike.split(",")],
                     remote_addrs or ["%any"], 500, dpd_delay, rekey_time,
                     {c.name: c for c in children})


def engine(policies: list[IkePolicy], seed: int, segment: int,
           cookie_threshold: int = 100) -> IkeEngine:
    rnd = deterministic_random(seed)
    spis = SegmentSpis(SpiAllocator(deterministic_random(seed + 1000)), [segment])
    return IkeEngine(policies, random=rnd, spis=spis,
                     options=IkeOptions(cookie_threshold=cookie_threshold))


@dataclass
class Pair:
    """``a`` initiates by default; ``b`` is the responder."""

    a: IkeEngine
    b: IkeEngine
    now: float = 0.0
    wire: list[tuple[str, Outgoing]] = field(default_factory=list)
    events_a: list[IkeEvent] = field(default_factory=list)
    events_b: list[IkeEvent] = field(default_factory=list)
    #: drop datagrams matching this predicate (sender, datagram) -> bool
    drop: object = None

    def flush(self, rounds: int = 50) -> int:
        """Deliver datagrams back and forth until both sides are quiet."""
        delivered = 0
        for _ in range(rounds):
            moved = False
            for sender, receiver, addr in ((self.a, self.b, A_ADDR), (self.b, self.a, B_ADDR)):
                for out in sender.datagrams_to_send():
                    moved = True
                    name = "a" if sender is self.a else "b"
                    self.wire.append((name, out))
                    if callable(self.drop) and self.drop(name, out):
                        continue
                    receiver.receive_datagram(out.data, (addr[0], out.local_port),
                                              out.remote[1], self.now)
                    delivered += 1
            self.drain()
            if not moved:
                break
        return delivered

    def drain(self) -> None:
        while (e := self.a.next_event()) is not None:
            self.events_a.append(e)
        while (e := self.b.next_event()) is not None:
            self.events_b.append(e)

    def advance(self, seconds: float) -> None:
        """Move time forward, firing timers on both sides as they come due."""
        end = self.now + seconds
        while True:
            timers = [t for t in (self.a.get_timer(), self.b.get_timer()) if t is not None]
            nxt = min(timers) if timers else None
            if nxt is None or nxt > end:
                break
            self.now = max(self.now, nxt)
            self.a.handle_timer(self.now)
            self.b.handle_timer(self.now)
            self.flush()
        self.now = end
        self.flush()

    def of(self, side: str, cls: type) -> list:
        return [e for e in (self.events_a if side == "a" else self.events_b)
                if isinstance(e, cls)]


def make_pair(psk_a: bytes = b"interop-test-psk-0123456789",
              psk_b: bytes = b"interop-test-psk-0123456789", esp: str = "aes128gcm16",
              ike_a: str = "aes128gcm16-prfsha256-ecp256",
              ike_b: str = "aes128gcm16-prfsha256-ecp256", seed: int = 1,
              extra_children: bool = True, **kw: object) -> Pair:
    ca = [child("net", "10.91.1.0/24", "10.91.2.0/24", esp)]
    cb = [child("net", "10.91.2.0/24", "10.91.1.0/24", esp)]
    if extra_children:
        ca.append(child("ctr", "10.91.11.0/24", "10.91.12.0/24", "aes128ctr-sha256"))
        cb.append(child("ctr", "10.91.12.0/24", "10.91.11.0/24", "aes128ctr-sha256"))
    pa = policy("conn", "gw-a.test", "gw-b.test", psk_a, ca, ike_a, **kw)  # type: ignore[arg-type]
    pb = policy("conn", "gw-b.test", "gw-a.test", psk_b, cb, ike_b, **kw)  # type: ignore[arg-type]
    return Pair(engine([pa], seed, 1), engine([pb], seed + 7, 2))
