"""Causal decoder LMs — Llama / SmolLM / Qwen2 and GPT-2 — in the canonical param layout.

Shape letters: B batch, T tokens, S keys (cache slots), D width, F feed-forward width,
H query heads, K key/value heads, E head width, L layers, V vocabulary.

Param layout (what lorax.lora's canonical target names match)::

    embed/token/embedding [V, D]            embed/position/embedding [P, D]   (GPT-2)
    layers_i/attn_norm/scale (+bias)        layers_i/attn/{q,k,v,o}/kernel (+bias)
    layers_i/mlp_norm/scale (+bias)         layers_i/mlp/{mlp_gate,mlp_in,mlp_out}/kernel (+bias)
    final_norm/scale (+bias)                lm_head/kernel [D, V]              (untied only)
    score/kernel [D, 1]                     (a reward model's head: lorax.models.reward)

With ``scan=True`` the layers are one ``nn.scan`` module and their params live under
``layers/...`` with a leading [L] axis; :func:`lorax.paths.stack_layers` converts.
Llama's MLP is ``mlp_out(act(mlp_gate(x)) * mlp_in(x))`` (gate_proj, up_proj, down_proj).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorax import nn as lnn
from lorax import paths
from lorax.models import hf_fields

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
NORMS = ("rms", "layer")
POSITIONS = ("rope", "learned")
MLPS = ("swiglu", "dense")
LLAMA_TYPES = ("llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyperparameters of a causal decoder; :meth:`from_hf` reads Hugging Face configs.

    Attributes:
      family: "llama" (Llama, SmolLM, Qwen2) or "gpt2"; names the loader's name table.
      norm: "rms" (RMSNorm, Llama) or "layer" (LayerNorm with bias, GPT-2).
      positions: "rope" (rotate-half RoPE, Hugging Face layout) or "learned" (GPT-2).
      mlp: "swiglu" (gate, up, down) or "dense" (in, activation, out).
      rope_scaling: Hugging Face's ``rope_scaling`` dict for Llama 3's "llama3" scaling.
      dropout: residual and embedding dropout when training (GPT-2 uses 0.1; Llama 0).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    family: str = "llama"
    norm: str = "rms"
    norm_eps: float = 1e-5
    positions: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    mlp: str = "swiglu"
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        for field, value, valid in (
            ("norm", self.norm, NORMS),
            ("positions", self.positions, POSITIONS),
            ("mlp", self.mlp, MLPS),
            ("activation", self.activation, tuple(ACTIVATIONS)),
        ):
            if value not in valid:
                raise ValueError(f"decoder {field} = {value!r} is not valid; choose one of {valid}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                f"{self.num_kv_heads} (grouped-query attention needs whole groups)"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        scaling = dict(self.rope_scaling or {})
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(
                f"rope_scaling type {kind!r} is not supported; supported: 'default', 'llama3'"
            )

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> DecoderConfig:
        """Reads a Hugging Face ``config.json`` dict of a Llama, Qwen2 or GPT-2 model."""
        model_type = d.get("model_type")
        if model_type == "gpt2":
            hf_fields.check(d, "gpt2")
            return cls._from_gpt2(d)
        if model_type not in LLAMA_TYPES:
            raise ValueError(
                f"config.json model_type {model_type!r} is not a supported decoder; "
                f"supported: {[*LLAMA_TYPES, 'gpt2']}"
            )
        need = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
        _require(d, need, model_type)
        hf_fields.check(d, model_type)
        heads = int(d["num_attention_heads"])
        qwen = model_type == "qwen2"
        scaling = d.get("rope_scaling") or d.get("rope_parameters")
        if scaling is not None:
            scaling = tuple(sorted((k, v) for k, v in dict(scaling).items() if k != "rope_theta"))
            if dict(scaling).get("rope_type", dict(scaling).get("type", "default")) == "default":
                scaling = None
        theta = d.get("rope_theta") or dict(d.get("rope_parameters") or {}).get("rope_theta")
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            intermediate_size=int(d["intermediate_size"]),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            family="llama",
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta or 10000.0),
            rope_scaling=scaling,
            activation=str(d.get("hidden_act", "silu")),
            qkv_bias=True if qwen else bool(d.get("attention_bias", False)),
            o_bias=False if qwen else bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=_token_id(d.get("bos_token_id")),
            eos_token_id=_token_id(d.get("eos_token_id")),
        )

    @classmethod
    def _from_gpt2(cls, d: Mapping[str, Any]) -> DecoderConfig:
        _require(d, ("vocab_size", "n_embd", "n_layer", "n_head"), "gpt2")
        width, heads = int(d["n_embd"]), int(d["n_head"])
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=width,
            num_layers=int(d["n_layer"]),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=width // heads,
            intermediate_size=int(d.get("n_inner") or 4 * width),
            max_position_embeddings=int(d.get("n_positions", 1024)),
            family="gpt2",
            norm="layer",
            norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
            positions="learned",
            mlp="dense",
            activation=str(d.get("activation_function", "gelu_new")),
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            tie_embeddings=True,
            dropout=float(d.get("resid_pdrop", 0.1)),
            bos_token_id=_token_id(d.get("bos_token_id")),
            eos_token_id=_token_id(d.get("eos_token_id")),
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict of this model (``from_hf`` reads it back).

        Llama-family models with q/k/v biases and no o bias are written as Qwen2.
        """
        common = {"vocab_size": self.vocab_size, "torch_dtype": "float32"}
        if self.family == "gpt2":
            return {
                **common,
                "model_type": "gpt2",
                "architectures": ["GPT2LMHeadModel"],
                "n_embd": self.hidden_size,
                "n_layer": self.num_layers,
                "n_head": self.num_heads,
                "n_inner": self.intermediate_size,
                "n_positions": self.max_position_embeddings,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": self.activation,
                "resid_pdrop": self.dropout,
                "embd_pdrop": self.dropout,
                "attn_pdrop": self.dropout,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
            }
        qwen = self.qkv_bias and not self.o_bias
        out = {
            **common,
            "model_type": "qwen2" if qwen else "llama",
            "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "hidden_act": self.activation,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if not qwen:
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        return out

    def num_params(self) -> int:
        """Parameter count of the :class:`Decoder` (tied embeddings counted once)."""
        return sum(math.prod(s) for s in param_shapes(self).values())


def _require(d: Mapping[str, Any], keys, model_type) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"config.json lacks {missing}; a {model_type} config needs {list(keys)}")


