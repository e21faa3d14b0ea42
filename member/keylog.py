"""Key export for Wireshark (``save_keys = "DIR"`` under [cluster]).

Writes the two files strongSwan's save-keys plugin writes, in its format, so
that Wireshark (or tshark) decrypts a capture of our IKE and ESP traffic:

- ``ikev2_decryption_table`` (Wireshark's IKEv2 decryption table UAT): one
  line per IKE SA, ``SPIi,SPIr,SK_ei,SK_er,"encr",SK_ai,SK_ar,"integ"``
  (SPIs as 16 hex digits, keys as hex, SK_e with the AEAD salt);
- ``esp_sa`` (Wireshark's ESP SA UAT): one line per direction of a child
  SA, ``"IPv4","src","dst","0xSPI","encr","0xkey","integ","0xkey"``.

Every process of the cluster (each member, the single gateway, our peer)
appends to the same two files: Wireshark reads one file per table. Each
line is one ``write`` on a descriptor opened with O_APPEND, which the
kernel appends whole (POSIX: the offset moves and the write happens as one
step), so lines from several processes never interleave. Files are
created 0600: they are secrets that decrypt all traffic they cover.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable
from typing import Protocol

from common.errors import StartupError
from common.esp.transforms import CBC, CHACHA, CTR, GCM, TRANSFORMS
from common.ike.constants import EncrId, IntegId
from common.ike.events import ChildSaInstalled, IkeEvent, IkeSaEstablished, IkeSaRekeyed
from common.ike.keys import IkeKeys
from common.ike.proposals import IkeSuite

log = logging.getLogger("ipsec_cluster.keylog")

IKE_TABLE = "ikev2_decryption_table"
ESP_TABLE = "esp_sa"
FILE_MODE = 0o600

#: Wireshark's names (its IKEv2 UAT), as strongSwan's save-keys maps them
_IKE_INTEG = {
    IntegId.NONE: "NONE [RFC4306]",
    IntegId.AUTH_HMAC_SHA1_96: "HMAC_SHA1_96 [RFC2404]",
    IntegId.AUTH_HMAC_SHA2_256_128: "HMAC_SHA2_256_128 [RFC4868]",
    IntegId.AUTH_HMAC_SHA2_384_192: "HMAC_SHA2_384_192 [RFC4868]",
    IntegId.AUTH_HMAC_SHA2_512_256: "HMAC_SHA2_512_256 [RFC4868]",
}
_GCM_ICV = {EncrId.ENCR_AES_GCM_8: 8, EncrId.ENCR_AES_GCM_12: 12, EncrId.ENCR_AES_GCM_16: 16}
#: Wireshark's names (its ESP SA UAT)
_ESP_ENCR = {CBC: "AES-CBC [RFC3602]", CTR: "AES-CTR [RFC3686]",
             GCM: "AES-GCM with 16 octet ICV [RFC4106]"}
_ESP_INTEG = {"sha1": "HMAC-SHA-1-96 [RFC2404]", "sha256": "HMAC-SHA-256-128 [RFC4868]",
              "sha384": "HMAC-SHA-384-192 [RFC4868]", "sha512": "HMAC-SHA-512-256 [RFC4868]"}
#: AES-GCM: Wireshark (4.0) takes it only with NULL authentication and with
#: the ICV length in the cipher's name. strongSwan's plugin writes "AES-GCM
#: [RFC4106]" with "ANY 128 bit authentication [no checking]", which
#: Wireshark 4.0 rejects as a preferences error: here we differ from it.
_ESP_GCM_INTEG = "NULL"


class _Sa(Protocol):
    suite: IkeSuite | None
    keys: IkeKeys | None


def ike_encr_name(suite: IkeSuite) -> str | None:
    bits = suite.key_bits
    if suite.encr == EncrId.ENCR_AES_CBC:
        return f"AES-CBC-{bits} [RFC3602]"
    if suite.encr == EncrId.ENCR_AES_CTR:
        return f"AES-CTR-{bits} [RFC5930]"
    icv = _GCM_ICV.get(suite.encr)
    if icv is not None:
        return f"AES-GCM-{bits} with {icv} octet ICV [RFC5282]"
    return None   # ChaCha20-Poly1305: no entry in Wireshark's table


def ike_line(spi_i: bytes, spi_r: bytes, suite: IkeSuite, keys: IkeKeys) -> str | None:
    """The ikev2_decryption_table line of an IKE SA, or None (not decryptable)."""
    encr = ike_encr_name(suite)
    integ = _IKE_INTEG.get(IntegId.NONE if suite.is_aead else suite.integ)
    if encr is None or integ is None:
        return None
    return (f'{spi_i.hex()},{spi_r.hex()},{keys.sk_ei.hex()},{keys.sk_er.hex()},"{encr}",'
            f'{keys.sk_ai.hex()},{keys.sk_ar.hex()},"{integ}"\n')


def esp_lines(e: ChildSaInstalled, local: str) -> list[str]:
    """The esp_sa lines of a child SA: peer -> us (spi_in), us -> peer (spi_out)."""
    t = TRANSFORMS.get(e.transform)
    if t is None or t.cipher == CHACHA:
        return []   # ChaCha20-Poly1305: no entry in Wireshark's table
    encr = _ESP_ENCR[t.cipher]
    integ = _ESP_GCM_INTEG if t.integ is None else _ESP_INTEG[t.integ]
    family = "IPv6" if ipaddress.ip_address(e.remote[0]).version == 6 else "IPv4"
    split = t.key_size + t.salt_size
    lines = []
    for src, dst, spi, keymat in ((e.remote[0], local, e.spi_in, e.keymat_in),
                                  (local, e.remote[0], e.spi_out, e.keymat_out)):
        lines.append(f'"{family}","{src}","{dst}","0x{spi:08x}","{encr}",'
                     f'"0x{keymat[:split].hex()}","{integ}","0x{keymat[split:].hex()}"\n')
    return lines


def append_line(path: str, line: str) -> None:
    """One line, one write, O_APPEND: whole even with other writers."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class KeyLog:
    """Writes the keys of each IKE SA and child SA as they come up."""

    def __init__(self, folder: str, local: str) -> None:
        self.folder = folder
        #: our address as the esp_sa file names it ("*": any, when we listen on all)
        self.local = local
        if folder:
            log.warning("save_keys: writing IKE and ESP keys to %s/%s and %s/%s: these files "
                        "decrypt the traffic; keep them secret and remove them after use",
                        folder, IKE_TABLE, folder, ESP_TABLE)

    def event(self, e: IkeEvent, sa_of: Callable[[int], _Sa | None]) -> None:
        """The hook in the member's event loop (member/worker.py)."""
        if not self.folder:
            return
        try:
            if isinstance(e, IkeSaEstablished | IkeSaRekeyed):
                sa = sa_of(e.ike_id if isinstance(e, IkeSaEstablished) else e.new_ike_id)
                if sa is not None and sa.suite is not None and sa.keys is not None:
                    line = ike_line(e.spi_i, e.spi_r, sa.suite, sa.keys)
                    if line is not None:
                        append_line(os.path.join(self.folder, IKE_TABLE), line)
            elif isinstance(e, ChildSaInstalled):
                for line in esp_lines(e, self.local):
                    append_line(os.path.join(self.folder, ESP_TABLE), line)
        except OSError as exc:
            log.error("save_keys: cannot write into %s: %s", self.folder, exc.strerror or exc)


def check_folder(folder: str) -> None:
    """A missing ``save_keys`` folder is one operator error line at start."""
    if folder and not os.path.isdir(folder):
        raise StartupError(f"save_keys: {folder} is not a folder (create it, mode 0700, "
                           "or remove cluster.save_keys)")


def keylog_for(folder: str, address: str) -> KeyLog:
    """The KeyLog of ``save_keys`` (off when ""); ``address`` is cluster.address."""
    check_folder(folder)
    local = "*" if ipaddress.ip_address(address).is_unspecified else address
    return KeyLog(folder, local)
