"""IKE_SA_INIT + IKE_AUTH between two in-memory engines (RFC 7296 §1.2, §2.6,
§2.7, §2.9, §2.15), roles swapped where the direction matters."""

from __future__ import annotations

import ipaddress

import pytest

from common.ike.constants import DhId, ExchangeType, IdType, NotifyType, PayloadType
from common.ike.context import IkeState
from common.ike.events import (
    ChildSaDeleted,
    ChildSaFailed,
    ChildSaInstalled,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
)
from common.ike.message import decode_header, decode_message
from common.ike.payloads import KePayload, NoncePayload, NotifyPayload, SaPayload
from common.ike.ts import ts_from_cidr
from tests.ike_pair import (
    assert_children_agree,
    child,
    esp_carries,
    make_pair,
    other,
)

ROLES = ["a", "b"]


def notifies(data: bytes) -> list[NotifyType]:
    return [n.notify_type for n in decode_message(data).get_all(NotifyPayload)]


@pytest.mark.parametrize("ini", ROLES)
def test_init_auth_first_child(ini: str) -> None:
    p = make_pair(extra_children=False)
    resp = other(ini)
    p.initiate(ini)
    # IKE_SA_INIT { SAi1, KEi, Ni, N(NAT_DETECTION_SOURCE_IP), N(NAT_DETECTION_DESTINATION_IP) } -->
    [m1] = p.step(ini)
    req = decode_message(m1)
    assert req.exchange == ExchangeType.IKE_SA_INIT and req.message_id == 0
    assert req.get(SaPayload) and req.get(KePayload) and req.get(NoncePayload)
    assert NotifyType.NAT_DETECTION_SOURCE_IP in notifies(m1)
    # <-- IKE_SA_INIT { SAr1, KEr, Nr, N(NAT_DETECTION_SOURCE_IP), N(NAT_DETECTION_DESTINATION_IP) }
    [m2] = p.step(resp)
    assert decode_header(m2).is_response and len(decode_message(m2).get(SaPayload).proposals) == 1
    # IKE_AUTH SK { IDi, IDr, AUTH, SAi2, TSi, TSr, N(MESSAGE_ID_SYNC_SUPPORTED) } -->
    [m3] = p.step(ini)
    assert decode_header(m3).next_payload == PayloadType.SK
    assert decode_header(m3).message_id == 1
    # <-- IKE_AUTH SK { IDr, AUTH, SAr2, TSi, TSr, N(MESSAGE_ID_SYNC_SUPPORTED) }
    [m4] = p.step(resp)
    assert decode_header(m4).is_response and decode_header(m4).message_id == 1
    assert p.step(ini) == [] and p.step(resp) == []

    [ei] = p.of(ini, IkeSaEstablished)
    [er] = p.of(resp, IkeSaEstablished)
    assert ei.initiator and not er.initiator
    assert (ei.spi_i, ei.spi_r) == (er.spi_i, er.spi_r)
    assert ei.suite == er.suite == "AES_GCM_16_128/PRF_HMAC_SHA2_256/ECP_256"
    assert (ei.local_id, ei.remote_id) == (er.remote_id, er.local_id)
    [ci] = p.of(ini, ChildSaInstalled)
    [cr] = p.of(resp, ChildSaInstalled)
    assert (ci.spi_in, ci.spi_out) == (cr.spi_out, cr.spi_in)
    assert ci.keymat_in == cr.keymat_out and ci.keymat_out == cr.keymat_in
    assert ci.keymat_in != ci.keymat_out
    assert (ci.local_ts, ci.remote_ts) == (cr.remote_ts, cr.local_ts)
    assert ci.replaces is None and cr.replaces is None
    assert esp_carries(ci, cr)
    # Both float to the NAT-T port (RFC 3948), as the engine always does.
    assert p.sa(ini).remote[1] == 4500 and p.sa(ini).local_port == 4500


