"""The one exception tree of ipsec-cluster.

Rules of this file:
- ``MalformedMessage`` is the only error that code parsing bytes from the
  network may raise for bad bytes; no ``IndexError`` or ``struct.error`` escapes.
- ``RemoteProtocolError`` (the peer misbehaved) and ``LocalProtocolError`` (our
  caller misused the API) stay apart, as in h11.
- IKE protocol errors carry the notify type they map to as ``notify_type``.
- Every ``RemoteProtocolError`` names a ``drop_reason``: the stable snake_case
  key under which a receiver that refuses the input counts it (the IKE engine's
  ``drops``), so an operator sees what peers get wrong, by cause.
"""

from __future__ import annotations


class IpsecClusterError(Exception):
    """Base of every error raised on purpose by ipsec-cluster."""


class RemoteProtocolError(IpsecClusterError):
    """The peer (or a packet from the network) broke the protocol.

    ``notify_type`` is the IKEv2 Notify Message Type (RFC 7296 §3.10.1) this
    error is reported with, or 0 when it is not reported to the peer; the
    other ``notify_*`` fields fill the rest of that Notify payload. Only
    ``common.ike.refusals.notify_for`` turns them into one.
    """

    notify_type: int = 0
    notify_data: bytes = b""
    #: stable snake_case key for drop counters (subclasses name their cause)
    drop_reason: str = "protocol_error"
    notify_protocol: int = 0
    notify_spi: bytes = b""


class MalformedMessage(RemoteProtocolError):
    """Bytes from the network that cannot be parsed (truncated, bad lengths,
    bad field values). RFC 7296 maps it to INVALID_SYNTAX (7)."""

    notify_type = 7
    drop_reason = "malformed"


class IntegrityError(RemoteProtocolError):
    """Authentication of a packet failed (ICV mismatch, AEAD tag mismatch).

    Always one error, whatever the cipher said, so nothing leaks which check
    failed."""

    drop_reason = "integrity"


class ReplayError(RemoteProtocolError):
    """An ESP packet whose sequence number was already seen or lies left of the
    anti-replay window (RFC 4303 §3.4.3)."""

    drop_reason = "replay"


class PeerTimeout(IpsecClusterError):
    """The peer stopped answering: neither it nor our caller broke the protocol,
    but the exchange (and with it the SA) is dead (RFC 7296 §2.4)."""


class LocalProtocolError(IpsecClusterError):
    """Our own caller used an API wrongly (a bug on our side, not the peer's)."""


class SequenceExhausted(LocalProtocolError):
    """An outbound SA has used its last sequence number; it must be rekeyed
    (RFC 4303 §3.3.3: sequence numbers never wrap)."""


class StartupError(IpsecClusterError):
    """Something on this host stops the gateway from starting or running (a
    port in use, an address not on this host, a key file missing, a run
    directory that is not ours). Its message is one line for the operator that
    names the cause and the fix; the command line prints it without a traceback
    and exits with status 2."""
