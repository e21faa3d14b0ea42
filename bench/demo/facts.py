"""What the demo knows: its schedule and limits, and the facts the scenario
records (the cluster's status, its events, our peer's records, the
failover's moments) for the view to show and the verdict to judge."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.cluster.events import EventType

GW, PEER = "127.0.0.1", "127.0.0.2"
PSK = "demo-psk-not-secret-0123456789abcdef"
ESPS = ("aes128gcm16", "aes128ctr-sha256", "aes256gcm16")
SEGMENTS = 256
#: a live table and the status poll, per second
REFRESH_HZ = 4


@dataclass(frozen=True, slots=True)
class Schedule:
    """How long the acts last (seconds)."""

    ike_sas: int = 6
    children: int = 3
    members: int = 3
    pps: float = 300.0
    size: int = 256
    #: traffic starts once every SA is up; the kill comes this long after
    kill_after: float = 15.0
    #: total traffic time (the kill included)
    traffic: float = 34.0


FULL = Schedule()
QUICK = Schedule(kill_after=5.0, traffic=14.0)

#: deadlines of the setup steps
CLUSTER_UP_S = 25.0
PEER_UP_S = 30.0
#: after the kill, by when the member must be dead / back / balanced
DEAD_WITHIN_S = 3.0
RESTART_WITHIN_S = 10.0
BALANCED_WITHIN_S = 15.0
#: every child must have had an echo this close to the end of the traffic
LAST_ECHO_S = 1.0
#: how much of a log a failure shows
TAIL_CHARS = 1500
#: lost packets allowed outside the failover and autobalance windows (loopback
#: does not lose, a very busy machine might)
STRAY_LOSS = 0.01


@dataclass(slots=True)
class Failover:
    """The failover act, its moments in time.monotonic() (from the cluster's
    events when they say, else from the status polls)."""

    member: int = 0
    pid: int = 0
    sender_id: int = 0
    ike_sas: int = 0
    child_sas: int = 0
    segments: int = 0
    killed_at: float | None = None
    dead_at: float | None = None
    dead_epoch: int = 0
    #: member -> segments it took over from the dead one (TAKEOVER events)
    moved_to: dict[int, int] = field(default_factory=dict)
    #: (member, segments, when) of every TAKEOVER of the dead member's segments
    takeovers: list[tuple[int, int, float]] = field(default_factory=list)
    #: every member's (IKE SAs, child SAs) adopted so far, at the kill (its sync counters)
    adopted_before: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: child SAs rekeyed after the kill (CHILD_REKEYED: replay_after_failover = rekey), per member
    rekeyed: dict[int, int] = field(default_factory=dict)
    rejoined_at: float | None = None
    new_pid: int = 0
    new_sender_id: int = 0
    balanced_at: float | None = None
    balanced_segments: int = 0
    #: segments, IKE SAs, child SAs the rejoined member took back
    taken_back: list[int] = field(default_factory=lambda: [0, 0, 0])

    def since_kill(self, at: float) -> str:
        """"150 ms after the kill" (or before it)."""
        if self.killed_at is None:
            raise RuntimeError("failover summary before the kill")
        ms = (at - self.killed_at) * 1000
        span = f"{abs(ms):.0f} ms" if abs(ms) < 2000 else f"{abs(ms) / 1000:.1f} s"
        return f"{span} {'after' if ms >= 0 else 'before'} the kill"


@dataclass(slots=True)
class Facts:
    """Everything the scenario recorded, in time.monotonic() where a time."""

    schedule: Schedule
    t_start: float
    gw_ports: tuple[int, int] = (0, 0)
    #: the segment table's epoch at the last ``status``
    epoch: int = 0
    #: the last ``status`` answer
    status: dict[str, Any] | None = None
    #: what the event stream said so far, by type
    seen: dict[EventType, int] = field(default_factory=dict)
    #: IKE_UP events per member
    ike_up: dict[int, int] = field(default_factory=dict)
    #: members declared dead that we did not kill: (when, what)
    others_dead: list[tuple[float, str]] = field(default_factory=list)
    #: our peer's "up" record (SAs up), its last counts, its "done" record
    up: dict[str, Any] = field(default_factory=dict)
    peer_sent: int = 0
    peer_echoed: int = 0
    done: dict[str, Any] | None = None
    #: when our peer's traffic started
    t0: float | None = None
    fo: Failover = field(default_factory=Failover)
    #: ``sas`` before the kill, at the rejoin, at the end
    sas_before: dict[str, Any] | None = None
    sas_during: dict[str, Any] | None = None
    sas_after: dict[str, Any] | None = None
    #: the act we are in, for the table's title
    phase: str = "starting"


def member_status(status: dict[str, Any] | None, member: int) -> dict[str, Any] | None:
    """One member's entry of a ``status`` answer."""
    return next((m for m in (status or {}).get("members", []) if m["id"] == member), None)


def adopted(status: dict[str, Any] | None) -> dict[int, tuple[int, int]]:
    """Every member's (IKE SAs, child SAs) adopted so far (its sync counters:
    what it took over, at a failover or a handover)."""
    return {m["id"]: (m["sync"].get("ike_sas_adopted", 0),
                      m["sync"].get("child_sas_adopted", 0))
            for m in (status or {}).get("members", [])}