@pytest.mark.parametrize("ini", ROLES)
def test_all_configured_children(ini: str) -> None:
    p = make_pair()
    # IKE_SA_INIT, IKE_AUTH (child "net") then CREATE_CHILD_SA (child "ctr") -->
    p.establish(ini)
    assert sorted(c.name for c in p.live(ini).values()) == ["ctr", "net"]
    assert_children_agree(p)
    for name in ("net", "ctr"):
        assert esp_carries(p.child_named("a", name), p.child_named("b", name))


SUITES = [
    ("aes128gcm16-prfsha256-ecp256", "AES_GCM_16_128/PRF_HMAC_SHA2_256/ECP_256"),
    ("aes256gcm16-prfsha384-ecp384", "AES_GCM_16_256/PRF_HMAC_SHA2_384/ECP_384"),
    ("aes256gcm16-prfsha512-curve25519", "AES_GCM_16_256/PRF_HMAC_SHA2_512/CURVE_25519"),
    ("aes128-sha256-prfsha256-modp2048", "AES_CBC_128/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/"
                                         "MODP_2048"),
    ("aes256-sha256-prfsha512-ecp256", "AES_CBC_256/HMAC_SHA2_256_128/PRF_HMAC_SHA2_512/ECP_256"),
    ("aes128-sha256-prfsha384-curve25519", "AES_CBC_128/HMAC_SHA2_256_128/PRF_HMAC_SHA2_384/"
                                           "CURVE_25519"),
    ("aes256-sha256-prfsha256-modp3072", "AES_CBC_256/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/"
                                         "MODP_3072"),
    ("aes128gcm16-prfsha512-modp2048", "AES_GCM_16_128/PRF_HMAC_SHA2_512/MODP_2048"),
]


@pytest.mark.parametrize(("ike", "status"), SUITES, ids=[s[0] for s in SUITES])
def test_ike_suites(ike: str, status: str) -> None:
    p = make_pair(ike_a=ike, ike_b=ike, extra_children=False)
    # IKE_SA_INIT { SAi1(ike), KEi, Ni } --> <-- { SAr1, KEr, Nr }; IKE_AUTH -->  <--
    p.establish("a")
    assert p.of("a", IkeSaEstablished)[0].suite == status
    assert p.of("b", IkeSaEstablished)[0].suite == status
    # INFORMATIONAL SK {} --> <-- SK {}: both directions of the SK keys work.
    assert p.dpd_ok("a") and p.dpd_ok("b")
    assert esp_carries(p.child_named("a", "net"), p.child_named("b", "net"))


def test_responder_picks_its_preferred_suite() -> None:
    # The initiator offers two suites; the responder chooses in its own order.
    p = make_pair(ike_a="aes128gcm16-prfsha256-ecp256,aes256gcm16-prfsha384-ecp384",
                  ike_b="aes256gcm16-prfsha384-ecp384,aes128gcm16-prfsha256-ecp256",
                  extra_children=False)
    # IKE_SA_INIT { SAi1(2 proposals), KEi(ecp256), Ni } -->
    # <-- IKE_SA_INIT { N(INVALID_KE_PAYLOAD, ecp384) }
    # IKE_SA_INIT { SAi1, KEi(ecp384), Ni } --> <-- { SAr1, KEr, Nr }
    p.establish("a")
    assert p.of("a", IkeSaEstablished)[0].suite == "AES_GCM_16_256/PRF_HMAC_SHA2_384/ECP_384"


ESP = ["aes128gcm16", "aes256gcm16", "aes128ctr-sha256", "aes256ctr-sha256",
       "aes128gcm16-esn", "aes256ctr-sha256-esn", "aes128gcm16-ecp256", "aes128ctr-sha256-modp2048"]


