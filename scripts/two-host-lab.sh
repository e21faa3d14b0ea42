#!/usr/bin/env bash
# Two dispatcher hosts by hand, in network namespaces (docs/operations.md
# "Two dispatcher hosts"): a bridge, our peer, two dispatcher hosts running
# `ipsec-cluster run` (role standby) with keepalived moving the cluster's
# address (VRRP), and two member hosts that know both dispatchers.
#
#   scripts/two-host-lab.sh up        build it all and start everything
#   scripts/two-host-lab.sh status    both dispatchers' role, term and members
#   scripts/two-host-lab.sh fail a    stop host a: its processes killed, its link down
#   scripts/two-host-lab.sh back a    host a again (it stays the standby)
#   scripts/two-host-lab.sh down      stop everything, delete the namespaces
#
# Needs root, iproute2, keepalived (`make sysdeps`). Everything lives in
# $LAB (default /tmp/ipsec-cluster-two-host): configs, keys, logs, the
# keepalived.conf and notify.sh each host got (python -m dispatcher.vrrp).
set -eu
LAB=${LAB:-/tmp/ipsec-cluster-two-host}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
CLI="$PY -m dispatcher.cli"
NET=198.18.60
VIP=$NET.10
declare -A ADDR=([peer]=$NET.1 [a]=$NET.11 [b]=$NET.12 [host1]=$NET.21 [host2]=$NET.22)
declare -A PRIO=([a]=150 [b]=100)
NS=ipc2h
SYNC=7000

ns() { local n=$1; shift; ip netns exec "$NS-$n" "$@"; }

cluster_toml() {  # $1 = side or member id, $2 = extra [cluster] lines
  cat <<EOF
[cluster]
address = "$VIP"
inside = "udp:127.0.0.1:9000"
inside_bind = "127.0.0.1:9001"
heartbeat_interval = 0.05
dead_after = 4
sync = "tcp://0.0.0.0:$SYNC"
$2

[connections.k0]
remote_addrs = ["%any"]
proposals = ["aes128gcm16-prfsha256-ecp256"]
local_id = "gw.test"
remote_id = "peer0.test"
psk = "two-host-lab-psk-0123456789abcdef"

[connections.k0.children.c0]
local_ts = ["10.200.0.0/28"]
remote_ts = ["10.100.0.0/28"]
esp_proposals = ["aes128gcm16"]
EOF
}

peer_toml() {
  cat <<EOF
[cluster]
address = "${ADDR[peer]}"
inside = "udp:127.0.0.1:9000"
inside_bind = "127.0.0.1:9001"

[connections.k0]
remote_addrs = ["$VIP"]
proposals = ["aes128gcm16-prfsha256-ecp256"]
local_id = "peer0.test"
remote_id = "gw.test"
psk = "two-host-lab-psk-0123456789abcdef"

[connections.k0.children.c0]
local_ts = ["10.100.0.0/28"]
remote_ts = ["10.200.0.0/28"]
esp_proposals = ["aes128gcm16"]
start_action = "start"
EOF
}

start_dispatcher() {  # $1 = a | b
  local s=$1
  cd "$LAB"
  ns "$s" setsid $CLI run --config "$LAB/dispatcher-$s.toml" >"$LAB/dispatcher-$s.log" 2>&1 &
  for _ in $(seq 100); do [ -s "$LAB/run-$s/supervisor.pid" ] && break; sleep 0.1; done
  (cd "$ROOT" && $PY -m dispatcher.vrrp --dir "$LAB/keepalived-$s" --run-dir "$LAB/run-$s" \
      --name "disp-$s" --interface eth0 --address "$VIP/24" --priority "${PRIO[$s]}" >/dev/null)
  local d="$LAB/keepalived-$s"
  ns "$s" setsid keepalived --dont-fork --log-console --vrrp -f "$d/keepalived.conf" \
      -p "$d/keepalived.pid" -r "$d/vrrp.pid" -c "$d/checkers.pid" >"$d/keepalived.log" 2>&1 &
  echo "dispatcher host $s: started (log $LAB/dispatcher-$s.log)"
}

