"""Two dispatcher hosts: the keepalived (VRRP) configuration that moves the
cluster's address, and the notify script that tells the local
``ipsec-cluster run`` its role (docs/failover.md "Two dispatcher hosts").

keepalived runs on each dispatcher host, both instances in state BACKUP with
``nopreempt``: the first to find no master takes the address, and a host that
comes back does not take it from the one that holds it (every move of the
address is a failover of the whole cluster). On each change keepalived runs
the notify script, which signals the supervisor whose pid is in the run
directory's ``supervisor.pid``: SIGUSR1 on MASTER (become active), SIGUSR2 on
BACKUP, FAULT and STOP (stand down; dispatcher/supervisor.py).

``python -m dispatcher.vrrp --dir DIR ...`` writes both files (used by
scripts/two-host-lab.sh and tests/test_cluster_twohost.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

#: the VRRP advertisement interval (VRRPv3 takes centiseconds): the backup
#: takes over after 3 intervals and a skew of (256 - priority)/256 of one
ADVERT_INT_S = 0.1
#: an interface name (IFNAMSIZ - 1)
_IFNAME = re.compile(r"[A-Za-z0-9_.@-]{1,15}")

NOTIFY_SCRIPT = """#!/bin/sh
# keepalived's notify: $1 = INSTANCE|GROUP, $2 = name, $3 = MASTER|BACKUP|FAULT|STOP.
# Tells the local `ipsec-cluster run` (its pid in the run directory) its role.
pidfile="{pidfile}"
[ -r "$pidfile" ] || {{ echo "notify: no $pidfile (is ipsec-cluster run started?)" >&2; exit 1; }}
pid=$(cat "$pidfile")
case "$3" in
  MASTER) exec kill -USR1 "$pid" ;;
  BACKUP|FAULT|STOP) exec kill -USR2 "$pid" ;;
esac
"""


@dataclass(frozen=True, slots=True)
class Vrrp:
    """One dispatcher host's VRRP instance."""

    name: str             # router_id, e.g. the host name
    interface: str        # where the cluster's address lives (the peer-facing link)
    address: str          # the cluster's address with its prefix, e.g. 198.18.50.10/24
    priority: int         # 1..254; the higher wins when both start together
    router_id: int = 51   # the VRRP id (1..255), the same on both hosts
    advert_int: float = ADVERT_INT_S

    def check(self) -> None:
        """``ValueError`` naming the field that is wrong."""
        if not _IFNAME.fullmatch(self.interface):
            raise ValueError(f"interface {self.interface!r}: not an interface name")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name):
            raise ValueError(f"name {self.name!r}: letters, digits, _ . - (1..64)")
        ipaddress.ip_interface(self.address)
        if not 1 <= self.priority <= 254:
            raise ValueError(f"priority {self.priority}: 1..254")
        if not 1 <= self.router_id <= 255:
            raise ValueError(f"router_id {self.router_id}: 1..255")
        if not 0.01 <= self.advert_int <= 255:
            raise ValueError(f"advert_int {self.advert_int}: 0.01..255 s")


def keepalived_config(v: Vrrp, notify: Path) -> str:
    """keepalived.conf for one dispatcher host (``notify``: the script's path)."""
    v.check()
    return f"""# written by dispatcher/vrrp.py: the cluster's address moves with VRRP
global_defs {{
    router_id {v.name}
    vrrp_version 3
    script_user root
    enable_script_security
}}
vrrp_instance ipsec_cluster {{
    state BACKUP
    nopreempt
    interface {v.interface}
    virtual_router_id {v.router_id}
    priority {v.priority}
    advert_int {v.advert_int:g}
    virtual_ipaddress {{
        {v.address} dev {v.interface}
    }}
    notify "{notify}"
}}
"""


def write(directory: Path, v: Vrrp, run_dir: Path) -> tuple[Path, Path]:
    """keepalived.conf and notify.sh in ``directory`` (the notify script
    signals the supervisor of the run directory ``run_dir``)."""
    directory.mkdir(parents=True, exist_ok=True)
    notify = directory / "notify.sh"
    notify.write_text(NOTIFY_SCRIPT.format(pidfile=run_dir / "supervisor.pid"))
    os.chmod(notify, 0o700)   # (keepalived runs it as root: no one else needs it)
    conf = directory / "keepalived.conf"
    conf.write_text(keepalived_config(v, notify))
    return conf, notify


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dispatcher.vrrp",
                                description="write keepalived.conf and notify.sh for one "
                                            "dispatcher host of a two-host cluster")
    p.add_argument("--dir", required=True, help="where to write the two files")
    p.add_argument("--run-dir", required=True,
                   help="the cluster's run directory (cluster.control): supervisor.pid")
    p.add_argument("--name", required=True, help="this host's name (router_id)")
    p.add_argument("--interface", required=True, help="the peer-facing interface")
    p.add_argument("--address", required=True, help="the cluster's address/prefix")
    p.add_argument("--priority", type=int, required=True, help="1..254")
    p.add_argument("--router-id", type=int, default=51, help="VRRP id, 1..255 (default 51)")
    p.add_argument("--advert-int", type=float, default=ADVERT_INT_S,
                   help=f"seconds between adverts (default {ADVERT_INT_S})")
    a = p.parse_args(argv)
    v = Vrrp(a.name, a.interface, a.address, a.priority, a.router_id, a.advert_int)
    try:
        conf, _ = write(Path(a.dir), v, Path(a.run_dir))
    except (ValueError, OSError) as exc:
        print(f"dispatcher.vrrp: {exc}", file=sys.stderr)
        return 2
    print(conf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
