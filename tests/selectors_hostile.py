"""A hostile but authenticated peer, for tests/test_selectors_strongswan.py.

``python -m tests.selectors_hostile CONFIG SPEC...`` brings up the connection
of CONFIG as our own initiator (the ``Gateway`` that ``ipsec-cluster peer``
runs), then encrypts hand-made inner IPv4/UDP packets into its first child SA,
whatever their addresses: what an authenticated peer can do that strongSwan's
libipsec will not. SPEC is ``SRC:DST:PORT:COUNT``. Prints ``sent N`` when done
and exits. Test-only: it reaches into the Member's child SAs.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from bench.harness.packets import udp4_packet
from bench.harness.procs import run_main
from dispatcher.gateway import Gateway
from member.config_file import read_config

UP_TIMEOUT_S = 20.0
POLL_S = 0.05
SPORT = 40000


async def main(config_path: str, specs: list[str]) -> int:
    gw = Gateway(read_config(config_path), initiate=True)
    await gw.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + UP_TIMEOUT_S
    while not gw.member.by_spi:
        if loop.time() > deadline:
            print("no child SA", flush=True)
            return 1
        await asyncio.sleep(POLL_S)
    route = next(iter(gw.member.by_spi.values()))
    transport = gw.ports[gw.config.cluster.natt_port].transport
    if transport is None:
        print("no NAT-T socket", flush=True)
        return 1
    sent = 0
    for spec in specs:
        src, dst, dport, count = spec.split(":")
        for i in range(int(count)):
            inner = udp4_packet(src, dst, SPORT, int(dport), b"hostile %d" % i, ident=i)
            transport.sendto(route.outbound.protect(inner), route.remote)
            sent += 1
            await asyncio.sleep(0.005)
    print(f"sent {sent}", flush=True)
    await asyncio.sleep(0.5)
    gw.close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(run_main(main(sys.argv[1], sys.argv[2:])))
