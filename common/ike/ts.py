"""Traffic selectors (RFC 7296 §3.13.1) and their narrowing (RFC 7296 §2.9)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from common.ike.constants import TsType

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(slots=True, frozen=True)
class TrafficSelector:
    """One selector: an address range, a port range and an IP protocol (0 = any)."""

    ts_type: TsType
    ip_protocol: int
    start_port: int
    end_port: int
    start_addr: IPAddress
    end_addr: IPAddress