@pytest.mark.parametrize("esp", ESP)
@pytest.mark.parametrize("ini", ROLES)
def test_esp_transforms(ini: str, esp: str) -> None:
    p = make_pair(esp=esp, extra_children=False)
    # IKE_AUTH SK { ..., SAi2(esp), TSi, TSr } --> <-- SK { ..., SAr2, TSi, TSr }
    p.establish(ini)
    [ci] = p.of(ini, ChildSaInstalled)
    [cr] = p.of(other(ini), ChildSaInstalled)
    assert ci.transform == esp.removesuffix("-esn").split("-ecp")[0].split("-modp")[0]
    assert ci.esn == cr.esn == esp.endswith("-esn")
    assert esp_carries(ci, cr)


def test_ipv6_traffic_selectors() -> None:
    p = make_pair(children_a=[child("v6", ["2001:db8:1::/64", "10.1.0.0/16"], "2001:db8:2::/64")],
                  children_b=[child("v6", ["2001:db8:2::/64"], ["2001:db8:1::/64", "10.1.0.0/16"])])
    # IKE_AUTH SK { ..., TSi(2001:db8:1::/64, 10.1.0.0/16), TSr(2001:db8:2::/64) } -->
    # <-- IKE_AUTH SK { ..., TSi(2001:db8:1::/64, 10.1.0.0/16), TSr(2001:db8:2::/64) }
    p.establish("a")
    [ca] = p.of("a", ChildSaInstalled)
    assert ca.local_ts == (ts_from_cidr("2001:db8:1::/64"), ts_from_cidr("10.1.0.0/16"))
    assert ca.remote_ts == (ts_from_cidr("2001:db8:2::/64"),)
    assert ipaddress.ip_address(ca.remote_ts[0].start_addr).version == 6
    assert_children_agree(p)


@pytest.mark.parametrize("ini", ROLES)
def test_ts_narrowing(ini: str) -> None:
    # The initiator asks for /16s; the responder allows only a /24 of each.
    if ini == "a":
        ca = child("net", "10.91.0.0/16", "10.92.0.0/16")
        cb = child("net", "10.92.5.0/24", "10.91.7.0/24")
    else:
        ca = child("net", "10.91.7.0/24", "10.92.5.0/24")
        cb = child("net", "10.92.0.0/16", "10.91.0.0/16")
    p = make_pair(children_a=[ca], children_b=[cb])
    # IKE_AUTH SK { ..., TSi(wide), TSr(wide) } -->
    # <-- IKE_AUTH SK { ..., TSi(narrowed), TSr(narrowed) }
    p.establish(ini)
    [ci] = p.of(ini, ChildSaInstalled)
    [cr] = p.of(other(ini), ChildSaInstalled)
    if ini == "a":
        assert ci.local_ts == (ts_from_cidr("10.91.7.0/24"),)
        assert ci.remote_ts == (ts_from_cidr("10.92.5.0/24"),)
    else:
        assert ci.local_ts == (ts_from_cidr("10.92.5.0/24"),)
        assert ci.remote_ts == (ts_from_cidr("10.91.7.0/24"),)
    assert (cr.local_ts, cr.remote_ts) == (ci.remote_ts, ci.local_ts)


IDS = [
    ((IdType.ID_FQDN, b"gw-a.example.net"), (IdType.ID_FQDN, b"gw-b.example.net"),
     "gw-a.example.net"),
    ((IdType.ID_IPV4_ADDR, bytes([192, 0, 2, 1])), (IdType.ID_IPV4_ADDR, bytes([192, 0, 2, 2])),
     "192.0.2.1"),
    ((IdType.ID_IPV6_ADDR, ipaddress.IPv6Address("2001:db8::1").packed),
     (IdType.ID_IPV6_ADDR, ipaddress.IPv6Address("2001:db8::2").packed), "2001:db8::1"),
    ((IdType.ID_KEY_ID, b"\x01\x02key-a"), (IdType.ID_KEY_ID, b"\x01\x02key-b"),
     "ID_KEY_ID:01026b65792d61"),
    ((IdType.ID_RFC822_ADDR, b"a@example.net"), (IdType.ID_RFC822_ADDR, b"b@example.net"),
     "a@example.net"),
]


