"""The control-API client of the demo, the tests and the benchmarks: the
product's one client (``dispatcher.operator.ControlClient``, which the
command line uses) with the harness's conveniences on top.

ZeroMQ REQ to the control socket of a running gateway or cluster (the
``ipc://`` endpoint ``ipsec-cluster status --config F`` finds, reachable from
every network namespace): ``request(cmd, **args)`` sends ``{"cmd": cmd,
**args}`` and returns the JSON answer. A request that gets no answer in time
raises ``ControlTimeout``; the REQ socket, stuck in its send/receive lock-step
after that, is replaced by a fresh one for the next request.

The event stream: ``events(since)`` reads the cluster's events from sequence
number ``since`` on (``{"cmd": "events", "since": N}`` -> ``{"ok": true,
"events": [...], "next": M, "dropped": K}``), each parsed with
``common.cluster.events.Event.from_json``; ``wait_event(predicate, timeout)``
reads on until an event matches. ``mark()`` is the stream's position now: a
test takes it before the action whose event it then waits for, so an event
that comes before the wait starts is not missed (or it waits from ``since=1``,
every event the run kept). A wait outlasts a gateway that does not answer
yet (still starting: its socket is not there) and one that was started anew
(its stream numbered from 1 again: read from there).

Not thread-safe (a ZeroMQ socket is not): one client per thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from common.cluster.events import Event, Logged
from common.errors import MalformedMessage
from dispatcher.operator import ControlClient as _OneClient
from dispatcher.operator import ControlError, ControlTimeout

DEFAULT_TIMEOUT_S = 5.0
#: how often ``wait_event`` asks again when nothing new came
EVENT_POLL_S = 0.05


def endpoint_of(config: Path | str) -> str:
    """The control socket of the gateway or cluster run with ``config``."""
    from dispatcher.control import control_endpoint
    from member.config_file import read_config

    return control_endpoint(read_config(str(config)), str(config))


@dataclass(frozen=True, slots=True)
class Events:
    """One read of the event stream: the events, the sequence number to ask
    for next, and how many were lost before the first (the ring moved on)."""

    events: list[Logged]
    next: int
    dropped: int = 0


@dataclass(slots=True)
class _Waited:
    seen: list[Logged] = field(default_factory=list)
    dropped: int = 0
    unanswered: int = 0
    restarts: int = 0


class ControlClient(_OneClient):
    """Requests to one control socket (``endpoint`` or the one of ``config``)."""

    def __init__(self, endpoint: str | None = None, *, config: Path | str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, context: zmq.Context[Any] | None = None
                 ) -> None:
        if (endpoint is None) == (config is None):
            raise ValueError("give an endpoint or a config, one of them")
        super().__init__(endpoint if endpoint is not None else endpoint_of(config or ""),
                         timeout=timeout, context=context)
        #: where ``wait_event`` goes on from (the ``next`` of its last read)
        self.cursor = 0

    # -- requests --------------------------------------------------------------------

    def request(self, cmd: str, *, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """The answer to ``{"cmd": cmd, **args}``; ``ControlError`` when it
        says ``ok: false``, ``ControlTimeout`` when none came in time."""
        answer = self.raw({"cmd": cmd, **args}, timeout=timeout)
        if answer.get("ok") is False:
            raise ControlError(f"{cmd}: {answer.get('error', answer)}")
        return answer

    def raw(self, req: dict[str, Any] | bytes, *, timeout: float | None = None
            ) -> dict[str, Any]:
        """The JSON object answered to ``req`` (a dict, or bytes as they are),
        whatever its ``ok``."""
        try:
            return self.ask(req, timeout=timeout)
        except zmq.ZMQError as exc:
            raise ControlTimeout(f"{self.endpoint}: {exc}") from exc

    def try_request(self, cmd: str, *, timeout: float | None = None,
                    **args: Any) -> dict[str, Any] | None:
        """``request``, or None when it failed or nothing answered in time."""
        try:
            return self.request(cmd, timeout=timeout, **args)
        except ControlError:
            return None

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        """What ``ipsec-cluster status --json`` prints."""
        return self.request("status", timeout=timeout)

    def sas(self, timeout: float | None = None) -> dict[str, Any]:
        """What ``ipsec-cluster sas --json`` prints."""
        return self.request("sas", timeout=timeout)

    # -- the event stream ----------------------------------------------------------------

    def events(self, since: int = 0, *, timeout: float | None = None) -> Events:
        """The events from sequence number ``since`` on (as many as one
        answer holds: ask again from ``next`` for more)."""
        answer = self.request("events", since=since, timeout=timeout)
        raw, nxt, dropped = answer.get("events"), answer.get("next"), answer.get("dropped", 0)
        if not isinstance(raw, list) or type(nxt) is not int or type(dropped) is not int:
            raise ControlError(f"events: not an events answer: {str(answer)[:200]}")
        out = []
        for obj in raw:
            try:
                seq, at = obj["seq"], obj["time"]
                if type(seq) is not int or not isinstance(at, int | float):
                    raise TypeError
                out.append(Logged(seq, float(at), Event.from_json(obj)))
            except (KeyError, TypeError, MalformedMessage) as exc:
                raise ControlError(f"events: a bad event {str(obj)[:200]}: {exc}") from None
        return Events(out, nxt, dropped)

    def mark(self, *, timeout: float | None = None) -> int:
        """The sequence number the next event will have (``wait_event`` goes
        on from there: what happened before is not waited for)."""
        answer = self.request("events", timeout=timeout)
        nxt = answer.get("next")
        if type(nxt) is not int:
            raise ControlError(f"events: not an events answer: {str(answer)[:200]}")
        self.cursor = nxt
        return nxt

    def wait_event(self, predicate: Callable[[Event], bool], timeout: float, *,
                   since: int | None = None, alive: Callable[[], bool] | None = None
                   ) -> Logged:
        """The first event from ``since`` (default: where the last wait or
        ``mark`` stopped; 0 at first, every event kept) that ``predicate``
        accepts; ``TimeoutError`` naming the events seen if none does within
        ``timeout`` seconds. Later waits go on after the event returned.

        No answer (the gateway is not listening yet, or busy) is waited out
        until the deadline; ``alive`` (the gateway's process still runs)
        ends the wait early when it says False. A stream that starts anew
        (the gateway restarted: ``next`` below what was asked for) is read
        from its first event."""
        cursor = self.cursor if since is None else since
        end = time.monotonic() + timeout
        waited = _Waited()
        while True:
            left = end - time.monotonic()
            try:
                got = self.events(cursor, timeout=max(0.1, min(self.timeout, left)))
            except ControlTimeout:
                waited.unanswered += 1
                got = Events([], cursor)
            waited.dropped += got.dropped
            for logged in got.events:
                waited.seen.append(logged)
                if predicate(logged.event):
                    self.cursor = logged.seq + 1
                    return logged
            if got.next < cursor and not got.events:
                waited.restarts += 1
                cursor = 1
            else:
                cursor = got.next
            self.cursor = cursor
            if alive is not None and not alive():
                raise TimeoutError("the gateway exited; " + self._waited_text(timeout, waited))
            if time.monotonic() >= end:
                raise TimeoutError(self._waited_text(timeout, waited))
            if not got.events:
                time.sleep(min(EVENT_POLL_S, max(0.0, end - time.monotonic())))

    @staticmethod
    def _waited_text(timeout: float, waited: _Waited) -> str:
        last = [f"{e.seq} {e.event.type.value} {e.event.to_json()}" for e in waited.seen[-10:]]
        lost = f" ({waited.dropped} lost: the ring moved on)" if waited.dropped else ""
        if waited.unanswered:
            lost += f"; {waited.unanswered} requests not answered"
        if waited.restarts:
            lost += f"; the stream started anew {waited.restarts} times"
        return (f"no matching event within {timeout:g} s; {len(waited.seen)} seen{lost}"
                + ("; the last:\n  " + "\n  ".join(last) if last else ""))

    # -- the end ---------------------------------------------------------------------------

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ask(config: Path | str, cmd: str, *, timeout: float = DEFAULT_TIMEOUT_S,
        **args: Any) -> dict[str, Any]:
    """One request to the gateway or cluster of ``config`` (a client of its own)."""
    with ControlClient(config=config, timeout=timeout) as client:
        return client.request(cmd, **args)
