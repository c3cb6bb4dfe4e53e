"""Dense, embedding and attention building blocks that understand LoraWeight and quantized kernels.

Shape letters: B batch, T query length, S key length, D model width, H heads, K kv heads,
E head width, F output width, R LoRA rank, V vocabulary.

A kernel may be a plain array, a :class:`~lorax.quant.QuantizedWeight` (dequantized to the
compute dtype inside the step, just before its matmul), or a LoRA node whose base ``w`` is
either; LoRA on a quantized base is QLoRA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorax import attention, quant, sharding
from lorax.kernels import (
    BankedLoraWeight,
    Bottleneck,
    DoraWeight,
    LoraWeight,
    WrappedKernel,
    column_norms,
)

Initializer = Callable[..., jax.Array]

# model.remat: what each layer keeps from its forward pass for the backward pass.
REMAT = {
    "none": "every intermediate (nothing recomputed)",
    "block_inputs": "only each layer's input; the whole layer is recomputed in the backward pass",
    "dots": "the outputs of the weight matmuls (projections, MLP); attention scores, softmax, "
    "norms and activations recomputed",
}


def remat_name(value: str | bool) -> str:
    """``model.remat`` as a name of :data:`REMAT` (older configs' False / True mean "none" /
    "block_inputs"); an error names the field and the valid names."""
    if isinstance(value, bool):
        return "block_inputs" if value else "none"
    if value not in REMAT:
        raise ValueError(
            f"model.remat = {value!r} is not valid; choose one of {list(REMAT)} (or True / False "
            f"for 'block_inputs' / 'none')"
        )
    return value


def gathered(target, gather: Callable[[Any], Any] | None, scope: str = "", methods=None):
    """``target`` (a Module class) reading its params through ``gather`` (e.g. the FSDP
    all-gather of :func:`lorax.sharding.layer_gather`), or ``target`` itself when ``gather``
    is None. Only for applying a model: its params must exist already (not under ``init``).

    ``gather`` sees the params under ``scope`` (the module's name, e.g. "lm_head", for rules
    that name it), or as they are (``attn/q/kernel``: a layer's rules match anywhere).
    """
    if gather is None:
        return target

    def trans_in(variables):
        params = variables["params"]
        params = gather({scope: params})[scope] if scope else gather(params)
        return {**variables, "params": params}

    return nn.map_variables(target, "params", trans_in_fn=trans_in, mutable=False, methods=methods)


def layer(target, gather, remat: str | bool, regather: bool, prevent_cse: bool = True):
    """``target`` (a layer's Module class) as a model runs each layer: reading its params
    through ``gather`` (:func:`gathered`) inside a checkpoint with the ``remat`` policy
    (:func:`remat_policy`), so a layer that gathers its weights again in the backward pass
    (``regather``) does so inside the checkpoint. ``prevent_cse``: as ``jax.checkpoint``'s
    (False under ``nn.scan``, whose loop already keeps the passes apart)."""
    policy = remat_policy(remat, regather=gather is not None and regather)
    block = gathered(target, gather)
    return block if policy is None else nn.remat(block, prevent_cse=prevent_cse, policy=policy)


def _anything_but_gathered(prim, *_, **params) -> bool:
    # Everything saveable except the gathered weights; a sharding constraint's or a cast's
    # output is recomputed too, else a gathered weight (or its cast copy) is saved through it.
    if prim.name == "name":
        return params.get("name") != sharding.GATHERED
    return prim.name not in ("sharding_constraint", "convert_element_type")


def remat_policy(remat: str | bool, regather: bool = False) -> Callable | None:
    """The ``jax.checkpoint`` policy of one layer for ``model.remat`` (:data:`REMAT`), or None
    for no checkpoint at all.

    Args:
      remat: a :data:`REMAT` name (or a bool, see :func:`remat_name`).
      regather: the layer all-gathers FSDP-split weights (tagged
        :data:`lorax.sharding.GATHERED`) and must gather them again in the backward pass
        rather than keep them (ZeRO-3). False keeps them (saved like any residual), which
        costs a layer's gathered weights per layer.
    """
    name = remat_name(remat)
    policies = jax.checkpoint_policies
    if name == "none":
        return _anything_but_gathered if regather else None
    base = {
        "block_inputs": policies.nothing_saveable,
        "dots": policies.dots_with_no_batch_dims_saveable,
    }[name]
    if regather:
        return base
    return policies.save_from_both_policies(base, policies.save_only_these_names(sharding.GATHERED))


def _lora_dropout(module: nn.Module, x: jax.Array, rate: float, deterministic: bool):
    """Dropout on the input of the low-rank branch only (as in the LoRA paper's code)."""
    if rate == 0.0 or deterministic:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def take_rows(table: Any, ids: jax.Array, dtype) -> jax.Array:
    """``table[ids]`` in ``dtype`` for a plain or quantized table [V, D].

    A quantized table whose rows are whole blocks has just the needed rows' codes gathered
    and dequantized; otherwise (blocks that straddle rows) the whole table is dequantized.
    """
    if not quant.is_quantized(table):
        return jnp.take(jnp.asarray(table), ids, axis=0).astype(dtype)
    v, d = table.shape
    if table.codes.ndim == 1 and d % table.block == 0:
        rows = quant.QuantizedWeight(
            jnp.take(table.codes.reshape(v, -1), ids, axis=0),
            jnp.take(table.scales.reshape(v, -1), ids, axis=0),
            table.kind,
            table.block,
            (d,),
            table.dtype,
        )
        return quant.dequantize(rows, dtype)
    return jnp.take(quant.dequantize(table, dtype), ids, axis=0)


def base_matmul(x_BxD: jax.Array, w: Any, transpose: bool = False) -> jax.Array:
    """``x@w`` (``x@wᵀ`` with ``transpose``) in ``x``'s dtype, for a plain or quantized ``w``.

    A quantized ``w`` is dequantized under ``jax.checkpoint``: the backward pass dequantizes
    it again rather than saving the dense kernel as a residual, at the price of a second
    dequantize. Under ``nn.scan`` this is what keeps the dense kernels of every layer from
    being stacked for the backward pass (SmolLM2-135M, scanned, grad w.r.t. a q,v delta:
    405 MiB less XLA temp memory than without it, i.e. the whole dense base).
    """
    if not quant.is_quantized(w):
        w = jnp.asarray(w).astype(x_BxD.dtype)
        return x_BxD @ (w.T if transpose else w)

    @jax.checkpoint
    def matmul(x_BxD, w):
        w_DF = quant.dequantize(w, x_BxD.dtype)
        return x_BxD @ (w_DF.T if transpose else w_DF)

    return matmul(x_BxD, w)


def kernel_param(module: nn.Module, name: str, init: Initializer, shape, dtype) -> Any:
    """``module.param(name, init, shape, dtype)`` that also accepts a quantized kernel.

    Flax checks a param's shape by its first leaf, which for a QuantizedWeight (or a LoRA
    node over one) is the packed codes; such a kernel is checked by its dense shape here.
    """
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        base = value.w if isinstance(value, WrappedKernel) else value
        if quant.is_quantized(base):
            if tuple(base.shape) != tuple(shape):
                raise ValueError(
                    f"quantized param {name!r} of {module.scope.path_text or '/'} has shape "
                    f"{tuple(base.shape)}; the module needs {tuple(shape)}"
                )
            return value
    return module.param(name, init, shape, dtype)


def lora_matmul(module: nn.Module, x_BxD: jax.Array, kernel: Any, dtype, deterministic: bool):
    """``x@w`` for a plain kernel; ``x@w + scale·(drop(x)@a)@b`` for a LoraWeight.

    The low-rank branch is two skinny matmuls, never the dense ``w + a@b``. Any ``w`` may be
    a QuantizedWeight (see :func:`base_matmul`).
    """
    x_BxD = x_BxD.astype(dtype)
    if isinstance(kernel, BankedLoraWeight):  # one adapter per batch row, gathered
        y_BxF = base_matmul(x_BxD, kernel.w)
        a_BDR = jnp.take(kernel.a, kernel.ids, axis=0).astype(dtype)
        b_BRF = jnp.take(kernel.b, kernel.ids, axis=0).astype(dtype)
        z_BxR = jnp.einsum("b...d,bdr->b...r", x_BxD, a_BDR)
        return y_BxF + jnp.einsum("b...r,brf->b...f", z_BxR, b_BRF).astype(y_BxF.dtype)
    if isinstance(kernel, DoraWeight):
        return dora_matmul(module, x_BxD, kernel, dtype, deterministic)
    if not isinstance(kernel, LoraWeight):
        return base_matmul(x_BxD, kernel)
    y_BxF = base_matmul(x_BxD, kernel.w)
    xd_BxD = _lora_dropout(module, x_BxD, kernel.dropout, deterministic)
    z_BxR = xd_BxD @ kernel.a.astype(dtype)
    return y_BxF + (kernel.scale * (z_BxR @ kernel.b.astype(dtype))).astype(y_BxF.dtype)


def dora_matmul(module: nn.Module, x_BxD: jax.Array, kernel: DoraWeight, dtype, deterministic):
    """``x`` through a DoRA kernel, unmerged: ``g·(x@w + scale·(x@a)@b)`` with the per-column
    ``g = m / ‖w + scale·a@b‖`` (the norm from the factors, :func:`column_norms`, and held
    constant in the backward pass). With LoRA dropout active the base term of the correction
    sees the dropped input, as PEFT computes it: ``x@w + (g-1)·(x̃@w) + g·scale·(x̃@a)@b``."""
    norm_F = jax.lax.stop_gradient(column_norms(kernel.w, kernel.a, kernel.b, kernel.scale))
    g_F = (kernel.m.astype(jnp.float32) / norm_F).astype(dtype)
    y_BxF = base_matmul(x_BxD, kernel.w)
    xd_BxD = _lora_dropout(module, x_BxD, kernel.dropout, deterministic)
    lora_BxF = kernel.scale * ((xd_BxD @ kernel.a.astype(dtype)) @ kernel.b.astype(dtype))
    if xd_BxD is x_BxD:
        return g_F * (y_BxF + lora_BxF.astype(y_BxF.dtype))
    return y_BxF + (g_F - 1) * base_matmul(xd_BxD, kernel.w) + g_F * lora_BxF.astype(y_BxF.dtype)


class Dense(nn.Module):
    """``y = x@kernel + bias`` with kernel [D, F]; the kernel may be a LoraWeight.

    A :class:`~lorax.kernels.Bottleneck` kernel adds its adapter to ``y`` (after the bias).

    Attributes:
      features: F.
      use_bias: whether to add a bias [F].
      dtype: compute dtype (params are cast to it; a bf16 base is thus fine).
      param_dtype: dtype of freshly initialised params.
    """

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kernel = kernel_param(
            self, "kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype
        )
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        return apply_kernel(self, x, kernel, bias, self.dtype, deterministic)


def apply_kernel(module: nn.Module, x: jax.Array, kernel: Any, bias, dtype, deterministic: bool):
    """What :class:`Dense` computes from its params: ``x@kernel (+ bias)``, where the kernel
    may be plain, quantized, a LoRA node or a Bottleneck (whose adapter is added last)."""
    adapter = kernel if isinstance(kernel, Bottleneck) else None
    if adapter is not None:
        kernel = adapter.w
    y = lora_matmul(module, x, kernel, dtype, deterministic)
    if bias is not None:
        y = y + jnp.asarray(bias).astype(dtype)
    return y if adapter is None else adapter.adapt(y, dtype)


class Embed(nn.Module):
    """Token embedding [V, D]; the table may be a LoraWeight (rows of ``a`` are gathered).

    ``attend`` multiplies by the transposed table: the output layer of a model with tied
    embeddings (GPT-2, SmolLM2).
    """

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(stddev=0.02)

    def setup(self):
        self.embedding = kernel_param(
            self,
            "embedding",
            self.embedding_init,
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.embedding
        if isinstance(table, BankedLoraWeight):
            raise ValueError("an adapter bank cannot adapt the embedding table; merge it instead")
        if isinstance(table, LoraWeight):
            y = take_rows(table.w, ids, self.dtype)
            z = jnp.take(table.a, ids, axis=0).astype(self.dtype)
            return y + table.scale * (z @ table.b.astype(self.dtype))
        return take_rows(table, ids, self.dtype)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """``x @ tableᵀ`` [.., V] (:func:`attend`)."""
        return attend(self.embedding, x_BTD, self.dtype)


def attend(table: Any, x_BTD: jax.Array, dtype) -> jax.Array:
    """``x @ tableᵀ`` [.., V] for an embedding table [V, D] (plain or quantized); for a
    LoraWeight table ``x@wᵀ + scale·(x@bᵀ)@aᵀ``. The tied output layer of GPT-2 and SmolLM2."""
    x_BTD = x_BTD.astype(dtype)
    if isinstance(table, BankedLoraWeight):
        raise ValueError("an adapter bank cannot adapt the embedding table; merge it instead")
    if isinstance(table, LoraWeight):
        y = base_matmul(x_BTD, table.w, transpose=True)
        z = x_BTD @ table.b.astype(dtype).T
        return y + table.scale * (z @ table.a.astype(dtype).T)
    return base_matmul(x_BTD, table, transpose=True)


def _with_prefix(prefix, k_BSKE, v_BSKE, mask_B1TS):
    """Prepends ``prefix["k"]``, ``prefix["v"]`` [P, K·E] to every row's keys and values.

    Every query sees every prefix position, so the mask gains P True columns in front.
    """
    b, _, kv, e = k_BSKE.shape
    parts = []
    for name, x_BSKE in (("k", k_BSKE), ("v", v_BSKE)):
        p_PKE = jnp.asarray(prefix[name]).astype(x_BSKE.dtype).reshape(-1, kv, e)
        p_BPKE = jnp.broadcast_to(p_PKE[None], (b, *p_PKE.shape))
        parts.append(jnp.concatenate([p_BPKE, x_BSKE], axis=1))
    if mask_B1TS is not None:
        p = parts[0].shape[1] - k_BSKE.shape[1]
        seen = jnp.ones((*mask_B1TS.shape[:-1], p), bool)
        mask_B1TS = jnp.concatenate([seen, mask_B1TS], axis=-1)
    return parts[0], parts[1], mask_B1TS


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) attention with separate q, k, v, o kernels.

    The q/k/v/o kernels are 2-D ([D, H·E], [D, K·E], [D, K·E], [H·E, D]), so LoRA adapts
    each as one matrix, exactly as the paper's Wq, Wk, Wv, Wo.

    Attributes:
      num_heads: H.
      head_dim: E.
      num_kv_heads: K (defaults to H; K < H is grouped-query attention).
      use_bias: biases on q, k, v (BERT and GPT-2 have them, Qwen2 too; Llama does not).
      o_bias: bias on o; None follows ``use_bias`` (Qwen2 has q/k/v biases but none on o).
      dtype: compute dtype.
      implementation: the attention kernel, "xla" or "cudnn" (:mod:`lorax.attention`); a
        cached decode and prefix keys always take XLA's.
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    use_bias: bool = True
    o_bias: bool | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    implementation: str = "xla"

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        mask_BTS: jax.Array | None = None,
        deterministic: bool = True,
        rope: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None,
        kv_cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
        causal: bool = False,
    ):
        """Self-attention over ``x_BTD``; ``mask_BTS`` is True where a query may attend.

        Args:
          x_BTD: the layer input.
          mask_BTS: which keys each query sees (S = T without a cache, the cache length with);
            None: every key (with ``causal``: every earlier key).
          deterministic: False turns on LoRA dropout (from the "dropout" rng).
          rope: applied to (q, k) before attention (and before k enters the cache).
          kv_cache: ``(k_BSKE, v_BSKE, index)``: this call's keys and values are written at
            slots ``index .. index+T-1`` and the queries attend over the whole cache.
          causal: ``mask_BTS`` lies inside the lower triangle (causal self-attention): a hint
            the fused kernel uses to skip work; the result is the mask's either way.

        Returns:
          ``y_BTD`` without a cache; ``(y_BTD, (k_BSKE, v_BSKE))`` with one.
        """
        h, e = self.num_heads, self.head_dim
        kv = self.num_kv_heads or h

        def dense(features, name, use_bias):
            return Dense(
                features, use_bias, self.dtype, self.param_dtype, self.kernel_init, name=name
            )

        b, t, _ = x_BTD.shape
        q_BTHE = dense(h * e, "q", self.use_bias)(x_BTD, deterministic).reshape(b, t, h, e)
        k_BTKE = dense(kv * e, "k", self.use_bias)(x_BTD, deterministic).reshape(b, t, kv, e)
        v_BTKE = dense(kv * e, "v", self.use_bias)(x_BTD, deterministic).reshape(b, t, kv, e)
        if rope is not None:
            q_BTHE, k_BTKE = rope(q_BTHE, k_BTKE)
        if kv_cache is not None:
            k_cache, v_cache, index = kv_cache
            k_BTKE = jax.lax.dynamic_update_slice_in_dim(
                k_cache, k_BTKE.astype(k_cache.dtype), index, axis=1
            )
            v_BTKE = jax.lax.dynamic_update_slice_in_dim(
                v_cache, v_BTKE.astype(v_cache.dtype), index, axis=1
            )
        mask = None if mask_BTS is None else mask_BTS[:, None, :, :]
        keys, values = k_BTKE, v_BTKE
        prefixed = self.has_variable("params", "prefix")
        if mask is None and causal and prefixed:  # "causal, no mask" made explicit for the
            mask = jnp.tril(jnp.ones((t, t), bool))[None, None]  # prefix columns to extend
        if prefixed:  # prefix tuning: P more keys and values
            prefix = self.get_variable("params", "prefix")
            keys, values, mask = _with_prefix(prefix, keys, values, mask)
        # The queries' own keys only (T == S): the one case the fused kernel and the hint serve.
        own_keys = kv_cache is None and not prefixed
        out_BTHE = attention.attend(
            q_BTHE,
            keys.astype(q_BTHE.dtype),
            values.astype(q_BTHE.dtype),
            mask,
            implementation=self.implementation if own_keys else "xla",
            causal=causal and own_keys,
        )
        o_bias = self.use_bias if self.o_bias is None else self.o_bias
        y_BTD = dense(x_BTD.shape[-1], "o", o_bias)(out_BTHE.reshape(b, t, h * e), deterministic)
        if kv_cache is None:
            return y_BTD
        return y_BTD, (k_BTKE, v_BTKE)
