"""member/batch_io.py: batched datagram I/O on real sockets (loopback, IPv4
and IPv6, raw sockets, a namespace whose loopback holds packets so a send
buffer fills), each test against the compiled functions (member/_batch_io.c)
and the pure-Python twins; Hypothesis checks that both give the same results
and raise the same exception types.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from typing_extensions import Buffer

from bench.harness.net import socket_in_netns
from common.packets import udp4_packet
from member import batch_io
from member.batch_io import Impl
from member.rawinside import RawInside
from tests.fuzz import fuzz_settings
from tests.lab import netns

IMPLS = ("c", "python")
FAMILIES = {"ipv4": (socket.AF_INET, "127.0.0.1"), "ipv6": (socket.AF_INET6, "::1")}


def impl_named(name: str) -> Impl:
    if name == "python":
        return batch_io.PYTHON
    if batch_io.COMPILED is None:
        pytest.skip("member._batch_io is not built (or IPSEC_CLUSTER_PURE_IO=1)")
    return batch_io.COMPILED


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> Impl:
    return impl_named(request.param)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[int, str]:
    fam, host = FAMILIES[request.param]
    if fam == socket.AF_INET6 and not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    return fam, host


class Pair:
    """A non-blocking receiver bound on loopback and a sender, same family."""

    def __init__(self, fam: int, host: str, rx_host: str | None = None,
                 tx_family: int | None = None) -> None:
        self.rx = socket.socket(fam, socket.SOCK_DGRAM)
        self.rx.setblocking(False)
        self.rx.bind((rx_host or host, 0))
        self.tx = socket.socket(tx_family or fam, socket.SOCK_DGRAM)
        self.tx.setblocking(False)
        self.tx.bind((host if (tx_family or fam) == fam else "127.0.0.1", 0))
        self.ip = socket.inet_pton(fam, host)
        self.port = self.rx.getsockname()[1]
        self.tx_port = self.tx.getsockname()[1]

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


@pytest.fixture
def pair(family: tuple[int, str]) -> Iterator[Pair]:
    p = Pair(*family)
    yield p
    p.close()


def wait_readable(fd: int, timeout: float = 2.0) -> None:
    select.select([fd], [], [], timeout)


def recv_all(impl: Impl, fd: int, count: int, max_n: int = 64, bufsize: int = 65535,
             ) -> tuple[list[tuple[bytes, bytes, int]], int, list[int]]:
    """Everything ``count`` datagrams bring (items, truncated, sizes of each call)."""
    items: list[tuple[bytes, bytes, int]] = []
    truncated = 0
    calls: list[int] = []
    deadline = time.monotonic() + 5
    while len(items) + truncated < count and time.monotonic() < deadline:
        wait_readable(fd, 0.5)
        got, trunc = impl.recv_batch(fd, max_n, bufsize)
        calls.append(len(got) + trunc)
        items += got
        truncated += trunc
    return items, truncated, calls


# -- recv_batch / send_batch ----------------------------------------------------------


def test_a_burst_larger_than_max_n_comes_in_max_n_pieces(impl: Impl, pair: Pair) -> None:
    payloads = [f"datagram {i}".encode() for i in range(10)]
    assert impl.send_batch(pair.tx.fileno(), [(p, pair.ip, pair.port) for p in payloads]) == 10
    wait_readable(pair.rx.fileno())
    time.sleep(0.05)     # loopback delivery is done in softirq; let it finish
    sizes = []
    got: list[tuple[bytes, bytes, int]] = []
    for _ in range(4):
        items, truncated = impl.recv_batch(pair.rx.fileno(), 4)
        assert truncated == 0
        sizes.append(len(items))
        got += items
    assert sizes == [4, 4, 2, 0]
    assert [g[0] for g in got] == payloads
    assert {(g[1], g[2]) for g in got} == {(pair.ip, pair.tx_port)}


def test_nothing_queued_gives_an_empty_batch(impl: Impl, pair: Pair) -> None:
    assert impl.recv_batch(pair.rx.fileno(), 64) == ([], 0)
    assert impl.recv_batch(pair.rx.fileno(), 0) == ([], 0)
    assert impl.send_batch(pair.tx.fileno(), []) == 0


@pytest.mark.parametrize("size", [0, 1, 1400, 65507])
def test_payload_sizes(impl: Impl, pair: Pair, size: int) -> None:
    payload = os.urandom(size)
    assert impl.send_batch(pair.tx.fileno(), [(payload, pair.ip, pair.port)]) == 1
    items, truncated, _ = recv_all(impl, pair.rx.fileno(), 1)
    assert (items, truncated) == ([(payload, pair.ip, pair.tx_port)], 0)


def test_a_datagram_longer_than_bufsize_is_dropped_and_counted(impl: Impl, pair: Pair) -> None:
    sizes = [10, 100, 50, 51, 0]
    assert impl.send_batch(pair.tx.fileno(),
                           [(bytes([i]) * n, pair.ip, pair.port) for i, n in enumerate(sizes)]) == 5
    items, truncated, _ = recv_all(impl, pair.rx.fileno(), 5, bufsize=50)
    assert [p for p, _, _ in items] == [bytes([0]) * 10, bytes([2]) * 50, b""]
    assert truncated == 2


def test_bufsize_zero_takes_only_empty_datagrams_and_huge_is_clamped(impl: Impl,
                                                                     pair: Pair) -> None:
    impl.send_batch(pair.tx.fileno(), [(b"", pair.ip, pair.port), (b"x", pair.ip, pair.port)])
    items, truncated, _ = recv_all(impl, pair.rx.fileno(), 2, bufsize=0)
    assert ([p for p, _, _ in items], truncated) == ([b""], 1)
    impl.send_batch(pair.tx.fileno(), [(b"y" * 3000, pair.ip, pair.port)])
    items, truncated, _ = recv_all(impl, pair.rx.fileno(), 1, max_n=10**30, bufsize=10**30)
    assert ([p for p, _, _ in items], truncated) == ([b"y" * 3000], 0)


def test_payloads_may_be_any_contiguous_buffer(impl: Impl, pair: Pair) -> None:
    sent: list[Buffer] = [bytearray(b"ba"), memoryview(b"xxmvxx")[2:4], b"by"]
    assert impl.send_batch(pair.tx.fileno(), [(p, pair.ip, pair.port) for p in sent]) == 3
    items, _, _ = recv_all(impl, pair.rx.fileno(), 3)
    assert [p for p, _, _ in items] == [b"ba", b"mv", b"by"]


def test_a_4_byte_ip_on_an_ipv6_socket_goes_v4_mapped(impl: Impl) -> None:
    if not _has_ipv6_loopback():
        pytest.skip("no IPv6")
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)   # dual stack (V6ONLY off)
    dual = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        rx.bind(("127.0.0.1", 0))
        dual.bind(("::", 0))
        loop4 = socket.inet_aton("127.0.0.1")
        n = impl.send_batch(tx.fileno(), [(b"mapped", loop4, rx.getsockname()[1]),
                                          (b"to dual", loop4, dual.getsockname()[1])])
        assert n == 2
        items, _, _ = recv_all(impl, rx.fileno(), 1)
        assert [(p, ip) for p, ip, _ in items] == [(b"mapped", loop4)]
        # an IPv4 sender seen from a dual-stack socket: 16 bytes, ::ffff:127.0.0.1
        v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with v4:
            v4.sendto(b"from v4", ("127.0.0.1", dual.getsockname()[1]))
            items, _, _ = recv_all(impl, dual.fileno(), 2)
        assert sorted(p for p, _, _ in items) == [b"from v4", b"to dual"]
        assert {ip for _, ip, _ in items} == {bytes(10) + b"\xff\xff" + loop4}
    finally:
        rx.close()
        tx.close()
        dual.close()


def test_a_16_byte_ip_on_an_ipv4_socket_is_refused_before_sending(impl: Impl) -> None:
    p = Pair(socket.AF_INET, "127.0.0.1")
    try:
        with pytest.raises(ValueError, match="16-byte"):
            impl.send_batch(p.tx.fileno(), [(b"a", p.ip, p.port), (b"b", bytes(16), p.port)])
        time.sleep(0.05)
        assert impl.recv_batch(p.rx.fileno(), 8) == ([], 0)
    finally:
        p.close()


def test_a_datagram_the_kernel_refuses_is_skipped_not_counted(impl: Impl, pair: Pair) -> None:
    """Port 0 (EINVAL) and an oversized payload (EMSGSIZE) are that datagram's
    own errors: the rest of the burst goes out."""
    batch = [(b"one", pair.ip, pair.port), (b"zero port", pair.ip, 0),
             (bytes(70000), pair.ip, pair.port), (b"two", pair.ip, pair.port)]
    assert impl.send_batch(pair.tx.fileno(), batch) == 2
    items, _, _ = recv_all(impl, pair.rx.fileno(), 2)
    assert [p for p, _, _ in items] == [b"one", b"two"]


# -- a send buffer that fills ---------------------------------------------------------


@pytest.fixture(scope="module")
def holding_ns() -> Iterator[str]:
    """A namespace whose loopback holds packets (tbf at 8 bit/s): what a sender
    has queued stays charged to its send buffer, so the buffer fills."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    ns = netns.create_netns(netns.unique_name("ipscbio"))
    try:
        subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "tbf", "rate",
                        "8bit", "burst", "1600", "limit", "1000000"], check=True,
                       capture_output=True)
        yield ns
    finally:
        netns.delete_netns(ns)


