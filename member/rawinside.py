"""Decrypted packets straight into the host's IP stack (raw IP sockets).

With a TUN inside on the dispatcher's host, a member on that host does not
need to hand decrypted packets back to the dispatcher: it can give them to the
kernel itself, exactly as a TUN write would (the kernel routes them by their
destination). The dispatcher then touches each inbound ESP packet once instead
of twice. Needs CAP_NET_RAW (root) and the member in the dispatcher's network
namespace; otherwise members hand packets back as before (INNER_OUT).

The sockets carry the decrypted-packets mark (``cluster.route_mark`` + 1,
member/routes.py): the kernel then routes them like packets the dispatcher
writes into the TUN device, to the main table's specific routes (the LAN
behind us) before the cluster's table, so a full-tunnel child does not send
them straight back into the tunnel.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

from member.batch_io import write_raw_batch

log = logging.getLogger("ipsec_cluster.member")

#: IPSEC_CLUSTER_INSIDE_RAW=0 turns it off (packets go back to the dispatcher)
ENV = "IPSEC_CLUSTER_INSIDE_RAW"
SO_MARK = getattr(socket, "SO_MARK", 36)  # linux/socket.h (Python < 3.12 lacks it)


class RawInside:
    """Non-blocking raw sockets for IPv4 (IPPROTO_RAW implies IP_HDRINCL) and
    IPv6 (IPV6_HDRINCL); a full socket buffer is a counted drop."""

    __slots__ = ("drops", "sent", "v4", "v6")

    def __init__(self, mark: int | None = None) -> None:
        self.v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.v4.setblocking(False)
        self.v6: socket.socket | None = None
        try:
            if mark is not None:
                self.v4.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except OSError:
            self.v4.close()
            raise
        with contextlib.suppress(OSError):
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            try:
                v6.setsockopt(socket.IPPROTO_IPV6, 36, 1)  # IPV6_HDRINCL (Linux >= 4.5)
                if mark is not None:
                    v6.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
                v6.setblocking(False)
            except OSError:
                v6.close()
                raise
            self.v6 = v6
        self.sent = 0
        self.drops = 0

    @classmethod
    def open_if_possible(cls, inside_kind: str, mark: int | None = None) -> RawInside | None:
        """``mark``: the TUN inside's ``route_mark``; the sockets carry it + 1."""
        if inside_kind != "tun" or os.environ.get(ENV, "1") == "0":
            return None
        try:
            return cls(mark + 1 if mark is not None else None)
        except OSError as exc:
            log.info("decrypted packets go back through the dispatcher (%s)", exc)
            return None

    def write(self, packet: bytes) -> bool:
        try:
            if packet[0] >> 4 == 4:
                self.v4.sendto(packet, (socket.inet_ntop(socket.AF_INET, packet[16:20]), 0))
            elif self.v6 is not None and len(packet) >= 40:
                self.v6.sendto(packet, (socket.inet_ntop(socket.AF_INET6, packet[24:40]), 0))
            else:
                return False
        except (BlockingIOError, InterruptedError):
            self.drops += 1
            return True
        except OSError:
            self.drops += 1
            return True
        self.sent += 1
        return True

    def write_batch(self, packets: list[bytes]) -> list[bytes]:
        """A burst in one ``sendmmsg`` per family (member/batch_io.py); the
        packets this path cannot carry (IPv6 without an IPv6 socket, not IP)
        are returned for the caller to hand back another way; what the
        kernel did not take (a full buffer) is a counted drop."""
        unsent = write_raw_batch(self.v4.fileno(),
                                 self.v6.fileno() if self.v6 is not None else -1, packets)
        back = []
        for i in unsent:
            p = packets[i]
            version = p[0] >> 4 if p else 0
            if version == 4 or (version == 6 and self.v6 is not None and len(p) >= 40):
                self.drops += 1
            else:
                back.append(p)
        self.sent += len(packets) - len(unsent)
        return back

    def close(self) -> None:
        self.v4.close()
        if self.v6 is not None:
            self.v6.close()
