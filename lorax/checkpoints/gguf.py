"""GGUF files (llama.cpp) -> fp32 numpy weights, a Llama config and a tokenizer, in our layout."""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import gguf
import numpy as np

from lorax.checkpoints import hf
from lorax.models import decoder

# Shape letters: V vocab, D hidden, H query heads, K key/value heads, E head dim, F MLP width.

# --- reading -------------------------------------------------------------------------------


def _field_value(field: gguf.ReaderField) -> Any:
    """A metadata value as a Python scalar, string or list."""
    value = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        # float32 -> shortest decimal that round-trips (1e-05, not 9.999999747378752e-06).
        value = float(str(np.float32(value)))
    return value


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The key-value metadata of a GGUF file, without reading any tensor data.

    Args:
      path: the ``.gguf`` file.

    Returns:
      ``{key: value}`` with values decoded to Python ints, floats, bools, strings or lists
      (e.g. ``"llama.block_count": 30``, ``"tokenizer.ggml.tokens": [...]``). The reader's own
      ``GGUF.version`` / ``GGUF.tensor_count`` / ``GGUF.kv_count`` entries are included.
    """
    reader = gguf.GGUFReader(os.fspath(path))
    return {key: _field_value(field) for key, field in reader.fields.items()}


def read_gguf_header(path_or_dir: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """A GGUF file's metadata (as :func:`read_gguf_metadata`) and its tensor names, without
    reading or dequantizing any tensor data: what a model's shapes need."""
    reader = gguf.GGUFReader(os.fspath(_gguf_path(path_or_dir)))
    metadata = {key: _field_value(field) for key, field in reader.fields.items()}
    return metadata, [t.name for t in reader.tensors]


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every metadata value and every tensor of a GGUF file, tensors dequantized to fp32.

    Args:
      path: the ``.gguf`` file.

    Returns:
      ``(metadata, tensors)``: metadata as in :func:`read_gguf_metadata`; tensors by GGUF name
      (``"blk.0.attn_q.weight"``) in PyTorch orientation, i.e. GGML's dimension order reversed:
      ``[out_features, in_features]`` for linear weights, ``[vocab, dim]`` for ``token_embd``.
      Q/K rows are still in llama.cpp's RoPE order (see :func:`gguf_to_hf_rows`).

    Raises:
      ValueError: a tensor whose dequantized shape disagrees with the shape the file declares.
    """
    reader = gguf.GGUFReader(os.fspath(path))
    metadata = {key: _field_value(field) for key, field in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        want = tuple(int(n) for n in reversed(t.shape))  # GGML lists the fastest dimension first
        if array.shape != want:
            raise ValueError(
                f"{path}: tensor {t.name!r} ({t.tensor_type.name}) dequantized to shape "
                f"{array.shape}; the file declares {want}"
            )
        tensors[t.name] = np.asarray(array, dtype=np.float32)
    return metadata, tensors


def find_gguf(model_dir: str | os.PathLike) -> pathlib.Path | None:
    """The one ``.gguf`` file directly inside ``model_dir``.

    Args:
      model_dir: a directory (e.g. from ``lorax.assets.resolve("smollm2-135m")``).

    Returns:
      Its path, or None when the directory holds no ``.gguf`` file (e.g. a Hugging Face
      safetensors layout).

    Raises:
      ValueError: several ``.gguf`` files (named in the message): pass the one you mean.
    """
    found = sorted(p for p in pathlib.Path(model_dir).glob("*.gguf") if p.is_file())
    if len(found) > 1:
        raise ValueError(
            f"{model_dir} holds {len(found)} GGUF files {[p.name for p in found]}; "
            "pass the path of the one to load"
        )
    return found[0] if found else None


def _gguf_path(path_or_dir: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path_or_dir)
    if path.is_dir():
        found = find_gguf(path)
        if found is None:
            raise FileNotFoundError(f"{path} holds no .gguf file")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a directory holding one")
    return path


# --- config --------------------------------------------------------------------------------

ARCHITECTURES = ("llama",)


def _need(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata:
        raise ValueError(f"GGUF metadata lacks {key!r}, which a llama model needs")
    return metadata[key]


def llama_config(metadata: Mapping[str, Any], tensor_names: Iterable[str]) -> dict[str, Any]:
    """A Hugging Face ``LlamaConfig``-style dict from GGUF metadata.

    Args:
      metadata: as returned by :func:`read_gguf_metadata`.
      tensor_names: the file's tensor names; tied embeddings are inferred from the absence
        of ``output.weight`` (llama.cpp writes no output matrix for tied models).

    Returns:
      A dict with ``model_type="llama"``, ``vocab_size``, ``hidden_size``,
      ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
      ``intermediate_size``, ``rms_norm_eps``, ``rope_theta``, ``max_position_embeddings``,
      ``tie_word_embeddings``, ``head_dim``, ``hidden_act``, ``bos_token_id``,
      ``eos_token_id`` and ``pad_token_id`` (the token ids None when the file has none):
      readable by ``DecoderConfig.from_hf``.

    Raises:
      ValueError: ``general.architecture`` is not llama, a needed key is missing, or the file
        uses RoPE scaling or partial rotary dims, which this loader does not translate.
    """
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"GGUF general.architecture is {arch!r}; this loader reads {list(ARCHITECTURES)}"
        )
    hidden = int(_need(metadata, "llama.embedding_length"))
    heads = int(_need(metadata, "llama.attention.head_count"))
    head_dim = int(metadata.get("llama.attention.key_length", hidden // heads))
    rotary = int(metadata.get("llama.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ValueError(
            f"GGUF llama.rope.dimension_count is {rotary}, but the head dim is {head_dim}; "
            "only full-width RoPE (equal values) is supported"
        )
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(
            f"GGUF llama.rope.scaling.type is {scaling!r}; only 'none' (no scaling) is supported"
        )
    if "llama.vocab_size" in metadata:
        vocab = int(metadata["llama.vocab_size"])
    else:  # older converters write no vocab_size; the token list has one entry per row
        vocab = len(_need(metadata, "tokenizer.ggml.tokens"))
    token = lambda key: (
        None if f"tokenizer.ggml.{key}" not in metadata else int(metadata[f"tokenizer.ggml.{key}"])
    )
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": int(_need(metadata, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(metadata.get("llama.attention.head_count_kv", heads)),
        "intermediate_size": int(_need(metadata, "llama.feed_forward_length")),
        "rms_norm_eps": float(_need(metadata, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(metadata.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_need(metadata, "llama.context_length")),
        "tie_word_embeddings": "output.weight" not in set(tensor_names),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "bos_token_id": token("bos_token_id"),
        "eos_token_id": token("eos_token_id"),
        "pad_token_id": token("padding_token_id"),
    }


# --- RoPE row order ------------------------------------------------------------------------
# Hugging Face's Llama rotates halves: within a head, row j pairs with row j + E/2. llama.cpp
# rotates adjacent pairs (2j, 2j + 1), so its converter reorders each head's Q/K rows to put
# the two halves' rows side by side. Undoing that keeps our RoPE (rotate-half) and our weights
# in the Hugging Face layout that every other checkpoint uses.


def hf_to_gguf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation: Q or K rows from rotate-half to interleaved order.

    Args:
      w: a Q or K weight in PyTorch orientation, ``[n_heads * E, ...]`` (rows are outputs).
      n_heads: heads in ``w``: query heads for Q, key/value heads for K.

    Returns:
      ``w`` with each head's rows ``[0..E/2) , [E/2..E)`` interleaved as ``0, E/2, 1, E/2+1, …``.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`hf_to_gguf_rows`: Q or K rows from llama.cpp's order to Hugging Face's.

    Args:
      w: a Q or K weight as stored in a GGUF, PyTorch orientation ``[n_heads * E, ...]``.
      n_heads: heads in ``w``: query heads for Q, key/value heads for K.

    Returns:
      ``w`` with each head's rows in rotate-half order (the Hugging Face layout).
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- names ---------------------------------------------------------------------------------
# (GGUF name, canonical path, how): "{i}" is the layer; how is "" (as is), "T" (transpose a
# PyTorch [out, in] weight to our [in, out]), "q"/"k" (undo the RoPE row order, then transpose).

LLAMA_NAMES: tuple[tuple[str, str, str], ...] = (
    ("token_embd.weight", "embed/token/embedding", ""),
    ("blk.{i}.attn_norm.weight", "layers_{i}/attn_norm/scale", ""),
    ("blk.{i}.attn_q.weight", "layers_{i}/attn/q/kernel", "q"),
    ("blk.{i}.attn_k.weight", "layers_{i}/attn/k/kernel", "k"),
    ("blk.{i}.attn_v.weight", "layers_{i}/attn/v/kernel", "T"),
    ("blk.{i}.attn_output.weight", "layers_{i}/attn/o/kernel", "T"),
    ("blk.{i}.ffn_norm.weight", "layers_{i}/mlp_norm/scale", ""),
    ("blk.{i}.ffn_gate.weight", "layers_{i}/mlp/mlp_gate/kernel", "T"),
    ("blk.{i}.ffn_up.weight", "layers_{i}/mlp/mlp_in/kernel", "T"),
    ("blk.{i}.ffn_down.weight", "layers_{i}/mlp/mlp_out/kernel", "T"),
    ("output_norm.weight", "final_norm/scale", ""),
    ("output.weight", "lm_head/kernel", "T"),
)
_NAME_RES = [
    (re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), ours, how)
    for g, ours, how in LLAMA_NAMES
]


def _canonical_name(name: str) -> tuple[str, str]:
    """``(canonical path, how)`` for a GGUF tensor name; ValueError naming it if unknown."""
    for regex, ours, how in _NAME_RES:
        m = regex.match(name)
        if m:
            return (ours.replace("{i}", m.group(1)) if m.groups() else ours), how
    known = [g for g, _, _ in LLAMA_NAMES]
    raise ValueError(f"GGUF tensor {name!r} is not a llama tensor this loader knows: {known}")


def llama_param_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Canonical path -> shape of every parameter a :func:`llama_config` model has."""
    return decoder.param_shapes(decoder.DecoderConfig.from_hf(config))


