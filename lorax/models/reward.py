"""A reward model's head on a causal decoder: one scalar per row, read at its last non-pad
token, as ``transformers``' ``LlamaForSequenceClassification`` / ``GPT2ForSequenceClassification``
with ``num_labels=1`` compute it (their ``score`` Linear, no bias, is ``score/kernel`` [D, 1]
here, beside :class:`lorax.models.decoder.Decoder`'s own params)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorax import nn as lnn
from lorax.models import decoder


def last_token_index(input_ids_BT: jax.Array, pad_id: int) -> jax.Array:
    """[B] the position of each row's last token that is not ``pad_id``: where a reward
    model reads its score, by the rule of ``transformers``' ``*ForSequenceClassification``
    (the rightmost non-pad token, so right or left padding alike; 0 for a row of pads). A
    row that ends in the pad token (an eos used as pad) is read at the token before it."""
    t = input_ids_BT.shape[-1]
    real_BT = (input_ids_BT != pad_id).astype(jnp.int32)
    return jnp.argmax(jnp.arange(t, dtype=jnp.int32) * real_BT, axis=-1)


def init_score(config: decoder.DecoderConfig, key: jax.Array) -> dict[str, jax.Array]:
    """A fresh reward head ``{"kernel": [D, 1]}`` (fp32, normal with std 0.02 as
    ``transformers`` initialises its ``score`` Linear; it has no bias)."""
    return {"kernel": 0.02 * jax.random.normal(key, (config.hidden_size, 1), jnp.float32)}


def rewards(
    model: decoder.Decoder,
    input_ids_BT: jax.Array,
    positions_BT: jax.Array,
    mask_BTS: jax.Array | None,
    pad_id: int,
    deterministic: bool = True,
) -> jax.Array:
    """[B] each row's reward in fp32: the ``score/kernel`` [D, 1] head on the final hidden
    state of the row's last non-pad token (:func:`last_token_index`). Called as
    ``model.apply({"params": params}, ..., method=rewards)``, the params holding ``score``
    beside the decoder's; the other arguments are ``Decoder.__call__``'s, and ``pad_id`` the
    tokenizer's pad id (its eos when it has none)."""
    x_BTD, _ = model(input_ids_BT, positions_BT, mask_BTS, None, deterministic, logits=False)
    last_B = last_token_index(input_ids_BT, pad_id)
    x_BD = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)[:, 0]
    kernel = model.variables["params"]["score"]["kernel"]
    score_B1 = lnn.apply_kernel(model, x_BD, kernel, None, model.dtype, deterministic)
    return score_B1[:, 0].astype(jnp.float32)
