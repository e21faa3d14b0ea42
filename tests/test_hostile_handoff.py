"""The supervisor <-> dispatcher channel and the fds a process inherits
(dispatcher/handoff.py, member/main.py ``own_sockets``, the CLI's ``--udp-fd``):
what the worst line, object or fd number can do. Every refusal is a counted
line or a clean error (ValueError, StartupError), never another exception."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import StartupError
from dispatcher.handoff import (
    MAX_LINE,
    OPS_TO_DISPATCHER,
    OPS_TO_SUPERVISOR,
    Channel,
    Handoff,
)
from member.main import own_sockets


def _read_all(lines: list[bytes], ops: frozenset[str]) -> tuple[list[dict[str, Any]], int]:
    """Write ``lines`` into one end of a socketpair, then close it; read every
    message the other end's Channel takes, and how many it refused."""
    async def go() -> tuple[list[dict[str, Any]], int]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ch = Channel(ours, ops)
        await ch.open()
        writer = theirs.makefile("wb")

        def feed() -> None:
            for line in lines:
                writer.write(line)
            writer.flush()
            writer.close()
            theirs.close()

        feeding = asyncio.get_running_loop().run_in_executor(None, feed)
        got = []
        while (msg := await ch.read()) is not None:
            got.append(msg)
        await feeding
        ch.close()
        return got, ch.refused
    return asyncio.run(go())


def test_bad_lines_are_counted_and_the_next_good_one_is_read() -> None:
    good = json.dumps({"op": "ready"}).encode() + b"\n"
    lines = [b"not json\n", b"[1, 2]\n", b'{"op": "handoff"}\n', b'{"no": "op"}\n',
             b"\xff\xfe\n", b"\n", good]
    got, refused = _read_all(lines, OPS_TO_SUPERVISOR)
    assert got == [{"op": "ready"}]
    assert refused == 6


def test_a_line_longer_than_the_limit_ends_the_channel_counted() -> None:
    got, refused = _read_all([b"x" * (MAX_LINE + 10) + b"\n",
                              json.dumps({"op": "ready"}).encode() + b"\n"],
                             OPS_TO_SUPERVISOR)
    assert got == [] and refused == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"") + b"\n"),
                max_size=8))
def test_random_lines_never_raise(lines: list[bytes]) -> None:
    got, refused = _read_all(lines, OPS_TO_DISPATCHER)
    assert all(isinstance(m, dict) and m.get("op") in OPS_TO_DISPATCHER for m in got)
    assert len(got) + refused <= len(lines)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["op", "curve", "inside", "groups", "plain", "tuns",
                                        "running", "member_keys", "supervisor_pid",
                                        "first", "role", "term"]), _json, max_size=12))
def test_a_handoff_of_any_shape_is_a_value_error_or_a_handoff(obj: dict[str, Any]) -> None:
    try:
        Handoff.from_json(obj)
    except ValueError:
        pass


def test_inherited_fds_that_are_not_our_sockets_are_one_line() -> None:
    r, w = os.pipe()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(StartupError, match=r"not an open socket|not a UDP socket"):
            own_sockets({4500: r})
        with pytest.raises(StartupError, match="not a UDP socket"):
            own_sockets({4500: tcp.fileno()})
        with pytest.raises(StartupError, match="bound to port 4500"):
            own_sockets({4500: udp.fileno()})
        closed = os.dup(w)
        os.close(closed)
        with pytest.raises(StartupError, match="not an open socket"):
            own_sockets({4500: closed})
        # (the refused fds are left to their owner: still open)
        os.fstat(r)
        assert tcp.fileno() >= 0 and udp.fileno() >= 0
    finally:
        os.close(r)
        os.close(w)
        tcp.close()
        udp.close()


@pytest.mark.parametrize("arg", ["4500", "x=3", "4500=x", "0=3", "70000=3", "=", "4500=-1",
                                 "4500=99999999999", " 4500=3"])
def test_a_bad_udp_fd_argument_is_one_line(arg: str) -> None:
    from dispatcher.cli import parse_udp_fds

    with pytest.raises(StartupError, match="expected PORT=FD"):
        parse_udp_fds([arg])
    assert parse_udp_fds(["500=7", "4500=8"]) == {500: 7, 4500: 8}