def llama_to_canonical(
    tensors: Mapping[str, np.ndarray], config: Mapping[str, Any], dtype=np.float32
) -> dict[str, np.ndarray]:
    """Renames GGUF Llama tensors to canonical paths: Q/K rows unpermuted, kernels [in, out].

    Args:
      tensors: GGUF name -> array in PyTorch orientation, as :func:`read_gguf` returns.
      config: from :func:`llama_config` (head counts for the unpermutation, shapes to check).
      dtype: numpy dtype of the returned arrays.

    Returns:
      Flat ``{canonical path: array}`` exactly covering :func:`llama_param_shapes`.

    Raises:
      ValueError: a tensor this table does not know (named), or a canonical path that no
        tensor filled or that has the wrong shape (path and expected shape named).
    """
    heads = {"q": config["num_attention_heads"], "k": config["num_key_value_heads"]}
    flat = {}
    for name in sorted(tensors):
        path, how = _canonical_name(name)
        w = tensors[name]
        if how in heads:
            try:
                w = gguf_to_hf_rows(w, heads[how])
            except ValueError as e:
                raise ValueError(f"GGUF tensor {name!r} {w.shape}: {e}") from None
        if how:
            w = w.T
        flat[path] = np.ascontiguousarray(w, dtype=dtype)
    hf.check_shapes(flat, llama_param_shapes(config), "the GGUF file")
    return flat