@pytest.mark.parametrize(("id_a", "id_b", "shown"), IDS, ids=["fqdn", "ipv4", "ipv6", "keyid",
                                                              "rfc822"])
@pytest.mark.parametrize("ini", ROLES)
def test_identities(ini: str, id_a: tuple[IdType, bytes], id_b: tuple[IdType, bytes],
                    shown: str) -> None:
    p = make_pair(id_a=id_a, id_b=id_b, extra_children=False)
    # IKE_AUTH SK { IDi, IDr, AUTH, ... } --> <-- SK { IDr, AUTH, ... }
    p.establish(ini)
    assert p.of("a", IkeSaEstablished)[0].local_id == shown
    assert p.of("b", IkeSaEstablished)[0].remote_id == shown
    assert p.sa("b").peer_id == id_a and p.sa("a").peer_id == id_b


def test_unexpected_identity_refused() -> None:
    # b expects "gw-a.test" but a presents another FQDN.
    p = make_pair(extra_children=False)
    p.a.policies["conn"].local_id = (IdType.ID_FQDN, b"mallory.test")
    p.initiate("a")
    # IKE_SA_INIT --> <--
    p.step("a"), p.step("b")
    # IKE_AUTH SK { IDi(mallory.test), ... } -->
    p.step("a")
    # <-- IKE_AUTH SK { N(AUTHENTICATION_FAILED) }
    p.step("b")
    assert "mallory.test" in p.of("b", IkeSaFailed)[0].reason
    assert p.of("a", IkeSaFailed) and not p.a.established() and not p.b.established()


@pytest.mark.parametrize("ini", ROLES)
def test_wrong_psk(ini: str) -> None:
    p = make_pair(psk_b=b"not-the-same-psk-0123456789")
    resp = other(ini)
    p.initiate(ini)
    # IKE_SA_INIT --> <--
    p.step(ini), p.step(resp)
    # IKE_AUTH SK { IDi, IDr, AUTH(wrong key), SAi2, TSi, TSr } -->
    p.step(ini)
    # <-- IKE_AUTH SK { N(AUTHENTICATION_FAILED) }
    [answer] = p.step(resp)
    assert decode_header(answer).exchange == ExchangeType.IKE_AUTH
    p.flush()
    assert not p.a.by_id and not p.b.by_id
    assert not p.of("a", ChildSaInstalled) and not p.of("b", ChildSaInstalled)
    [fi] = p.of(ini, IkeSaFailed)
    [fr] = p.of(resp, IkeSaFailed)
    assert "AUTHENTICATION_FAILED" in fi.reason
    assert "pre-shared key" in fr.reason and "PSK" in fr.reason.upper()


def test_no_common_ike_proposal() -> None:
    p = make_pair(ike_a="aes128gcm16-prfsha256-ecp256", ike_b="aes256-sha256-prfsha512-modp3072")
    p.initiate("a")
    # IKE_SA_INIT { SAi1, KEi, Ni } -->
    p.step("a")
    # <-- IKE_SA_INIT { N(NO_PROPOSAL_CHOSEN) }
    [answer] = p.step("b")
    assert notifies(answer) == [NotifyType.NO_PROPOSAL_CHOSEN]
    assert not p.a.by_id and not p.b.by_id
    assert "NO_PROPOSAL_CHOSEN" in p.of("a", IkeSaFailed)[0].reason
    assert p.b.drops.total() == 0


@pytest.mark.parametrize("ini", ROLES)
def test_no_common_esp_proposal(ini: str) -> None:
    p = make_pair(children_a=[child("net", "10.91.1.0/24", "10.91.2.0/24", "aes256gcm16")],
                  children_b=[child("net", "10.91.2.0/24", "10.91.1.0/24", "aes128ctr-sha256")])
    # IKE_AUTH SK { ..., SAi2(esp), TSi, TSr } -->
    # <-- IKE_AUTH SK { IDr, AUTH, N(NO_PROPOSAL_CHOSEN) }
    p.establish(ini)
    assert not p.live("a") and not p.live("b")
    [f] = p.of(ini, ChildSaFailed)
    assert "NO_PROPOSAL_CHOSEN" in f.reason
    assert p.dpd_ok(ini)


