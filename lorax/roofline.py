"""A step-time estimate read from a compiled step's optimized HLO text, with no device: a
roofline over the kernels it launches.

Each kernel (a fusion, a GEMM, a cuDNN attention call, a convolution, a copy) costs
max(FLOPs / peak, bytes / HBM bandwidth); a while loop's body counts once per trip; a
collective costs the bytes its ring sends over one GPU's link / link bandwidth. The sum,
divided by one efficiency factor fitted on the GPU runs in ``benchmarks/results/runbook-gpu``
(``benchmarks/calibrate.py``; the table and its error are in benchmarks/README.md), is the
estimate. It is an estimate, not a measurement: it assumes every kernel reaches the same
fraction of its roofline, no gaps between launches, and collectives that overlap nothing.

Input: ``compiled.as_text()`` of a GPU compile (a deviceless CUDA compile will do). Matrix
products appear there as Triton GEMM fusions (a ``dot`` inside), cuBLAS custom calls
(``__cublas$gemm``, ``__cublas$lt$matmul``: dims in ``backend_config``) or ``dot``s;
attention as cuDNN calls (``__cudnn$fmha*``), costed from their Q, K, V shapes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from lorax.hlo import COLLECTIVES, ELEMENT_BYTES  # bytes per element, collective kinds

# Fitted by benchmarks/calibrate.py: measured step time = roofline time / EFFICIENCY, one
# factor for every row (see benchmarks/README.md "Step-time estimate" for the rows and error).
EFFICIENCY = 0.654
CALIBRATION_ERROR = 0.17  # the largest |estimate / measured - 1| over those rows


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the roofline needs of a GPU, from its datasheet (dense, no sparsity)."""

    name: str
    peak_flops: float  # 16-bit (bf16/fp16) tensor-core FLOP/s: products of 16-bit inputs
    hbm_bytes_per_s: float  # device-memory bandwidth
    link_bytes_per_s: float  # one GPU's NVLink bandwidth, one direction (a ring's bytes)
    tf32_flops: float  # products of f32 inputs (TF32: XLA's default precision on such GPUs)
    vector_flops: float  # FP32 CUDA-core FLOP/s, for element-wise work


# NVIDIA datasheets (H100 SXM5, H200 SXM, A100 SXM4 80 GB): bf16 dense, TF32 dense, FP32,
# HBM, NVLink (900 / 900 / 600 GB/s both directions together).
SPECS = {
    "h100": Spec("H100 SXM", 989e12, 3.35e12, 450e9, 494.5e12, 67e12),
    "h200": Spec("H200 SXM", 989e12, 4.8e12, 450e9, 494.5e12, 67e12),
    "a100": Spec("A100 SXM 80GB", 312e12, 2.039e12, 300e9, 156e12, 19.5e12),
}

# --------------------------------------------------------------------------- parsing

_HEADER_RE = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{$")
_INSTR_RE = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.*)$")
_SHAPE_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_OPERAND_RE = re.compile(r"%([\w.\-]+)")
_COMMENT_RE = re.compile(r"/\*.*?\*/")
_FREE = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
    "replica-id", "opt-barrier", "add-dependency", "all-reduce-done", "all-gather-done",
    "collective-permute-done", "async-done", "async-update", "copy-done", "send", "send-done",
    "recv", "recv-done", "domain", "get-dimension-size",
}  # fmt: skip
_NO_FLOP = {"broadcast", "reshape", "bitcast", "transpose", "copy", "slice", "dynamic-slice",
            "dynamic-update-slice", "concatenate", "pad", "gather", "scatter", "parameter",
            "constant", "iota", "tuple", "get-tuple-element", "reverse", "convert",
            "bitcast-convert", "select"}  # fmt: skip


