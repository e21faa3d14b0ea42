"""The routing rule as a classic BPF program for an ``SO_REUSEPORT`` group.

Rules of this file (docs/routing.md "Kernel steering: the building blocks"):
- ``build_program`` turns a segment table, a map member -> socket index and
  the dispatcher's socket index into a classic BPF program for
  ``SO_ATTACH_REUSEPORT_CBPF``. For a UDP socket Linux runs the program on
  the UDP payload (the UDP header is pulled first), and the value it returns
  is the index of the socket in the reuseport group (bind order).
- It makes the same decision as ``route_datagram`` (common/cluster/routing.py)
  wherever that one names a member by an SPI: ESP by its SPI's segment,
  established IKE by OUR SPI's segment (the I flag says which half). Every
  other datagram goes to the dispatcher's socket, which runs
  ``route_datagram`` in Python: a first IKE_SA_INIT (SPIr = 0, the hash has no
  classic BPF equivalent), a NAT keepalive, bad bytes, and a segment with no
  owner on this host.
- Never a wrong member: when a table cannot be written exactly within the
  kernel's 4096 instructions (very many segments with a scattered owner
  pattern), segments go to the dispatcher instead, whole ranges at a time;
  ``Program.overflow`` counts them.
- The segment lookup: first a binary search over ranges of segments that
  differ from a periodic pattern, then the pattern, ``segment % period``
  (round-robin tables are periodic), through a second binary search.
- ``run(program, payload)`` interprets the subset of classic BPF used here,
  with the kernel's semantics (a load past the end returns 0), for tests.
- Pure: no sockets, no I/O.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.cluster.segments import SegmentTable

#: the kernel's limit (BPF_MAXINSNS) for a classic BPF program
MAX_INSNS = 4096

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
LD_IMM = 0x00       # A = k
LD_W_ABS = 0x20     # A = be32 at payload[k]
LD_B_ABS = 0x30     # A = payload[k]
LD_W_LEN = 0x80     # A = payload length
ALU_RSH_K = 0x74    # A >>= k
ALU_MOD_K = 0x94    # A %= k
JMP_JA = 0x05       # pc += k
JMP_JEQ_K = 0x15
JMP_JGT_K = 0x25
JMP_JGE_K = 0x35
JMP_JSET_K = 0x45
RET_K = 0x06

_INSN = struct.Struct("=HBBI")  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
_MAX_JUMP = 255                 # jt/jf are 8 bits

NON_ESP_MARKER_LEN = 4
IKE_HEADER_LEN = 28
ESP_HEADER_LEN = 8
ESP_SPI_RESERVED_BELOW = 256
FLAG_INITIATOR = 0x08
_FLAGS_AT = 19                  # in the IKE header: SPIi 8, SPIr 8, np, version, exchange

Insn = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class Program:
    """A built program: ``insns`` (code, jt, jf, k) and their packed bytes.

    ``overflow``: segments that have a local owner but go to the dispatcher
    because the exact lookup would not fit (0 for every table small enough)."""

    insns: tuple[Insn, ...]
    overflow: int
    period: int

    def __len__(self) -> int:
        return len(self.insns)

    def packed(self) -> bytes:
        """The array of ``struct sock_filter`` for ``struct sock_fprog``."""
        return b"".join(_INSN.pack(*i) for i in self.insns)


# -- the segment -> socket function -------------------------------------------------------


def socket_of_segment(table: SegmentTable, sockets: Mapping[int, int],
                      dispatcher: int) -> list[int]:
    """Socket index per segment: its owner's socket, or the dispatcher's
    when the segment has no owner or the owner has no socket here."""
    out = []
    for s in range(table.segments):
        owner = table.owner(s)
        out.append(dispatcher if owner is None else sockets.get(owner, dispatcher))
    return out


@dataclass(frozen=True, slots=True)
class _Lookup:
    period: int
    pattern: tuple[int, ...]                 # value per residue
    ranges: tuple[tuple[int, int, int], ...]  # (first, last, value), sorted, disjoint
    overflow: int


def _runs(values: Sequence[int], base: Sequence[int] | None) -> list[tuple[int, int, int]]:
    """Maximal runs of equal ``values`` where they differ from ``base``."""
    runs: list[tuple[int, int, int]] = []
    for s, v in enumerate(values):
        if base is not None and base[s] == v:
            continue
        if runs and runs[-1][1] == s - 1 and runs[-1][2] == v:
            runs[-1] = (runs[-1][0], s, v)
        else:
            runs.append((s, s, v))
    return runs


def _coarsen(ranges: list[tuple[int, int, int]], limit: int, dispatcher: int,
             values: Sequence[int]) -> tuple[list[tuple[int, int, int]], int]:
    """At most ``limit`` ranges: merge neighbours (and the gap between them)
    into dispatcher ranges, smallest span first. Returns the ranges and the
    number of segments that lost their owner's socket."""
    if len(ranges) <= limit:
        return ranges, 0
    # Merge in passes: each pass joins pairs whose combined span is below a
    # threshold that doubles until the count fits.
    span = 2
    while len(ranges) > limit:
        merged: list[tuple[int, int, int]] = []
        for r in ranges:
            if merged and r[1] - merged[-1][0] < span:
                merged[-1] = (merged[-1][0], r[1], dispatcher)
            else:
                merged.append(r)
        ranges = merged
        span *= 2
    lost = sum(1 for lo, hi, v in ranges if v == dispatcher
               for s in range(lo, hi + 1) if values[s] != dispatcher)
    return ranges, lost