@pytest.mark.parametrize("ini", ROLES)
def test_ts_unacceptable(ini: str) -> None:
    p = make_pair(children_a=[child("net", "10.91.1.0/24", "10.91.2.0/24")],
                  children_b=[child("net", "172.16.0.0/24", "172.17.0.0/24")])
    # IKE_AUTH SK { ..., TSi, TSr } --> <-- IKE_AUTH SK { IDr, AUTH, N(TS_UNACCEPTABLE) }
    p.establish(ini)
    assert not p.live("a") and not p.live("b")
    assert "TS_UNACCEPTABLE" in p.of(ini, ChildSaFailed)[0].reason
    assert p.dpd_ok(other(ini))


@pytest.mark.parametrize("ini", ROLES)
def test_invalid_ke_payload_retry(ini: str) -> None:
    offers = "aes128gcm16-prfsha256-ecp256,aes128gcm16-prfsha256-curve25519"
    only = "aes128gcm16-prfsha256-curve25519"
    ike_a, ike_b = (offers, only) if ini == "a" else (only, offers)
    p = make_pair(ike_a=ike_a, ike_b=ike_b, extra_children=False)
    resp = other(ini)
    p.initiate(ini)
    # IKE_SA_INIT { SAi1(ecp256, curve25519), KEi(ecp256), Ni } -->
    [m1] = p.step(ini)
    assert decode_message(m1).get(KePayload).group == DhId.ECP_256
    # <-- IKE_SA_INIT { N(INVALID_KE_PAYLOAD, curve25519) }
    [m2] = p.step(resp)
    assert notifies(m2) == [NotifyType.INVALID_KE_PAYLOAD]
    assert decode_message(m2).payloads[0].data == int(DhId.CURVE_25519).to_bytes(2, "big")
    assert not p.engine(resp).by_id  # stateless refusal
    # IKE_SA_INIT { SAi1, KEi(curve25519), Ni } -->
    [m3] = p.step(ini)
    assert decode_header(m3).message_id == 0
    assert decode_message(m3).get(KePayload).group == DhId.CURVE_25519
    # <-- IKE_SA_INIT { SAr1, KEr(curve25519), Nr }; IKE_AUTH --> <--
    p.flush()
    assert p.of(ini, IkeSaEstablished)[0].suite.endswith("CURVE_25519")
    assert p.dpd_ok(ini)


def test_invalid_ke_for_a_group_not_offered_fails() -> None:
    p = make_pair(ike_a="aes128gcm16-prfsha256-ecp256", extra_children=False)
    p.initiate("a")
    sa = p.sa("a")
    # <-- IKE_SA_INIT { N(INVALID_KE_PAYLOAD, modp3072) } (a group a never offered)
    from common.ike.exchanges.ike_init import _error_answer

    p.step("a")
    forged = _error_answer(decode_message(p.wire[0][1].data), NotifyType.INVALID_KE_PAYLOAD,
                           int(DhId.MODP_3072).to_bytes(2, "big"))
    p.b.datagrams_to_send()  # b's real answer is lost
    p.deliver("b", forged)
    p.drain()
    assert sa.state is IkeState.FAILED
    assert "did not offer" in p.of("a", IkeSaFailed)[0].reason


