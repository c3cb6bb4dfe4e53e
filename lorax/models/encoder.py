"""BERT / MiniLM-style encoder (post-LayerNorm) in the canonical layout, with a classifier head.

Shape letters: B batch, T tokens, D width, F feed-forward width, C classes.
Param layout (what lorax.lora's canonical target names match)::

    embed/{token,position,type}/embedding   embed/norm/{scale,bias}
    layers_i/attn/{q,k,v,o}/{kernel,bias}   layers_i/attn_norm/{scale,bias}
    layers_i/mlp/{mlp_in,mlp_out}/{kernel,bias}   layers_i/mlp_norm/{scale,bias}
    pooler/{kernel,bias}                    (only with the "cls" pooler)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorax import nn as lnn
from lorax import paths
from lorax.models import hf_fields

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT's exact erf GELU
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Hyperparameters of a BERT-style encoder (names follow Hugging Face's config.json)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; valid: {sorted(ACTIVATIONS)}"
            )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> EncoderConfig:
        """Reads a Hugging Face BERT ``config.json`` dict."""
        names = {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size",
        }
        hf_fields.check(d, "bert")
        missing = [hf for hf in names.values() if hf not in d]
        if missing:
            raise ValueError(
                f"config.json lacks {missing}; a BERT config needs {list(names.values())}"
            )
        return cls(
            **{ours: int(d[hf]) for ours, hf in names.items()},
            max_position_embeddings=int(d.get("max_position_embeddings", 512)),
            type_vocab_size=int(d.get("type_vocab_size", 2)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
            hidden_act=str(d.get("hidden_act", "gelu")),
            hidden_dropout=float(d.get("hidden_dropout_prob", 0.1)),
            pad_token_id=int(d.get("pad_token_id") or 0),
        )

    def num_params(self, with_pooler: bool = True) -> int:
        """Parameter count of the :class:`Encoder` (with or without BERT's pooler)."""
        return sum(math.prod(s) for s in param_shapes(self, with_pooler).values())


class _Mlp(nn.Module):
    """Feed-forward block: mlp_in [D, F] -> activation -> mlp_out [F, D]."""

    config: EncoderConfig
    dtype: Any

    @nn.compact
    def __call__(self, x_BTD, deterministic):
        c = self.config
        h_BTF = lnn.Dense(c.intermediate_size, dtype=self.dtype, name="mlp_in")(
            x_BTD, deterministic
        )
        h_BTF = ACTIVATIONS[c.hidden_act](h_BTF)
        return lnn.Dense(c.hidden_size, dtype=self.dtype, name="mlp_out")(h_BTF, deterministic)


class _Embeddings(nn.Module):
    """Token + position (0..T-1) + segment embeddings, then LayerNorm."""

    config: EncoderConfig
    dtype: Any

    @nn.compact
    def __call__(self, ids_BT, types_BT, prompt_PD=None):
        """Embeds ``ids``; a soft prompt [P, D] goes before each row's tokens (positions
        0..P-1, segment 0), as Hugging Face BERT embeds ``inputs_embeds`` (Lester et al. 2021).
        """
        c = self.config
        embed = lambda n, name: lnn.Embed(n, c.hidden_size, dtype=self.dtype, name=name)  # noqa: E731
        x_BTD = embed(c.vocab_size, "token")(ids_BT)
        if prompt_PD is not None:
            b, p = ids_BT.shape[0], prompt_PD.shape[0]
            prompt_BPD = jnp.broadcast_to(
                jnp.asarray(prompt_PD, x_BTD.dtype), (b, p, x_BTD.shape[-1])
            )
            x_BTD = jnp.concatenate([prompt_BPD, x_BTD], axis=1)
            types_BT = jnp.concatenate([jnp.zeros((b, p), types_BT.dtype), types_BT], axis=1)
        positions_1T = jnp.arange(x_BTD.shape[1])[None, :]
        x_BTD = (
            x_BTD
            + embed(c.max_position_embeddings, "position")(positions_1T)
            + embed(c.type_vocab_size, "type")(types_BT)
        )
        return nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="norm")(x_BTD)


class _Layer(nn.Module):
    """One post-LN BERT layer: x = LN(x + drop(attn(x))); x = LN(x + drop(mlp(x)))."""

    config: EncoderConfig
    dtype: Any
    attention: str = "xla"

    @nn.compact
    def __call__(self, x_BTD, mask_BTS, deterministic):
        c = self.config
        drop = nn.Dropout(c.hidden_dropout)
        norm = lambda name: nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        h = lnn.Attention(
            c.num_heads,
            c.hidden_size // c.num_heads,
            dtype=self.dtype,
            implementation=self.attention,
            name="attn",
        )(x_BTD, mask_BTS, deterministic)
        x_BTD = norm("attn_norm")(x_BTD + drop(h, deterministic=deterministic))
        h = _Mlp(c, self.dtype, name="mlp")(x_BTD, deterministic)
        return norm("mlp_norm")(x_BTD + drop(h, deterministic=deterministic))