def _token_id(value) -> int | None:
    if isinstance(value, list | tuple):  # Llama 3 lists several eos ids; the first is the main
        value = value[0] if value else None
    return None if value is None else int(value)


# --------------------------------------------------------------------------- RoPE


def rope_frequencies(config: DecoderConfig) -> jax.Array:
    """Inverse frequencies [E/2] of rotate-half RoPE, with Llama 3's scaling when configured."""
    e = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    scaling = dict(config.rope_scaling or {})
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = jnp.where(
            wavelen > old_len / low,
            inv_freq / factor,
            jnp.where(wavelen < old_len / high, inv_freq, blended),
        )
    return inv_freq


def apply_rope(x_BTHE: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates each head's halves by position·frequency (Hugging Face's rotate-half layout).

    Computed in fp32 and cast back, as transformers does.
    """
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos_BT1E = jnp.cos(jnp.concatenate([angles_BTF, angles_BTF], -1))[:, :, None, :]
    sin_BT1E = jnp.sin(jnp.concatenate([angles_BTF, angles_BTF], -1))[:, :, None, :]
    x = x_BTHE.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos_BT1E + rotated * sin_BT1E).astype(x_BTHE.dtype)


# --------------------------------------------------------------------------- masks


def causal_mask(segment_ids_BT: jax.Array) -> jax.Array:
    """[B, T, T] True where query t may see key s: same packed segment, s <= t, not padding.

    Padding queries (segment 0) see themselves only, so no softmax row is empty.
    """
    seg = segment_ids_BT
    t = seg.shape[1]
    causal_TT = jnp.tril(jnp.ones((t, t), bool))
    same_BTS = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    return (same_BTS & causal_TT) | jnp.eye(t, dtype=bool)


def cache_mask(valid_BS: jax.Array, index: jax.Array, t: int) -> jax.Array:
    """[B, T, S] for T queries written at cache slots ``index..index+T-1``.

    A query at slot ``index + t`` sees slots ``<= index + t`` that hold real tokens
    (``valid_BS``: False for a prompt's left padding).
    """
    s = valid_BS.shape[1]
    query_T1 = index + jnp.arange(t)[:, None]
    causal_TS = jnp.arange(s)[None, :] <= query_T1
    return causal_TS[None] & valid_BS[:, None, :] | (jnp.arange(s)[None, None, :] == query_T1)


# --------------------------------------------------------------------------- modules


def _norm(config: DecoderConfig, dtype, name: str) -> nn.Module:
    if config.norm == "rms":
        return nn.RMSNorm(epsilon=config.norm_eps, dtype=dtype, name=name)
    return nn.LayerNorm(epsilon=config.norm_eps, dtype=dtype, name=name)


class _Mlp(nn.Module):
    """SwiGLU ``mlp_out(act(mlp_gate(x)) * mlp_in(x))`` or ``mlp_out(act(mlp_in(x)))``."""

    config: DecoderConfig
    dtype: Any

    @nn.compact
    def __call__(self, x_BTD, deterministic):
        c = self.config
        act = ACTIVATIONS[c.activation]

        def dense(features, name):
            return lnn.Dense(features, c.mlp_bias, dtype=self.dtype, name=name)

        h_BTF = dense(c.intermediate_size, "mlp_in")(x_BTD, deterministic)
        if c.mlp == "swiglu":
            h_BTF = act(dense(c.intermediate_size, "mlp_gate")(x_BTD, deterministic)) * h_BTF
        else:
            h_BTF = act(h_BTF)
        return dense(c.hidden_size, "mlp_out")(h_BTF, deterministic)


class Block(nn.Module):
    """One pre-norm layer: ``x += attn(norm(x)); x += mlp(norm(x))``.

    Called as ``(x, cache) -> (x, cache)`` with positions and mask broadcast, the shape
    ``nn.scan`` wants; ``cache`` is None or this layer's ``(k_BSKE, v_BSKE, index)``.
    """

    config: DecoderConfig
    dtype: Any
    deterministic: bool = True
    attention: str = "xla"

    @nn.compact
    def __call__(self, x_BTD, cache, positions_BT, mask_BTS):
        c = self.config
        rope = None
        if c.positions == "rope":
            inv_freq = rope_frequencies(c)

            def rope(q, k):
                return apply_rope(q, positions_BT, inv_freq), apply_rope(k, positions_BT, inv_freq)

        attn = lnn.Attention(
            c.num_heads,
            c.head_dim,
            c.num_kv_heads,
            use_bias=c.qkv_bias,
            o_bias=c.o_bias,
            dtype=self.dtype,
            implementation=self.attention,
            name="attn",
        )
        drop = nn.Dropout(c.dropout, deterministic=self.deterministic)
        h_BTD = _norm(c, self.dtype, "attn_norm")(x_BTD)
        if cache is None:  # causal_mask (and a soft prompt's) lies inside the lower triangle
            h_BTD = attn(h_BTD, mask_BTS, self.deterministic, rope, causal=True)
            new_cache = None
        else:
            h_BTD, (k, v) = attn(h_BTD, mask_BTS, self.deterministic, rope, kv_cache=cache)
            new_cache = (k, v, cache[2])
        x_BTD = x_BTD + drop(h_BTD)
        h_BTD = _norm(c, self.dtype, "mlp_norm")(x_BTD)
        x_BTD = x_BTD + drop(_Mlp(c, self.dtype, name="mlp")(h_BTD, self.deterministic))
        return x_BTD, new_cache


class _Embeddings(nn.Module):
    """Token (+ learned position) embeddings; ``attend`` is the tied output layer."""

    config: DecoderConfig
    dtype: Any

    def setup(self):
        c = self.config
        self.token = lnn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype)
        if c.positions == "learned":
            self.position = lnn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype)

    def __call__(self, ids_BT, positions_BT):
        x_BTD = self.token(ids_BT)
        if self.config.positions == "learned":
            x_BTD = x_BTD + self.position(positions_BT)
        return x_BTD

    def attend(self, x_BTD):
        return self.token.attend(x_BTD)


def init_cache(
    config: DecoderConfig, batch: int, length: int, dtype=jnp.float32
) -> dict[str, jax.Array]:
    """An empty KV cache: ``{"k", "v"}`` [L, B, S, K, E] and ``"index"`` (next free slot)."""
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "index": jnp.zeros((), jnp.int32),
    }


def _with_prompt(prompt_PD, x_BTD, positions_BT, mask_BTS):
    """Puts a soft prompt [P, D] before every row (Lester et al. 2021).

    The prompt takes positions 0..P-1 and the tokens' positions move up by P; prompt
    positions see earlier prompt positions, and every token sees the whole prompt (each packed
    segment of a row, too) besides what ``mask_BTS`` lets it see.
    """
    b, t, d = x_BTD.shape
    p = prompt_PD.shape[0]
    if mask_BTS is None:  # whole rows: the causal mask made explicit, for the prompt to join
        mask_BTS = causal_mask(jnp.ones((b, t), jnp.int32))
    prompt_BPD = jnp.broadcast_to(jnp.asarray(prompt_PD, x_BTD.dtype)[None], (b, p, d))
    positions = jnp.broadcast_to(jnp.arange(p, dtype=positions_BT.dtype), (b, p))
    top_BPS = jnp.concatenate(
        [jnp.broadcast_to(jnp.tril(jnp.ones((p, p), bool)), (b, p, p)), jnp.zeros((b, p, t), bool)],
        axis=2,
    )
    bottom_BTS = jnp.concatenate([jnp.ones((b, t, p), bool), mask_BTS], axis=2)
    return (
        jnp.concatenate([prompt_BPD, x_BTD], axis=1),
        jnp.concatenate([positions, positions_BT + p], axis=1),
        jnp.concatenate([top_BPS, bottom_BTS], axis=1),
    )


def _check_inputs(c: DecoderConfig, length: int, prompt: int, cached: bool, no_mask: bool):
    """Raises for a soft prompt with a KV cache, a cached decode without its mask, or a
    sequence (prompt included) longer than learned position embeddings reach."""
    if cached and no_mask:
        raise ValueError("a cached decode needs its mask_BTS (decoder.cache_mask)")
    if prompt and cached:
        raise ValueError(
            "a soft prompt (method 'prompt' or 'ptuning') is not supported with a KV cache; "
            "score or train without one, or decode with a LoRA adapter"
        )
    if c.positions == "learned" and not cached and length + prompt > c.max_position_embeddings:
        raise ValueError(
            f"sequence length {length} (with a soft prompt of {prompt}) exceeds "
            f"max_position_embeddings {c.max_position_embeddings}"
        )


class Decoder(nn.Module):
    """A causal LM. ``__call__`` returns ``(logits_BTV in fp32, updated cache or None)``.

    Attributes:
      config: the hyperparameters.
      dtype: compute dtype (params may be stored in another dtype; they are cast).
      scan: run the layers as one ``nn.scan`` (params under ``layers/`` with a leading [L]
        axis): one layer is compiled instead of L.
      remat: what each layer keeps for the backward pass (:data:`lorax.nn.REMAT`).
      attention: the attention kernel, "xla" or "cudnn" (:func:`lorax.attention.choose`).
      gather: applied to each layer's params (the embeddings', the output layer's) inside that
        layer (its checkpoint, its scanned body): :func:`lorax.sharding.layer_gather`, or None.
      regather: with ``gather``, gather again in the backward pass, never keep (ZeRO-3).
    """

    config: DecoderConfig
    dtype: Any = jnp.float32
    scan: bool = False
    remat: str | bool = "none"
    attention: str = "xla"
    gather: Callable[[Any], Any] | None = None
    regather: bool = True

    @nn.compact
    def __call__(
        self,
        input_ids_BT: jax.Array,
        positions_BT: jax.Array,
        mask_BTS: jax.Array,
        cache: Mapping[str, jax.Array] | None = None,
        deterministic: bool = True,
        logits: bool = True,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """Runs the decoder.

        Args:
          input_ids_BT: token ids.
          positions_BT: each token's position (restarting per packed segment; for a cached
            decode, the absolute position).
          mask_BTS: from :func:`causal_mask` (training, scoring) or :func:`cache_mask`; None:
            rows of one whole sequence each, causal with no mask array (:mod:`lorax.attention`).
          cache: from :func:`init_cache`; this call's keys and values are written at
            ``cache["index"]``, which advances by T.
          deterministic: False turns on dropout and LoRA dropout ("dropout" rng).
          logits: False returns the final hidden states [B, T, D] (after the final norm)
            instead of the logits; :meth:`project` is the output layer alone.
        """
        c = self.config
        prompt_PD = (
            self.get_variable("params", "prompt") if self.has_variable("params", "prompt") else None
        )
        p = 0 if prompt_PD is None else prompt_PD.shape[0]
        _check_inputs(c, input_ids_BT.shape[1], p, cache is not None, mask_BTS is None)
        gather = None if self.is_initializing() else self.gather
        embed = lnn.gathered(_Embeddings, gather, "embed", methods=["__call__", "attend"])
        embed = embed(c, self.dtype, name="embed")
        x_BTD = embed(input_ids_BT, positions_BT + p)
        if p:
            x_BTD, positions_BT, mask_BTS = _with_prompt(prompt_PD, x_BTD, positions_BT, mask_BTS)
        x_BTD = nn.Dropout(c.dropout)(x_BTD, deterministic=deterministic)

        block = lnn.layer(Block, gather, self.remat, self.regather, prevent_cse=not self.scan)
        layer_caches = None
        if cache is not None:
            index = cache["index"]
            layer_caches = (cache["k"], cache["v"], jnp.broadcast_to(index, (c.num_layers,)))
        if self.scan:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=c.num_layers,
            )
            x_BTD, new = scanned(c, self.dtype, deterministic, self.attention, name="layers")(
                x_BTD, layer_caches, positions_BT, mask_BTS
            )
        else:
            new_k, new_v = [], []
            for i in range(c.num_layers):
                layer_cache = None
                if layer_caches is not None:
                    layer_cache = tuple(part[i] for part in layer_caches)
                x_BTD, out = block(
                    c, self.dtype, deterministic, self.attention, name=f"layers_{i}"
                )(x_BTD, layer_cache, positions_BT, mask_BTS)
                if out is not None:
                    new_k, new_v = [*new_k, out[0]], [*new_v, out[1]]
            new = (jnp.stack(new_k), jnp.stack(new_v), None) if new_k else None
        x_BTD = _norm(c, self.dtype, "final_norm")(x_BTD[:, p:])
        new_cache = None
        if cache is not None:
            new_cache = {"k": new[0], "v": new[1], "index": index + input_ids_BT.shape[1]}
        if not logits:
            return x_BTD, new_cache
        if c.tie_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            lm_head = lnn.gathered(lnn.Dense, gather, "lm_head")
            logits_BTV = lm_head(c.vocab_size, False, dtype=self.dtype, name="lm_head")(
                x_BTD, deterministic
            )
        return logits_BTV.astype(jnp.float32), new_cache

    def project(self, x_BTD: jax.Array, deterministic: bool = True) -> jax.Array:
        """The output layer alone: logits [.., V] in the compute dtype from final hidden
        states, as ``__call__`` computes them (read from the bound params; used by the
        chunked LM loss, :class:`lorax.evaluate.Hidden`)."""
        scope = "embed" if self.config.tie_embeddings else "lm_head"
        params = {scope: self.variables["params"][scope]}
        params = (params if self.gather is None else self.gather(params))[scope]
        if self.config.tie_embeddings:
            return lnn.attend(params["token"]["embedding"], x_BTD, self.dtype)
        kernel = params["kernel"]
        return lnn.apply_kernel(self, x_BTD, kernel, None, self.dtype, deterministic)


def param_shapes(config: DecoderConfig, scan: bool = False) -> dict[str, tuple[int, ...]]:
    """The ``"/"``-joined path -> shape table of :class:`Decoder`'s params (nothing allocated)."""
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, 2, 2), jnp.bool_)
    model = Decoder(config, scan=scan)
    tree = jax.eval_shape(model.init, jax.random.key(0), ids, ids, mask)["params"]
    return {p: tuple(v.shape) for p, v in paths.flatten(tree).items()}
