"""Hugging Face checkpoints (config.json + *.safetensors) <-> lorax's canonical param trees."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from lorax import paths
from lorax.models import decoder
from lorax.models.encoder import EncoderConfig, param_shapes

# --- name tables ---------------------------------------------------------------------------
# One table per model family: (Hugging Face name, canonical path, transpose). "{i}" is the
# layer index; transpose marks a PyTorch Linear weight [out, in] that becomes our [in, out].

BERT_NAMES: tuple[tuple[str, str, bool], ...] = (
    ("embeddings.word_embeddings.weight", "embed/token/embedding", False),
    ("embeddings.position_embeddings.weight", "embed/position/embedding", False),
    ("embeddings.token_type_embeddings.weight", "embed/type/embedding", False),
    ("embeddings.LayerNorm.weight", "embed/norm/scale", False),
    ("embeddings.LayerNorm.bias", "embed/norm/bias", False),
    ("encoder.layer.{i}.attention.self.query.weight", "layers_{i}/attn/q/kernel", True),
    ("encoder.layer.{i}.attention.self.query.bias", "layers_{i}/attn/q/bias", False),
    ("encoder.layer.{i}.attention.self.key.weight", "layers_{i}/attn/k/kernel", True),
    ("encoder.layer.{i}.attention.self.key.bias", "layers_{i}/attn/k/bias", False),
    ("encoder.layer.{i}.attention.self.value.weight", "layers_{i}/attn/v/kernel", True),
    ("encoder.layer.{i}.attention.self.value.bias", "layers_{i}/attn/v/bias", False),
    ("encoder.layer.{i}.attention.output.dense.weight", "layers_{i}/attn/o/kernel", True),
    ("encoder.layer.{i}.attention.output.dense.bias", "layers_{i}/attn/o/bias", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "layers_{i}/attn_norm/scale", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "layers_{i}/attn_norm/bias", False),
    ("encoder.layer.{i}.intermediate.dense.weight", "layers_{i}/mlp/mlp_in/kernel", True),
    ("encoder.layer.{i}.intermediate.dense.bias", "layers_{i}/mlp/mlp_in/bias", False),
    ("encoder.layer.{i}.output.dense.weight", "layers_{i}/mlp/mlp_out/kernel", True),
    ("encoder.layer.{i}.output.dense.bias", "layers_{i}/mlp/mlp_out/bias", False),
    ("encoder.layer.{i}.output.LayerNorm.weight", "layers_{i}/mlp_norm/scale", False),
    ("encoder.layer.{i}.output.LayerNorm.bias", "layers_{i}/mlp_norm/bias", False),
    ("pooler.dense.weight", "pooler/kernel", True),
    ("pooler.dense.bias", "pooler/bias", False),
)


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


@dataclasses.dataclass(frozen=True)
class NameMap:
    """A family's name table, compiled for both directions.

    Attributes:
      family: what the table is for, used in error messages ("BERT").
      names: (hf name, canonical path, transpose) templates.
      prefixes: optional leading parts of HF names (e.g. "bert." in task checkpoints).
      ignored: HF names the model does not use (buffers, other heads), a full-match regex.
      renames: (regex, replacement) applied to an HF name first (old spellings).
    """

    family: str
    names: tuple[tuple[str, str, bool], ...]
    prefixes: tuple[str, ...] = ()
    ignored: str = r"(?!)"
    renames: tuple[tuple[str, str], ...] = ()

    @functools.cached_property
    def _from_hf(self) -> list[tuple[re.Pattern[str], tuple[str, str, bool]]]:
        return [(_template_regex(row[0]), row) for row in self.names]

    @functools.cached_property
    def _to_hf(self) -> list[tuple[re.Pattern[str], tuple[str, str, bool]]]:
        return [(_template_regex(row[1]), row) for row in self.names]

    def to_canonical(self, key: str) -> tuple[str, bool] | None:
        """``(canonical path, transpose)`` for an HF name; None if ignored; KeyError if unknown."""
        for prefix in self.prefixes:
            key = key.removeprefix(prefix)
        for pattern, repl in self.renames:
            key = re.sub(pattern, repl, key)
        if re.fullmatch(self.ignored, key):
            return None
        for regex, (_, ours, transpose) in self._from_hf:
            m = regex.match(key)
            if m:
                return _fill(ours, m), transpose
        raise KeyError(key)

    def to_hf(self, path: str) -> tuple[str, bool]:
        """``(HF name, transpose)`` for a canonical path; KeyError if it has none."""
        for regex, (hf, _, transpose) in self._to_hf:
            m = regex.match(path)
            if m:
                return _fill(hf, m), transpose
        raise KeyError(path)


def _fill(template: str, m: re.Match[str]) -> str:
    return template.replace("{i}", m.group(1)) if m.groups() else template


BERT = NameMap(
    family="BERT",
    names=BERT_NAMES,
    prefixes=("bert.",),  # BertForSequenceClassification & co. nest the encoder under "bert."
    # position_ids is a buffer; cls.* (pretraining heads) and classifier.* are task heads.
    ignored=r"embeddings\.position_ids|cls\..*|classifier\..*",
    renames=((r"\.gamma$", ".weight"), (r"\.beta$", ".bias")),  # pre-2019 LayerNorm names
)

LLAMA_NAMES: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "embed/token/embedding", False),
    ("model.layers.{i}.input_layernorm.weight", "layers_{i}/attn_norm/scale", False),
    *(
        row
        for ours in "qkvo"
        for row in (
            (
                f"model.layers.{{i}}.self_attn.{ours}_proj.weight",
                f"layers_{{i}}/attn/{ours}/kernel",
                True,
            ),
            (
                f"model.layers.{{i}}.self_attn.{ours}_proj.bias",
                f"layers_{{i}}/attn/{ours}/bias",
                False,
            ),
        )
    ),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers_{i}/mlp_norm/scale", False),
    *(
        row
        for hf, ours in (("gate_proj", "mlp_gate"), ("up_proj", "mlp_in"), ("down_proj", "mlp_out"))
        for row in (
            (f"model.layers.{{i}}.mlp.{hf}.weight", f"layers_{{i}}/mlp/{ours}/kernel", True),
            (f"model.layers.{{i}}.mlp.{hf}.bias", f"layers_{{i}}/mlp/{ours}/bias", False),
        )
    ),
    ("model.norm.weight", "final_norm/scale", False),
    ("lm_head.weight", "lm_head/kernel", True),
)

LLAMA = NameMap(
    family="Llama",
    names=LLAMA_NAMES,
    ignored=r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|model\.rotary_emb\..*",
)

# GPT-2's Conv1D weights are already [in, out]: nothing is transposed. Its fused c_attn
# [D, 3D] maps to a temporary "attn/qkv" that split_fused_qkv cuts into q, k and v.
GPT2_NAMES: tuple[tuple[str, str, bool], ...] = (
    ("wte.weight", "embed/token/embedding", False),
    ("wpe.weight", "embed/position/embedding", False),
    ("h.{i}.ln_1.weight", "layers_{i}/attn_norm/scale", False),
    ("h.{i}.ln_1.bias", "layers_{i}/attn_norm/bias", False),
    ("h.{i}.attn.c_attn.weight", "layers_{i}/attn/qkv/kernel", False),
    ("h.{i}.attn.c_attn.bias", "layers_{i}/attn/qkv/bias", False),
    ("h.{i}.attn.c_proj.weight", "layers_{i}/attn/o/kernel", False),
    ("h.{i}.attn.c_proj.bias", "layers_{i}/attn/o/bias", False),
    ("h.{i}.ln_2.weight", "layers_{i}/mlp_norm/scale", False),
    ("h.{i}.ln_2.bias", "layers_{i}/mlp_norm/bias", False),
    ("h.{i}.mlp.c_fc.weight", "layers_{i}/mlp/mlp_in/kernel", False),
    ("h.{i}.mlp.c_fc.bias", "layers_{i}/mlp/mlp_in/bias", False),
    ("h.{i}.mlp.c_proj.weight", "layers_{i}/mlp/mlp_out/kernel", False),
    ("h.{i}.mlp.c_proj.bias", "layers_{i}/mlp/mlp_out/bias", False),
    ("ln_f.weight", "final_norm/scale", False),
    ("ln_f.bias", "final_norm/bias", False),
)

GPT2 = NameMap(
    family="GPT-2",
    names=GPT2_NAMES,
    prefixes=("transformer.",),  # GPT2LMHeadModel nests the stack under "transformer."
    # attn.bias / attn.masked_bias are causal-mask buffers; lm_head is tied to wte.
    ignored=r"h\.\d+\.attn\.(?:masked_)?bias|lm_head\.weight",
)

_QKV_RE = re.compile(r"^(.*/attn/)qkv/(kernel|bias)$")


def split_fused_qkv(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cuts each fused ``attn/qkv`` [D, 3D] (or bias [3D]) into ``attn/q``, ``k`` and ``v``.

    GPT-2's ``c_attn`` computes ``x @ [Wq | Wk | Wv]``: its last axis is q, then k, then v.
    """
    out = {}
    for path, value in flat.items():
        m = _QKV_RE.match(path)
        if not m:
            out[path] = value
            continue
        if value.shape[-1] % 3:
            raise ValueError(f"fused {path} has shape {value.shape}; its last axis is not 3·D")
        for name, part in zip("qkv", np.split(value, 3, axis=-1), strict=True):
            out[f"{m.group(1)}{name}/{m.group(2)}"] = np.ascontiguousarray(part)
    return out


