"""Virtual IP address pools, partitioned by segment (RFC 7296 §3.15, RFC 6027 §3.7).

Rules of this file:
- A pool's usable addresses are numbered 0..size-1 (IPv4: without the network
  and broadcast addresses of a prefix up to /30; IPv6: without the
  subnet-router anycast address, index 0 of the prefix).
- Address number ``i`` belongs to segment ``i mod 2**segment_bits``. An IKE SA
  lives in one segment (its SPI says which), and a segment has one owner at a
  time, so the owner leases from that segment's partition alone and two
  members never lease one address: no round trip between members.
- A lease is held by the IKE SA; it travels in the SA's replica. The member
  that takes a segment over ``claim``s the leases of the SAs it adopts.
- Nothing here raises for a full pool: ``lease`` returns None (the exchange
  answers INTERNAL_ADDRESS_FAILURE, RFC 7296 §3.15.4).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field

from common.cluster.spi import segment_of_ike_spi

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: how many peers' last addresses a pool remembers (to give a reconnecting
#: peer its old address back when it is still free)
RECENT_PEERS_MAX = 65536


def _first_offset(net: IPNetwork) -> tuple[int, int]:
    """(offset of usable address 0 in the prefix, number of usable addresses)."""
    n = net.num_addresses
    if net.version == 4:
        return (1, n - 2) if n >= 4 else (0, n)
    return (1, n - 1) if n >= 2 else (0, n)


@dataclass(slots=True)
class Pool:
    """One ``[pools.NAME]``: a prefix, its DNS servers, what is leased."""

    name: str
    network: IPNetwork
    dns: tuple[IPAddress, ...] = ()
    segment_bits: int = 0
    #: address index -> holder key (the peer's identity, for status)
    leased: dict[int, bytes] = field(default_factory=dict)
    #: peer identity -> the index it had last (least recently used first)
    recent: OrderedDict[bytes, int] = field(default_factory=OrderedDict)

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def size(self) -> int:
        return _first_offset(self.network)[1]

    @property
    def partitions(self) -> int:
        return 1 << self.segment_bits

    def per_segment(self, segment: int) -> int:
        """How many addresses segment ``segment`` may lease."""
        p = self.partitions
        return 0 if segment >= p else max(0, (self.size - segment + p - 1) // p)

    def address(self, index: int) -> IPAddress:
        return self.network.network_address + _first_offset(self.network)[0] + index

    def index_of(self, addr: IPAddress) -> int | None:
        if addr.version != self.version or addr not in self.network:
            return None
        offset, size = _first_offset(self.network)
        i = int(addr) - int(self.network.network_address) - offset
        return i if 0 <= i < size else None

    def segment_of(self, addr: IPAddress) -> int | None:
        i = self.index_of(addr)
        return None if i is None else i % self.partitions

    def lease(self, segment: int, holder: bytes,
              prefer: IPAddress | None = None) -> IPAddress | None:
        """A free address of ``segment``'s partition: ``prefer`` if it is one,
        else the holder's last address if free, else the lowest free one."""
        p = self.partitions
        candidates = [self.index_of(prefer)] if prefer is not None else []
        candidates.append(self.recent.get(holder))
        for i in candidates:
            if i is not None and i % p == segment and i not in self.leased:
                return self._take(i, holder)
        # At most len(leased) indexes of the partition are taken: the first
        # free one is within that many steps.
        for k in range(self.per_segment(segment)):
            i = segment + k * p
            if i not in self.leased:
                return self._take(i, holder)
        return None

    def _take(self, index: int, holder: bytes) -> IPAddress:
        self.leased[index] = holder
        self.recent[holder] = index
        self.recent.move_to_end(holder)
        while len(self.recent) > RECENT_PEERS_MAX:
            self.recent.popitem(last=False)
        return self.address(index)

    def claim(self, addr: IPAddress, holder: bytes) -> bool:
        """Mark ``addr`` leased (a lease found in a replica we take over);
        False when it is not one of this pool's addresses."""
        i = self.index_of(addr)
        if i is None:
            return False
        self._take(i, holder)
        return True

    def release(self, addr: IPAddress) -> None:
        i = self.index_of(addr)
        if i is not None:
            self.leased.pop(i, None)


@dataclass(slots=True, frozen=True)
class Lease:
    """An address an IKE SA holds: from which pool."""

    pool: str
    address: IPAddress


class PoolSet:
    """The pools of one member (or of the single gateway)."""

    __slots__ = ("pools", "segment_bits")

    def __init__(self, pools: list[Pool], segment_bits: int) -> None:
        self.segment_bits = segment_bits
        self.pools = {p.name: p for p in pools}
        for p in pools:
            p.segment_bits = segment_bits

    def segment_of_spi(self, spi: bytes) -> int:
        return segment_of_ike_spi(int.from_bytes(spi, "big"), self.segment_bits)

    def lease(self, names: list[str], version: int, segment: int, holder: bytes,
              prefer: IPAddress | None = None) -> Lease | None:
        """An address of IP ``version`` from the first of ``names`` that has
        one free in ``segment``'s partition."""
        for name in names:
            pool = self.pools.get(name)
            if pool is None or pool.version != version:
                continue
            addr = pool.lease(segment, holder, prefer)
            if addr is not None:
                return Lease(name, addr)
        return None

    def claim(self, lease: Lease, holder: bytes) -> bool:
        pool = self.pools.get(lease.pool)
        return pool is not None and pool.claim(lease.address, holder)

    def release(self, lease: Lease) -> None:
        pool = self.pools.get(lease.pool)
        if pool is not None:
            pool.release(lease.address)

    def dns(self, names: list[str], version: int) -> list[IPAddress]:
        out: list[IPAddress] = []
        for name in names:
            pool = self.pools.get(name)
            if pool is not None:
                out += [a for a in pool.dns if a.version == version and a not in out]
        return out

    def status(self) -> list[dict[str, object]]:
        """What ``ipsec-cluster status`` shows of each pool."""
        return [{"name": p.name, "addrs": str(p.network), "size": p.size,
                 "per_segment": p.per_segment(0), "leased": len(p.leased),
                 "leases": sorted(str(p.address(i)) for i in p.leased)}
                for p in self.pools.values()]
