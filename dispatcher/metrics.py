"""Prometheus metrics of the running cluster (``cluster.metrics_port``): the
same counters as ``ipsec-cluster status``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

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


def start_metrics(dispatcher: Dispatcher, port: int) -> None:
    REGISTRY.register(ClusterCollector(dispatcher))
    start_http_server(port, addr="127.0.0.1")
