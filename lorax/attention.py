"""Which kernel computes attention: XLA's dense path or cuDNN's fused (flash) kernel.

``jax.nn.dot_product_attention`` defaults to XLA, which builds the [B, H, T, S] scores in
memory and masks them densely. On an NVIDIA GPU, ``implementation="cudnn"`` runs cuDNN's
fused kernel instead: the scores never leave the chip, and with ``is_causal`` the blocks above
the diagonal are skipped. lorax passes both paths the same boolean mask (causal, packed
segments, padding: the fused kernel receives it as a [B, 1, T, S] additive bias) and, for
self-attention whose mask lies inside the lower triangle, the causal hint on top, which
changes nothing in the result. XLA applies the hint too (as one more mask), so on a CPU
``tests/test_step_paths.py`` checks it against every mask the models build: a hint that
were wrong for one of them would change that model's output.

A causal-LM batch of whole rows (no ``segment_ids``: no packing, no padding) passes no mask at
all, only the hint, which the fused kernel runs with no bias to read and no bias gradient to
compute (JAX 0.10's cuDNN path, `should_export_dbias`, computes one whenever a bias is given).

``model.attention`` chooses: ``"auto"`` takes cuDNN on a GPU where a probe of the model's own
head shapes and dtype compiles and runs (forward and gradients), else XLA; ``"xla"`` and
``"cudnn"`` force one (``"cudnn"`` where it cannot run is an error naming why). The choice is
made for the platform the step is compiled for: the host's backend, or the GPUs a plan
describes (``lorax.plan``), where no GPU is present to run the probe: there ``"auto"`` takes
cuDNN for a bfloat16/float16 model unprobed (:func:`probed` says so), and the GPU compiler's
own checks of the fused kernel's shapes remain.

A multi-adapter job (``lorax.multi``) vmaps its step over the K adapters, and JAX
0.10's batching rule of the fused kernel (``_dot_product_attention_fwd_batcher`` and
``_bwd_batcher`` in ``jax/_src/cudnn/fused_attention_stablehlo.py``) reshapes a batched bias to
[K·B, H, T, S]: our [K, B, 1, T, S] mask-as-bias (one head row, broadcast over the heads) cannot
take that shape, so a masked row (packed segments, padding) failed to trace. Inside
:func:`vmapped` (the multi-adapter step is traced in it) a masked cuDNN call therefore goes
through :func:`folded`: its own batching rule folds the vmapped axes into the batch axis
([K, B, ...] -> [K·B, ...]) and calls the kernel on 4-D operands, whose bias keeps its one head
row; its gradient is a custom VJP whose backward pass, batched the same way, runs the fused
forward again and then the fused backward (one more fused forward per layer and step, in
multi-adapter jobs with masked rows only).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading

import jax
import jax.numpy as jnp

CHOICES = ("auto", "xla", "cudnn")


def attend(q_BTHE, k_BSKE, v_BSKE, mask_B1TS, *, implementation: str, causal: bool):
    """Scaled dot-product attention with the chosen kernel.

    Args:
      q_BTHE, k_BSKE, v_BSKE: queries, keys and values (K divides H: grouped-query).
      mask_B1TS: True where a query may attend (or None).
      implementation: "xla" or "cudnn" (resolved by :func:`choose`).
      causal: the mask lies inside the lower triangle (self-attention, T == S): the fused
        kernel may skip the blocks above the diagonal.
    """
    if mask_B1TS is not None and implementation == "cudnn" and getattr(_VMAPPED, "depth", 0):
        return folded(q_BTHE, k_BSKE, v_BSKE, mask_B1TS, implementation=implementation,
                      causal=causal)  # fmt: skip
    return jax.nn.dot_product_attention(
        q_BTHE, k_BSKE, v_BSKE, mask=mask_B1TS, is_causal=causal, implementation=implementation
    )


_VMAPPED = threading.local()  # .depth: set per thread by vmapped(), 0 where never set


@contextlib.contextmanager
def vmapped():
    """Attention traced inside this block may be batched by ``jax.vmap`` (the multi-adapter
    step): a masked fused call takes :func:`folded`'s batching-safe form."""
    _VMAPPED.depth = getattr(_VMAPPED, "depth", 0) + 1
    try:
        yield
    finally:
        _VMAPPED.depth -= 1


def folded(q_BTHE, k_BSKE, v_BSKE, mask_B1TS, *, implementation: str, causal: bool):
    """:func:`attend` with a mask, the same values and gradients, whose ``jax.vmap`` folds the
    mapped axes into the batch axis before the kernel sees them (any ``implementation``: on a
    CPU, ``"xla"`` checks the folding)."""
    b = q_BTHE.shape[0]
    mask = jnp.broadcast_to(mask_B1TS, (b, *mask_B1TS.shape[1:]))  # one per row, to fold
    return _folded_attention(implementation, causal)(q_BTHE, k_BSKE, v_BSKE, mask)


