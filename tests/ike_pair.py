"""Two in-memory IKE engines wired back to back, with time as data
(aioquic ``client_and_server()``, h11 ``ConnectionPair``).

Sides are named "a" and "b"; most helpers take a side so that a test can run
with roles swapped (``@pytest.mark.parametrize("ini", ["a", "b"])``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from common.cluster.spi import SpiAllocator
from common.esp.transforms import InboundSA, OutboundSA
from common.ike.child import ChildSa
from common.ike.constants import IKE_HEADER_LEN, IdType, PayloadType
from common.ike.context import ChildState, IkeOptions, IkeState, Outgoing
from common.ike.engine import IkeEngine
from common.ike.events import ChildSaInstalled, DpdSucceeded, IkeEvent
from common.ike.message import HEADER, IkeMessage
from common.ike.msgid import RetransmitPolicy
from common.ike.payloads import GENERIC_HEADER, Payload, encode_payloads
from common.ike.policy import ChildPolicy, IkePolicy
from common.ike.proposals import parse_esp_proposal, parse_ike_proposal
from common.ike.sa import IkeSa
from common.ike.spis import SegmentSpis
from common.ike.ts import ts_from_cidr
from common.rand import RandomBytes, deterministic_random

A_ADDR = ("198.18.0.1", 500)
B_ADDR = ("198.18.0.2", 500)

Identity = tuple[IdType, bytes]


def other(side: str) -> str:
    return "b" if side == "a" else "a"


def child(name: str, local: str | list[str], remote: str | list[str],
          esp: str = "aes128gcm16", rekey_time: float = 3600.0) -> ChildPolicy:
    local_l = [local] if isinstance(local, str) else local
    remote_l = [remote] if isinstance(remote, str) else remote
    return ChildPolicy(name, [ts_from_cidr(c) for c in local_l],
                       [ts_from_cidr(c) for c in remote_l],
                       [parse_esp_proposal(p) for p in esp.split(",")], rekey_time)


def _ident(i: str | Identity | None) -> Identity | None:
    if i is None or isinstance(i, tuple):
        return i
    return (IdType.ID_FQDN, i.encode())


def policy(name: str, local_id: str | Identity, remote_id: str | Identity | None, psk: bytes,
           children: list[ChildPolicy], ike: str = "aes128gcm16-prfsha256-ecp256",
           remote_addrs: list[str] | None = None, dpd_delay: float = 10.0,
           rekey_time: float = 14400.0) -> IkePolicy:
    local = _ident(local_id)
    assert local is not None
    return IkePolicy(name, local, _ident(remote_id), psk,
                     [parse_ike_proposal(p) for p in ike.split(",")],
                     remote_addrs or ["%any"], 500, dpd_delay, rekey_time,
                     {c.name: c for c in children})


def engine(policies: list[IkePolicy], seed: int, segment: int,
           cookie_threshold: int = 100, retransmit: RetransmitPolicy | None = None) -> IkeEngine:
    rnd = deterministic_random(seed)
    spis = SegmentSpis(SpiAllocator(deterministic_random(seed + 1000)), [segment])
    opts = IkeOptions(cookie_threshold=cookie_threshold)
    if retransmit is not None:
        opts.retransmit = retransmit
    return IkeEngine(policies, random=rnd, spis=spis, options=opts)


class ScriptedRandom:
    """Wraps an engine's random source so that the next nonce draws return
    chosen bytes (RFC 7296 §2.8.1/§2.8.2 collisions are decided by the lowest
    nonce). A nonce is any draw of ``nonce_len`` bytes: with the ECP-256 groups
    and no x25519 used in the collision tests, nothing else draws 32 bytes
    (ECP-256 private values draw 40, IVs 8 or 16, NAT hashes 20)."""

    def __init__(self, inner: RandomBytes, nonce_len: int) -> None:
        self.inner = inner
        self.nonce_len = nonce_len
        self.nonces: deque[bytes] = deque()

    def __call__(self, n: int) -> bytes:
        if n == self.nonce_len and self.nonces:
            return self.nonces.popleft()
        return self.inner(n)


def script_nonces(e: IkeEngine, *nonces: bytes) -> ScriptedRandom:
    rnd = e.ctx.random
    if not isinstance(rnd, ScriptedRandom):
        rnd = ScriptedRandom(rnd, e.ctx.options.nonce_len)
        e.ctx.random = rnd
    rnd.nonces.extend(nonces)
    return rnd


def nonce(fill: int) -> bytes:
    return bytes([fill]) * 32


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
    drop: Callable[[str, Outgoing], bool] | None = None

    def engine(self, side: str) -> IkeEngine:
        return self.a if side == "a" else self.b

    def addr(self, side: str) -> tuple[str, int]:
        return A_ADDR if side == "a" else B_ADDR

    def flush(self, rounds: int = 50) -> int:
        """Deliver datagrams back and forth until both sides are quiet."""
        delivered = 0
        for _ in range(rounds):
            moved = False
            for name in ("a", "b"):
                for out in self.engine(name).datagrams_to_send():
                    moved = True
                    self.wire.append((name, out))
                    if self.drop is not None and self.drop(name, out):
                        continue
                    self.deliver(name, out.data, out)
                    delivered += 1
            self.drain()
            if not moved:
                break
        return delivered

    def deliver(self, sender: str, data: bytes, out: Outgoing | None = None) -> None:
        """Hand ``data`` from ``sender`` to the other engine (no flush)."""
        addr = self.addr(sender)
        port = out.local_port if out is not None else 4500
        to_port = out.remote[1] if out is not None else 4500
        self.engine(other(sender)).receive_datagram(data, (addr[0], port), to_port, self.now)

    def step(self, sender: str) -> list[bytes]:
        """Deliver what ``sender`` has queued, one message flight; returns it."""
        out = self.pending(sender)
        for o in out:
            if self.drop is None or not self.drop(sender, o):
                self.deliver(sender, o.data, o)
        self.drain()
        return [o.data for o in out]

    def pending(self, side: str) -> list[Outgoing]:
        """Take what ``side`` wants to send, without delivering it."""
        out = self.engine(side).datagrams_to_send()
        self.wire += [(side, o) for o in out]
        return out

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

    def clear_events(self) -> None:
        self.events_a.clear()
        self.events_b.clear()

    # -- shortcuts -------------------------------------------------------------

    def initiate(self, side: str, children: list[str] | None = None) -> int:
        return self.engine(side).initiate("conn", self.addr(other(side)), self.now, children)

    def establish(self, side: str = "a", children: list[str] | None = None) -> None:
        self.initiate(side, children)
        self.flush()
        assert self.sa("a").state is IkeState.ESTABLISHED
        assert self.sa("b").state is IkeState.ESTABLISHED

    def sa(self, side: str) -> IkeSa:
        """The one non-terminal IKE SA of ``side``."""
        sas = [s for s in self.engine(side).by_id.values() if not s.terminal]
        assert len(sas) == 1, sas
        return sas[0]

    def established_sa(self, side: str) -> IkeSa:
        """The one ESTABLISHED IKE SA of ``side`` (half-open ones ignored)."""
        sas = [s for s in self.engine(side).by_id.values() if s.state is IkeState.ESTABLISHED]
        assert len(sas) == 1, sas
        return sas[0]

    def ike_id(self, side: str) -> int:
        return self.sa(side).ike_id

    def live(self, side: str) -> dict[int, ChildSa]:
        """Installed children of every IKE SA of ``side``, by inbound SPI."""
        return {spi: c for s in self.engine(side).by_id.values() for spi, c in s.children.items()
                if c.state is ChildState.INSTALLED}

    def child_named(self, side: str, name: str) -> ChildSa:
        found = [c for c in self.live(side).values() if c.name == name]
        assert len(found) == 1, found
        return found[0]

    def dpd_ok(self, side: str, ike_id: int | None = None) -> bool:
        """A DPD from ``side`` on its (established) IKE SA is answered: the SK
        keys work both ways and the message IDs agree."""
        if ike_id is None:
            ike_id = self.established_sa(side).ike_id
        before = [e for e in self.of(side, DpdSucceeded) if e.ike_id == ike_id]
        self.engine(side).dpd(ike_id, self.now)
        self.flush()
        after = [e for e in self.of(side, DpdSucceeded) if e.ike_id == ike_id]
        return len(after) == len(before) + 1


def assert_children_agree(p: Pair) -> None:
    """Both sides hold the same installed child pairs, mirrored."""
    la, lb = p.live("a"), p.live("b")
    assert len(la) == len(lb)
    for spi_in, ca in la.items():
        cb = lb.get(ca.spi_out)
        assert cb is not None, f"b has no child with inbound SPI {ca.spi_out:08x}"
        assert cb.spi_out == spi_in
        assert ca.keymat_in == cb.keymat_out and ca.keymat_out == cb.keymat_in
        assert ca.local_ts == cb.remote_ts and ca.remote_ts == cb.local_ts
        assert ca.name == cb.name


#: A minimal inner IPv4 packet (version nibble 4); ESP does not parse it further.
INNER_PACKET = bytes([0x45, 0, 0, 28]) + bytes(24)


def esp_carries(x: ChildSaInstalled | ChildSa, y: ChildSaInstalled | ChildSa) -> bool:
    """A packet sealed with x's outbound keys opens with y's inbound ones and
    back (what the data plane does with ``ChildSaInstalled``)."""
    def transform(c: ChildSaInstalled | ChildSa) -> tuple[str, bool]:
        if isinstance(c, ChildSa):
            return c.suite.transform, c.suite.esn
        return c.transform, c.esn

    for src, dst in ((x, y), (y, x)):
        (t_src, esn_src), (t_dst, esn_dst) = transform(src), transform(dst)
        out = OutboundSA(src.spi_out, t_src, src.keymat_out, sender_id=1, esn=esn_src)
        inb = InboundSA(dst.spi_in, t_dst, dst.keymat_in, esn=esn_dst)
        if inb.unprotect(out.protect(INNER_PACKET)) != INNER_PACKET:
            return False
    return True


def encode_with_raw(sa: IkeSa, msg: IkeMessage, payloads: list[Payload],
                    raw_type: int, raw_body: bytes, critical: bool) -> bytes:
    """``msg`` protected with ``sa``'s outbound keys, with one raw payload of
    type ``raw_type`` appended inside SK (for RFC 7296 §2.5 tests)."""
    assert sa.sk_out is not None
    first, body = encode_payloads(payloads, raw_type)
    raw = GENERIC_HEADER.pack(0, 0x80 if critical else 0, 4 + len(raw_body)) + raw_body
    inner = body + raw
    if not payloads:
        first = PayloadType(raw_type)
    sk_len = 4 + sa.sk_out.sealed_size(len(inner))
    flags = (0x08 if msg.is_initiator else 0) | (0x20 if msg.is_response else 0)
    header = HEADER.pack(msg.spi_i, msg.spi_r, PayloadType.SK, 0x20, int(msg.exchange), flags,
                         msg.message_id, IKE_HEADER_LEN + sk_len)
    aad = header + GENERIC_HEADER.pack(int(first), 0, sk_len)
    return aad + sa.sk_out.seal(aad, inner, sa.ctx.random(sa.sk_out.iv_size))


def make_pair(psk_a: bytes = b"interop-test-psk-0123456789",
              psk_b: bytes = b"interop-test-psk-0123456789", esp: str = "aes128gcm16",
              ike_a: str = "aes128gcm16-prfsha256-ecp256",
              ike_b: str = "aes128gcm16-prfsha256-ecp256", seed: int = 1,
              extra_children: bool = True, *,
              children_a: list[ChildPolicy] | None = None,
              children_b: list[ChildPolicy] | None = None,
              id_a: str | Identity = "gw-a.test", id_b: str | Identity = "gw-b.test",
              cookie_threshold_a: int = 100, cookie_threshold_b: int = 100,
              retransmit: RetransmitPolicy | None = None, **kw: object) -> Pair:
    ca = [child("net", "10.91.1.0/24", "10.91.2.0/24", esp)]
    cb = [child("net", "10.91.2.0/24", "10.91.1.0/24", esp)]
    if extra_children:
        ca.append(child("ctr", "10.91.11.0/24", "10.91.12.0/24", "aes128ctr-sha256"))
        cb.append(child("ctr", "10.91.12.0/24", "10.91.11.0/24", "aes128ctr-sha256"))
    if children_a is not None:
        ca = children_a
    if children_b is not None:
        cb = children_b
    pa = policy("conn", id_a, id_b, psk_a, ca, ike_a, **kw)  # type: ignore[arg-type]
    pb = policy("conn", id_b, id_a, psk_b, cb, ike_b, **kw)  # type: ignore[arg-type]
    return Pair(engine([pa], seed, 1, cookie_threshold_a, retransmit),
                engine([pb], seed + 7, 2, cookie_threshold_b, retransmit))