class Encoder(nn.Module):
    """The encoder stack. ``__call__`` returns ``(hidden_BTD, pooled_BD or None)``.

    Attributes:
      config: the hyperparameters.
      dtype: compute dtype (params may be stored in another dtype; they are cast).
      with_pooler: also compute BERT's pooler (dense + tanh on the first token).
      attention: the attention kernel, "xla" or "cudnn" (:func:`lorax.attention.choose`).
      gather: applied to each layer's params (the embeddings', the pooler's) where that layer
        reads them: the FSDP all-gather (:func:`lorax.sharding.layer_gather`); None: as given.
    """

    config: EncoderConfig
    dtype: Any = jnp.float32
    with_pooler: bool = False
    attention: str = "xla"
    gather: Callable[[Any], Any] | None = None

    @nn.compact
    def __call__(
        self, input_ids_BT, token_type_ids_BT, attention_mask_BT, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array | None]:
        """Encodes a batch.

        Args:
          input_ids_BT: token ids [B, T] (int).
          token_type_ids_BT: segment ids [B, T] (0 = first sentence, 1 = second).
          attention_mask_BT: 1 for real tokens, 0 for padding [B, T]; padding keys are masked
            out of attention (padded query rows still get values; ignore them).
          deterministic: False turns on hidden dropout and LoRA dropout, which then draw from
            the "dropout" rng: ``apply(..., deterministic=False, rngs={"dropout": key})``.

        Returns:
          ``(hidden_BTD, pooled_BD)``: the last hidden state in ``dtype`` (of the input's
          tokens only, when a ``prompt`` param [P, D] puts a soft prompt before them), and
          BERT's pooler output (tanh(dense(hidden[:, 0]))) when ``with_pooler``, else None.
        """
        c = self.config
        prompt_PD = (
            self.get_variable("params", "prompt") if self.has_variable("params", "prompt") else None
        )
        p = 0 if prompt_PD is None else prompt_PD.shape[0]
        t = input_ids_BT.shape[1] + p
        if t > c.max_position_embeddings:
            raise ValueError(
                f"sequence length {t} (with a soft prompt of {p}) exceeds max_position_embeddings "
                f"{c.max_position_embeddings}"
            )
        gather = None if self.is_initializing() else self.gather
        embeddings = lnn.gathered(_Embeddings, gather, "embed")(c, self.dtype, name="embed")
        x_BTD = embeddings(input_ids_BT, token_type_ids_BT, prompt_PD)
        x_BTD = nn.Dropout(c.hidden_dropout)(x_BTD, deterministic=deterministic)
        keys_BS = attention_mask_BT.astype(bool)
        if p:  # every token sees the prompt
            keys_BS = jnp.concatenate([jnp.ones((keys_BS.shape[0], p), bool), keys_BS], axis=1)
        mask_BTS = jnp.broadcast_to(keys_BS[:, None, :], (x_BTD.shape[0], t, t))
        for i in range(c.num_layers):
            layer = lnn.gathered(_Layer, gather)(c, self.dtype, self.attention, name=f"layers_{i}")
            x_BTD = layer(x_BTD, mask_BTS, deterministic)
        x_BTD = x_BTD[:, p:]  # the prompt's outputs are not pooled or returned
        pooled_BD = None
        if self.with_pooler:
            pooled_BD = jnp.tanh(
                lnn.gathered(lnn.Dense, gather, "pooler")(
                    c.hidden_size, dtype=self.dtype, name="pooler"
                )(x_BTD[:, 0], deterministic)
            )
        return x_BTD, pooled_BD


def param_shapes(config: EncoderConfig, with_pooler: bool = True) -> dict[str, tuple[int, ...]]:
    """The ``"/"``-joined path -> shape table of :class:`Encoder`'s params.

    Taken from ``jax.eval_shape`` of the module's own ``init`` (nothing is allocated), so the
    loader's checks cannot drift from the model's definition.
    """
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    model = Encoder(config, with_pooler=with_pooler)
    tree = jax.eval_shape(model.init, jax.random.key(0), ids, ids, ids)["params"]
    return {p: tuple(v.shape) for p, v in paths.flatten(tree).items()}


def _head(num_classes: int, dtype: Any) -> lnn.Dense:
    # One definition for the classifier's head and for init_params, so both init it alike.
    return lnn.Dense(num_classes, dtype=dtype, name="head")