def _full_buffer_run(ns: str, impl: Impl, family: int, host: str) -> tuple[int, int, int]:
    rx = socket_in_netns(ns, family)
    tx = socket_in_netns(ns, family)
    try:
        rx.bind((host, 0))
        port = rx.getsockname()[1]
        ip = socket.inet_pton(family, host)
        warm = socket_in_netns(ns, family)
        with warm:   # spend the bucket's burst: from now on nothing leaves the qdisc
            for _ in range(3):
                with contextlib.suppress(OSError):
                    warm.sendto(bytes(1400), socket.MSG_DONTWAIT, (host, port))
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        batch = [(bytes(1000), ip, port)] * 64
        first = impl.send_batch(tx.fileno(), batch)
        second = impl.send_batch(tx.fileno(), batch)
        with pytest.raises(BlockingIOError):
            tx.sendto(b"x", socket.MSG_DONTWAIT, (host, port))
        received, _ = impl.recv_batch(rx.fileno(), 64)
        return first, second, sum(len(d) == 1000 for d, _, _ in received)  # not the warm-up
    finally:
        rx.close()
        tx.close()


@pytest.mark.netns
@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_send_batch_stops_at_a_full_send_buffer(holding_ns: str, fam: str) -> None:
    family_, host = FAMILIES[fam]
    results = {name: _full_buffer_run(holding_ns, impl_named(name), family_, host)
               for name in IMPLS if name == "python" or batch_io.COMPILED is not None}
    for first, second, received in results.values():
        assert 0 < first < 64       # a partial count: the rest are the caller's drops
        assert second == 0          # still full: nothing more, no exception
        assert received == 0        # the qdisc holds them all
    assert len(set(results.values())) == 1, results   # C and Python stop at the same place