def _balanced(text: str, start: int, open_: str = "(", close: str = ")") -> int:
    """Index just past the bracket that closes the one at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_!r} in HLO text: {text[start : start + 80]!r}")


@dataclasses.dataclass
class Instr:
    """One HLO instruction: its result arrays (dtype, dims), operands and attributes text."""

    name: str
    opcode: str
    shapes: list[tuple[str, tuple[int, ...]]]
    operands: list[str]
    attrs: str
    argtext: str  # the text inside the opcode's parentheses (a parameter's number)

    @property
    def bytes(self) -> float:
        return sum(_array_bytes(s) for s in self.shapes)

    def attr(self, key: str) -> str | None:
        """The value of ``key=`` (a name, a ``{...}`` group or a quoted string), or None."""
        m = re.search(rf"(?:^|[\s,]){re.escape(key)}=", self.attrs)
        if not m:
            return None
        i = m.end()
        if self.attrs[i] == "{":
            return self.attrs[i : _balanced(self.attrs, i, "{", "}")]
        if self.attrs[i] == '"':
            return self.attrs[i + 1 : self.attrs.index('"', i + 1)]
        if self.attrs[i] == "[":  # iota replica groups: [groups,size]<=[devices]T(perm)
            return re.match(r"\[[^\]]*\](<=\[[^\]]*\])?(T\([^)]*\))?", self.attrs[i:]).group(0)
        return re.match(r"[^,\s]*", self.attrs[i:]).group(0)

    def config(self) -> dict[str, Any]:
        """The ``backend_config`` JSON ({} if none or unreadable)."""
        text = self.attr("backend_config")
        try:
            return json.loads(text) if text and text.startswith("{") else {}
        except json.JSONDecodeError:
            return {}

    def calls(self, key: str = "calls") -> list[str]:
        value = self.attr(key)
        return _OPERAND_RE.findall(value) if value else []


def _array_bytes(shape: tuple[str, tuple[int, ...]]) -> float:
    dtype, dims = shape
    size = ELEMENT_BYTES.get(dtype, 1 if dtype[:2] in ("f8", "f4") else 4)
    return size * math.prod(dims)


def _parse_instr(name: str, rest: str) -> Instr:
    if rest.startswith("("):  # a tuple result
        end = _balanced(rest, 0)
        type_text, rest = rest[:end], rest[end:].lstrip()
    else:
        type_text, _, rest = rest.partition(" ")
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        raise ValueError(f"HLO instruction %{name}: no opcode in {rest[:80]!r}")
    close = _balanced(rest, m.end() - 1)
    shapes = [(d, tuple(int(x) for x in dims.split(",") if x))
              for d, dims in _SHAPE_RE.findall(type_text)]  # fmt: skip
    argtext = rest[m.end() : close - 1]
    return Instr(name, m.group(1), shapes, _OPERAND_RE.findall(argtext), rest[close:], argtext)


@dataclasses.dataclass
class Module:
    """An HLO module's computations (name → instructions in order), its entry, and every
    instruction by its (module-wide unique) name."""

    computations: dict[str, list[Instr]]
    roots: dict[str, Instr]
    entry: str
    by_name: dict[str, Instr]
    partitions: int


def parse(hlo_text: str) -> Module:
    """Reads an HLO module's text (``compiled.as_text()``)."""
    computations, roots, entry, current, by_name = {}, {}, None, None, {}
    header = hlo_text[: hlo_text.find("\n")]
    partitions = re.search(r"num_partitions=(\d+)", header)
    for line in hlo_text.splitlines():
        line = _COMMENT_RE.sub("", line.rstrip())
        m = _HEADER_RE.match(line)
        if m:
            name = m.group(2)
            current = computations.setdefault(name, [])
            entry = name if m.group(1) else entry
            continue
        m = _INSTR_RE.match(line)
        if m and current is not None:
            instr = _parse_instr(m.group(2), m.group(3))
            current.append(instr)
            by_name[instr.name] = instr
            if m.group(1):
                roots[name] = instr
    if entry is None:
        raise ValueError("not an HLO module's text: no ENTRY computation found")
    n = int(partitions.group(1)) if partitions else 1
    return Module(computations, roots, entry, by_name, n)


# --------------------------------------------------------------------------- costing


@dataclasses.dataclass
class Cost:
    """The work of one kernel launch."""

    matmul16: float = 0.0  # FLOPs of products of 16-bit (or narrower) inputs
    matmul32: float = 0.0  # FLOPs of products of f32 inputs
    vector: float = 0.0  # element-wise FLOPs
    bytes: float = 0.0  # device memory read and written
    wire: float = 0.0  # bytes one GPU sends over its link (collectives)

    @property
    def flops(self) -> float:
        return self.matmul16 + self.matmul32 + self.vector

    def seconds(self, spec: Spec) -> float:
        """max(FLOPs / peak, bytes / bandwidth), plus the link time of a collective."""
        compute = (self.matmul16 / spec.peak_flops + self.matmul32 / spec.tf32_flops
                   + self.vector / spec.vector_flops)  # fmt: skip
        return max(compute, self.bytes / spec.hbm_bytes_per_s) + self.wire / spec.link_bytes_per_s

    def add_matmul(self, flops: float, dtype: str) -> None:
        if dtype in ("f32", "f64", "c64", "c128"):
            self.matmul32 += flops
        else:
            self.matmul16 += flops


