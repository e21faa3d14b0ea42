"""The operator's commands (``status``, ``sas``, ``events`` and the control
verbs): clients of the control API of a running gateway or cluster
(docs/operations.md "Control API"). ``ControlClient`` is the one client of
that API; the harness (bench/harness/control.py) builds on it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import zmq

from common.errors import StartupError
from dispatcher.control import control_endpoint
from member.config_file import read_config

#: the control API's verbs (docs/operations.md "Control API")
CONTROL_VERBS = ("list-conns", "list-sas", "initiate", "terminate", "rekey", "stats", "reload")




class ControlError(Exception):
    """The gateway answered ``{"ok": false, "error": ...}``, or not in JSON."""


class ControlTimeout(ControlError, TimeoutError):
    """No answer within the timeout (nothing runs there, or it is stuck)."""


class ControlClient:
    """Requests to one control socket (ZeroMQ REQ): ``ask(request)`` sends
    one JSON object and returns the JSON object answered. A request that
    gets no answer in time raises ``ControlTimeout``, and the REQ socket
    (stuck in its send/receive lock-step after that) is replaced by a fresh
    one for the next request. Not thread-safe: one client per thread."""

    def __init__(self, endpoint: str, *, timeout: float = 5.0,
                 context: zmq.Context[Any] | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.ctx: zmq.Context[Any] = context or zmq.Context.instance()
        self._sock: zmq.Socket[Any] | None = None

    def _socket(self) -> zmq.Socket[Any]:
        if self._sock is None:
            sock = self.ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def ask(self, request: dict[str, Any] | bytes, *, timeout: float | None = None
            ) -> dict[str, Any]:
        """The JSON object answered to ``request`` (a dict, or bytes sent as
        they are), whatever its ``ok``; ``ControlError`` only for an answer
        that is not a JSON object. A ZeroMQ failure is raised as it is."""
        data = request if isinstance(request, bytes) else json.dumps(request).encode()
        wait_ms = int((self.timeout if timeout is None else timeout) * 1000)
        sock = self._socket()
        try:
            sock.setsockopt(zmq.SNDTIMEO, wait_ms)
            sock.send(data)
            if not sock.poll(wait_ms, zmq.POLLIN):
                self._reset()
                raise ControlTimeout(f"no answer on {self.endpoint} within {wait_ms} ms")
            raw = sock.recv()
        except zmq.ZMQError:
            self._reset()
            raise
        try:
            answer = json.loads(raw)
        except ValueError:
            raise ControlError(f"{self.endpoint}: an answer that is not JSON") from None
        if not isinstance(answer, dict):
            raise ControlError(f"{self.endpoint}: an answer that is not a JSON object")
        return answer

    def close(self) -> None:
        self._reset()


def _ask(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any]:
    """One request of a command line; every failure is one StartupError line."""
    config = read_config(args.config)
    endpoint = control_endpoint(config, args.config)
    client = ControlClient(endpoint, timeout=args.timeout)
    try:
        answer = client.ask(request)
    except ControlTimeout:
        raise StartupError(f"no cluster answers for {args.config} "
                           "(is `ipsec-cluster run` running with this config?)") from None
    except zmq.ZMQError as exc:
        reason = zmq.strerror(exc.errno or 0)
        raise StartupError(f"cannot reach the cluster at {endpoint}: {reason} "
                           "(check cluster.control)") from None
    except ControlError:  # not a JSON object: something else listens there
        raise StartupError(f"{endpoint} answered with something that is not JSON "
                           "(is another program using cluster.control?)") from None
    finally:
        client.close()
    if answer.get("ok") is False:
        raise StartupError(str(answer.get("error", "refused")).splitlines()[0])
    return answer


def cmd_status(args: argparse.Namespace) -> int:
    from common.cluster.stats import StatusReport
    from dispatcher.views import print_status

    answer = _ask(args, {"cmd": "status"})
    if args.json:
            print(json.dumps(answer, indent=2))
    else:
        try:
            report = StatusReport.from_json(answer)
        except ValueError as exc:
            raise StartupError(f"the status answer is not one this version reads: {exc}"
                               ) from None
        print_status(report)
        if sys.stdout.isatty():   # (piped: the plain table only, for scripts)
            _recent_events(args)
    return 0


#: events ``status`` shows, and ``events --follow`` before the new ones
RECENT_EVENTS = 5
#: how often ``events --follow`` asks
FOLLOW_INTERVAL_S = 0.2


def event_line(e: dict[str, Any]) -> str:
    """One event as a line: sequence number, local time, type, then its fields."""
    when = e.get("time")
    stamp = (time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when * 1000) % 1000:03d}"
             if isinstance(when, int | float) else "?")
    rest = " ".join(f"{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in e.items() if k not in ("seq", "time", "type"))
    return f"{e.get('seq', '?'):>6} {stamp} {e.get('type', '?'):<15} {rest}".rstrip()


def _recent_events(args: argparse.Namespace) -> None:
    """The last few events under ``status`` (nothing from a gateway without them)."""
    try:
        end = int(_ask(args, {"cmd": "events"})["next"])
        answer = _ask(args, {"cmd": "events", "since": max(1, end - RECENT_EVENTS)})
    except (StartupError, KeyError, TypeError, ValueError):
        return
    if answer.get("events"):
        print("recent events:")
        for e in answer["events"]:
            print(event_line(e))


def cmd_events(args: argparse.Namespace) -> int:
    """The event stream (docs/operations.md "Control API"): the events held
    (or from ``--since``); ``--follow`` then asks for new ones every
    FOLLOW_INTERVAL_S until Ctrl-C."""
    if args.since is not None:
        since = args.since
    elif args.follow:
        since = max(1, int(_ask(args, {"cmd": "events"})["next"]) - RECENT_EVENTS)
    else:
        since = 1
    try:
        while True:
            answer = _ask(args, {"cmd": "events", "since": since})
            nxt = int(answer["next"])
            if nxt < since:   # the gateway started anew: its stream from the start
                print(f"(event stream started anew at {nxt})", file=sys.stderr)
                since = 1
                continue
            if answer.get("dropped"):
                print(f"({answer['dropped']} events lost: the ring moved past them)",
                      file=sys.stderr)
            for e in answer["events"]:
                print(json.dumps(e, separators=(",", ":")) if args.json else event_line(e))
            sys.stdout.flush()
            since = nxt
            if answer["events"]:
                continue   # more may be waiting
            if not args.follow:
                return 0
            time.sleep(FOLLOW_INTERVAL_S)
    except KeyboardInterrupt:
        return 0


def cmd_sas(args: argparse.Namespace) -> int:
    from dispatcher.views import print_sas

    answer = _ask(args, {"cmd": "sas"})
    if args.json:
            print(json.dumps(answer, indent=2))
    else:
        print_sas(answer)
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    """The control verbs (docs/operations.md "Control API")."""
    request: dict[str, Any] = {"cmd": args.command}
    for key in ("ike", "child"):
        if getattr(args, key, None) is not None:
            request[key] = getattr(args, key)
    answer = _ask(args, request)
    if getattr(args, "json", False):
        print(json.dumps(answer, indent=2))
    elif args.command == "list-sas":
        from dispatcher.views import print_sas

        print_sas(answer)
    elif args.command == "list-conns":
        for conn in answer["connections"]:
            print(f"{conn['name']}: {', '.join(conn['remote_addrs'])}, "
                  f"{conn['local_id']} - {conn['remote_id']}")
            for ch in conn["children"]:
                print(f"  {ch['name']}: start_action {ch['start_action']}, "
                      f"{', '.join(ch['local_ts'])} === {', '.join(ch['remote_ts'])}")
    elif args.command in ("initiate", "terminate", "rekey"):
        print(f"{args.command}: {answer['done']} SA(s)")
    elif args.command == "reload":
        print("reloaded: " + "; ".join(f"{k} {', '.join(answer[k]) or '-'}"
                                       for k in ("added", "changed", "removed")))
    else:
        print(json.dumps(answer, indent=2))
    return 0


def control_parsers(sub: Any) -> None:
    verbs = (("list-conns", "the loaded connections and their children"),
             ("list-sas", "IKE and child SAs: owner member, ages, rekey timers, traffic"),
             ("initiate", "bring up a connection (--ike NAME) or a child (--child NAME)"),
             ("terminate", "delete IKE SAs (--ike NAME|ID) or child SAs (--child NAME|ID) "
                           "with the peer"),
             ("rekey", "rekey an IKE SA (--ike ID) or a child SA (--child ID)"),
             ("stats", "counters and drops of every member"),
             ("reload", "re-read the config file: connections added, changed, removed"))
    for name, text in verbs:
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="the config the gateway runs with")
        p.add_argument("--json", action="store_true", help="print the answer as JSON")
        p.add_argument("--timeout", type=float, default=5.0,
                       help="seconds to wait for the gateway's answer (default 5)")
        if name in ("initiate", "terminate", "rekey"):
            group = p.add_mutually_exclusive_group(required=True)
            group.add_argument("--ike", help="a connection name, an IKE SA id or its SPI (hex)")
            group.add_argument("--child", help="a child name or its inbound SPI (hex)")
