"""Hugging Face config fields that change a model's math, and the values lorax computes.

A ``config.json`` field that lorax's model does not implement would otherwise be ignored and
the model would compute something else (a GPT-2 with ``scale_attn_by_inverse_layer_idx`` gives
logits 14-89% off). Every such field of each family lorax loads is listed here with the values
lorax honours; :func:`check` refuses any other value, naming the field. Fields lorax reads
(sizes, norms' eps, activations, RoPE theta and llama3 scaling, biases, tied embeddings) are
handled by the configs' ``from_hf``; fields that never change the forward pass at inference
(dropouts, ``pretraining_tp``, ``reorder_and_upcast_attn``, ``use_cache``, token ids) are not
listed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Rule = tuple[Callable[[Any], bool], str]


def _is(*allowed: Any) -> Callable[[Any], bool]:
    return lambda v: v in allowed


def _full_attention(v) -> bool:
    return v is None or all(t == "full_attention" for t in v)


# family -> {field: (accepts(value), what lorax computes)}. A missing field is its default.
RULES: dict[str, dict[str, Rule]] = {
    "bert": {
        "position_embedding_type": (_is(None, "absolute"), "'absolute' position embeddings"),
        "is_decoder": (_is(None, False), "a bidirectional encoder (false)"),
        "add_cross_attention": (_is(None, False), "no cross-attention (false)"),
    },
    "gpt2": {
        "scale_attn_weights": (_is(None, True), "scores scaled by 1/sqrt(head_dim) (true)"),
        "scale_attn_by_inverse_layer_idx": (_is(None, False), "no per-layer scaling (false)"),
        "tie_word_embeddings": (_is(None, True), "the LM head tied to the embedding (true)"),
        "add_cross_attention": (_is(None, False), "no cross-attention (false)"),
    },
    "llama": {
        "partial_rotary_factor": (_is(None, 1, 1.0), "RoPE over the whole head (1.0)"),
        "attn_logit_softcapping": (_is(None), "no logit soft-capping (null)"),
        "final_logit_softcapping": (_is(None), "no logit soft-capping (null)"),
        "layer_types": (_full_attention, "full attention in every layer"),
    },
    "qwen2": {
        "use_sliding_window": (_is(None, False), "full attention (false)"),
        "layer_types": (_full_attention, "full attention in every layer"),
    },
}


def check(d: Mapping[str, Any], family: str, where: str = "config.json") -> None:
    """Raises ValueError naming the first field of ``d`` whose value lorax does not compute."""
    for field, (accepts, honoured) in RULES[family].items():
        if field in d and not accepts(d[field]):
            raise ValueError(
                f"{where}: {field}={d[field]!r} changes the model's math in a way lorax does "
                f"not implement; lorax computes {honoured} for a {family} model"
            )
