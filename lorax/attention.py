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
"""

from __future__ import annotations

import functools
import logging

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
    return jax.nn.dot_product_attention(
        q_BTHE, k_BSKE, v_BSKE, mask=mask_B1TS, is_causal=causal, implementation=implementation
    )


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