def _fold_rule(fn):
    """A ``custom_vmap`` rule calling ``fn`` on the arguments with the mapped axis folded into
    their leading (batch) axis (an unmapped argument broadcast first), every output unfolded."""

    def rule(axis_size, in_batched, *args):
        mapped = [
            x if m else jnp.broadcast_to(x, (axis_size, *x.shape))
            for x, m in zip(args, in_batched, strict=True)
        ]
        flat = [x.reshape(axis_size * x.shape[1], *x.shape[2:]) for x in mapped]
        outs = fn(*flat)
        unfold = lambda y: y.reshape(axis_size, y.shape[0] // axis_size, *y.shape[1:])  # noqa: E731
        return jax.tree_util.tree_map(unfold, outs), jax.tree_util.tree_map(lambda _: True, outs)

    return rule


@functools.cache
def _folded_attention(implementation: str, causal: bool):
    def plain(q, k, v, mask):
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=causal, implementation=implementation
        )

    @jax.custom_batching.custom_vmap
    def forward(q, k, v, mask):
        return plain(q, k, v, mask)

    forward.def_vmap(_fold_rule(forward))  # nested vmaps fold one axis at a time

    @jax.custom_batching.custom_vmap
    def backward(q, k, v, mask, g):
        return jax.vjp(lambda q, k, v: plain(q, k, v, mask), q, k, v)[1](g)

    backward.def_vmap(_fold_rule(backward))

    @jax.custom_vjp
    def attention(q, k, v, mask):
        return forward(q, k, v, mask)

    def fwd(q, k, v, mask):
        return forward(q, k, v, mask), (q, k, v, mask)

    def bwd(res, g):
        q, k, v, mask = res
        return (*backward(q, k, v, mask, g), None)

    attention.defvjp(fwd, bwd)
    return attention


def choose(
    requested: str,
    dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    platform: str | None = None,
) -> str:
    """``model.attention`` resolved for ``platform`` (default: the host's backend) and these
    shapes: "xla" or "cudnn"."""
    if requested not in CHOICES:
        raise ValueError(f"model.attention = {requested!r}; choose one of {list(CHOICES)}")
    if requested == "xla":
        return "xla"
    platform = platform or jax.default_backend()
    why = _cudnn_unavailable(jnp.dtype(dtype).name, num_heads, num_kv_heads, head_dim, platform)
    if why is None:
        return "cudnn"
    if requested == "cudnn":
        raise ValueError(
            f"model.attention = 'cudnn' cannot run here: {why}; use 'auto' (cuDNN where it "
            f"runs, else XLA) or 'xla'"
        )
    return "xla"


def probed(platform: str) -> bool:
    """Whether an ``"auto"`` choice for ``platform`` ran the cuDNN probe: only where the host
    itself has that platform (not for the GPUs of a plan made without one)."""
    return platform == jax.default_backend()


@functools.cache
def _cudnn_unavailable(
    dtype: str, heads: int, kv_heads: int, head_dim: int, platform: str
) -> str | None:
    """Why cuDNN's fused attention cannot run these shapes on ``platform``, or None when it can.

    Cheap answers first (platform, dtype); then, where the host has a GPU, a probe: a 256-token
    causal attention with a mask and without one, and a padded non-causal one, forward and
    gradients, compiled and run once per shape.
    """
    if platform != "gpu":
        return f"the backend is {platform!r} (cuDNN needs an NVIDIA GPU)"
    if dtype not in ("bfloat16", "float16"):
        return f"model.dtype is {dtype!r} (the fused kernel takes bfloat16 or float16)"
    if not probed(platform):  # GPUs described, not present: nothing to run the probe on
        return None
    t = 256
    q = jnp.ones((2, t, heads, head_dim), dtype)
    kv = jnp.ones((2, t, kv_heads, head_dim), dtype)
    # Masks shaped as the models pass them, [B, 1, T, S]: causal (packed rows look alike) and
    # key padding (the encoders').
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (2, 1, t, t))
    keys = jnp.arange(t)[None, :] < jnp.array([t, t // 2])[:, None]
    padded = jnp.broadcast_to(keys[:, None, None, :], (2, 1, t, t))

    def loss(q, k, v):
        total = 0.0
        for mask, is_causal in ((causal, True), (None, True), (padded, False)):
            out = attend(q, k, v, mask, implementation="cudnn", causal=is_causal)
            total = total + out.astype(jnp.float32).sum()
        return total

    try:
        jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, kv, kv))
    except Exception as err:  # any failure means: not here, for these shapes
        why = f"cuDNN's fused attention failed on these shapes: {str(err).splitlines()[0]}"
        logging.getLogger(__name__).warning("model.attention 'auto' takes XLA's: %s", why)
        return why
    return None
