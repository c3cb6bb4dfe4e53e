"""The pytree nodes that stand where a kernel was, and that :mod:`lorax.nn`'s layers understand.

Shape letters: D = a kernel's input width, F = its output width, R = a low-rank factor's rank,
M = a bottleneck's width, N = adapters in a bank, B = batch rows.

:class:`LoraWeight` (LoRA, :mod:`lorax.lora`), :class:`BankedLoraWeight` (many LoRA adapters,
one per batch row, :mod:`lorax.serving`) and :class:`Bottleneck` (an adapter on a layer's
output, :mod:`lorax.methods`) each carry the frozen kernel ``w`` and report its shape and dtype.
This module sits below the layers and the methods: both import it, neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

# Nonlinearities of a bottleneck adapter (and of the method MLPs built beside it).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "tanh": jnp.tanh,
}


class WrappedKernel:
    """A pytree node that stands where a kernel ``w`` was (LoRA, an adapter bank, a bottleneck
    adapter): it reports ``w``'s shape and dtype, so code that sizes params still works."""

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype


@struct.dataclass
class LoraWeight(WrappedKernel):
    """A frozen kernel with its low-rank update; a pytree node whose leaves are (w, a, b).

    ``w`` comes first so Flax's param shape check (which compares leaves in order) sees the
    kernel's own shape.
    """

    w: jax.Array  # [D, F] frozen base kernel (possibly bf16)
    a: jax.Array  # [D, R]
    b: jax.Array  # [R, F]
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    def materialize(self) -> jax.Array:
        """``w + scale·a@b`` in ``w``'s dtype (the sum itself is taken in fp32)."""
        return merge_kernel(self.w, self.a, self.b, self.scale)


@struct.dataclass
class DoraWeight(WrappedKernel):
    """A frozen kernel with a DoRA update (Liu et al. 2024): the adapted kernel is
    ``m · (w + scale·a@b) / ‖w + scale·a@b‖``, column norms over D, the norm held constant in
    the backward pass (the paper's §4.3, as PEFT computes it); leaves (w, a, b, m)."""

    w: jax.Array  # [D, F] frozen base kernel
    a: jax.Array  # [D, R]
    b: jax.Array  # [R, F]
    m: jax.Array  # [F] learned magnitude, initialised to the base kernel's column norms
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    def materialize(self) -> jax.Array:
        """The adapted kernel, in ``w``'s dtype (computed in fp32, with the norm the forward
        pass uses: :func:`column_norms`)."""
        f32 = jnp.float32
        merged = self.w.astype(f32) + self.scale * (self.a.astype(f32) @ self.b.astype(f32))
        g_F = self.m.astype(f32) / column_norms(self.w, self.a, self.b, self.scale)
        return (merged * g_F[..., None, :]).astype(self.w.dtype)


def column_norms(w_DF: jax.Array, a_DR: jax.Array, b_RF: jax.Array, scale) -> jax.Array:
    """``‖w + scale·a@b‖`` over D for every column [F], in fp32, without building the sum:
    ‖w_f‖² + 2·scale·Σ_r b_rf (aᵀw)_rf + scale²·b_fᵀ(aᵀa)b_f. Leading axes (scanned layers)
    are kept."""
    w, a, b = (x.astype(jnp.float32) for x in (w_DF, a_DR, b_RF))
    aw_RF = jnp.einsum("...dr,...df->...rf", a, w)
    aab_RF = jnp.einsum("...dr,...ds,...sf->...rf", a, a, b)
    sq_F = jnp.sum(w * w, axis=-2) + 2 * scale * jnp.sum(b * aw_RF, axis=-2)
    sq_F = sq_F + scale * scale * jnp.sum(b * aab_RF, axis=-2)
    return jnp.sqrt(jnp.maximum(sq_F, 0.0))


@struct.dataclass
class BankedLoraWeight(WrappedKernel):
    """A frozen kernel with a bank of N low-rank updates, one chosen per batch row.

    Row b computes ``x@w + (x@a[ids[b]])@b[ids[b]]``: each adapter's scale is folded into its
    ``b``, lower ranks are zero-padded to the bank's R (exact), and slot 0 is conventionally
    all zeros (the base alone). See :mod:`lorax.serving`.
    """

    w: jax.Array  # [D, F] frozen base kernel
    a: jax.Array  # [N, D, R]
    b: jax.Array  # [N, R, F], scale folded in
    ids: jax.Array  # [B] int32: the slot of each batch row


def merge_kernel(w: jax.Array, a_DR: jax.Array, b_RF: jax.Array, scale: float) -> jax.Array:
    """``w + scale·a@b``, accumulated in fp32 and cast back to ``w.dtype``."""
    delta_DF = scale * (a_DR.astype(jnp.float32) @ b_RF.astype(jnp.float32))
    return (w.astype(jnp.float32) + delta_DF).astype(w.dtype)


@struct.dataclass
class Bottleneck(WrappedKernel):
    """A layer's kernel with an adapter on that layer's output; a pytree node.

    The layer computes ``y = x@w + bias`` and then ``y + up(act(down(norm(y))))``, where
    ``norm`` is a LayerNorm (Lin et al.) or nothing (Houlsby et al.). Leaves may carry a
    leading [L] axis in a scanned stack of layers.
    """

    w: Any  # [D, F] the frozen kernel (first, so Flax's shape check sees its shape)
    down: jax.Array  # [F, M]
    down_bias: jax.Array  # [M]
    up: jax.Array  # [M, F], zero at init
    up_bias: jax.Array  # [F]
    norm_scale: jax.Array | None = None  # [F] (Lin)
    norm_bias: jax.Array | None = None  # [F] (Lin)
    activation: str = struct.field(pytree_node=False, default="relu")

    def adapt(self, y_BxF: jax.Array, dtype) -> jax.Array:
        """``y + up(act(down(norm(y))))`` in ``dtype`` (the LayerNorm's statistics in fp32)."""
        h = y_BxF
        if self.norm_scale is not None:
            h32 = h.astype(jnp.float32)
            mean = jnp.mean(h32, -1, keepdims=True)
            var = jnp.mean(jnp.square(h32 - mean), -1, keepdims=True)
            h = (h32 - mean) * jax.lax.rsqrt(var + 1e-5) * self.norm_scale + self.norm_bias
        h = h.astype(dtype) @ self.down.astype(dtype) + self.down_bias.astype(dtype)
        h = ACTIVATIONS[self.activation](h)
        h = h @ self.up.astype(dtype) + self.up_bias.astype(dtype)
        return (y_BxF + h).astype(y_BxF.dtype)
