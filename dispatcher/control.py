"""The control API (docs/operations.md "Control API"): JSON requests
``{"cmd": "...", ...}`` on the ZeroMQ REQ/REP ipc socket in the run
directory, JSON answers ``{"ok": true, ...}`` or ``{"ok": false, "error":
"one line"}``. One handler table serves both modes: the single-process
gateway answers from its own ``Member``; the cluster's dispatcher relays to
its members (``ControlReq``) and merges their answers (``Control``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import zmq
import zmq.asyncio

from common.cluster.events import MAX_LIMIT, EventLog
from common.cluster.stats import StatusReport
from common.config import Config

log = logging.getLogger("ipsec_cluster.control")

#: longest request we read (a request is a command and a name or two)
MAX_REQUEST_BYTES = 4096


def run_dir(config: Config, config_path: str) -> Path:
    """Where a running cluster keeps its sockets: ``cluster.control`` or a
    folder derived from the config file's absolute path, so that ``status``
    and ``sas`` find the cluster through the same ``--config``."""
    if config.cluster.control:
        return Path(config.cluster.control)
    digest = hashlib.sha256(str(Path(config_path).resolve()).encode()).hexdigest()[:12]
    return Path("/tmp") / f"ipsec-cluster-{digest}"  # noqa: S108 - a per-config folder, 0700


def control_endpoint(config: Config, config_path: str) -> str:
    return f"ipc://{run_dir(config, config_path) / 'control.ipc'}"


class Backend(Protocol):
    """What a mode offers the handlers."""

    def status_report(self) -> StatusReport: ...

    def connections(self) -> list[dict[str, Any]]: ...

    @property
    def events(self) -> EventLog:
        """The event stream (``events``)."""
        ...

    async def ask(self, req: dict[str, Any], *, one: bool = False) -> list[dict[str, Any]]:
        """Every member's answer to ``req`` (``one``: a single member acts,
        for ``initiate``: one IKE SA, not one per member)."""
        ...

    async def reload(self) -> dict[str, Any]: ...


Handler = Callable[[Backend, dict[str, Any]], Awaitable[dict[str, Any]]]


async def _status(b: Backend, req: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, **b.status_report().to_json()}


async def _sas(b: Backend, req: dict[str, Any]) -> dict[str, Any]:
    answers = await b.ask({"cmd": "list-sas"})
    return {"ok": True, "members": answers}


async def _list_conns(b: Backend, req: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "connections": b.connections()}


def _target(req: dict[str, Any], cmd: str) -> dict[str, Any]:
    ike, child = req.get("ike"), req.get("child")
    if (ike is None) == (child is None) or not isinstance(ike or child, str):
        raise ValueError(f"{cmd}: give one of \"ike\" or \"child\" (a string)")
    return {"cmd": cmd, "ike": ike} if ike is not None else {"cmd": cmd, "child": child}


async def _initiate(b: Backend, req: dict[str, Any]) -> dict[str, Any]:
    target = _target(req, "initiate")
    if "child" in target:
        # a CREATE_CHILD_SA by the member that owns an IKE SA of its
        # connection (in the cluster: any member may); else a new IKE SA
        answers = await b.ask({**target, "existing": True})
        if any(a.get("ike_ids") for a in answers):
            return _merge(answers, "initiate", req)
    answers = await b.ask(target, one=True)
    return _merge(answers, "initiate", req)


async def _act(b: Backend, req: dict[str, Any]) -> dict[str, Any]:
    answers = await b.ask(_target(req, str(req["cmd"])))
    return _merge(answers, str(req["cmd"]), req)


def _merge(answers: list[dict[str, Any]], cmd: str, req: dict[str, Any]) -> dict[str, Any]:
    errors = [a["error"] for a in answers if not a.get("ok")]
    done = sum(int(a.get("done", 0)) for a in answers) + sum(
        len(a.get("ike_ids", [])) for a in answers)
    if errors and not done:
        return {"ok": False, "error": errors[0]}
    if not done:
        what = req.get("ike") or req.get("child")
        return {"ok": False, "error": f"{cmd}: no SA matches {what!r}"}
    return {"ok": True, "done": done, "members": answers}


async def _stats(b: Backend, req: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "members": await b.ask({"cmd": "stats"})}


async def _reload(b: Backend, req: dict[str, Any]) -> dict[str, Any]:
    return await b.reload()


#: the highest ``since`` taken (a sequence number, JSON-safe)
MAX_SINCE = (1 << 53) - 1
#: events per answer unless the request says ``limit``
DEFAULT_LIMIT = 512


def _number(req: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = req.get(key)
    if value is None:
        return None
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"events: \"{key}\" must be an integer in {low}..{high}")
    return value


async def _events(b: Backend, req: dict[str, Any]) -> dict[str, Any]:
    """The event stream from ``since`` (a sequence number; without it: from
    now on, only ``next`` to ask with), at most ``limit`` events. ``next``
    is the ``since`` of the following request; ``dropped`` counts the events
    the ring no longer holds between ``since`` and the first one returned."""
    since = _number(req, "since", 0, MAX_SINCE)
    limit = _number(req, "limit", 1, MAX_LIMIT)
    log_ = b.events
    events, nxt, dropped = log_.since(log_.next_seq if since is None else since,
                                      DEFAULT_LIMIT if limit is None else limit)
    return {"ok": True, "events": [e.to_json() for e in events], "next": nxt,
            "dropped": dropped}


HANDLERS: dict[str, Handler] = {
    "status": _status, "sas": _sas, "list-sas": _sas, "list-conns": _list_conns,
    "initiate": _initiate, "terminate": _act, "rekey": _act, "stats": _stats,
    "reload": _reload, "events": _events,
}


def parse_request(data: bytes) -> dict[str, Any]:
    """A JSON object with a ``cmd``; the bare words ``status`` and ``sas`` of
    older clients are taken too. ``ValueError`` with one line otherwise."""
    if len(data) > MAX_REQUEST_BYTES:
        raise ValueError(f"request of {len(data)} bytes (at most {MAX_REQUEST_BYTES})")
    if data in (b"status", b"sas"):
        return {"cmd": data.decode()}
    try:
        req = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("request is not JSON") from None
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        raise ValueError("request is not a JSON object with a \"cmd\" string")
    return req


async def answer(backend: Backend, data: bytes) -> dict[str, Any]:
    """One request's answer; never raises for what the client sent."""
    try:
        req = parse_request(data)
        handler = HANDLERS.get(req["cmd"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {req['cmd'][:40]!r} (one of "
                                          f"{', '.join(sorted(HANDLERS))})"}
        return await handler(backend, req)
    except ValueError as exc:
        return {"ok": False, "error": str(exc).splitlines()[0]}


async def serve(backend: Backend, endpoint: str, stopping: Callable[[], bool]) -> None:
    """The REP socket loop (a socket file only we can connect to)."""
    ctx = zmq.asyncio.Context.instance()
    rep = ctx.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    rep.bind(endpoint)
    if endpoint.startswith("ipc://"):
        with contextlib.suppress(OSError):
            os.chmod(endpoint[len("ipc://"):], 0o600)
    try:
        while not stopping():
            data = await rep.recv()
            try:
                reply = await answer(backend, data)
            except Exception as exc:   # the barrier: the socket must answer
                log.exception("control request failed")
                reply = {"ok": False, "error": f"internal error: {type(exc).__name__}"}
            await rep.send(json.dumps(reply).encode())
    finally:
        rep.close(linger=0)


def connections_view(config: Any) -> list[dict[str, Any]]:
    """``list-conns``: the loaded connections (both modes)."""
    out = []
    for conn in config.connections.values():
        out.append({
            "name": conn.name, "remote_addrs": [str(a) for a in conn.remote_addrs] or ["%any"],
            "remote_port": conn.remote_port, "local_id": conn.local_id.text,
            "remote_id": conn.remote_id.text, "rekey_time": conn.rekey_time,
            "children": [{"name": n, "start_action": ch.start_action,
                          "rekey_time": ch.rekey_time,
                          "local_ts": [str(t) for t in ch.local_ts],
                          "remote_ts": [str(t) for t in ch.remote_ts]}
                         for n, ch in conn.children.items()]})
    return out


class ControlRelay:
    """The dispatcher's side of ``ControlReq``/``Control``: requests numbered
    per dispatcher, and an answer taken only from a member that was asked and
    has not answered yet (the role check: members may only answer)."""

    def __init__(self) -> None:
        self.next_id = 1
        #: req_id -> (members asked, answers so far, done when all answered)
        self.waiting: dict[int, tuple[set[int], dict[int, dict[str, Any]], Any]] = {}

    def open(self, members: set[int], done: Any) -> int:
        req_id = self.next_id
        self.next_id += 1
        self.waiting[req_id] = (members, {}, done)
        return req_id

    def close(self, req_id: int) -> dict[int, dict[str, Any]]:
        entry = self.waiting.pop(req_id, None)
        return entry[1] if entry is not None else {}

    def answer(self, member_id: int, req_id: int, data: bytes) -> str | None:
        """None when taken, else the refusal reason."""
        entry = self.waiting.get(req_id)
        if entry is None or member_id not in entry[0]:
            return "control_unasked"
        asked, answers, done = entry
        if member_id in answers:
            return "control_answered"
        try:
            parsed = json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError):
            return "control_not_json"
        if not isinstance(parsed, dict):
            return "control_not_json"
        parsed["member"] = member_id
        answers[member_id] = parsed
        if set(answers) >= asked and not done.done():
            done.set_result(None)
        return None