def _periods(values: Sequence[int], tries: int) -> list[int]:
    """Candidate periods, best first, from a sample of the segments."""
    n = len(values)
    step = max(1, n // 512)
    sample = range(0, n, step)
    scores = []
    for p in range(2, min(n // 2, 128) + 1):
        agree = sum(1 for s in sample if s + p < n and values[s] == values[s + p])
        scores.append((-agree, p))
    scores.sort()
    return [p for _, p in scores[:tries]]


def _lookup(values: Sequence[int], dispatcher: int, budget: int) -> _Lookup:
    """The lookup with the fewest ranges that fits ``budget`` ranges; when
    none fits, the one that sends the fewest owned segments to the dispatcher."""
    plain = [r for r in _runs(values, None) if r[2] != dispatcher]
    candidates: list[tuple[int, tuple[int, ...], list[tuple[int, int, int]]]] = [
        (1, (dispatcher,), plain)]
    if len(plain) > 32:
        for p in _periods(values, 4):
            pattern = tuple(Counter(values[r::p]).most_common(1)[0][0] for r in range(p))
            base = [pattern[s % p] for s in range(len(values))]
            candidates.append((p, pattern, _runs(values, base)))
    fits = [c for c in candidates if len(c[2]) + c[0] <= budget]
    if fits:
        p, pattern, ranges = min(fits, key=lambda c: len(c[2]) + c[0])
        return _Lookup(p, pattern, tuple(ranges), 0)
    best: _Lookup | None = None
    for p, pattern, ranges in candidates:
        if p > budget // 2:
            continue
        coarse, lost = _coarsen(ranges, budget - p, dispatcher, values)
        if best is None or lost < best.overflow:
            best = _Lookup(p, pattern, tuple(coarse), lost)
    if best is None:  # pragma: no cover - period 1 always qualifies
        raise ValueError("no lookup")
    return best


# -- code generation ----------------------------------------------------------------------


class _Asm:
    """Instructions with symbolic jump targets, resolved at the end."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int | str, int | str, int | str]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: int = 0) -> None:
        self.code.append((code, 0, 0, k))

    def jump(self, code: int, k: int, jt: int | str, jf: int | str) -> None:
        self.code.append((code, jt, jf, k))

    def ja(self, target: str) -> None:
        self.code.append((JMP_JA, 0, 0, target))

    def _rel(self, pc: int, target: int | str) -> int:
        if isinstance(target, int):
            return target
        off = self.labels[target] - pc - 1
        if off < 0:
            raise ValueError(f"backward jump to {target}")
        return off

    def resolve(self) -> list[Insn]:
        out: list[Insn] = []
        for pc, (code, jt, jf, k) in enumerate(self.code):
            rk = self._rel(pc, k) if code == JMP_JA else k
            rt, rf = self._rel(pc, jt), self._rel(pc, jf)
            if not isinstance(rk, int) or rt > _MAX_JUMP or rf > _MAX_JUMP:
                raise ValueError(f"jump out of reach at {pc}")
            out.append((code, rt, rf, rk))
        return out


def _tree(pieces: Sequence[tuple[int, Insn | str]]) -> list[Insn | str]:
    """A binary search over ``pieces`` (first value, leaf), sorted by first
    value, the segment in A. A leaf is ``ret`` or the name of a label
    (emitted as ``ja``, kept as a str here). Returns a list of relative
    instructions: jumps inside the tree are already resolved."""
    if len(pieces) == 1:
        return [pieces[0][1]]
    mid = len(pieces) // 2
    low = _tree(pieces[:mid])
    high = _tree(pieces[mid:])
    pivot = pieces[mid][0]
    if len(low) <= _MAX_JUMP:
        # jge pivot: skip the low subtree
        return [(JMP_JGE_K, len(low), 0, pivot), *low, *high]
    # too far for jt: jge -> next (ja over low), else skip the ja
    return [(JMP_JGE_K, 0, 1, pivot), (JMP_JA, 0, 0, len(low)), *low, *high]


def _emit_tree(asm: _Asm, items: list[Insn | str]) -> None:
    for it in items:
        if isinstance(it, str):
            asm.ja(it)
        else:
            asm.code.append(it)


def _ret(v: int) -> Insn:
    return (RET_K, 0, 0, v)


def _pieces(ranges: Sequence[tuple[int, int, int]], n: int,
            gap: Insn | str) -> list[tuple[int, Insn | str]]:
    pieces: list[tuple[int, Insn | str]] = []
    pos = 0
    for lo, hi, v in ranges:
        if lo > pos:
            pieces.append((pos, gap))
        pieces.append((lo, _ret(v)))
        pos = hi + 1
    if pos < n or not pieces:
        pieces.append((pos, gap))
    return pieces


def _tree_size(n_pieces: int) -> int:
    """An upper bound of ``_tree``'s length for ``n_pieces`` leaves."""
    return 3 * n_pieces


_FIXED = 40  # the header checks, loads and shifts: fewer than this


def build_program(table: SegmentTable, sockets: Mapping[int, int], dispatcher: int,
                  *, natt: bool = True) -> Program:
    """The steering program for the cluster's UDP 4500 (``natt``) or 500 socket group.

    ``sockets``: member id -> index of its socket in the group; ``dispatcher``:
    the dispatcher's socket index."""
    for idx in (dispatcher, *sockets.values()):
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < 0xFFFF_FFFF:
            raise ValueError(f"bad socket index {idx!r}")
    values = socket_of_segment(table, sockets, dispatcher)
    bits = table.segment_bits
    # Worst case 3 instructions per piece; pieces <= 2 * ranges + 1 per tree.
    budget = (MAX_INSNS - _FIXED) // 6 - 1
    lk = _lookup(values, dispatcher, budget)

    asm = _Asm()
    disp = _ret(dispatcher)
    off = NON_ESP_MARKER_LEN if natt else 0
    asm.op(LD_W_LEN)
    if natt:
        asm.jump(JMP_JEQ_K, 1, "dispatcher", 0)             # keepalive / one bad byte
        asm.jump(JMP_JGE_K, NON_ESP_MARKER_LEN, 0, "dispatcher")
        asm.op(LD_W_ABS, 0)
        asm.jump(JMP_JEQ_K, 0, "ike", 0)
        # ESP: reserved SPIs and short packets are the dispatcher's to count
        asm.jump(JMP_JGE_K, ESP_SPI_RESERVED_BELOW, 0, "dispatcher")
        asm.op(LD_W_LEN)
        asm.jump(JMP_JGE_K, ESP_HEADER_LEN, 0, "dispatcher")
        asm.op(LD_W_ABS, 0)
        _segment(asm, bits)
        asm.ja("lookup")
        asm.label("ike")
        asm.op(LD_W_LEN)
    asm.jump(JMP_JGE_K, off + IKE_HEADER_LEN, 0, "dispatcher")
    # SPIi == 0 is malformed (RFC 7296 §3.1)
    asm.op(LD_W_ABS, off)
    asm.jump(JMP_JEQ_K, 0, 0, "established_i")
    asm.op(LD_W_ABS, off + 4)
    asm.jump(JMP_JEQ_K, 0, "dispatcher", 0)
    asm.label("established_i")
    # SPIr == 0: a first IKE_SA_INIT, placed by the hash in Python
    asm.op(LD_W_ABS, off + 8)
    asm.jump(JMP_JEQ_K, 0, 0, "established")
    asm.op(LD_W_ABS, off + 12)
    asm.jump(JMP_JEQ_K, 0, "dispatcher", 0)
    asm.label("established")
    asm.op(LD_B_ABS, off + _FLAGS_AT)
    asm.jump(JMP_JSET_K, FLAG_INITIATOR, 0, "ours_is_spi_i")
    asm.op(LD_W_ABS, off + 8)                                # we responded: ours is SPIr
    _segment(asm, bits)
    asm.ja("lookup")
    asm.label("ours_is_spi_i")
    asm.op(LD_W_ABS, off)
    _segment(asm, bits)
    asm.ja("lookup")
    # within reach of every 8-bit jump above
    asm.label("dispatcher")
    asm.code.append(disp)
    asm.label("lookup")
    n = table.segments
    if lk.period > 1:
        _emit_tree(asm, _tree(_pieces(lk.ranges, n, "pattern")))
        asm.label("pattern")
        asm.op(ALU_MOD_K, lk.period)
        pat = [r for r in _runs(lk.pattern, None)]
        _emit_tree(asm, _tree(_pieces(pat, lk.period, disp)))
    else:
        _emit_tree(asm, _tree(_pieces(lk.ranges, n, disp)))
    insns = asm.resolve()
    if len(insns) > MAX_INSNS:
        raise ValueError(f"steering program of {len(insns)} instructions")  # pragma: no cover
    return Program(tuple(insns), lk.overflow, lk.period)


def _segment(asm: _Asm, bits: int) -> None:
    """A holds the SPI's top 32 bits: keep the top ``bits``."""
    if bits == 0:
        asm.op(LD_IMM, 0)
    elif bits < 32:
        asm.op(ALU_RSH_K, 32 - bits)


# -- an interpreter, for tests ------------------------------------------------------------


def run(program: Program | Sequence[Insn], payload: bytes | bytearray | memoryview) -> int:
    """Run ``program`` on a UDP payload as the kernel would; the return value."""
    insns = program.insns if isinstance(program, Program) else tuple(program)
    data = bytes(payload)
    a = 0
    pc = 0
    steps = 0
    while True:
        if pc >= len(insns):
            raise ValueError("ran off the end of the program")
        steps += 1
        if steps > MAX_INSNS:
            raise ValueError("loop")  # forward jumps only: cannot happen
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == LD_IMM:
            a = k
        elif code == LD_W_LEN:
            a = len(data)
        elif code == LD_W_ABS:
            if k + 4 > len(data):
                return 0
            a = int.from_bytes(data[k:k + 4], "big")
        elif code == LD_B_ABS:
            if k >= len(data):
                return 0
            a = data[k]
        elif code == ALU_RSH_K:
            a >>= k
        elif code == ALU_MOD_K:
            a %= k
        elif code == JMP_JA:
            pc += k
        elif code in (JMP_JEQ_K, JMP_JGT_K, JMP_JGE_K, JMP_JSET_K):
            hit = {JMP_JEQ_K: a == k, JMP_JGT_K: a > k, JMP_JGE_K: a >= k,
                   JMP_JSET_K: bool(a & k)}[code]
            pc += jt if hit else jf
        elif code == RET_K:
            return k
        else:
            raise ValueError(f"opcode {code:#x} is not used here")
