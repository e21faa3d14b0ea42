"""What the IKE core needs to know of the configuration: one ``IkePolicy`` per
connection, one ``ChildPolicy`` per child. Built from common.config by the shell
(``policies_from_config``), kept separate so the core does not depend on the
TOML schema."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from common.config import ConnectionConfig
from common.ike.certs import LocalCredential, TrustAnchors, dn_equal, format_dn
from common.ike.constants import IdType
from common.ike.transforms import Proposal
from common.ike.ts import TrafficSelector


@dataclass(slots=True)
class ChildPolicy:
    name: str
    local_ts: list[TrafficSelector]
    remote_ts: list[TrafficSelector]
    esp_proposals: list[Proposal]
    rekey_time: float = 3600.0
    start: bool = False


@dataclass(slots=True)
class IkePolicy:
    name: str
    local_id: tuple[IdType, bytes]
    #: None = accept any identity (swanctl ``%any``).
    remote_id: tuple[IdType, bytes] | None
    psk: bytes = field(repr=False)
    proposals: list[Proposal]
    #: textual addresses; "%any" matches everything.
    remote_addrs: list[str] = field(default_factory=lambda: ["%any"])
    remote_port: int = 500
    dpd_delay: float = 10.0
    rekey_time: float = 14400.0
    children: dict[str, ChildPolicy] = field(default_factory=dict)
    #: RFC 7383: "yes"/"force" announce and send fragments, "accept" only
    #: announces, "no" does neither (received fragments are always taken)
    fragmentation: str = "yes"
    #: address pools for CP requests (RFC 7296 §3.15), tried in order
    pools: list[str] = field(default_factory=list)
    #: how we prove our identity and how the peer must prove its own:
    #: "psk" or "pubkey" (swanctl's local/remote auth)
    local_auth: str = "psk"
    remote_auth: str = "psk"
    #: our certificate and key (local_auth = "pubkey")
    credential: LocalCredential | None = field(default=None, repr=False)
    #: CAs a peer's certificate must chain to (remote_auth = "pubkey")
    anchors: TrustAnchors | None = field(default=None, repr=False)

    @property
    def uses_certificates(self) -> bool:
        return "pubkey" in (self.local_auth, self.remote_auth)

    def matches_address(self, addr: str) -> bool:
        return "%any" in self.remote_addrs or addr in self.remote_addrs

    def matches_remote_id(self, id_type: IdType, data: bytes) -> bool:
        if self.remote_id is None:
            return True
        if id_type == IdType.ID_DER_ASN1_DN and self.remote_id[0] == id_type:
            return dn_equal(self.remote_id[1], data)
        return self.remote_id == (id_type, data)


def format_identity(id_type: IdType, data: bytes) -> str:
    """Human form of an IKE identity for logs and status."""
    if id_type == IdType.ID_IPV4_ADDR and len(data) == 4:
        return str(ipaddress.IPv4Address(data))
    if id_type == IdType.ID_IPV6_ADDR and len(data) == 16:
        return str(ipaddress.IPv6Address(data))
    if id_type in (IdType.ID_FQDN, IdType.ID_RFC822_ADDR):
        return data.decode("utf-8", "replace")
    if id_type == IdType.ID_DER_ASN1_DN:
        return format_dn(data)
    return f"{id_type.name}:{data.hex()}"


def policies_from_config(connections: Mapping[str, ConnectionConfig]) -> list[IkePolicy]:
    """The IKE core's view of the ``[connections]`` of a config file."""
    out = []
    for conn in connections.values():
        uses_psk = "psk" in (conn.local_auth, conn.remote_auth)
        if conn.psk is None and uses_psk:
            raise ValueError(f"connection {conn.name}: the pre-shared key was not read")
        if conn.local_auth != "psk" and conn.credential is None:
            raise ValueError(f"connection {conn.name}: local_cert/local_key were not read")
        if conn.remote_auth == "pubkey" and conn.anchors is None:
            raise ValueError(f"connection {conn.name}: remote_cacerts were not read")
        if conn.local_id.id_type is None:
            raise ValueError(f"connection {conn.name}: local_id cannot be %any")
        children = {
            c.name: ChildPolicy(c.name, list(c.local_ts), list(c.remote_ts),
                                [p.proposal for p in c.esp_proposals], float(c.rekey_time),
                                c.start_action == "start")
            for c in conn.children.values()
        }
        remote_id = (None if conn.remote_id.id_type is None
                     else (conn.remote_id.id_type, conn.remote_id.data))
        out.append(IkePolicy(
            conn.name, (conn.local_id.id_type, conn.local_id.data), remote_id, conn.psk or b"",
            [p.proposal for p in conn.proposals],
            [str(a) for a in conn.remote_addrs] or ["%any"], conn.remote_port,
            float(conn.dpd_delay), float(conn.rekey_time), children,
            fragmentation=conn.fragmentation, pools=list(conn.pools),
            local_auth="psk" if conn.local_auth == "psk" else "pubkey",
            remote_auth=conn.remote_auth, credential=conn.credential, anchors=conn.anchors))
    return out
