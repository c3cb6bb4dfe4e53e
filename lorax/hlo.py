"""What a compiled step's optimized HLO text says: its instructions' result buffers, custom
calls (cuDNN's fused attention) and collectives, loops counted by their trip counts.

Read from ``compiled.as_text()``, the module XLA runs after its passes. Instructions inside a
fusion's computation are not buffers of their own (a fusion writes only its result), so only
the computations a program runs instruction by instruction are read: the entry, loop bodies
and conditions, branches and called computations. A ``while`` whose trip count XLA knows
(``known_trip_count`` in its backend config) multiplies what its body does; one it does not
know counts once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator

# Bytes per element of HLO's element types (pred is stored as a byte).
ELEMENT_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1,
    "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e8m0fnu": 1, "f4e2m1fn": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
    "token": 0,
}  # fmt: skip

COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-broadcast",
    "ragged-all-to-all",
)

_ARRAY_RE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_COMPUTATION_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")  # unindented
_INSTRUCTION_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS_RE = re.compile(r"\b(calls|body|condition|to_apply|branch_computations)=\{?([^}\s]+)")
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_TARGET_RE = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One instruction of a non-fused computation.

    Attributes:
      name: its name in the module.
      computation: the computation holding it.
      opcode: e.g. "fusion", "custom-call", "all-gather-start".
      shape: its result type as written (an array, or a tuple in parentheses).
      bytes: the result's size (a tuple: the sum of its arrays).
      target: a custom call's target (e.g. "__cudnn$fmhaSoftmax"), else "".
      op_name: the JAX operation it came from (its metadata), else "".
      runs: how many times a step runs it (the trip counts of the loops around it).
    """

    name: str
    computation: str
    opcode: str
    shape: str
    bytes: int
    target: str
    op_name: str
    runs: int


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO result type: every ``dtype[dims]`` array in it summed."""
    total = 0
    for dtype, dims in _ARRAY_RE.findall(shape):
        if dtype in ELEMENT_BYTES:
            total += ELEMENT_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _split_type(rest: str) -> tuple[str, str]:
    """``"f32[2]{0} add(...)"`` -> (type, the text after it); a tuple type is parenthesised."""
    if not rest.startswith("("):
        shape, _, after = rest.partition(" ")
        return shape, after
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[: i + 1], rest[i + 1 :].lstrip()
    return rest, ""


def _computations(text: str) -> Iterator[tuple[str, bool, list[str]]]:
    """(name, is_entry, instruction lines) of each computation in the module text."""
    name, entry, lines = None, False, []
    for line in text.splitlines():
        if name is None:
            m = _COMPUTATION_RE.match(line)
            if m and not line.startswith("HloModule"):
                name, entry, lines = m.group(2), bool(m.group(1)), []
            continue
        if line.strip() == "}":
            yield name, entry, lines
            name = None
            continue
        lines.append(line)


def instructions(text: str) -> list[Instruction]:
    """Every instruction of the computations a step runs one by one (not fusion bodies), each
    with how many times it runs per step."""
    comps = {name: (entry, lines) for name, entry, lines in _computations(text)}
    fused: set[str] = set()
    calls: dict[str, list[tuple[str, int]]] = {}  # computation -> (callee, times per call)
    parsed: dict[str, list[tuple[str, str, str, str]]] = {}
    for comp, (_, lines) in comps.items():
        rows = []
        for line in lines:
            m = _INSTRUCTION_RE.match(line)
            if not m:
                continue
            shape, after = _split_type(m.group(2))
            opcode = after.split("(", 1)[0].strip()
            rows.append((m.group(1), shape, opcode, after))
            trips = _TRIP_RE.search(after)
            for kind, callees in _CALLS_RE.findall(after):
                for callee in callees.strip("{}").split(","):
                    callee = callee.strip().lstrip("%")
                    if opcode == "fusion" or kind == "to_apply" and opcode != "call":
                        fused.add(callee)  # a fusion body, or a reducer's scalar computation
                    n = int(trips.group(1)) if trips and kind == "body" else 1
                    calls.setdefault(comp, []).append((callee, n))
        parsed[comp] = rows
    runs: dict[str, int] = {}
    entry = next((c for c, (e, _) in comps.items() if e), None)
    stack = [(entry, 1)] if entry else []
    while stack:
        comp, n = stack.pop()
        if comp in fused or comp not in parsed or runs.get(comp, 0) >= n:
            continue
        runs[comp] = n
        stack.extend((callee, n * k) for callee, k in calls.get(comp, []))
    out = []
    for comp, n in runs.items():
        for name, shape, opcode, after in parsed[comp]:
            target = _TARGET_RE.search(after)
            op_name = _OP_NAME_RE.search(after)
            out.append(
                Instruction(
                    name,
                    comp,
                    opcode,
                    shape,
                    shape_bytes(shape),
                    target.group(1) if target else "",
                    op_name.group(1) if op_name else "",
                    n,
                )  # fmt: skip
            )
    return out


# Results that hold no buffer of their own: views, tuples, parameters of called computations.
_NOT_BUFFERS = ("parameter", "get-tuple-element", "tuple", "bitcast", "constant", "copy-done",
                "all-gather-done", "all-reduce-done", "collective-permute-done", "send-done",
                "recv-done", "async-done", "while", "conditional", "call", "opt-barrier",
                "partition-id", "replica-id", "after-all")  # fmt: skip


_LAYOUT_RE = re.compile(r"\{[^{}]*\}")
_LAYER_RE = re.compile(r"layers_\d+")


@dataclasses.dataclass(frozen=True)
class Buffers:
    """Result buffers of one kind: the same shape, made by the same op in every layer.

    Attributes:
      bytes: each one's size.
      shape: the result type, layouts dropped.
      op: the opcode, or a custom call's target.
      op_name: the JAX op it came from, a layer index written ``layers_N``.
      count: how many instructions write one (a loop body's writes the same buffer on every
        trip, so trips do not multiply it).
      runs: how many times a step runs each of them (the loops' trip counts around it).
    """

    bytes: int
    shape: str
    op: str
    op_name: str
    count: int
    runs: int = 1


def largest(insts: list[Instruction], n: int = 10) -> list[Buffers]:
    """The ``n`` largest kinds of result buffer a step's instructions write, largest first
    (views, tuples and parameters skipped: they hold no buffer of their own). Buffers of one
    shape made by the same op in different layers are one row with their count. A result in
    a loop body is written in place on every trip: one buffer, however many trips."""
    groups: dict[tuple[str, str, str], list[Instruction]] = {}
    for i in insts:
        if i.opcode in _NOT_BUFFERS or not i.bytes:
            continue
        shape, op_name = _LAYOUT_RE.sub("", i.shape), _LAYER_RE.sub("layers_N", i.op_name)
        key = (shape, i.target or i.opcode, op_name)
        groups.setdefault(key, []).append(i)
    rows = [
        Buffers(g[0].bytes, shape, op, op_name, len(g), max(i.runs for i in g))
        for (shape, op, op_name), g in groups.items()
    ]
    return sorted(rows, key=lambda r: (-r.bytes, -r.count))[:n]


def custom_calls(insts: list[Instruction], prefix: str = "") -> dict[str, int]:
    """Custom-call target -> calls per step (targets starting with ``prefix``)."""
    out: dict[str, int] = {}
    for i in insts:
        if i.opcode == "custom-call" and i.target.startswith(prefix):
            out[i.target] = out.get(i.target, 0) + i.runs
    return dict(sorted(out.items()))


def collectives(insts: list[Instruction]) -> dict[str, dict[str, int]]:
    """Collective kind -> ``{"count", "bytes"}`` per step: every all-reduce, all-gather,
    reduce-scatter, all-to-all and collective-permute (synchronous or ``-start``), bytes being
    the sum of their results (of an async start: its last tuple element, the result)."""
    out: dict[str, dict[str, int]] = {}
    for i in insts:
        kind = i.opcode.removesuffix("-start")
        if kind not in COLLECTIVES:
            continue
        size = i.bytes
        if i.opcode.endswith("-start") and i.shape.startswith("("):
            arrays = _ARRAY_RE.findall(i.shape)
            size = shape_bytes("{}[{}]".format(*arrays[-1])) if arrays else 0
        row = out.setdefault(kind, {"count": 0, "bytes": 0})
        row["count"] += i.runs
        row["bytes"] += size * i.runs
    return dict(sorted(out.items()))