def _ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text or ""))


def _shape(module: Module, name: str) -> tuple[str, tuple[int, ...]]:
    shapes = module.by_name[name].shapes
    return shapes[0] if shapes else ("token", ())


def _dot_flops(module: Module, instr: Instr) -> tuple[float, str]:
    """2 · result elements · contracted length, and the left operand's dtype."""
    dtype, lhs = _shape(module, instr.operands[0])
    contracted = math.prod(lhs[d] for d in _ints(instr.attr("lhs_contracting_dims")))
    return 2.0 * math.prod(instr.shapes[0][1]) * contracted, dtype


def _conv_flops(module: Module, instr: Instr) -> tuple[float, str]:
    """2 · result elements · (kernel elements / output features): each output sums a window
    over the input features of its group."""
    dtype, kernel = _shape(module, instr.operands[1])
    labels = (instr.attr("dim_labels") or "").split("_")
    out_feature = labels[1].index("o") if len(labels) > 1 and "o" in labels[1] else -1
    per_output = math.prod(kernel) / max(kernel[out_feature], 1) if kernel else 0
    return 2.0 * math.prod(instr.shapes[0][1]) * per_output, dtype


def _fused_work(module: Module, computation: str, cost: Cost, memo: dict) -> None:
    """Adds a fused computation's FLOPs (its products, element-wise ops and reductions,
    nested fusions included) to ``cost``."""
    if computation not in memo:
        work = Cost()
        for instr in module.computations.get(computation, []):
            if instr.opcode == "dot":
                work.add_matmul(*_dot_flops(module, instr))
            elif instr.opcode == "convolution":
                work.add_matmul(*_conv_flops(module, instr))
            elif instr.opcode == "fusion":
                for called in instr.calls():
                    _fused_work(module, called, work, memo)
            elif instr.opcode == "reduce" and instr.operands:
                inputs = max(len(instr.operands) // 2, 1)
                work.vector += inputs * math.prod(_shape(module, instr.operands[0])[1])
            elif instr.opcode not in _NO_FLOP and instr.shapes:
                work.vector += math.prod(instr.shapes[0][1])
        memo[computation] = work
    work = memo[computation]
    cost.matmul16 += work.matmul16
    cost.matmul32 += work.matmul32
    cost.vector += work.vector


def _fusion_bytes(module: Module, fusion: Instr) -> float:
    """What a fusion reads and writes: each operand whole, except one only sliced inside
    (the slice's bytes) or updated in place (nothing); each output whole, except one updated
    in place (the update's bytes)."""
    called = fusion.calls()
    body = module.computations.get(called[0], []) if called else []
    users: dict[str, list[tuple[Instr, int]]] = {}
    for instr in body:
        for k, operand in enumerate(instr.operands):
            users.setdefault(operand, []).append((instr, k))

    def read(name: str, full: float) -> float:
        uses = users.get(name, [])
        if not uses:
            return full
        total = 0.0
        for user, k in uses:
            if user.opcode in ("dynamic-slice", "slice", "gather") and k == 0:
                total += user.bytes
            elif user.opcode in ("dynamic-update-slice", "scatter") and k == 0:
                continue
            elif user.opcode == "bitcast":
                total += read(user.name, full)
            else:
                return full
        return min(total, full)

    params = {int(i.argtext): i for i in body if i.opcode == "parameter"}
    total = 0.0
    for index, operand in enumerate(fusion.operands):
        full = _array_bytes(_shape(module, operand))
        total += read(params[index].name, full) if index in params else full

    def written(instr: Instr) -> float:
        if instr.opcode == "dynamic-update-slice":
            return _array_bytes(_shape(module, instr.operands[1]))
        if instr.opcode == "scatter":
            return _array_bytes(_shape(module, instr.operands[-1]))
        if instr.opcode in ("tuple", "bitcast"):
            return sum(written(module.by_name[o]) for o in instr.operands)
        return instr.bytes

    root = module.roots.get(called[0]) if called else None
    return total + (written(root) if root else fusion.bytes)


def _operand_bytes(module: Module, instr: Instr) -> float:
    return sum(_array_bytes(_shape(module, o)) for o in instr.operands)


def _free(shape: tuple[int, ...], dims: dict, side: str) -> int:
    """Elements of ``shape`` in neither its contracting nor its batch dims (XLA's
    ``dot_dimension_numbers`` JSON, ``side`` "lhs" or "rhs")."""
    bound = dims.get(f"{side}_contracting_dimensions", []) + dims.get(
        f"{side}_batch_dimensions", []
    )
    return math.prod(n for d, n in enumerate(shape) if str(d) not in bound)


def _gemm_cost(module: Module, instr: Instr) -> Cost:
    """A cuBLAS custom call: 2 · lhs elements · rhs free elements; bytes: operands and
    result, the workspace not counted."""
    dims = instr.config().get("gemm_backend_config", {}).get("dot_dimension_numbers", {})
    dtype, lhs = _shape(module, instr.operands[0])
    cost = Cost(bytes=_operand_bytes(module, instr) + _result_bytes(instr))
    cost.add_matmul(
        2.0 * math.prod(lhs) * _free(_shape(module, instr.operands[1])[1], dims, "rhs"), dtype
    )
    return cost


def _result_bytes(instr: Instr) -> float:
    """A custom call's result bytes, less a trailing u8/s8 workspace in its tuple."""
    shapes = instr.shapes
    if len(shapes) > 1 and shapes[-1][0] in ("u8", "s8"):
        shapes = shapes[:-1]
    return sum(_array_bytes(s) for s in shapes)


def _attention_cost(module: Module, instr: Instr, target: str) -> Cost:
    """A cuDNN fused attention call (operands Q, K, V, ...). With P = Q·Kᵀ of shape
    [B, N, T, S] (``intermediate_tensor_shape``), D and Dv the head widths of Q and V: the
    forward is 2·|P|·(D + Dv) FLOPs (Q·Kᵀ and P·V); the backward recomputes P and makes dV,
    dP, dQ and dK: 2·|P|·(3·D + 2·Dv); a causal mask halves both."""
    cfg = instr.config().get("cudnn_fmha_backend_config", {})
    dtype, q = _shape(module, instr.operands[0])
    _, v = _shape(module, instr.operands[2])
    p = [int(d) for d in cfg.get("intermediate_tensor_shape", {}).get("dimensions", [])]
    if not p:  # the forward's bmm1 numbers: |P| = Q's elements / D · K's free elements
        dims = cfg.get("bmm1_dot_dimension_numbers", {})
        p = [math.prod(q) // q[-1], _free(_shape(module, instr.operands[1])[1], dims, "rhs")]
    size, d, dv = math.prod(p), q[-1], v[-1]
    flops = 2.0 * size * ((3 * d + 2 * dv) if "Backward" in target else (d + dv))
    if "CAUSAL" in str(cfg.get("mask_type", "")).upper():
        flops /= 2
    cost = Cost(bytes=_operand_bytes(module, instr) + _result_bytes(instr))
    cost.add_matmul(flops, dtype)
    return cost


def _group_size(module: Module, instr: Instr) -> int:
    """Devices in one replica group of a collective (all of them if no groups are given)."""
    groups = instr.attr("replica_groups")
    if groups:
        iota = re.match(r"\[(\d+),(\d+)\]<=", groups)
        if iota:
            return int(iota.group(2))
        first = re.search(r"\{([\d,\s]*)\}", groups[1:] if groups.startswith("{{") else groups)
        if first and _ints(first.group(1)):
            return len(_ints(first.group(1)))
    return module.partitions


def _collective_cost(module: Module, instr: Instr, kind: str) -> Cost:
    """Ring algorithms over n devices: all-reduce sends 2(n-1)/n of its buffer, all-gather
    (n-1)/n of its result, reduce-scatter and all-to-all (n-1)/n of their operand, a
    collective-permute its operand once. Memory traffic: operands and results."""
    n = _group_size(module, instr)
    operand = _operand_bytes(module, instr)
    result = _array_bytes(instr.shapes[-1]) if instr.shapes else 0.0
    if kind == "collective-permute" or kind == "collective-broadcast":
        wire = operand if n > 1 or instr.attr("source_target_pairs") else 0.0
    else:
        share = (n - 1) / n if n > 0 else 0.0
        wire = {"all-reduce": 2 * share * operand, "all-gather": share * result}.get(
            kind, share * operand
        )
    return Cost(bytes=operand + result, wire=wire)


def _kernel_cost(module: Module, instr: Instr, memo: dict) -> tuple[str, Cost]:
    """The kind of one launched instruction (gemm, attention, convolution, fusion,
    collective, copy, other) and its cost."""
    op = instr.opcode
    if op == "fusion":
        cost = Cost(bytes=_fusion_bytes(module, instr))
        for called in instr.calls():
            _fused_work(module, called, cost, memo)
        return ("gemm" if cost.matmul16 + cost.matmul32 else "fusion"), cost
    if op in ("dot", "convolution"):
        cost = Cost(bytes=_operand_bytes(module, instr) + instr.bytes)
        cost.add_matmul(*(_dot_flops if op == "dot" else _conv_flops)(module, instr))
        return ("gemm" if op == "dot" else "convolution"), cost
    if op == "custom-call":
        target = instr.attr("custom_call_target") or ""
        if "fmha" in target:
            return "attention", _attention_cost(module, instr, target)
        if target.startswith("__cublas"):
            return "gemm", _gemm_cost(module, instr)
        cost = Cost(bytes=_operand_bytes(module, instr) + _result_bytes(instr))
        if target.startswith("__cudnn$conv"):
            cost.add_matmul(*_conv_flops(module, instr))
            return "convolution", cost
        return "other", cost
    base = op.removesuffix("-start")
    if base in COLLECTIVES:
        return "collective", _collective_cost(module, instr, base)
    cost = Cost(bytes=_operand_bytes(module, instr) + instr.bytes)
    if op in ("copy", "copy-start", "transpose"):
        return "copy", cost
    if op not in _NO_FLOP and instr.shapes:
        cost.vector = math.prod(instr.shapes[0][1])
    return "other", cost


def _trip_count(module: Module, loop: Instr, notes: list[str]) -> int:
    """A while loop's trips: XLA's ``known_trip_count``, else the N of a ``counter < N``
    compare in its condition (a counter from 0), else 1 with a note."""
    known = loop.config().get("known_trip_count", {}).get("n")
    if known is not None:
        return int(known)
    pending = list(loop.calls("condition"))
    while pending:
        for instr in module.computations.get(pending.pop(), []):
            pending += instr.calls() if instr.opcode == "fusion" else []
            if instr.opcode == "compare" and instr.attr("direction") == "LT":
                for operand in instr.operands:
                    const = module.by_name.get(operand)
                    if const and const.opcode == "constant" and const.argtext.strip().isdigit():
                        return int(const.argtext)
    notes.append(f"while %{loop.name}: trip count unknown, its body counted once")
    return 1


@dataclasses.dataclass
class Op:
    """One launched instruction, how many times a step runs it, and one run's cost."""

    name: str
    kind: str
    op_name: str  # the JAX op it came from (HLO metadata), "" if none
    shape: str
    count: int
    cost: Cost
    seconds: float  # one run, roofline

    def row(self, efficiency: float, roofline: float) -> dict[str, Any]:
        """For :attr:`Estimate.top`: all runs' estimated seconds and share of the roofline."""
        total = self.count * self.seconds
        return {"name": self.name, "kind": self.kind, "op_name": self.op_name,
                "shape": self.shape, "count": self.count, "flops": self.cost.flops,
                "bytes": self.cost.bytes, "seconds": total / efficiency,
                "share": total / roofline if roofline else 0.0}  # fmt: skip


def kernels(module: Module, spec: Spec) -> tuple[list[Op], list[str]]:
    """Every instruction a step launches, loop bodies by their trip counts, the costliest
    branch of each conditional; and notes on what could not be read."""
    memo: dict = {}
    notes: list[str] = []

    def walk(computation: str, times: int) -> list[Op]:
        ops = []
        for instr in module.computations.get(computation, []):
            op = instr.opcode
            if op in _FREE:
                continue
            if op == "while":
                trips = _trip_count(module, instr, notes)
                for key in ("body", "condition"):
                    for called in instr.calls(key):
                        ops += walk(called, times * trips)
            elif op == "conditional":
                branches = instr.calls("branch_computations") or (
                    instr.calls("true_computation") + instr.calls("false_computation"))  # fmt: skip
                walked = [walk(b, times) for b in branches]
                ops += max(walked, key=lambda w: sum(o.seconds * o.count for o in w), default=[])
            elif op in ("call", "async-start"):  # what it wraps runs as kernels of its own
                for called in instr.calls("to_apply") + instr.calls():
                    ops += walk(called, times)
            else:
                kind, cost = _kernel_cost(module, instr, memo)
                meta = re.search(r'op_name="([^"]*)"', instr.attrs)
                shape = ", ".join(f"{d}[{','.join(map(str, s))}]" for d, s in instr.shapes[:3])
                ops.append(Op(instr.name, kind, meta.group(1) if meta else "", shape, times,
                              cost, cost.seconds(spec)))  # fmt: skip
        return ops

    return walk(module.entry, 1), notes


@dataclasses.dataclass
class Estimate:
    """A step's estimated time on one GPU, and what it is made of. An estimate, not a
    measurement: ``seconds`` = ``roofline_seconds`` / ``efficiency``."""

    seconds: float
    roofline_seconds: float
    efficiency: float
    spec: str
    tokens_per_step: int | None
    flops: float  # all FLOPs of a step (products and element-wise)
    matmul_flops: float  # of which in matrix products (GEMMs, attention, convolutions)
    bytes: float  # device-memory traffic, summed over kernels
    wire_bytes: float  # bytes one GPU sends over its links (collectives)
    kernels: int  # launches per step
    kinds: dict[str, dict[str, float]]  # per kind: count, seconds (estimated), flops, bytes
    top: list[dict[str, Any]]  # the instructions with the largest share of the time
    notes: list[str]

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens_per_step / self.seconds if self.tokens_per_step else None

    def summary(self) -> str:
        """One line, saying it is an estimate."""
        rate = f", ~{self.tokens_per_s:,.0f} tokens/s" if self.tokens_per_step else ""
        return (
            f"estimated step time ~{self.seconds * 1e3:.1f} ms{rate} on {self.spec} "
            f"(an estimate, not a measurement: a roofline over the optimized HLO / "
            f"{self.efficiency:.2f} fitted efficiency, off by up to {CALIBRATION_ERROR:.0%} "
            f"on the GPU steps it was fitted to); {self.flops / 1e12:.2f} TFLOP, "
            f"{self.bytes / 1e9:.1f} GB memory traffic, {self.wire_bytes / 1e9:.2f} GB over "
            f"links, {self.kernels} kernels"
        )

    def to_json(self) -> dict[str, Any]:
        return {"estimate": True, **dataclasses.asdict(self), "tokens_per_s": self.tokens_per_s}


def estimate(
    hlo_text: str,
    spec: Spec | str,
    tokens_per_step: int | None = None,
    *,
    efficiency: float = EFFICIENCY,
    top: int = 10,
) -> Estimate:
    """The step-time estimate of one device's program.

    Args:
      hlo_text: the optimized HLO module, ``compiled.as_text()`` of a GPU compile.
      spec: the GPU (a :class:`Spec`, or a key of :data:`SPECS`).
      tokens_per_step: tokens one step trains on (for tokens/s), or None.
      efficiency: the fraction of the roofline reached (default: the calibrated one).
      top: how many of the costliest instructions to list.
    """
    if isinstance(spec, str):
        if spec not in SPECS:
            raise ValueError(f"unknown GPU {spec!r}; known: {sorted(SPECS)}")
        spec = SPECS[spec]
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency = {efficiency} must be in (0, 1]")
    ops, notes = kernels(parse(hlo_text), spec)
    kinds: dict[str, dict[str, float]] = {}
    for op in ops:
        k = kinds.setdefault(op.kind, dict.fromkeys(("count", "seconds", "flops", "bytes"), 0))
        values = (1, op.seconds / efficiency, op.cost.flops, op.cost.bytes)
        for key, value in zip(k, values, strict=True):
            k[key] += op.count * value
    roofline = sum(op.count * op.seconds for op in ops)
    ranked = sorted(ops, key=lambda op: -op.count * op.seconds)[:top]
    return Estimate(
        seconds=roofline / efficiency,
        roofline_seconds=roofline,
        efficiency=efficiency,
        spec=spec.name,
        tokens_per_step=tokens_per_step,
        flops=sum(op.count * op.cost.flops for op in ops),
        matmul_flops=sum(op.count * (op.cost.matmul16 + op.cost.matmul32) for op in ops),
        bytes=sum(op.count * op.cost.bytes for op in ops),
        wire_bytes=sum(op.count * op.cost.wire for op in ops),
        kernels=sum(op.count for op in ops),
        kinds=kinds,
        top=[op.row(efficiency, roofline) for op in ranked],
        notes=notes,
    )