def fuse_qkv(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`split_fused_qkv`: ``attn/{q,k,v}`` -> one ``attn/qkv``."""
    out = dict(flat)
    for path in sorted(flat):
        m = re.match(r"^(.*/attn/)q/(kernel|bias)$", path)
        if m:
            parts = [out.pop(f"{m.group(1)}{n}/{m.group(2)}") for n in "qkv"]
            out[f"{m.group(1)}qkv/{m.group(2)}"] = np.concatenate(parts, axis=-1)
    return out


# --- files ---------------------------------------------------------------------------------

# safetensors dtype codes -> numpy dtypes; bf16 and fp8 come from ml_dtypes (numpy lacks them).
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_config(model_dir: str | os.PathLike) -> dict:
    """The ``config.json`` of a Hugging Face model directory."""
    path = os.path.join(os.fspath(model_dir), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{model_dir} has no config.json; expected a Hugging Face model "
            "directory (config.json + model.safetensors)"
        )
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not a JSON model config ({e}); restore the file") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a JSON object (a model config); restore the file")
    return raw


def _config_from(from_hf, raw: dict, model_dir) -> Any:
    """``from_hf(raw)``, an error in it prefixed with the model directory."""
    try:
        return from_hf(raw)
    except ValueError as e:
        raise ValueError(f"{model_dir}: {e}") from None


def model_config(model_dir: str | os.PathLike) -> EncoderConfig | decoder.DecoderConfig:
    """The model a Hugging Face directory's ``config.json`` describes (no weights read)."""
    raw = read_config(model_dir)
    if raw.get("model_type", "bert") == "bert":
        return _config_from(EncoderConfig.from_hf, raw, model_dir)
    return _config_from(decoder.DecoderConfig.from_hf, raw, model_dir)


def read_safetensors_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one ``.safetensors`` file, as read-only numpy views of a memory map.

    Read directly (an 8-byte little-endian header length, a JSON header, then raw bytes) rather
    than through ``safetensors.numpy``, which cannot represent bf16 tensors.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes is too short for a safetensors file")
        n = int(np.frombuffer(head, "<u8")[0])
        if n > size - 8:
            raise ValueError(
                f"{path}: the header claims {n} bytes but the file has only {size - 8} after "
                "its length field; the file is truncated or not safetensors"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else b""
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        tensors[key] = _tensor(path, key, info, data, size - 8 - n)
    return tensors


def _tensor(path: str, key: str, info: Any, data, available: int) -> np.ndarray:
    """One header entry's array, its dtype, shape and byte range checked against the file."""
    try:
        dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        shape = tuple(int(d) for d in shape)
        begin, end = int(begin), int(end)
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{path}: header entry {key!r} is {info!r}; expected dtype, shape and data_offsets"
        ) from None
    if dtype_name not in _DTYPES:
        raise ValueError(
            f"{path}: tensor {key!r} has dtype {dtype_name}; readable: {sorted(_DTYPES)}"
        )
    dtype = np.dtype(_DTYPES[dtype_name]).newbyteorder("<")
    want = int(np.prod(shape)) * dtype.itemsize
    if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != want:
        raise ValueError(
            f"{path}: tensor {key!r} ({dtype_name} {list(shape)}) has data_offsets "
            f"[{begin}, {end}], which do not hold its {want} bytes"
        )
    if end > available:
        raise ValueError(
            f"{path}: tensor {key!r} ends at byte {end} of the data but the file holds "
            f"{available}; the file is truncated"
        )
    if not want:
        return np.zeros(shape, dtype)
    return data[begin:end].view(dtype).reshape(shape)


def read_safetensors(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of ``model.safetensors`` or of the shards ``model.safetensors.index.json``
    lists, by Hugging Face name."""
    model_dir = os.fspath(model_dir)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(model_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{model_dir} has neither model.safetensors nor model.safetensors.index.json"
        )
    tensors = {}
    for name in files:
        tensors.update(read_safetensors_file(os.path.join(model_dir, name)))
    return tensors


def to_canonical(
    tensors: Mapping[str, np.ndarray], names: NameMap, dtype, where: str = "checkpoint"
) -> dict[str, np.ndarray]:
    """Renames (and transposes) HF tensors to flat canonical paths, in numpy ``dtype``.

    Raises:
      ValueError: a key the table does not know, or two keys mapping to one path.
    """
    flat, source = {}, {}
    for key in sorted(tensors):
        try:
            mapped = names.to_canonical(key)
        except KeyError:
            raise ValueError(
                f"{where}: key {key!r} is not a {names.family} weight lorax knows; "
                f"known names look like {names.names[5][0]!r}"
            ) from None
        if mapped is None:
            continue
        path, transpose = mapped
        if path in flat:  # e.g. both "bert.x" and "x" present: refuse rather than pick one
            raise ValueError(f"{where}: keys {source[path]!r} and {key!r} both give {path}")
        value = np.asarray(tensors[key])
        flat[path] = np.ascontiguousarray((value.T if transpose else value).astype(dtype))
        source[path] = key
    return flat


def check_shapes(
    flat: Mapping[str, np.ndarray],
    want: Mapping[str, Sequence[int]],
    where: str,
    optional: Sequence[str] = (),
) -> None:
    """Raises naming the first missing, unexpected or wrongly shaped path.

    Args:
      flat: canonical path -> array, as loaded.
      want: canonical path -> the shape the model (and config.json) implies.
      where: the checkpoint, for the message.
      optional: path prefixes that may be absent (e.g. "pooler/").
    """
    optional = tuple(optional)
    want = {p: tuple(s) for p, s in want.items() if p in flat or not p.startswith(optional)}
    paths.check_tree(
        flat,
        want,
        where=where,
        missing="{where}: checkpoint lacks the weight for {path} {want}",
        unexpected="{where}: checkpoint has {path}, which the model defined by config.json "
        "does not have (more layers than num_hidden_layers?)",
        mismatch="{where}: {path} has shape {got}; config.json implies {want}",
    )


# --- BERT family ---------------------------------------------------------------------------


def load_encoder(model_dir: str | os.PathLike, dtype=np.float32) -> tuple[EncoderConfig, dict]:
    """Reads a Hugging Face BERT-family directory into ``(EncoderConfig, params)``.

    Args:
      model_dir: a directory with ``config.json`` and ``model.safetensors`` (or shards listed in
        ``model.safetensors.index.json``).
      dtype: numpy dtype of the returned arrays (``ml_dtypes.bfloat16`` for a bf16 base).

    Returns:
      The config and the nested param dict of :class:`lorax.models.encoder.Encoder` (no
      "encoder" prefix), numpy arrays. The pooler is included when the checkpoint has one.

    Raises:
      ValueError: a non-BERT ``model_type``, an unknown key, a missing weight or a wrong shape;
        the message names the key or path and the expected shape.
    """
    raw = read_config(model_dir)
    if raw.get("model_type", "bert") != "bert":
        raise ValueError(
            f"{model_dir}: model_type {raw.get('model_type')!r} is not a BERT-family "
            "encoder; supported: 'bert'"
        )
    config = _config_from(EncoderConfig.from_hf, raw, model_dir)
    flat = to_canonical(read_safetensors(model_dir), BERT, dtype, where=str(model_dir))
    # A checkpoint without a pooler is fine for mean pooling; init_params asks for it for "cls".
    check_shapes(flat, param_shapes(config), str(model_dir), optional=("pooler/",))
    return config, paths.unflatten(flat)


def encoder_to_hf(params: Mapping) -> dict[str, np.ndarray]:
    """Inverse of :func:`load_encoder`'s mapping: canonical encoder params -> HF BERT names.

    Args:
      params: the :class:`Encoder`'s params (no "encoder" prefix), plain arrays (merge any LoRA
        delta first).

    Returns:
      ``{hf name: array}`` with Linear weights back in PyTorch's [out, in] layout, ready for
      ``safetensors.numpy.save_file``.
    """
    out = {}
    for path, value in paths.flatten(params).items():
        try:
            name, transpose = BERT.to_hf(path)
        except KeyError:
            raise ValueError(
                f"encoder param {path} has no Hugging Face BERT name (is it a LoraWeight or a "
                "classifier param? pass the merged encoder subtree)"
            ) from None
        value = np.asarray(value)
        out[name] = np.ascontiguousarray(value.T if transpose else value)
    return out


# --- decoder families (Llama, Qwen2, GPT-2) ---------------------------------------------------


def decoder_names(config: decoder.DecoderConfig) -> NameMap:
    """The name table of a decoder family."""
    return GPT2 if config.family == "gpt2" else LLAMA


def decoder_from_flat(
    flat: Mapping[str, np.ndarray], config: decoder.DecoderConfig, where: str
) -> dict:
    """Checks canonical flat decoder params against ``config`` and nests them.

    A tied model's ``lm_head/kernel`` (some checkpoints store the copy) is dropped.
    """
    flat = dict(flat)
    if config.tie_embeddings:
        flat.pop("lm_head/kernel", None)
    check_shapes(flat, decoder.param_shapes(config), where)
    return paths.unflatten(flat)


def load_decoder(
    model_dir: str | os.PathLike, dtype=np.float32
) -> tuple[decoder.DecoderConfig, dict]:
    """Reads a Hugging Face Llama / Qwen2 / GPT-2 directory into ``(DecoderConfig, params)``.

    Args:
      model_dir: ``config.json`` plus ``model.safetensors`` or sharded
        ``model.safetensors.index.json``.
      dtype: numpy dtype of the returned arrays.

    Returns:
      The config and the nested params of :class:`lorax.models.decoder.Decoder` (per-layer
      ``layers_i`` layout; GPT-2's fused c_attn already split into q, k, v).

    Raises:
      ValueError: an unsupported ``model_type``, an unknown key, a missing weight or a wrong
        shape, naming the key or path and the expected shape.
    """
    config = _config_from(decoder.DecoderConfig.from_hf, read_config(model_dir), model_dir)
    names = decoder_names(config)
    flat = to_canonical(read_safetensors(model_dir), names, dtype, where=str(model_dir))
    if config.family == "gpt2":
        flat = split_fused_qkv(flat)
    return config, decoder_from_flat(flat, config, str(model_dir))


def decoder_to_hf(params: Mapping, config: decoder.DecoderConfig) -> dict[str, np.ndarray]:
    """Canonical decoder params -> Hugging Face names (GPT-2's q, k, v fused back to c_attn).

    Args:
      params: plain arrays in the per-layer layout (merge any LoRA delta first).
      config: the model's config (chooses the name table).
    """
    flat = {p: np.asarray(v) for p, v in paths.flatten(params).items()}
    names = decoder_names(config)
    if config.family == "gpt2":
        flat = fuse_qkv(flat)
    out = {}
    for path, value in flat.items():
        try:
            name, transpose = names.to_hf(path)
        except KeyError:
            raise ValueError(f"decoder param {path} has no {names.family} name") from None
        out[name] = np.ascontiguousarray(value.T if transpose else value)
    if config.family == "gpt2":
        out = {f"transformer.{k}": v for k, v in out.items()}
    return out