@pytest.mark.parametrize("ini", ROLES)
def test_cookie(ini: str) -> None:
    resp = other(ini)
    kw = {f"cookie_threshold_{resp}": 0}
    p = make_pair(extra_children=False, **kw)  # type: ignore[arg-type]
    p.initiate(ini)
    # IKE_SA_INIT { SAi1, KEi, Ni } -->
    [m1] = p.step(ini)
    # <-- IKE_SA_INIT { N(COOKIE) }
    [m2] = p.step(resp)
    assert notifies(m2) == [NotifyType.COOKIE]
    assert not p.engine(resp).by_id  # no state kept before the cookie came back
    cookie = decode_message(m2).payloads[0].data
    # IKE_SA_INIT { N(COOKIE), SAi1, KEi, Ni } -->
    [m3] = p.step(ini)
    first = decode_message(m3).payloads[0]
    assert isinstance(first, NotifyPayload) and first.notify_type == NotifyType.COOKIE
    assert first.data == cookie
    # RFC 7296 §2.6: the same request (SPI, SA, KE value, nonce, NAT hashes)
    # with only the cookie added in front.
    assert decode_message(m3).payloads[1:] == decode_message(m1).payloads
    assert decode_header(m3).spi_i == decode_header(m1).spi_i
    # <-- IKE_SA_INIT { SAr1, KEr, Nr }; IKE_AUTH --> <--
    p.flush()
    assert p.of(ini, IkeSaEstablished) and p.of(resp, IkeSaEstablished)


def test_forged_cookie_refused() -> None:
    p = make_pair(extra_children=False, cookie_threshold_b=0)
    p.initiate("a")
    # IKE_SA_INIT --> <-- N(COOKIE)
    p.step("a"), p.step("b")
    task = p.sa("a").active
    assert task is not None
    # IKE_SA_INIT { N(COOKIE, forged), SAi1, KEi, Ni } -->
    [m3] = p.pending("a")
    msg = decode_message(m3.data)
    real = msg.payloads[0]
    assert isinstance(real, NotifyPayload)
    msg.payloads[0] = NotifyPayload(NotifyType.COOKIE, data=bytes(len(real.data)))
    from common.ike.message import encode_message

    p.deliver("a", encode_message(msg))
    # <-- IKE_SA_INIT { N(COOKIE) } again: no state for the forged one.
    [answer] = p.pending("b")
    assert notifies(answer.data) == [NotifyType.COOKIE]
    assert not p.b.by_id


def test_unknown_critical_payload_in_request() -> None:
    from common.ike.message import IkeMessage
    from tests.ike_pair import encode_with_raw

    p = make_pair(extra_children=False)
    p.establish("a")
    sa_a, sa_b = p.sa("a"), p.sa("b")
    mid = sa_a.mids.take_request_id()
    msg = IkeMessage(sa_a.spi_i, sa_a.spi_r, ExchangeType.INFORMATIONAL, mid, False, True, [])
    # INFORMATIONAL SK { <payload type 200, critical> } -->
    p.deliver("a", encode_with_raw(sa_a, msg, [], 200, b"xyz", critical=True))
    # <-- INFORMATIONAL SK { N(UNSUPPORTED_CRITICAL_PAYLOAD, 200) }
    [answer] = p.pending("b")
    reply = decode_message(answer.data, sa_a.sk_in)
    assert reply.is_response and reply.message_id == mid
    n = reply.notify(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD)
    assert n is not None and n.data == bytes([200])
    assert sa_b.state is IkeState.ESTABLISHED
    # The message ID was consumed on both sides; the SA keeps working.
    sa_a.mids.send_next = mid + 1
    assert p.dpd_ok("a") and p.dpd_ok("b")


def test_unknown_noncritical_payload_skipped() -> None:
    from common.ike.message import IkeMessage
    from tests.ike_pair import encode_with_raw

    p = make_pair(extra_children=False)
    p.establish("a")
    sa_a = p.sa("a")
    mid = sa_a.mids.take_request_id()
    msg = IkeMessage(sa_a.spi_i, sa_a.spi_r, ExchangeType.INFORMATIONAL, mid, False, True, [])
    # INFORMATIONAL SK { <payload type 200, not critical> } -->  (a DPD to the responder)
    p.deliver("a", encode_with_raw(sa_a, msg, [], 200, b"xyz", critical=False))
    # <-- INFORMATIONAL SK { }
    [answer] = p.pending("b")
    reply = decode_message(answer.data, sa_a.sk_in)
    assert reply.is_response and reply.payloads == []
    sa_a.mids.send_next = mid + 1
    assert p.dpd_ok("a")


