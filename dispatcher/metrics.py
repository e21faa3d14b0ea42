"""Prometheus metrics (``cluster.metrics_port`` on ``cluster.metrics_address``),
in every mode: the cluster's dispatcher serves the counters of ``ipsec-cluster
status``, the single-process gateway the same names for its one member (id 1).

Naming (Prometheus conventions): counters end in ``_total`` (TYPE counter),
units are suffixes (``_bytes``, ``_seconds``); per-connection SA counts carry a
``connection`` (IKE SAs) or ``child`` (child SAs) label, at most
MAX_CONNECTION_LABELS names per member (the rest summed as ``_other``)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from common.cluster.stats import MemberStatus, StatusReport
from common.errors import StartupError

#: reads of the status per scrape before a changing dict is an error
STATUS_TRIES = 3

Family = GaugeMetricFamily | CounterMetricFamily


class StatusSource(Protocol):
    """What serves a status report: the cluster's dispatcher, the gateway."""

    def status_report(self) -> StatusReport: ...


#: (MemberStatus field, metric name, HELP) of the per-member gauges
MEMBER_GAUGES = (
    ("segments", "ipsec_cluster_segments", "SPI segments the member owns"),
    ("backup_segments", "ipsec_cluster_backup_segments",
     "SPI segments the member backs up (state sync)"),
    ("ike_sas", "ipsec_cluster_ike_sas", "established IKE SAs on the member"),
    ("half_open_ike_sas", "ipsec_cluster_half_open_ike_sas",
     "IKE SAs in negotiation (IKE_SA_INIT answered, no IKE_AUTH yet)"),
    ("child_sas", "ipsec_cluster_child_sas", "child SAs (ESP) installed on the member"),
)
#: (MemberStatus field, metric name without _total, HELP) of the per-member counters
MEMBER_COUNTERS = (
    ("packets_in", "ipsec_cluster_esp_packets_in", "ESP packets decrypted by the member"),
    ("bytes_in", "ipsec_cluster_esp_in_bytes",
     "inner bytes decrypted from ESP (IP packets to the inside)"),
    ("packets_out", "ipsec_cluster_esp_packets_out", "ESP packets encrypted by the member"),
    ("bytes_out", "ipsec_cluster_esp_out_bytes",
     "inner bytes encrypted into ESP (IP packets from the inside)"),
)
#: (ReplicationStatus field, metric name, HELP, is a counter)
REPLICATION = (
    ("ike_replicas", "ipsec_cluster_ike_replicas",
     "IKE SAs of other members this member holds a copy of", False),
    ("child_replicas", "ipsec_cluster_child_replicas",
     "child SAs of other members this member holds a copy of", False),
    ("unreplicated_changes", "ipsec_cluster_unreplicated_changes",
     "IKE SA changes that reached no backup", True),
    ("ack_timeouts", "ipsec_cluster_sync_ack_timeouts",
     "state updates whose backup's acknowledgement did not come in time", True),
    ("takeovers", "ipsec_cluster_takeovers",
     "segments this member took over from a dead member", True),
)


class ClusterCollector(Collector):
    """The metrics of one scrape, from a status report (cluster or gateway)."""

    def __init__(self, source: Callable[[], StatusReport] | StatusSource) -> None:
        self.source: Callable[[], StatusReport] = \
            source if callable(source) else source.status_report

    def collect(self) -> Iterator[Family]:
        # the HTTP server's thread reads what the event loop changes: a dict
        # that changed size under us is read again
        for _ in range(STATUS_TRIES - 1):
            try:
                report = self.source()
                break
            except RuntimeError:
                continue
        else:
            report = self.source()
        yield from _member_families(report.members)
        yield from _process_families(report)


