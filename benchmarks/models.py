"""The benchmark models by name (lorax and Hugging Face forms) and the FLOP formula for MFU.

Each model is one Hugging Face ``config.json`` dict that both sides build from: lorax through
:meth:`lorax.models.decoder.DecoderConfig.from_hf`, the peer through ``transformers``. Weights
are random: speed does not depend on their values. Dropout is off on both sides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lorax.models import decoder


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """A model to benchmark and the LoRA adapter trained on it.

    Attributes:
      name: the ``--model`` name.
      hf_config: a Hugging Face ``config.json`` dict (model_type "gpt2" or "llama").
      targets: lorax canonical target names (see ``lorax.lora.CANONICAL_TARGETS``).
      peft_targets: PEFT ``target_modules`` naming the same matrices (GPT-2's q, k, v are
        one fused ``c_attn`` matrix there; see README.md).
      rank: LoRA rank r (alpha = 2r).
      batch, seq: the default rows per step and tokens per row.
    """

    name: str
    hf_config: Mapping[str, Any]
    targets: tuple[str, ...]
    peft_targets: tuple[str, ...]
    rank: int = 8
    batch: int = 16
    seq: int = 1024

    def decoder_config(self) -> decoder.DecoderConfig:
        """lorax's config of this model, dropout off."""
        return dataclasses.replace(decoder.DecoderConfig.from_hf(self.hf_config), dropout=0.0)


_GPT2_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}

MODELS: dict[str, BenchModel] = {
    m.name: m
    for m in (
        # GPT-2 small (124M): the goals 1, 3, 4 and 5.
        BenchModel(
            "gpt2-124m",
            {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12,
             "n_head": 12, "n_positions": 1024, **_GPT2_NO_DROPOUT},
            targets=("q", "k", "v"),
            peft_targets=("c_attn",),
        ),
        # A ~1.1B Llama-family model (TinyLlama's shape): the goals 2 and 3.
        BenchModel(
            "llama-1b",
            {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
             "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
             "num_key_value_heads": 8, "max_position_embeddings": 2048,
             "tie_word_embeddings": False, "rms_norm_eps": 1e-5},
            targets=("q", "v"),
            peft_targets=("q_proj", "v_proj"),
            batch=8,
        ),
        # Seconds on a CPU, for tests and for trying the harness out.
        BenchModel(
            "tiny",
            {"model_type": "llama", "vocab_size": 512, "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 256,
             "tie_word_embeddings": False},
            targets=("q", "v"),
            peft_targets=("q_proj", "v_proj"),
            batch=4,
            seq=64,
        ),
        BenchModel(
            "tiny-gpt2",
            {"model_type": "gpt2", "vocab_size": 512, "n_embd": 64, "n_layer": 2, "n_head": 4,
             "n_positions": 256, "bos_token_id": 0, "eos_token_id": 0, **_GPT2_NO_DROPOUT},
            targets=("q", "k", "v"),
            peft_targets=("c_attn",),
            batch=4,
            seq=64,
        ),
    )
}  # fmt: skip


def get(name: str) -> BenchModel:
    """The model called ``name``; raises naming the valid names."""
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]


# --------------------------------------------------------------------------- FLOP formula


def matmul_params(c: decoder.DecoderConfig) -> int:
    """N_mm: the weights of every matrix product, the LM head included (tied or not).

    The embedding lookup is a gather, not a product, so the token table counts once (as the
    head) when tied and not at all otherwise; biases and norms are not matmul weights.
    """
    d, e = c.hidden_size, c.head_dim
    attention = 2 * d * c.num_heads * e + 2 * d * c.num_kv_heads * e  # q and o; k and v
    mlp = (3 if c.mlp == "swiglu" else 2) * d * c.intermediate_size
    return c.num_layers * (attention + mlp) + d * c.vocab_size


def attention_flops_per_token(c: decoder.DecoderConfig, seq: int) -> int:
    """12·L·d·s: QKᵀ and AV (2·s·d each, forward) times 3 for forward plus backward.

    ``d`` is the query heads' total width H·E (the model width in every model here). Like
    PaLM's appendix B, it counts the full s×s score matrix, causal mask or not.
    """
    return 12 * c.num_layers * c.num_heads * c.head_dim * seq


def flops_per_token(c: decoder.DecoderConfig, seq: int, n_lora: int | None) -> int:
    """Model FLOPs of one training step per token (../shared/PAPER.md).

    Args:
      c: the model.
      seq: tokens per row (s).
      n_lora: Σ r·(d_in + d_out) over the adapted matrices; None for full fine-tuning.

    Returns:
      ``4·N_mm + 6·N_lora + 12·L·d·s`` for LoRA (the frozen weights need their forward and the
      activation gradient, not a weight gradient), ``6·N_mm + 12·L·d·s`` for full fine-tuning.
    """
    n_mm = matmul_params(c)
    if n_lora is None:
        return 6 * n_mm + attention_flops_per_token(c, seq)
    return 4 * n_mm + 6 * n_lora + attention_flops_per_token(c, seq)