@pytest.mark.parametrize("initial_contact", [True, False])
def test_initial_contact_option(initial_contact: bool) -> None:
    p = make_pair(extra_children=False)
    p.a.initiate("conn", p.addr("b"), p.now, initial_contact=initial_contact)
    # IKE_SA_INIT -->  <-- IKE_SA_INIT
    p.step("a")
    p.step("b")
    # IKE_AUTH { IDi, [N(INITIAL_CONTACT),] IDr, AUTH, SAi2, TSi, TSr } -->
    [auth] = p.pending("a")
    msg = decode_message(auth.data, p.sa("b").sk_in)
    assert msg.has_notify(NotifyType.INITIAL_CONTACT) is initial_contact
    p.deliver("a", auth.data, auth)
    p.flush()
    assert p.of("a", IkeSaEstablished) and p.of("b", IkeSaEstablished)


def test_initial_contact_deletes_stale_sas_of_the_same_identities() -> None:
    """RFC 7296 §2.4: IKE_AUTH with N(INITIAL_CONTACT) tells the responder that
    the initiator holds no other IKE SA with it: ours of the same identity
    pair are stale and go (without a delete); others stay."""
    p = make_pair(extra_children=False)
    first = p.initiate("a")
    p.flush()
    second = p.a.initiate("conn", p.addr("b"), p.now, initial_contact=False)
    p.flush()
    assert len(p.b.by_id) == 2  # without INITIAL_CONTACT, nothing goes
    stale = set(p.b.by_id)
    third = p.a.initiate("conn", p.addr("b"), p.now, initial_contact=False)
    p.flush()
    # Another identity pair on b's side: a different peer identity.
    [different] = [sa for i, sa in p.b.by_id.items() if i not in stale]
    different.peer_id = (IdType.ID_FQDN, b"someone-else.test")
    p.clear_events()
    # IKE_AUTH { IDi, N(INITIAL_CONTACT), IDr, AUTH, SAi2, TSi, TSr } -->
    p.a.initiate("conn", p.addr("b"), p.now)
    p.flush()
    gone = {e.ike_id for e in p.of("b", IkeSaDeleted)}
    assert gone == stale and different.ike_id in p.b.by_id and len(p.b.by_id) == 2
    assert all("INITIAL_CONTACT" in e.reason for e in p.of("b", IkeSaDeleted))
    assert len(p.of("b", ChildSaDeleted)) == 2
    assert {first, second, third} <= set(p.a.by_id)  # a is not told