def load_llama(
    path_or_dir: str | os.PathLike, dtype=np.float32
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A llama-architecture GGUF as (Hugging Face-style config, canonical flat params).

    Args:
      path_or_dir: a ``.gguf`` file, or a directory holding exactly one.
      dtype: numpy dtype of the params (dequantization itself is always fp32).

    Returns:
      ``(config, flat)``: config from :func:`llama_config`; flat from
      :func:`llama_to_canonical` (Hugging Face RoPE layout, kernels ``[in, out]``).
    """
    metadata, tensors = read_gguf(_gguf_path(path_or_dir))
    config = llama_config(metadata, tensors)
    return config, llama_to_canonical(tensors, config, dtype)


# --- tokenizer -----------------------------------------------------------------------------

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) whose byte-level BPE first splits off
# every digit on its own (SmolLM's tokenizer.json: Digits(individual_digits) then ByteLevel).
_DIGIT_SPLIT_PRE = ("smollm",)
_CONTROL = 3  # llama.cpp token type of special (control) tokens like <|im_end|>


def tokenizer_from_gguf(path_or_dir: str | os.PathLike):
    """A ``transformers`` fast tokenizer rebuilt from a GGUF's byte-level BPE metadata.

    Built directly with ``tokenizers`` (vocabulary ``tokenizer.ggml.tokens``, merges
    ``tokenizer.ggml.merges``, control tokens kept whole as special tokens), with GPT-2's
    byte-level pre-tokenizer and decoder, preceded by a per-digit split for SmolLM files.
    No BOS or EOS is added when encoding (the chat template writes them).

    Args:
      path_or_dir: a ``.gguf`` file, or a directory holding exactly one.

    Returns:
      A ``transformers.PreTrainedTokenizerFast`` with ``bos_token``, ``eos_token``,
      ``unk_token`` and ``pad_token`` set from the file (pad falls back to eos), and the
      file's ``tokenizer.chat_template`` as its chat template.

    Raises:
      ValueError: the file's tokenizer (``tokenizer.ggml.model``) is not byte-level BPE
        ("gpt2"), or it lacks tokens or merges.
    """
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers

    meta = read_gguf_metadata(_gguf_path(path_or_dir))
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported"
        )
    tokens = _need(meta, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _need(meta, "tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = tokenizers.Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") in _DIGIT_SPLIT_PRE:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    control = [t for t, kind in zip(tokens, types, strict=True) if kind == _CONTROL]
    tok.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in control]
    )

    def special(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    eos = special("eos_token_id")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special("bos_token_id"),
        eos_token=eos,
        unk_token=special("unknown_token_id"),
        pad_token=special("padding_token_id") or eos,
        clean_up_tokenization_spaces=False,
        # kept, so apply_chat_template and a merged export's tokenizer files have it
        chat_template=meta.get("tokenizer.chat_template"),
    )
