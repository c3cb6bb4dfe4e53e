"""A compiled step's HLO text: its matrix products (shapes, FLOPs) and each instruction's
JAX ``op_name``.

For the CPU tests: on CPU, XLA keeps every matrix product a ``dot`` instruction (on GPU most
become cuBLAS custom calls, which this does not read). Instruction names are unique in an HLO
module, so an operand's shape is found from the line that defines it, in whatever computation.
"""

from __future__ import annotations

import dataclasses
import math
import re

_DEF_RE = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]")
_DOT_RE = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)$")
_DIMS_RE = r"{}=\{{([\d,]*)\}}"
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')
_INSTRUCTION_RE = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_OPERAND_RE = re.compile(r"%([\w.\-]+)")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


@dataclasses.dataclass(frozen=True)
class Dot:
    """One ``dot``: result shape, the left operand's shape, its contracting and batch dims."""

    name: str
    shape: tuple[int, ...]
    lhs_shape: tuple[int, ...]
    lhs_contracting: tuple[int, ...]
    lhs_batch: tuple[int, ...]
    op_name: str  # the jax op it came from (metadata), e.g. ".../layers_0/attn/q/dot_general"

    @property
    def contracted(self) -> int:
        """How many products each result element sums (the contracted length)."""
        return math.prod(self.lhs_shape[d] for d in self.lhs_contracting)

    @property
    def flops(self) -> int:
        """2 · result elements · contracted length (a multiply and an add each)."""
        return 2 * math.prod(self.shape) * self.contracted


def dots(hlo_text: str) -> list[Dot]:
    """Every ``dot`` instruction in an HLO module's text (``compiled.as_text()``)."""
    shapes = {m.group(1): _ints(m.group(2)) for m in _DEF_RE.finditer(hlo_text)}
    out = []
    for line in hlo_text.splitlines():
        m = _DOT_RE.search(line)
        if not m:
            continue
        rest = m.group(5)
        contracting = re.search(_DIMS_RE.format("lhs_contracting_dims"), rest)
        batch = re.search(_DIMS_RE.format("lhs_batch_dims"), rest)
        op = _OP_NAME_RE.search(rest)
        out.append(
            Dot(
                name=m.group(1),
                shape=_ints(m.group(2)),
                lhs_shape=shapes[m.group(3)],
                lhs_contracting=_ints(contracting.group(1)) if contracting else (),
                lhs_batch=_ints(batch.group(1)) if batch else (),
                op_name=op.group(1) if op else "",
            )
        )
    return out


def op_names(hlo_text: str) -> dict[str, tuple[str, bool]]:
    """Each instruction's JAX ``op_name`` (from its metadata) and whether it is inherited, by
    instruction name. An instruction XLA added itself (a layout copy, a convert) has none of
    its own; it inherits that of the first instruction that reads it and has one (so a copy
    feeding a matmul counts with that matmul's part of the model)."""
    names, readers = {}, {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION_RE.match(line)
        if not match:
            continue
        found = _OP_NAME_RE.search(line)
        args = line[match.end() :].split(" calls=", 1)[0]
        readers[match.group(1)] = (found.group(1) if found else None, _OPERAND_RE.findall(args))
    for name, (op_name, _) in readers.items():
        if op_name:
            names[name] = (op_name, False)
    for _ in range(4):  # chains of added instructions: a convert into a copy into a dot
        added = {}
        for name, (_, operands) in readers.items():
            reader = names.get(name)
            for operand in operands if reader else ():
                if operand in readers and operand not in names:
                    added.setdefault(operand, (reader[0], True))
        if not added:
            break
        names.update(added)
    return names


def weight_gradients(hlo_text: str, kernel_shapes: set[tuple[int, int]], tokens: int) -> list[Dot]:
    """The dots that compute a weight gradient of one of ``kernel_shapes``.

    A weight gradient ``xᵀ·dy`` is a [D, F] (or transposed [F, D]) result summed over every
    token of the batch; a forward product or an activation gradient sums over a width
    instead, and attention's products carry batch dims. Choose ``tokens`` (B·T) unequal to
    every width so the two cannot be confused.
    """
    shapes = {tuple(s) for s in kernel_shapes} | {tuple(reversed(s)) for s in kernel_shapes}
    return [
        d
        for d in dots(hlo_text)
        if not d.lhs_batch and d.shape in shapes and d.contracted == tokens
    ]