@pytest.mark.parametrize("in_auth", [True, False])
@pytest.mark.parametrize("ini", ROLES)
def test_wider_ts_answer_refused_and_deleted(ini: str, in_auth: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 7296 §2.9: the responder may only narrow. An answer wider than the
    offer is refused (TS_UNACCEPTABLE) and the child the responder installed
    is deleted; the IKE SA lives on."""
    from common.ike.exchanges import child_sa

    resp = other(ini)
    p = make_pair(extra_children=False)
    if not in_auth:
        p.establish(ini)
        p.clear_events()
    # A broken responder: answers its whole configuration (10.0.0.0/8)
    # instead of the intersection with the offer.
    wide = [child("net", "10.0.0.0/8", "10.0.0.0/8")]
    p.engine(resp).policies["conn"].children["net"] = wide[0]
    monkeypatch.setattr(child_sa, "narrow", lambda proposed, allowed: list(allowed))
    if in_auth:
        # IKE_AUTH { ..., TSi(/24), TSr(/24) } -->  <-- IKE_AUTH { ..., TSi(/8), TSr(/8) }
        p.initiate(ini)
    else:
        # CREATE_CHILD_SA { SA, Ni, TSi(/24), TSr(/24) } -->  <-- { SA, Nr, TSi(/8), TSr(/8) }
        p.engine(ini).create_child(p.ike_id(ini), "net", p.now)
    # INFORMATIONAL { D(ESP, the refused child) } -->  <-- INFORMATIONAL { D(ESP) }
    p.flush()
    [failed] = p.of(ini, ChildSaFailed)
    assert "TS_UNACCEPTABLE" in failed.reason
    assert not p.of(ini, ChildSaInstalled)
    [installed] = p.of(resp, ChildSaInstalled)
    [deleted] = p.of(resp, ChildSaDeleted)
    assert deleted.spi_in == installed.spi_in
    extra = 0 if in_auth else 1  # the child from IKE_AUTH stays
    assert len(p.live(ini)) == len(p.live(resp)) == extra
    assert p.dpd_ok(ini) and p.dpd_ok(resp)


def test_unknown_critical_payload_in_first_ike_sa_init() -> None:
    """RFC 7296 §2.5: even without an SA, an unknown critical payload is
    answered with UNSUPPORTED_CRITICAL_PAYLOAD naming its type."""
    from common.ike.constants import IKE_HEADER_LEN
    from common.ike.message import HEADER
    from common.ike.payloads import GENERIC_HEADER, encode_payloads

    p = make_pair(extra_children=False)
    p.initiate("a")
    [req] = p.pending("a")
    msg = decode_message(req.data)
    first, body = encode_payloads(msg.payloads, 200)
    raw = GENERIC_HEADER.pack(0, 0x80, 4 + 3) + b"xyz"
    data = HEADER.pack(msg.spi_i, msg.spi_r, int(first), 0x20, int(ExchangeType.IKE_SA_INIT),
                       0x08, 0, IKE_HEADER_LEN + len(body) + len(raw)) + body + raw
    # IKE_SA_INIT { SAi1, KEi, Ni, N(NAT_D)..., <payload 200, critical> } -->
    p.deliver("a", data, req)
    # <-- IKE_SA_INIT { N(UNSUPPORTED_CRITICAL_PAYLOAD, 200) }
    [answer] = p.pending("b")
    reply = decode_message(answer.data)
    assert reply.is_response and reply.spi_i == msg.spi_i and reply.message_id == 0
    n = reply.notify(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD)
    assert n is not None and n.data == bytes([200])
    assert not p.b.by_id  # no state kept


@pytest.mark.parametrize(("version", "response", "answered"), [
    (0x30, False, True), (0x21, False, False), (0x10, False, False), (0x30, True, False)])
def test_invalid_major_version(version: int, response: bool, answered: bool) -> None:
    """RFC 7296 §1.5, §2.5: a request of a higher major version is answered
    with INVALID_MAJOR_VERSION in a 2.0 header; IKEv1, responses and a higher
    minor version (taken as 2.x) are not."""
    p = make_pair(extra_children=False)
    p.initiate("a")
    [req] = p.pending("a")
    data = bytearray(req.data)
    data[17] = version
    if response:
        data[19] |= 0x20
    p.deliver("a", bytes(data), req)
    out = p.pending("b")
    if version == 0x21:
        # A minor version is ignored: this is a normal IKE_SA_INIT.
        assert decode_message(out[0].data).get(SaPayload) is not None
        return
    assert bool(out) is answered
    if answered:
        reply = decode_message(out[0].data)
        assert notifies(out[0].data) == [NotifyType.INVALID_MAJOR_VERSION]
        assert out[0].data[17] == 0x20 and reply.is_response
        assert (reply.spi_i, reply.exchange, reply.message_id) == \
            (decode_header(req.data).spi_i, ExchangeType.IKE_SA_INIT, 0)