def mean_pool(hidden_BTD: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
    """Mean over real tokens (the pooling all-MiniLM-L6-v2 was trained with), in fp32.

    Args:
      hidden_BTD: hidden states (any float dtype).
      attention_mask_BT: 1 for real tokens, 0 for padding.

    Returns:
      [B, D] fp32; a row with no real token gives zeros rather than NaN.
    """
    # Summed in fp32: a bf16 sum over T tokens would lose the low bits of every term.
    m_BT1 = attention_mask_BT[..., None].astype(jnp.float32)
    total_BD = jnp.sum(hidden_BTD.astype(jnp.float32) * m_BT1, axis=1)
    return total_BD / jnp.maximum(jnp.sum(m_BT1, axis=1), 1)


class EncoderClassifier(nn.Module):
    """Encoder + pooling + a linear head. Params: ``{"encoder": ..., "head": {kernel, bias}}``.

    Attributes:
      config: encoder hyperparameters.
      num_classes: C.
      pooling: "mean" over real tokens, or "cls" (BERT's pooler on the first token).
      dtype: compute dtype; logits are returned in fp32 regardless.
      head_dropout: dropout on the pooled vector during training.
      attention: the attention kernel, "xla" or "cudnn" (:func:`lorax.attention.choose`).
      gather: see :class:`Encoder` (the head is small and replicated: read as given).
    """

    config: EncoderConfig
    num_classes: int
    pooling: str = "mean"
    dtype: Any = jnp.float32
    head_dropout: float = 0.1
    attention: str = "xla"
    gather: Callable[[Any], Any] | None = None

    @nn.compact
    def __call__(
        self, input_ids_BT, token_type_ids_BT, attention_mask_BT, deterministic: bool = True
    ) -> jax.Array:
        """Logits [B, C] in fp32; arguments as :meth:`Encoder.__call__` (same dropout rng)."""
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"model.pooling = {self.pooling!r} is not valid; choose one of {list(POOLINGS)}"
            )
        hidden_BTD, pooled_BD = Encoder(
            self.config,
            self.dtype,
            self.pooling == "cls",
            self.attention,
            self.gather,
            name="encoder",
        )(input_ids_BT, token_type_ids_BT, attention_mask_BT, deterministic)
        if self.pooling == "mean":
            pooled_BD = mean_pool(hidden_BTD, attention_mask_BT)
        pooled_BD = nn.Dropout(self.head_dropout)(pooled_BD, deterministic=deterministic)
        logits_BC = _head(self.num_classes, self.dtype)(pooled_BD, deterministic)
        return logits_BC.astype(jnp.float32)


def init_params(model: EncoderClassifier, encoder_params: dict, key: jax.Array) -> dict:
    """The classifier's full param tree: pretrained ``encoder_params`` plus a fresh head.

    The pretrained tree is checked against the model's expected shapes, taken from
    ``jax.eval_shape`` so that no second, random encoder is ever allocated; only the head is
    initialised. A checkpoint's pooler is dropped when ``model.pooling == "mean"`` (unused).

    Args:
      model: the classifier the params are for.
      encoder_params: the :class:`Encoder`'s params (e.g. from ``checkpoints.hf.load_encoder``),
        without the "encoder" prefix; arrays of any dtype, passed through unchanged.
      key: PRNG key for the head's kernel.

    Returns:
      ``{"encoder": encoder_params, "head": {"kernel": [D, C], "bias": [C]}}``, head in fp32.

    Raises:
      ValueError: naming the first (sorted) path that is missing, unexpected, or of the wrong
        shape, with the shape found and the shape the model needs.
    """
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    expected = jax.eval_shape(model.init, jax.random.key(0), ids, ids, ids)["params"]
    got = paths.flatten(encoder_params)
    if model.pooling != "cls":  # checkpoints carry a pooler that mean pooling leaves unused
        got = {p: v for p, v in got.items() if not p.startswith("pooler/")}
    paths.check_tree(
        paths.flatten({"encoder": got}),
        paths.flatten({"encoder": expected["encoder"]}),
        where="pretrained weights",
    )
    return {"encoder": paths.unflatten(got), "head": init_head(model, key)}


def init_head(model: EncoderClassifier, key: jax.Array) -> dict:
    """A fresh classifier head ``{"kernel": [D, C], "bias": [C]}`` in fp32, drawn from ``key``
    (a run's head for its seed: :func:`init_params` and each adapter of a multi-adapter job)."""
    d = model.config.hidden_size
    return _head(model.num_classes, model.dtype).init(key, jnp.zeros((1, d), jnp.float32))["params"]
