"""Logging for every process: the text and JSON formats, and the one line per
SA event.

``setup_logging`` is called once per process (dispatcher/cli.py) with its
role: ``dispatcher``, ``member N``, ``gateway`` or ``peer``. Text lines carry
the role in brackets; JSON lines are one object each with ``time``,
``level``, ``role``, ``logger``, ``message`` and, for SA events, the
structured fields of ``SaEventLog`` (``event``, ``connection``,
``ike_spi_i``, ``ike_spi_r``, ``member``, ``peer``, ...).

SA events are logged here only, from the events the IKE core hands its
shell (common/ike/events.py): the core itself logs none of them, so that
each event is one line. The same facts go to the event stream of the
control API as ``Event``s (common/cluster/events.py): the demo, ``status``
and the tests read those, not these lines.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TextIO

from common.cluster.events import Event, EventType, clip
from common.ike.events import (
    ChildSaDeleted,
    ChildSaFailed,
    ChildSaInstalled,
    IkeEvent,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaRekeyed,
)

#: the attribute of a LogRecord that holds an SA event's fields
SA_FIELDS = "sa_fields"
TEXT_FORMAT = "%(asctime)s [%(role)s] %(name)s %(levelname)s %(message)s"

log = logging.getLogger("ipsec_cluster.sa")


class _RoleFilter(logging.Filter):
    """Puts the process role on every record (for both formats)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601 with milliseconds), level,
    role, logger, message, and an SA event's fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        obj: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "role": getattr(record, "role", ""),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, SA_FIELDS, None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                obj.setdefault(key, value)
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, separators=(",", ":"), default=str)


