"""The kernel routes of the per-member TUN devices, planned without I/O
(common/cluster/routing.py ``kernel_routes``, ``route_changes``;
docs/routing.md "Host routes"), and the names of the devices."""

from __future__ import annotations

import ipaddress

from common.cluster.routing import kernel_routes, route_changes
from common.ike.ts import TrafficSelector, ts_from_cidr, ts_from_range
from member.routes import KernelRoutes
from member.tun import IFNAMSIZ
from member.tuns import member_tun_name

net = ipaddress.ip_network
BASE = {net("10.91.0.0/16"): "ipsc0", net("fd00:91::/48"): "ipsc0"}


def ts(*cidrs: str) -> tuple[TrafficSelector, ...]:
    return tuple(ts_from_cidr(c) for c in cidrs)


def test_no_children_is_the_base() -> None:
    assert kernel_routes(BASE, []) == BASE


def test_each_child_prefix_goes_to_its_members_device() -> None:
    plan = kernel_routes(BASE, [(ts("10.91.1.0/24"), "ipsc0m1"),
                                (ts("10.91.11.0/24", "fd00:91:11::/64"), "ipsc0m2")])
    assert plan == {**BASE, net("10.91.1.0/24"): "ipsc0m1",
                    net("10.91.11.0/24"): "ipsc0m2", net("fd00:91:11::/64"): "ipsc0m2"}


def test_equal_prefix_newest_child_wins_also_over_the_base() -> None:
    older, newer = (ts("10.91.1.0/24"), "ipsc0m1"), (ts("10.91.1.0/24"), "ipsc0m2")
    assert kernel_routes(BASE, [older, newer])[net("10.91.1.0/24")] == "ipsc0m2"
    assert kernel_routes(BASE, [newer, older])[net("10.91.1.0/24")] == "ipsc0m1"
    whole = kernel_routes(BASE, [(ts("10.91.0.0/16"), "ipsc0m2")])
    assert whole[net("10.91.0.0/16")] == "ipsc0m2"


def test_a_range_becomes_the_fewest_prefixes() -> None:
    rng = ts_from_range("10.91.1.1", "10.91.1.6")   # 1/32 2/31 4/31 6/32
    plan = kernel_routes({}, [((rng,), "ipsc0m1")])
    assert sorted(map(str, plan)) == ["10.91.1.1/32", "10.91.1.2/31", "10.91.1.4/31",
                                      "10.91.1.6/32"]
    assert set(plan.values()) == {"ipsc0m1"}


def test_changes_replace_moved_and_new_delete_gone_keep_the_rest() -> None:
    old = kernel_routes(BASE, [(ts("10.91.1.0/24"), "ipsc0m1"),
                               (ts("10.91.11.0/24"), "ipsc0m1"),
                               (ts("10.91.21.0/24"), "ipsc0m2")])
    # member 1 died: its children moved to member 2; the 10.91.21 child went
    new = kernel_routes(BASE, [(ts("10.91.1.0/24"), "ipsc0m2"),
                               (ts("10.91.11.0/24"), "ipsc0m2"),
                               (ts("fd00:91:1::/64"), "ipsc0m2")])
    replace, delete = route_changes(old, new)
    assert replace == {net("10.91.1.0/24"): "ipsc0m2", net("10.91.11.0/24"): "ipsc0m2",
                       net("fd00:91:1::/64"): "ipsc0m2"}
    assert delete == [net("10.91.21.0/24")]
    assert route_changes(new, new) == ({}, [])
    # an equal-prefix child gone: the base route comes back (a replace, never a delete)
    over = kernel_routes(BASE, [(ts("10.91.0.0/16"), "ipsc0m1")])
    assert route_changes(over, BASE) == ({net("10.91.0.0/16"): "ipsc0"}, [])


def test_changes_are_ordered_ipv4_first_then_by_prefix() -> None:
    new = {net("fd00::/64"): "a", net("10.2.0.0/16"): "a", net("10.1.0.0/16"): "a"}
    replace, _ = route_changes({}, new)
    assert list(map(str, replace)) == ["10.1.0.0/16", "10.2.0.0/16", "fd00::/64"]


def test_applier_commands_are_one_batch_in_our_table() -> None:
    kr = KernelRoutes(table=1220)
    lines = kr.commands({net("10.91.1.0/24"): "ipsc0m1", net("::/0"): "ipsc0m2"},
                        [net("0.0.0.0/0")])
    assert lines == ["route del 0.0.0.0/0 table 1220",
                     "route replace 10.91.1.0/24 dev ipsc0m1 table 1220",
                     "route replace ::/0 dev ipsc0m2 table 1220"]
    assert kr.apply({}, []) and kr.applied == 0


def test_member_device_names_fit_and_differ() -> None:
    assert member_tun_name("ipsc0", 1) == "ipsc0m1"
    long = "a" * (IFNAMSIZ - 1)
    names = {member_tun_name(long, m) for m in range(1, 65)}
    assert len(names) == 64
    assert all(len(n) <= IFNAMSIZ - 1 and n != long for n in names)
