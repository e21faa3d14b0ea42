#!/usr/bin/env bash
# Installs the Debian packages the real-peer tests need (strongSwan's charon with
# libipsec, swanctl, ping, tcpdump, iproute2, tshark for the key export test,
# keepalived for the two dispatcher hosts' VRRP) and
# the OpenSSL headers the compiled ESP path builds against (libssl-dev), when
# running as root and missing.
set -eu
PKGS="strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-standard-plugins iputils-ping tcpdump iproute2 libssl-dev nftables tshark keepalived"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "sysdeps: not root or no apt-get; the strongSwan interop tests will be skipped and without libssl-dev ESP uses its pure-Python path (missing:$missing)"
  exit 0
fi
echo "sysdeps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
# tshark's wireshark-common asks whether non-root users may capture: no.
echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
apt-get update -qq
apt-get install -y -qq --no-install-recommends $missing >/dev/null
# The charon package may start a system charon; the tests run their own per namespace.
systemctl stop strongswan-starter >/dev/null 2>&1 || true