# -- read_batch ------------------------------------------------------------------------


def test_read_batch_one_packet_per_read_until_eagain(impl: Impl) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        b.setblocking(False)
        packets = [os.urandom(n) for n in (1, 60, 1400, 9000, 20)]
        for p in packets:
            a.send(p)
        assert impl.read_batch(b.fileno(), 3) == packets[:3]
        assert impl.read_batch(b.fileno(), 3) == packets[3:]
        assert impl.read_batch(b.fileno(), 3) == []
        a.send(b"abcdef")
        assert impl.read_batch(b.fileno(), 3, 4) == [b"abcd"]    # read(2) cuts, silently
        assert impl.read_batch(b.fileno(), 0) == []
    finally:
        a.close()
        b.close()


def test_read_batch_stops_at_end_of_file_and_refuses_a_blocking_fd(impl: Impl) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="blocking"):
            impl.read_batch(r, 4)
        os.set_blocking(r, False)
        os.write(w, b"12345")
        os.close(w)
        assert impl.read_batch(r, 4, 3) == [b"123", b"45"]
        assert impl.read_batch(r, 4) == []
    finally:
        os.close(r)
        with contextlib.suppress(OSError):
            os.close(w)


# -- write_raw_batch --------------------------------------------------------------------


@pytest.fixture
def raw() -> Iterator[RawInside]:
    if os.geteuid() != 0:
        pytest.skip("raw sockets need root")
    r = RawInside()
    yield r
    r.close()