def _member_families(members: tuple[MemberStatus, ...]) -> Iterator[Family]:
    labels = ["member"]
    alive = GaugeMetricFamily("ipsec_cluster_member_alive",
                              "1 if the member is alive (heartbeats arrive), 0 if declared dead",
                              labels=labels)
    heartbeat = GaugeMetricFamily("ipsec_cluster_member_heartbeat_age_seconds",
                                  "time since the member's last heartbeat", labels=labels)
    gauges = [(k, GaugeMetricFamily(n, h, labels=labels)) for k, n, h in MEMBER_GAUGES]
    counters = [(k, CounterMetricFamily(n, h, labels=labels)) for k, n, h in MEMBER_COUNTERS]
    repl = [(k, (CounterMetricFamily if c else GaugeMetricFamily)(n, h, labels=labels))
            for k, n, h, c in REPLICATION]
    degraded = GaugeMetricFamily("ipsec_cluster_unreplicated",
                                 "1 if some segment of the member has no live backup",
                                 labels=labels)
    drops = CounterMetricFamily("ipsec_cluster_member_drops",
                                "packets and messages the member dropped, by reason",
                                labels=["member", "reason"])
    conn_ike = GaugeMetricFamily("ipsec_cluster_connection_ike_sas",
                                 "established IKE SAs per configured connection",
                                 labels=["member", "connection"])
    conn_child = GaugeMetricFamily("ipsec_cluster_connection_child_sas",
                                   "child SAs per configured child (its name in the config)",
                                   labels=["member", "child"])
    for m in members:
        label = [str(m.id)]
        alive.add_metric(label, 1.0 if m.alive else 0.0)
        heartbeat.add_metric(label, m.last_heartbeat_ms / 1000)
        for k, g in gauges:
            g.add_metric(label, float(getattr(m, k)))
        for k, c in counters:
            c.add_metric(label, float(getattr(m, k)))
        r = m.replication
        for k, f in repl:
            f.add_metric(label, float(getattr(r, k)) if r is not None else 0.0)
        degraded.add_metric(label, 1.0 if r is not None and r.degraded else 0.0)
        for reason, n in m.drops.items():
            drops.add_metric([*label, reason], float(n))
        for name, n in m.connections.ike.items():
            conn_ike.add_metric([*label, name], float(n))
        for name, n in m.connections.child.items():
            conn_child.add_metric([*label, name], float(n))
    yield alive
    yield heartbeat
    for _, g in gauges:
        yield g
    for _, c in counters:
        yield c
    for _, f in repl:
        yield f
    yield degraded
    yield drops
    yield conn_ike
    yield conn_child


def _process_families(report: StatusReport) -> Iterator[Family]:
    d = report.dispatcher
    drops = CounterMetricFamily("ipsec_cluster_dispatcher_drops",
                                "datagrams and messages the dispatcher dropped, by reason",
                                labels=["reason"])
    for reason, n in d.drops.items():
        drops.add_metric([reason], float(n))
    yield drops
    events = CounterMetricFamily("ipsec_cluster_dispatcher_events",
                                 "what the dispatcher relayed and did, by event",
                                 labels=["event"])
    for event, n in d.counters.items():
        events.add_metric([event], float(n))
    yield events
    # refused input and failed messages of every process, by reason
    # (member/refusals.py): process = a member id or "dispatcher"
    refused = CounterMetricFamily("ipsec_cluster_refused",
                                  "input refused and messages that failed, by process and "
                                  "reason (bug.* = a failure nobody foresaw)",
                                  labels=["process", "reason"])
    for m in report.members:
        for reason, n in m.refused.items():
            refused.add_metric([str(m.id), reason], float(n))
    for reason, n in d.refused.items():
        refused.add_metric(["dispatcher", reason], float(n))
    yield refused
    epoch = GaugeMetricFamily("ipsec_cluster_table_epoch",
                              "epoch of the segment table (grows with every reassignment)")
    epoch.add_metric([], float(report.cluster.epoch))
    yield epoch
    uptime = GaugeMetricFamily("ipsec_cluster_uptime_seconds",
                               "time since the dispatcher (or gateway) started")
    uptime.add_metric([], float(report.cluster.uptime_s))
    yield uptime


#: /proc/net/tcp state of a listening socket
_TCP_LISTEN = "0A"


def start_metrics(source: Callable[[], StatusReport], port: int, address: str) -> None:
    """Serve the metrics; a port we cannot listen on is a ``StartupError``."""
    try:
        start_http_server(port, addr=address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"cluster.metrics_port: port {port} on {address} is in use"
                f"{port_holder(port)} (choose another metrics_port, or 0 for no metrics)"
            ) from None
        raise StartupError(f"cluster.metrics_port: cannot listen on {address} port "
                           f"{port}: {exc.strerror} (choose another metrics_port or "
                           "metrics_address, or 0 for no metrics)") from None
    REGISTRY.register(ClusterCollector(source))


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
