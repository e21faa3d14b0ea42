"""Prometheus metrics of the running cluster (``cluster.metrics_port``): the
same counters as ``ipsec-cluster status``."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from common.errors import StartupError

if TYPE_CHECKING:
    from dispatcher.cluster import Dispatcher


class ClusterCollector(Collector):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        status = self.dispatcher.status()
        alive = GaugeMetricFamily("ipsec_cluster_member_alive", "1 if the member is alive",
                                  labels=["member"])
        gauges = {k: GaugeMetricFamily(f"ipsec_cluster_{k}", f"{k} per member",
                                       labels=["member"])
                  for k in ("segments", "ike_sas", "child_sas")}
        counters = {k: CounterMetricFamily(f"ipsec_cluster_esp_{k}", f"ESP {k} per member",
                                           labels=["member"])
                    for k in ("packets_in", "bytes_in", "packets_out", "bytes_out")}
        drops = CounterMetricFamily("ipsec_cluster_member_drops", "drops by reason",
                                    labels=["member", "reason"])
        repl = {k: GaugeMetricFamily(f"ipsec_cluster_{k}", f"{k} per member (state sync)",
                                     labels=["member"])
                for k in ("ike_replicas", "child_replicas", "unreplicated_changes",
                          "ack_timeouts", "takeovers")}
        # refused input and failed messages of every process, by reason
        # (member/refusals.py): process = a member id or "dispatcher"
        refused = CounterMetricFamily("ipsec_cluster_refused", "refusals by reason",
                                      labels=["process", "reason"])
        degraded = GaugeMetricFamily("ipsec_cluster_unreplicated",
                                     "1 if some segment of the member has no live backup",
                                     labels=["member"])
        for m in status["members"]:
            label = [str(m["id"])]
            alive.add_metric(label, 1.0 if m["alive"] else 0.0)
            for k, g in gauges.items():
                g.add_metric(label, float(m[k]))
            for k, c in counters.items():
                c.add_metric(label, float(m[k]))
            for reason, n in m["drops"].items():
                drops.add_metric([str(m["id"]), reason], float(n))
            for reason, n in m.get("refused", {}).items():
                refused.add_metric([str(m["id"]), reason], float(n))
            r = m.get("replication", {})
            for k, g in repl.items():
                g.add_metric(label, float(r.get(k, 0)))
            degraded.add_metric(label, 1.0 if r.get("degraded") else 0.0)
        yield alive
        yield from gauges.values()
        yield from counters.values()
        yield drops
        yield from repl.values()
        yield degraded
        d = CounterMetricFamily("ipsec_cluster_dispatcher_drops", "dispatcher drops by reason",
                                labels=["reason"])
        for reason, n in status["dispatcher"]["drops"].items():
            d.add_metric([reason], float(n))
        yield d
        for reason, n in status["dispatcher"].get("refused", {}).items():
            refused.add_metric(["dispatcher", reason], float(n))
        yield refused
        epoch = GaugeMetricFamily("ipsec_cluster_table_epoch", "segment table epoch")
        epoch.add_metric([], float(status["cluster"]["epoch"]))
        yield epoch


#: the HTTP server listens on loopback only
METRICS_ADDRESS = "127.0.0.1"
#: /proc/net/tcp state of a listening socket
_TCP_LISTEN = "0A"


def start_metrics(dispatcher: Dispatcher, port: int) -> None:
    """Serve the metrics; a port we cannot listen on is a ``StartupError``."""
    try:
        start_http_server(port, addr=METRICS_ADDRESS)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"cluster.metrics_port: port {port} on {METRICS_ADDRESS} is in use"
                f"{port_holder(port)} (choose another metrics_port, or 0 for no metrics)"
            ) from None
        raise StartupError(f"cluster.metrics_port: cannot listen on {METRICS_ADDRESS} port "
                           f"{port}: {exc.strerror} (choose another metrics_port, or 0 for "
                           "no metrics)") from None
    REGISTRY.register(ClusterCollector(dispatcher))


def port_holder(port: int) -> str:
    """" by pid N (name)" for the process listening on TCP ``port``, or "" when
    /proc does not tell (another user's process, no /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXADDR:HEXPORT; field 9 is the socket's inode
            if (len(fields) > 9 and fields[3] == _TCP_LISTEN
                    and int(fields[1].rpartition(":")[2], 16) == port):
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return ""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                return f" by pid {pid} ({name})"
        except OSError:
            continue
    return ""
