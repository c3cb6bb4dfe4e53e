"""Loading and saving weights: Hugging Face checkpoints, GGUF files, adapter-only training state."""

from __future__ import annotations

import logging
import os

import numpy as np

from lorax.models import decoder
from lorax.models.encoder import EncoderConfig


def _gguf_file(model: str | os.PathLike) -> str | None:
    from lorax.checkpoints import gguf

    model = os.fspath(model)
    if model.endswith(".gguf") and os.path.isfile(model):
        return model
    if os.path.isdir(model) and not os.path.exists(os.path.join(model, "config.json")):
        return gguf.find_gguf(model)
    return None


def load_pretrained(
    model: str | os.PathLike, dtype=np.float32
) -> tuple[EncoderConfig | decoder.DecoderConfig, dict]:
    """``(config, params)`` of a pretrained model, whatever its format and family.

    Args:
      model: a Hugging Face directory (``config.json`` + safetensors) of a BERT, Llama, Qwen2
        or GPT-2 model, or a Llama-family ``.gguf`` file (or a directory holding one).
      dtype: numpy dtype of the returned arrays.

    Returns:
      An :class:`EncoderConfig` with the encoder's params, or a :class:`DecoderConfig` with
      the decoder's params (per-layer ``layers_i`` layout), as nested dicts of numpy arrays.
    """
    from lorax.checkpoints import gguf, hf

    path = _gguf_file(model)
    if path is not None:
        raw, flat = gguf.load_llama(path, dtype)
        config = decoder.DecoderConfig.from_hf(raw)
        return config, hf.decoder_from_flat(flat, config, path)
    if hf.read_config(model).get("model_type", "bert") == "bert":
        return hf.load_encoder(model, dtype)
    return hf.load_decoder(model, dtype)


# The files a Hugging Face directory's tokenizer is read from (one of them is enough): its
# fast tokenizer, a WordPiece or BPE vocabulary, a SentencePiece model.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")  # fmt: skip


def check_tokenizer_files(model: str | os.PathLike) -> None:
    """Raises naming ``model`` and the files expected unless it holds a tokenizer. Without
    one transformers builds a tokenizer of its few special tokens, every word ``[UNK]``, and
    a run trains to chance without a word of warning."""
    model = os.fspath(model)
    if os.path.isdir(model) and not any(
        os.path.exists(os.path.join(model, name)) for name in TOKENIZER_FILES
    ):
        raise FileNotFoundError(
            f"{model} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy the "
            "tokenizer saved with the model into it (tokenizer.save_pretrained(dir))"
        )


def pretrained_shapes(
    model: str | os.PathLike, dtype=np.float32
) -> tuple[EncoderConfig | decoder.DecoderConfig, dict]:
    """``(config, params)`` as :func:`load_pretrained` returns them, with
    ``jax.ShapeDtypeStruct`` leaves in place of arrays: read from ``config.json`` (or a GGUF
    file's header) alone, so no weight is read and nothing is allocated (``lorax.plan``).

    The shapes are the tables the loaders check every checkpoint against
    (``decoder.param_shapes``, ``encoder.param_shapes``); an encoder's pooler is included, as
    a checkpoint that has one loads it.
    """
    import jax

    from lorax import paths
    from lorax.checkpoints import gguf, hf
    from lorax.models import encoder

    path = _gguf_file(model)
    if path is not None:
        config = decoder.DecoderConfig.from_hf(gguf.llama_config(*gguf.read_gguf_header(path)))
        shapes = decoder.param_shapes(config)
    else:
        config = hf.model_config(model)
        if isinstance(config, EncoderConfig):
            shapes = encoder.param_shapes(config)
        else:
            shapes = decoder.param_shapes(config)
    tree = {p: jax.ShapeDtypeStruct(s, np.dtype(dtype)) for p, s in shapes.items()}
    return config, paths.unflatten(tree)


def load_tokenizer(model: str | os.PathLike):
    """The model's tokenizer: from the GGUF metadata, or the directory's tokenizer files."""
    from lorax.checkpoints import gguf

    path = _gguf_file(model)
    if path is not None:
        return gguf.tokenizer_from_gguf(path)
    check_tokenizer_files(model)
    import transformers  # heavy; only once a model is being loaded

    # lorax tokenizes without truncation and cuts (and counts) long examples itself, so the
    # tokenizer's "longer than the specified maximum sequence length" warning is wrong here.
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    return transformers.AutoTokenizer.from_pretrained(os.fspath(model))
