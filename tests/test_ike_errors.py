"""One exception tree, and exactly one function that turns an exception into
a NOTIFY payload (docs/design.md "Code conventions")."""

from __future__ import annotations

import re
from pathlib import Path

from common.errors import MalformedMessage, RemoteProtocolError
from common.ike.constants import NotifyType, ProtocolId
from common.ike.message import InvalidMajorVersion
from common.ike.payloads import UnsupportedCriticalPayload
from common.ike.refusals import ChildRefused, Refused, UnexpectedExchange, notify_for

IKE = Path(__file__).resolve().parent.parent / "common" / "ike"


def test_notify_for() -> None:
    n = notify_for(UnsupportedCriticalPayload(200))
    assert (n.notify_type, n.data) == (NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, bytes([200]))
    n = notify_for(ChildRefused(NotifyType.CHILD_SA_NOT_FOUND, "x", protocol=ProtocolId.ESP,
                                spi=b"\x01\x02\x03\x04"))
    assert (n.notify_type, n.protocol, n.spi) == (NotifyType.CHILD_SA_NOT_FOUND,
                                                  ProtocolId.ESP, b"\x01\x02\x03\x04")
    n = notify_for(Refused(NotifyType.INVALID_KE_PAYLOAD, "group", b"\x00\x13"))
    assert (n.notify_type, n.data) == (NotifyType.INVALID_KE_PAYLOAD, b"\x00\x13")
    assert notify_for(InvalidMajorVersion(3)).notify_type == NotifyType.INVALID_MAJOR_VERSION
    for exc in (UnexpectedExchange("x"), MalformedMessage("x"), RemoteProtocolError("x")):
        assert notify_for(exc).notify_type == NotifyType.INVALID_SYNTAX


def test_error_notifies_are_built_only_by_notify_for() -> None:
    """No module of the IKE core builds an error NotifyPayload itself."""
    built = re.compile(r"NotifyPayload\(\s*NotifyType\.(\w+)")
    offenders = []
    for path in IKE.rglob("*.py"):
        for name in built.findall(path.read_text()):
            if NotifyType[name].is_error:
                offenders.append(f"{path.relative_to(IKE)}: {name}")
    assert not offenders