def test_write_raw_batch_delivers_ipv4_and_names_what_it_did_not_send(
        impl: Impl, raw: RawInside) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        port = rx.getsockname()[1]
        good = [udp4_packet("127.0.0.1", "127.0.0.1", 40000 + i, port, f"raw {i}".encode())
                for i in range(3)]
        v6 = bytes(IPv6(src="::1", dst="::1") / UDP(sport=1, dport=port) / b"v6")
        bad_ihl = bytearray(good[0])
        bad_ihl[0] = 0x4F                     # IHL 60 bytes > the packet
        packets = [good[0], b"", b"\x45" + bytes(18), good[1], bytes(bad_ihl),
                   b"\x55" + bytes(40), v6, good[2], b"\x60" + bytes(38)]
        unsent = impl.write_raw_batch(raw.v4.fileno(), -1, packets)
        assert unsent == [1, 2, 4, 5, 6, 8]
        items, _, _ = recv_all(impl, rx.fileno(), 3)
        assert [(p, port_) for p, _, port_ in items] == \
            [(b"raw 0", 40000), (b"raw 1", 40001), (b"raw 2", 40002)]
    finally:
        rx.close()


def test_write_raw_batch_delivers_ipv6(impl: Impl, raw: RawInside) -> None:
    if raw.v6 is None or not _has_ipv6_loopback():
        pytest.skip("no IPv6 raw socket or no ::1")
    rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        rx.bind(("::1", 0))
        rx.setblocking(False)
        port = rx.getsockname()[1]
        v6 = bytes(IPv6(src="::1", dst="::1") / UDP(sport=4242, dport=port) / b"hello v6")
        v4 = udp4_packet("127.0.0.1", "127.0.0.1", 4343, 9, b"to a closed port")
        assert impl.write_raw_batch(raw.v4.fileno(), raw.v6.fileno(), [v6, v4, v6[:39]]) == [2]
        items, _, _ = recv_all(impl, rx.fileno(), 1)
        assert items == [(b"hello v6", socket.inet_pton(socket.AF_INET6, "::1"), 4242)]
    finally:
        rx.close()


# -- hostile arguments ------------------------------------------------------------------


def _closed_fd() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fd = s.fileno()
    s.close()
    return fd


IP4 = bytes(4)
LOOP4 = socket.inet_aton("127.0.0.1")


