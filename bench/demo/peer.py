"""Our peer for the demo, as a subprocess: ``python -m bench.demo peer ...``.

A ``dispatcher.peer.Peer`` that brings up its IKE SAs, then sends paced inner
UDP traffic round-robin through its children and records every echo.

One JSON object per line on stdout: {"event": "up", ...} once the SAs are
up, {"event": "traffic", "t0": ...} when traffic starts, {"event":
"progress", ...} a few times a second, {"event": "done", ...} at the end.
Times are time.monotonic(), which is one clock for all processes on Linux.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import struct
import sys
import time
from pathlib import Path
from typing import Any

from bench.demo.facts import PEER_UP_S, REFRESH_HZ
from bench.demo.verdict import _loss_runs, _silences
from bench.harness.procs import run_main

SEQ = struct.Struct("!I")


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _peer_main(argv: list[str]) -> int:
    from common.config import load_config
    from common.packets import IPV4_UDP_HEADERS, TRAFFIC_MARK
    from dispatcher.peer import Peer, PeerOptions

    p = argparse.ArgumentParser(prog="python -m bench.demo peer")
    p.add_argument("--config", required=True)
    p.add_argument("--pps", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--timeout", type=float, default=PEER_UP_S)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config(Path(args.config).read_text(), args.config)

    class Recorder:
        """The peer's inside: keeps the arrival time of every echo of ours."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.echo_at: dict[int, float] = {}
            self.duplicates = 0
            self.other = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def write(self, packet: bytes | bytearray | memoryview) -> bool:
            mark = IPV4_UDP_HEADERS + len(TRAFFIC_MARK)
            if bytes(packet[IPV4_UDP_HEADERS:mark]) == TRAFFIC_MARK:
                seq = SEQ.unpack_from(packet, mark)[0]
                if seq in self.echo_at:
                    self.duplicates += 1
                else:
                    self.echo_at[seq] = time.monotonic()
                return True
            self.other += 1
            return bool(self.inner.write(packet))

    class DemoPeer(Peer):
        async def demo(self) -> int:
            await self.start()
            try:
                result = await self.bring_up(args.timeout)
                _emit({"event": "up", **result.as_dict(), "summary": result.summary()})
                if not result.ok or self._stopped.is_set():
                    return 1
                return await self.traffic()
            finally:
                self.close()

        def labels(self) -> list[str]:
            out = []
            for route in self.member.carried():
                try:
                    ike = self.member.engine.get(route.ike_id).name
                except KeyError:
                    ike = "?"
                out.append(f"{ike}/{route.name}")
            return out

        async def traffic(self) -> int:
            if self.inside is None:
                raise RuntimeError("traffic() before the inside was opened")
            rec = Recorder(self.inside)
            self.inside = rec
            self.options.traffic_size = args.size
            templates = self._templates()
            n = len(templates)
            labels = self.labels()
            if not n:
                _emit({"event": "done", "error": "no child to send through"})
                return 1
            total = int(args.pps * args.seconds)
            sent_at: list[float] = []
            c0 = self.member.counters.copy()
            start = time.monotonic()
            _emit({"event": "traffic", "t0": start, "children": labels, "pps": args.pps})
            next_progress = start
            while len(sent_at) < total and not self._stopped.is_set():
                now = time.monotonic()
                due = min(total, int((now - start) * args.pps) + 1)
                while len(sent_at) < due:
                    seq = len(sent_at)
                    sent_at.append(time.monotonic())
                    self.inner(templates[seq % n].packet(seq))
                if now >= next_progress:
                    next_progress = now + 1.0 / REFRESH_HZ
                    _emit({"event": "progress", "t": now, "sent": len(sent_at),
                           "echoed": len(rec.echo_at)})
                await asyncio.sleep(0.002)
            end = time.monotonic()
            drain = end + 1.5
            while len(rec.echo_at) < len(sent_at) and time.monotonic() < drain:
                await asyncio.sleep(0.02)
            sent = len(sent_at)
            lost = [s for s in range(sent) if s not in rec.echo_at]
            arrivals: list[list[float]] = [[] for _ in range(n)]
            for seq, t in rec.echo_at.items():
                arrivals[seq % n].append(t)
            per_child = [{"label": labels[i], "sent": len(range(i, sent, n)),
                          "echoed": len(arrivals[i])} for i in range(n)]
            spacing = n / args.pps
            _emit({"event": "done", "t0": start, "t_end": end, "sent": sent,
                   "echoed": len(rec.echo_at), "duplicates": rec.duplicates,
                   "other_in": rec.other,
                   "esp_out": self.member.counters["esp_out"] - c0["esp_out"],
                   "esp_in": self.member.counters["esp_in"] - c0["esp_in"],
                   "children": labels, "per_child": per_child, "spacing_s": spacing,
                   "lost_runs": _loss_runs(lost, sent_at, n),
                   "silences": _silences(arrivals, max(0.2, 4 * spacing)),
                   "last_echo": [max(a) if a else None for a in arrivals],
                   "interrupted": self._stopped.is_set(),
                   "drops": {k: v for k, v in (self.member.drops
                                               + self.member.engine.drops).items() if v}})
            return 0

    return run_main(DemoPeer(config, PeerOptions(timeout_s=args.timeout)).demo())
