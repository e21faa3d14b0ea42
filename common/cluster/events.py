"""The cluster's event stream: typed facts that the control socket serves
(``{"cmd": "events", "since": N}``) and that the demo, ``status`` and the
tests read instead of log lines.

Pure: an ``EventLog`` is a bounded ring with sequence numbers; the shell
passes the time in. Every event crosses process boundaries as a flat JSON
object (``Event.to_json`` / ``Event.from_json``), refused with
``MalformedMessage`` when a field is not what its type says."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from common.errors import MalformedMessage


class EventType(StrEnum):
    """What happened. The fields each type fills are listed with it."""

    READY = "ready"                    # the dispatcher/gateway listens (peer: its address)
    MEMBER_JOINED = "member_joined"    # member, sender_id
    MEMBER_DEAD = "member_dead"        # member, reason
    TAKEOVER = "takeover"              # member (the new owner), dead (the old), epoch, segments
    # reason (assign, failover, backups, autobalance, balanced), epoch, segments
    # (the moved ones), member (the joining one, for autobalance and balanced)
    SEGMENTS_MOVED = "segments_moved"
    IKE_UP = "ike_up"                  # member, conn, ike_spi, peer
    IKE_DOWN = "ike_down"              # member, conn, ike_spi, reason
    IKE_REKEYED = "ike_rekeyed"        # member, conn, ike_spi (old), new_spi
    IKE_FAILED = "ike_failed"          # member, conn, peer, reason (auth, proposals, ...)
    CHILD_UP = "child_up"              # member, conn, child, ike_spi, child_spi (inbound), peer
    CHILD_DOWN = "child_down"          # member, conn, child, child_spi, reason
    CHILD_REKEYED = "child_rekeyed"    # member, conn, child, child_spi (old), new_spi
    CHILD_FAILED = "child_failed"      # member, conn, child, ike_spi, reason
    LEASE_RELEASED = "lease_released"  # member, conn, address (a virtual IP back in its pool)


#: what a member may report (the dispatcher publishes the rest itself)
MEMBER_EVENTS = frozenset({
    EventType.IKE_UP, EventType.IKE_DOWN, EventType.IKE_REKEYED, EventType.IKE_FAILED,
    EventType.CHILD_UP, EventType.CHILD_DOWN, EventType.CHILD_REKEYED, EventType.CHILD_FAILED,
    EventType.LEASE_RELEASED})


_MAX_TEXT = 256
_MAX_SEGMENTS = 1024
#: the most events one read returns (and the ring's default size)
MAX_LIMIT = 4096


def clip(text: str) -> str:
    """``text`` as an event's string field: its first line, at most 256 characters."""
    lines = text.splitlines()
    return (lines[0] if lines else "")[:_MAX_TEXT]


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    member: int = 0            # the member it happened on (0: the dispatcher or gateway)
    conn: str = ""             # the connection's name
    ike_spi: str = ""          # our IKE SPI, 16 hex digits
    child_spi: str = ""        # our inbound ESP SPI, 8 hex digits
    new_spi: str = ""          # rekeyed: the SPI that replaces ike_spi / child_spi
    peer: str = ""             # the peer's address
    child: str = ""            # a child SA's name (CHILD_*)
    address: str = ""          # a virtual IP (LEASE_RELEASED)
    reason: str = ""           # down / failed / dead: why, one line
    epoch: int = 0             # the segment table's epoch after the change
    sender_id: int = 0         # MEMBER_JOINED: the incarnation's IV sender id
    dead: int = 0              # TAKEOVER: the member that died
    segments: tuple[int, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """The non-default fields, ``type`` always."""
        out: dict[str, Any] = {"type": self.type.value}
        for f in fields(self):
            if f.name == "type":
                continue
            value = getattr(self, f.name)
            if value != f.default and value != ():
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, obj: object) -> Event:
        """An event from its JSON object; anything else is MalformedMessage."""
        if not isinstance(obj, dict):
            raise MalformedMessage("event: not an object")
        try:
            kind = EventType(str(obj.get("type")))
        except ValueError:
            raise MalformedMessage(f"event: unknown type {obj.get('type')!r:.40}") from None
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "type" or f.name not in obj:
                continue
            value = obj[f.name]
            if f.name == "segments":
                if (not isinstance(value, list) or len(value) > _MAX_SEGMENTS
                        or not all(type(s) is int and 0 <= s < 1 << 16 for s in value)):
                    raise MalformedMessage("event: segments must be a list of segment numbers")
                kwargs[f.name] = tuple(value)
            elif isinstance(f.default, int):
                if type(value) is not int or not 0 <= value < 1 << 64:
                    raise MalformedMessage(f"event: {f.name} must be an unsigned integer")
                kwargs[f.name] = value
            else:
                if not isinstance(value, str) or len(value) > _MAX_TEXT:
                    raise MalformedMessage(f"event: {f.name} must be a short string")
                kwargs[f.name] = value
        unknown = set(obj) - {f.name for f in fields(cls)} - {"seq", "time"}
        if unknown:
            raise MalformedMessage(f"event: unknown field {sorted(unknown)[0]!r:.40}")
        return cls(kind, **kwargs)


@dataclass(frozen=True, slots=True)
class Logged:
    seq: int
    time: float
    event: Event

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": round(self.time, 6), **self.event.to_json()}


class EventLog:
    """The last ``capacity`` events, numbered from 1. A reader keeps the
    ``next`` of its previous read; ``dropped`` says how many it missed
    because the ring had moved past them."""

    def __init__(self, capacity: int = MAX_LIMIT) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._ring: deque[Logged] = deque(maxlen=capacity)
        self._next = 1

    @property
    def next_seq(self) -> int:
        return self._next

    def add(self, event: Event, now: float) -> int:
        seq = self._next
        self._ring.append(Logged(seq, now, event))
        self._next += 1
        return seq

    def since(self, seq: int, limit: int = 512) -> tuple[list[Logged], int, int]:
        """(events with seq >= ``seq``, at most ``limit``; the next seq to ask
        for; how many events before the first returned one were lost). A
        ``seq`` past the end (a reader of a log that started anew) reads
        from the end: ``next`` then is below what the reader asked for."""
        seq = min(max(seq, 1), self._next)
        first = self._ring[0].seq if self._ring else self._next
        dropped = max(0, first - seq)
        start = max(seq, first)
        out = [e for e in self._ring if e.seq >= start][: max(limit, 0)]
        nxt = out[-1].seq + 1 if out else max(start, min(seq, self._next))
        return out, nxt, dropped