def hostile_calls(pair: Pair) -> list[tuple[str, tuple[object, ...], type[BaseException]]]:
    rx, tx, ip, port = pair.rx.fileno(), pair.tx.fileno(), pair.ip, pair.port
    closed = _closed_fd()
    pkt = udp4_packet("127.0.0.1", "127.0.0.1", 1, 9, b"x")
    return [
        ("recv_batch", ("3", 1), TypeError),
        ("recv_batch", (3.0, 1), TypeError),
        ("recv_batch", (None, 1), TypeError),
        ("recv_batch", (-1, 1), ValueError),
        ("recv_batch", (2**40, 1), ValueError),
        ("recv_batch", (rx, -1), ValueError),
        ("recv_batch", (rx, -(2**70)), ValueError),
        ("recv_batch", (rx, 1, -1), ValueError),
        ("recv_batch", (rx, 1, b"x"), TypeError),
        ("recv_batch", (closed, 1), OSError),
        ("send_batch", (tx, 5), TypeError),
        ("send_batch", (tx, [b"payload"]), TypeError),
        ("send_batch", (tx, [(b"p", ip)]), TypeError),
        ("send_batch", (tx, [[b"p", ip, port]]), TypeError),
        ("send_batch", (tx, [(12, ip, port)]), TypeError),
        ("send_batch", (tx, [("str", ip, port)]), TypeError),
        ("send_batch", (tx, [(b"p", bytearray(ip), port)]), TypeError),
        ("send_batch", (tx, [(b"p", ip[:3], port)]), ValueError),
        ("send_batch", (tx, [(b"p", ip + b"\0", port)]), ValueError),
        ("send_batch", (tx, [(b"p", b"", port)]), ValueError),
        ("send_batch", (tx, [(b"p", ip, -1)]), ValueError),
        ("send_batch", (tx, [(b"p", ip, 65536)]), ValueError),
        ("send_batch", (tx, [(b"p", ip, 2**80)]), ValueError),
        ("send_batch", (tx, [(b"p", ip, "80")]), TypeError),
        ("send_batch", (tx, [(memoryview(bytes(8))[::2], ip, port)]), TypeError),
        ("send_batch", (closed, [(b"p", IP4, port)]), OSError),
        ("send_batch", (-5, [(b"p", IP4, port)]), ValueError),
        ("read_batch", (rx, 1, 0), ValueError),
        ("read_batch", (closed, 1), OSError),
        ("read_batch", (rx, -3), ValueError),
        ("write_raw_batch", (closed, -1, [pkt]), OSError),
        ("write_raw_batch", (-1, -1, [pkt]), ValueError),
        ("write_raw_batch", (rx, -2, [pkt]), ValueError),
        ("write_raw_batch", (rx, -1, [pkt, 7]), TypeError),
        ("write_raw_batch", (rx, -1, "abc"), TypeError),
        ("write_raw_batch", (rx, -1, None), TypeError),
    ]


def test_hostile_arguments_raise_clean_exceptions(impl: Impl, pair: Pair) -> None:
    for name, args, exc in hostile_calls(pair):
        with pytest.raises(exc):
            getattr(impl, name)(*args)
    # nothing of the refused batches went out
    time.sleep(0.05)
    assert impl.recv_batch(pair.rx.fileno(), 64) == ([], 0)


def test_a_bad_item_at_the_end_stops_the_whole_batch(impl: Impl, pair: Pair) -> None:
    batch: list[tuple[object, ...]] = [(b"fine", pair.ip, pair.port)] * 5
    batch.append((b"bad", pair.ip, None))
    with pytest.raises(TypeError):
        impl.send_batch(pair.tx.fileno(), batch)  # type: ignore[arg-type]
    time.sleep(0.05)
    assert impl.recv_batch(pair.rx.fileno(), 64) == ([], 0)


def test_a_non_socket_and_a_non_inet_socket_are_os_errors(impl: Impl) -> None:
    r, w = os.pipe()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with pytest.raises(OSError) as e1:
            impl.recv_batch(r, 4)
        assert e1.value.errno == errno.ENOTSOCK
        with pytest.raises(OSError) as e2:
            impl.send_batch(a.fileno(), [(b"x", IP4, 1)])
        assert e2.value.errno == errno.EAFNOSUPPORT
        a.send(b"unix")
        with pytest.raises(OSError) as e3:
            impl.recv_batch(b.fileno(), 4)
        assert e3.value.errno == errno.EAFNOSUPPORT
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


