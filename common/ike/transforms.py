"""Proposals and transforms (RFC 7296 §3.3) as plain data, shared by the SA
payload codec (``payloads.py``), the proposal-string parser and negotiation
(``proposals.py``), and the exchanges.

Rules of this file: data only, no parsing of bytes, no negotiation logic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.ike.constants import ProtocolId, TransformType


@dataclass(slots=True, frozen=True)
class Transform:
    """One transform substructure (RFC 7296 §3.3.2).

    ``key_length`` is the Key Length attribute in bits (RFC 7296 §3.3.5), or
    None when the transform carries no attribute.
    """

    type: TransformType
    id: int
    key_length: int | None = None


@dataclass(slots=True)
class Proposal:
    """One proposal substructure (RFC 7296 §3.3.1).

    ``spi`` is empty in an initial IKE_SA_INIT, 8 bytes for IKE SA rekeys,
    4 bytes for ESP.
    """

    number: int
    protocol: ProtocolId
    spi: bytes = b""
    transforms: list[Transform] = field(default_factory=list)

    def of_type(self, ttype: TransformType) -> list[Transform]:
        return [t for t in self.transforms if t.type == ttype]