up() {
  mkdir -p "$LAB" && cd "$LAB"
  export PYTHONPATH=$ROOT
  ip netns add "$NS-sw"
  ns sw ip link add br0 type bridge && ns sw ip link set br0 up
  for n in peer a b host1 host2; do
    ip netns add "$NS-$n"
    ns "$n" ip link set lo up
    ip -n "$NS-sw" link add "p-$n" type veth peer name eth0 netns "$NS-$n"
    ip -n "$NS-sw" link set "p-$n" master br0 up
    ns "$n" ip addr add "${ADDR[$n]}/24" dev eth0
    ns "$n" ip link set eth0 up
  done
  # the standby binds the cluster's address before it holds it
  ns a sysctl -qw net.ipv4.ip_nonlocal_bind=1
  ns b sysctl -qw net.ipv4.ip_nonlocal_bind=1
  for k in dispatcher-a dispatcher-b member1 member2; do
    (cd "$ROOT" && $CLI keygen --dir "$LAB/keys" --name "$k" --force >/dev/null)
  done
  mkdir -p authorized && cp keys/member1.key keys/member2.key authorized/
  for s in a b; do
    cluster_toml "$s" "members = 0
expect_members = 2
role = \"standby\"
control = \"$LAB/run-$s\"
curve_secret_key = \"keys/dispatcher-$s.key_secret\"
curve_authorized = \"authorized\"" >"dispatcher-$s.toml"
  done
  for m in 1 2; do
    cluster_toml "$m" "curve_secret_key = \"keys/member$m.key_secret\"
curve_server_key = \"keys/dispatcher-a.key\"
sync_standby = \"tcp://${ADDR[b]}:$SYNC\"
curve_server_key_standby = \"keys/dispatcher-b.key\"" >"member$m.toml"
  done
  peer_toml >peer.toml
  start_dispatcher a
  sleep 1.5       # a becomes the VRRP master first
  start_dispatcher b
  for m in 1 2; do
    ns "host$m" setsid $CLI member --config "$LAB/member$m.toml" --id "$m" \
        --connect "tcp://${ADDR[a]}:$SYNC" >"$LAB/member$m.log" 2>&1 &
  done
  sleep 3
  ns peer setsid $CLI peer --config "$LAB/peer.toml" >"$LAB/peer.log" 2>&1 &
  echo "up: peer ${ADDR[peer]}, cluster address $VIP; try: $0 status"
}

status() {
  export PYTHONPATH=$ROOT
  for s in a b; do
    echo "== dispatcher host $s"
    (cd "$ROOT" && $CLI status --config "$LAB/dispatcher-$s.toml" --json 2>/dev/null) | "$PY" -c '
import json, sys
s = json.load(sys.stdin)
d = s["dispatcher"]
alive = [m["id"] for m in s["members"] if m["alive"]]
print("role", d["role"], "on", d["host"], "term", d["term"], "epoch", s["cluster"]["epoch"],
      "members alive", alive)' 2>/dev/null || echo "(no answer)"
  done
}

fail() {  # $1 = a | b: kill its processes, take its link down
  local s=$1
  for pid in $(ip netns pids "$NS-$s"); do kill -9 "$pid" 2>/dev/null || true; done
  ns "$s" ip link set eth0 down
  echo "dispatcher host $s: stopped, link down"
}

back() {
  local s=$1
  export PYTHONPATH=$ROOT
  ns "$s" ip link set eth0 up
  start_dispatcher "$s"
}

down() {
  for n in peer a b host1 host2 sw; do
    for pid in $(ip netns pids "$NS-$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$NS-$n" 2>/dev/null || true
  done
  echo "down (files stay in $LAB)"
}

case "${1:-}" in
  up) up ;;
  status) status ;;
  fail) fail "${2:?a or b}" ;;
  back) back "${2:?a or b}" ;;
  down) down ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