def setup_logging(level: str, fmt: str, role: str, stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one to ``stream`` (stderr)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(_RoleFilter(role))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


class LiveSa(NamedTuple):
    """The engine's view of a live IKE SA (``engine_lookup``)."""

    name: str
    spi_i: bytes
    spi_r: bytes
    peer: str
    initiator: bool = False
    #: its virtual IPs (RFC 7296 §3.15), back in their pool when it goes
    leases: tuple[str, ...] = ()


@dataclass(slots=True)
class _Known:
    name: str
    spi_i: str
    spi_r: str
    peer: str
    initiator: bool = False
    leases: tuple[str, ...] = ()

    @property
    def ours(self) -> str:
        """Our SPI of the IKE SA (hex)."""
        return self.spi_i if self.initiator else self.spi_r


class SaEventLog:
    """One log line per SA event, with the connection name, the IKE SPIs, the
    member id and the peer's address, and the same fact as an ``Event`` for
    the event stream (``publish``: the gateway's, or the member process's
    outbox to the dispatcher). The IKE core drops an SA before its shell
    drains the SA's last event, so the SPIs (and virtual IPs) are remembered
    here from the SA's establishment on."""

    def __init__(self, member_id: int, lookup: Callable[[int], LiveSa | None],
                 publish: Callable[[Event], None] | None = None) -> None:
        self.member_id = member_id
        #: the engine's view of a live IKE SA: name, SPIs, peer address, ...
        self.lookup = lookup
        self.publish = publish
        self.known: dict[int, _Known] = {}

    def remember(self, ike_id: int, name: str, spi_i: bytes, spi_r: bytes, peer: str,
                 initiator: bool = False, leases: tuple[str, ...] = ()) -> _Known:
        k = self.known[ike_id] = _Known(name, spi_i.hex(), spi_r.hex(), peer, initiator,
                                        leases)
        return k

    def _find(self, ike_id: int) -> _Known | None:
        k = self.known.get(ike_id)
        if k is None and (live := self.lookup(ike_id)) is not None:
            k = self.remember(ike_id, *live)
        return k

    def _emit(self, level: int, event: str, ike_id: int, child: str, what: str,
              **extra: Any) -> None:
        k = self._find(ike_id)
        conn = extra.pop("connection", "") or (k.name if k else "")
        peer = extra.pop("peer", "") or (k.peer if k else "")
        fields: dict[str, Any] = {
            "event": event, "connection": conn, "ike_id": ike_id,
            "ike_spi_i": k.spi_i if k else "", "ike_spi_r": k.spi_r if k else "",
            "member": self.member_id, "peer": peer}
        if child:
            fields["child"] = child
        fields.update(extra)
        spis = f"SPIs {k.spi_i}_i {k.spi_r}_r" if k else "no SPIs yet"
        if child:
            text = (f"child SA {child} {what} (IKE SA {conn}[{ike_id}], {spis}, "
                    f"member {self.member_id}, peer {peer or '?'})")
        else:
            text = f"IKE SA {conn}[{ike_id}] {what} ({spis}, member {self.member_id})"
        log.log(level, "%s", text, extra={SA_FIELDS: fields})

    def _publish(self, kind: EventType, ike_id: int, **fields: str) -> None:
        """The event for the stream: the member, and the IKE SA's connection,
        our SPI and the peer unless ``fields`` name them."""
        if self.publish is None:
            return
        k = self._find(ike_id)
        base = {"conn": k.name if k else "", "ike_spi": k.ours if k else "",
                "peer": k.peer if k else ""}
        base.update({key: value for key, value in fields.items() if value})
        text: dict[str, Any] = {key: clip(value) for key, value in base.items()}
        self.publish(Event(kind, member=self.member_id, **text))

    def _released(self, ike_id: int) -> None:
        """The IKE SA is gone: its virtual IPs are back in their pools."""
        k = self.known.get(ike_id)
        for address in k.leases if k else ():
            self._publish(EventType.LEASE_RELEASED, ike_id, address=address)

    def event(self, e: IkeEvent) -> None:
        """Log and publish one event (those that are not SA events are ignored)."""
        if isinstance(e, IkeSaEstablished):
            live = self.lookup(e.ike_id)
            self.remember(e.ike_id, e.name, e.spi_i, e.spi_r, e.remote[0], e.initiator,
                          live.leases if live else ())
            self._emit(logging.INFO, "ike_sa_established", e.ike_id, "",
                       f"established with {e.remote[0]} ({e.local_id} <-> {e.remote_id}), "
                       f"{e.suite}", initiator=e.initiator, suite=e.suite,
                       local_id=e.local_id, remote_id=e.remote_id)
            self._publish(EventType.IKE_UP, e.ike_id)
        elif isinstance(e, IkeSaRekeyed):
            old = self.known.get(e.old_ike_id)  # its own deletion follows
            name, peer = (old.name, old.peer) if old else ("", "")
            live = self.lookup(e.new_ike_id)
            # the virtual IPs follow the new SA (RFC 7296 §2.18)
            leases = live.leases if live and live.leases else old.leases if old else ()
            new = self.remember(e.new_ike_id, name, e.spi_i, e.spi_r, peer,
                                live.initiator if live else False, leases)
            if old is not None:
                old.leases = ()
            self._emit(logging.INFO, "ike_sa_rekeyed", e.new_ike_id, "",
                       f"with {peer or '?'}: IKE SA {name}[{e.old_ike_id}]"
                       + (f" ({old.spi_i}_i {old.spi_r}_r)" if old else "")
                       + f" rekeyed into {name}[{e.new_ike_id}]", old_ike_id=e.old_ike_id)
            self._publish(EventType.IKE_REKEYED, e.old_ike_id, conn=name, peer=peer,
                          new_spi=new.ours)
        elif isinstance(e, IkeSaDeleted):
            k = self.known.get(e.ike_id)
            self._emit(logging.INFO, "ike_sa_deleted", e.ike_id, "",
                       f"with {k.peer if k else '?'} deleted: {e.reason}",
                       connection=e.name, reason=e.reason)
            self._publish(EventType.IKE_DOWN, e.ike_id, conn=e.name, reason=e.reason)
            self._released(e.ike_id)
            self.known.pop(e.ike_id, None)
        elif isinstance(e, IkeSaFailed):
            self._emit(logging.WARNING, "ike_sa_failed", e.ike_id, "",
                       f"with {e.remote[0]} failed: {e.reason}", connection=e.name,
                       reason=e.reason, peer=e.remote[0])
            self._publish(EventType.IKE_FAILED, e.ike_id, conn=e.name, peer=e.remote[0],
                          reason=e.reason)
            self._released(e.ike_id)
            self.known.pop(e.ike_id, None)
        elif isinstance(e, ChildSaInstalled):
            rekey = f", rekeys {e.replaces:08x}_i" if e.replaces else ""
            self._emit(logging.INFO, "child_sa_rekeyed" if e.replaces else "child_sa_installed",
                       e.ike_id, e.name,
                       f"{e.spi_in:08x}_i {e.spi_out:08x}_o installed: {e.transform}{rekey}",
                       spi_in=f"{e.spi_in:08x}", spi_out=f"{e.spi_out:08x}",
                       transform=e.transform,
                       replaces=f"{e.replaces:08x}" if e.replaces else None)
            if e.replaces:
                self._publish(EventType.CHILD_REKEYED, e.ike_id, child=e.name,
                              child_spi=f"{e.replaces:08x}", new_spi=f"{e.spi_in:08x}")
            else:
                self._publish(EventType.CHILD_UP, e.ike_id, child=e.name,
                              child_spi=f"{e.spi_in:08x}")
        elif isinstance(e, ChildSaDeleted):
            self._emit(logging.INFO, "child_sa_deleted", e.ike_id, e.name,
                       f"{e.spi_in:08x}_i deleted: {e.reason}, {e.spi_out:08x}_o",
                       spi_in=f"{e.spi_in:08x}", spi_out=f"{e.spi_out:08x}", reason=e.reason)
            self._publish(EventType.CHILD_DOWN, e.ike_id, child=e.name,
                          child_spi=f"{e.spi_in:08x}", reason=e.reason)
        elif isinstance(e, ChildSaFailed):
            self._emit(logging.WARNING, "child_sa_failed", e.ike_id, e.name or "?",
                       f"failed: {e.reason}", reason=e.reason)
            self._publish(EventType.CHILD_FAILED, e.ike_id, child=e.name, reason=e.reason)


def engine_lookup(engine: Any) -> Callable[[int], LiveSa | None]:
    """``SaEventLog``'s view of a live IKE SA in ``engine`` (an IkeEngine)."""
    def lookup(ike_id: int) -> LiveSa | None:
        sa = engine.by_id.get(ike_id)
        if sa is None:
            return None
        return LiveSa(sa.name, sa.spi_i, sa.spi_r, sa.remote[0], bool(sa.initiator),
                      tuple(str(lease.address) for lease in sa.leases))
    return lookup