# -- the two implementations agree -------------------------------------------------------


def _both() -> tuple[Impl, Impl]:
    if batch_io.COMPILED is None:
        pytest.skip("member._batch_io is not built")
    return batch_io.COMPILED, batch_io.PYTHON


@pytest.mark.fuzz
@fuzz_settings(40)
@given(sizes=st.lists(st.integers(0, 3000), max_size=40), max_n=st.integers(-2, 50),
       bufsize=st.integers(-2, 4000), fam=st.sampled_from(sorted(FAMILIES)))
def test_c_and_python_receive_the_same(sizes: list[int], max_n: int, bufsize: int,
                                       fam: str) -> None:
    """The same burst sent (by each implementation) twice; each receiver drains
    it with the same max_n and bufsize: the same calls return the same items."""
    c, py = _both()
    family_, host = FAMILIES[fam]
    if family_ == socket.AF_INET6 and not _has_ipv6_loopback():
        return
    outcomes = []
    for impl in (c, py):
        p = Pair(family_, host)
        try:
            batch = [(bytes([i % 256]) * n, p.ip, p.port) for i, n in enumerate(sizes)]
            sent = impl.send_batch(p.tx.fileno(), batch)
            time.sleep(0.002)
            calls: list[object] = []
            for _ in range(len(sizes) + 2):
                try:
                    items, trunc = impl.recv_batch(p.rx.fileno(), max_n, bufsize)
                except ValueError as exc:
                    calls.append(type(exc))
                    break
                calls.append(([(d, ip, port == p.tx_port) for d, ip, port in items], trunc))
                if not items and not trunc:
                    break
            outcomes.append((sent, calls))
        finally:
            p.close()
    assert outcomes[0] == outcomes[1]


ARG = st.one_of(st.integers(-(2**65), 2**65), st.integers(-3, 70000), st.none(),
                st.text(max_size=3), st.binary(max_size=4), st.floats(allow_nan=False))


@pytest.mark.fuzz
@fuzz_settings(60)
@given(fd=st.sampled_from(["rx", "closed", -1, 2**31, "x", None]), max_n=ARG, bufsize=ARG,
       items=st.lists(st.tuples(
           st.one_of(st.binary(max_size=8), st.integers(), st.none()),
           # a valid destination is only ever our own receiver (see PORT)
           st.one_of(st.sampled_from([LOOP4, LOOP4[:3], bytes(16), b""]),
                     st.binary(min_size=5, max_size=15), st.text(max_size=2)),
           st.one_of(st.just("PORT"), st.integers(-(2**65), -1), st.integers(65536, 2**65),
                     st.none())), max_size=4))
def test_c_and_python_refuse_the_same_arguments(fd: object, max_n: object, bufsize: object,
                                                items: list[tuple[object, object, object]]
                                                ) -> None:
    c, py = _both()
    p = Pair(socket.AF_INET, "127.0.0.1")
    closed = _closed_fd()
    try:
        real = {"rx": p.rx.fileno(), "closed": closed}.get(str(fd), fd)
        items = [(d, ip, p.port if port == "PORT" else port) for d, ip, port in items]

        def outcome(call: object) -> object:
            try:
                result = call()  # type: ignore[operator]
            except (TypeError, ValueError, OSError) as exc:
                return type(exc), getattr(exc, "errno", None)
            return result

        for name, args in (("recv_batch", (real, max_n, bufsize)),
                           ("read_batch", (real, max_n, bufsize)),
                           ("send_batch", (real, items))):
            # only an rx fd with valid items could send; send to the receiver itself
            outs = [outcome(lambda i=impl, n=name, a=args: getattr(i, n)(*a))
                    for impl in (c, py)]
            assert outs[0] == outs[1], (name, args, outs)
    finally:
        p.close()
