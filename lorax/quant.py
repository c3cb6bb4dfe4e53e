"""A quantized frozen base for QLoRA: NF4 and int8 kernels with per-block absmax scales.

Shape letters: L layers of a scanned stack, N the elements of one layer's kernel, G its blocks
(N / block), P packed bytes (N / 2 for NF4, N for int8).

A kernel ``w`` [*stack, *kernel] is flattened per layer to N elements and cut into blocks of
``block`` consecutive elements (64 by default, as in QLoRA); each block is divided by its
absolute maximum and every element is replaced by a code:

- ``nf4``: the index of the nearest of the 16 NormalFloat levels (Dettmers et al. 2023, "QLoRA:
  Efficient Finetuning of Quantized LLMs", §3), two 4-bit codes per uint8 byte;
- ``int8``: ``round(127·w/absmax)`` in int8 (symmetric, no zero point).

A :class:`QuantizedWeight` node holds the codes and the fp32 scales; :mod:`lorax.nn` layers
dequantize it to the compute dtype inside the jitted step, just before the matmul, so only the
packed codes stay resident. Blocks never straddle the layers of a stack ``layers/...`` [L, ...],
so ``nn.scan`` can slice a stacked QuantizedWeight like any other param. A kernel whose per-layer
size is not a multiple of ``block`` is an error (rather than padded): pick a block that divides
it, or leave the kernel out of the patterns.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lorax import paths

KINDS = ("nf4", "int8")
# The kernels of attention and the MLP in the canonical layout (see lorax.lora's target names):
# never norms, biases, embeddings or the output head unless a pattern asks for them.
DEFAULT_PATTERNS = (
    r"(?:^|/)attn/(?:q|k|v|o)/kernel$",
    r"(?:^|/)mlp/mlp_(?:in|gate|out)/kernel$",
)
DEFAULT_BLOCK = 64
# The classifier head and an untied LM head are never quantized: every logit passes through
# them (QLoRA keeps the output layer in 16 bits too).
_HEAD_RE = r"(?:^|/)(?:lm_)?head/"


def _nf4_levels() -> np.ndarray:
    """The 16 NF4 levels, computed from standard normal quantiles as QLoRA §3 defines them.

    A k-bit NormalFloat puts its levels at quantiles of N(0, 1), normalised to [-1, 1]. To
    have an exact zero and still use all 2^k codes, QLoRA takes the quantiles of two ranges,
    2^(k-1) for the negative half and 2^(k-1) + 1 for the positive half, unites them and keeps
    one of the two zeros: 7 negative levels, 0, and 8 positive levels. The outermost quantile
    is taken at ``delta``, the mean of 1 - 1/(2·15) and 1 - 1/(2·16) (the two ranges' half-step
    offsets), since the quantile function is infinite at 1.
    """
    inv_cdf = statistics.NormalDist().inv_cdf
    delta = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    positive = [inv_cdf(p) for p in np.linspace(delta, 0.5, 9)[:-1]]  # 8 levels > 0
    negative = [-inv_cdf(p) for p in np.linspace(delta, 0.5, 8)[:-1]]  # 7 levels < 0
    levels = np.sort(np.array([*negative, 0.0, *positive]))
    return levels / np.abs(levels).max()


NF4_LEVELS = _nf4_levels().astype(np.float32)  # [16], sorted, NF4_LEVELS[7] == 0
# Decision boundaries: a normalised value is coded as the number of midpoints below it.
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # [15]
INT8_MAX = 127


@struct.dataclass
class QuantizedWeight:
    """A frozen kernel stored as quantization codes and per-block scales; a pytree node.

    The leaves are ``codes`` and ``scales`` (integers and fp32, never differentiated); kind,
    block, the per-layer kernel shape and the dtype the kernel stands for are static. The
    full shape is derived from ``codes``' leading axes, so slicing a stacked node layer by
    layer (as ``nn.scan`` does) gives a valid node for one layer.
    """

    codes: jax.Array  # [*stack, P] uint8 (nf4: element 2i in the low nibble) or int8
    scales: jax.Array  # [*stack, G] fp32, each block's absolute maximum
    kind: str = struct.field(pytree_node=False, default="nf4")
    block: int = struct.field(pytree_node=False, default=DEFAULT_BLOCK)
    kernel_shape: tuple[int, ...] = struct.field(pytree_node=False, default=())
    dtype: Any = struct.field(pytree_node=False, default=jnp.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense kernel's shape, ``(*stack, *kernel_shape)``."""
        return (*self.codes.shape[:-1], *self.kernel_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: the packed codes plus the scales."""
        return int(self.codes.nbytes + self.scales.nbytes)


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a :class:`QuantizedWeight` (an ``is_leaf`` for tree maps)."""
    return isinstance(x, QuantizedWeight)


def check_kind_block(kind: str, block: int) -> None:
    """Raises ValueError unless ``kind`` is one of :data:`KINDS` and ``block`` is even, >= 2."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantization kind {kind!r}; valid kinds are {list(KINDS)}")
    if isinstance(block, bool) or not isinstance(block, int | np.integer) or block < 2 or block % 2:
        raise ValueError(
            f"quantization block size (model.quant_block) must be a positive even integer "
            f"(e.g. 64), got {block!r}"
        )


def quantize(
    w: jax.Array,
    kind: str = "nf4",
    block: int = DEFAULT_BLOCK,
    *,
    stack_axes: int = 0,
    dtype: Any = None,
) -> QuantizedWeight:
    """Quantizes a kernel blockwise with absmax scales.

    Args:
      w: a float array [*stack, *kernel]; its first ``stack_axes`` axes index layers of a
        scanned stack, and each layer's kernel is quantized on its own.
      kind: "nf4" (4-bit NormalFloat, two codes per byte) or "int8" (symmetric).
      block: elements per scale, along the flattened per-layer kernel.
      stack_axes: how many leading axes are layer axes (1 for ``layers/...`` paths).
      dtype: the dtype the kernel stands for (what :func:`dequantize` returns by default and
        what :func:`dense_nbytes` counts); default ``w``'s. Quantizing an fp32 kernel into a
        bf16 base should pass bf16 here rather than round ``w`` to bf16 first.

    Returns:
      A :class:`QuantizedWeight`.

    Raises:
      ValueError: an unknown kind, a block that is not a positive even integer, a kernel with
        fewer than one axis, or a per-layer size that is not a multiple of ``block``.
    """
    check_kind_block(kind, block)
    shape = tuple(np.shape(w))
    stack, kernel = shape[:stack_axes], shape[stack_axes:]
    if not kernel:
        raise ValueError(f"cannot quantize an array of shape {shape} with {stack_axes} layer axes")
    n = math.prod(kernel)
    if n % block:
        raise ValueError(
            f"cannot quantize a kernel of shape {kernel} (size {n}) in blocks of {block}: the "
            f"size must be a multiple of the block; valid blocks divide {n} and are even"
        )
    codes, scales = _quantize_flat(jnp.reshape(w, (*stack, n // block, block)), kind)
    dtype = jnp.dtype(w.dtype if dtype is None else dtype)
    return QuantizedWeight(codes, scales, kind, int(block), kernel, dtype)


@functools.partial(jax.jit, static_argnums=1)
def _quantize_flat(w_SGK: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """Codes [*S, P] and absmax scales [*S, G] of blocks ``w_SGK`` [*S, G, block]."""
    w_SGK = w_SGK.astype(jnp.float32)
    absmax_SG = jnp.max(jnp.abs(w_SGK), axis=-1)
    # An all-zero block gets scale 0 and the code of 0, not a division by zero.
    safe_SG1 = jnp.where(absmax_SG > 0, absmax_SG, 1.0)[..., None]
    x_SGK = w_SGK / safe_SG1
    stack = w_SGK.shape[:-2]
    if kind == "nf4":
        idx_SGK = jnp.sum(x_SGK[..., None] > _NF4_MIDPOINTS, axis=-1).astype(jnp.uint8)
        codes_SP = pack_nf4(idx_SGK.reshape(*stack, -1))
    else:
        q_SGK = jnp.clip(jnp.round(x_SGK * INT8_MAX), -INT8_MAX, INT8_MAX)
        codes_SP = q_SGK.astype(jnp.int8).reshape(*stack, -1)
    return codes_SP, absmax_SG


def pack_nf4(idx_SN: jax.Array) -> jax.Array:
    """Packs 4-bit codes [*S, N] (0..15, N even) two per byte [*S, N/2] uint8.

    Element 2i goes in the low nibble of byte i and element 2i+1 in the high nibble.
    """
    pairs_SP2 = jnp.asarray(idx_SN, jnp.uint8).reshape(*idx_SN.shape[:-1], -1, 2)
    return pairs_SP2[..., 0] | (pairs_SP2[..., 1] << 4)


def unpack_nf4(codes_SP: jax.Array) -> jax.Array:
    """The 4-bit level indices [*S, 2·P] (uint8 in 0..15) of packed NF4 bytes [*S, P]."""
    lo, hi = codes_SP & 0xF, codes_SP >> 4
    return jnp.stack([lo, hi], axis=-1).reshape(*codes_SP.shape[:-1], -1)


def dequantize(qw: QuantizedWeight, dtype: Any = None) -> jax.Array:
    """The dense kernel ``qw`` stands for, in ``dtype`` (default: the original dtype).

    Computed in fp32 (level × scale) and then cast, so it is the same array whatever the
    compute dtype's rounding. Jittable; :mod:`lorax.nn` calls it inside the step.
    """
    dtype = qw.dtype if dtype is None else dtype
    stack = qw.codes.shape[:-1]
    if qw.kind == "nf4":
        values = jnp.asarray(NF4_LEVELS)[unpack_nf4(qw.codes)]
    elif qw.kind == "int8":
        values = qw.codes.astype(jnp.float32) / INT8_MAX
    else:
        raise ValueError(f"unknown quantization kind {qw.kind!r}; valid kinds are {list(KINDS)}")
    scales_SG1 = jax.lax.stop_gradient(qw.scales.astype(jnp.float32))[..., None]
    values_SGK = values.reshape(*stack, qw.scales.shape[-1], qw.block) * scales_SG1
    return values_SGK.reshape(qw.shape).astype(dtype)


def quantize_tree(
    params: Mapping[str, Any],
    kind: str = "nf4",
    block: int = DEFAULT_BLOCK,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    dtype: Any = None,
) -> dict[str, Any]:
    """Replaces the kernels matching ``patterns`` with :class:`QuantizedWeight` nodes.

    Args:
      params: a nested dict of arrays (a frozen base; scanned stacks ``layers/...`` [L, ...]
        are quantized layer by layer).
      kind, block: see :func:`quantize`.
      patterns: regexes over "/"-joined paths; the default selects every attention and MLP
        kernel. Each pattern must match some path.
      dtype: the dtype each kernel stands for (see :func:`quantize`); default its own.

    Returns:
      The same nesting with matched kernels quantized; every other leaf is passed through.

    Raises:
      ValueError: naming the path when a pattern matches nothing, matches a leaf with fewer
        than two axes per layer (a bias or norm), the output head, a leaf that is not an array,
        or a kernel whose size is not a multiple of ``block``.
    """
    check_kind_block(kind, block)
    matched, rest = paths.select(
        paths.flatten(params), tuple(patterns), what="quantization pattern"
    )
    head = paths.compile_patterns([_HEAD_RE])
    out = dict(rest)
    for path, leaf in matched.items():
        if paths.first_match(path, head) is not None:
            raise ValueError(
                f"quantization pattern matched {path}, the output head; heads stay unquantized"
            )
        if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(
                f"quantization pattern matched {path}, which is {type(leaf).__name__} "
                f"{getattr(leaf, 'dtype', '')}; only float arrays can be quantized"
            )
        stack_axes = 1 if paths.is_stacked(path) else 0
        shape = tuple(np.shape(leaf))
        if len(shape) - stack_axes < 2:
            raise ValueError(
                f"quantization pattern matched {path} of shape {shape}, which is not a kernel; "
                "only kernels with 2 or more axes per layer are quantized (never biases, norms)"
            )
        try:
            out[path] = quantize(leaf, kind, block, stack_axes=stack_axes, dtype=dtype)
        except ValueError as e:
            raise ValueError(f"{path} {shape}: {e}") from None
    return paths.unflatten(out)


def dequantize_tree(tree: Any, dtype: Any = None) -> Any:
    """``tree`` with every :class:`QuantizedWeight` replaced by its dense kernel.

    For merging an adapter into a quantized base, exporting, or comparing with the dense model.
    One jitted computation (one compile, not one per kernel shape); leaves come back as jax
    arrays.
    """

    @jax.jit
    def run(tree):
        return jax.tree_util.tree_map(
            lambda x: dequantize(x, dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized
        )

    return run(tree)


def dense_nbytes(tree: Any) -> int:
    """Bytes ``tree`` would occupy with every quantized kernel dense in its original dtype
    (:func:`lorax.paths.nbytes` counts them at their packed size)."""

    def size(x):
        if is_quantized(x):
            return x.size * jnp.dtype(x.dtype).itemsize
        return x.nbytes

    return int(sum(size(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized)))
