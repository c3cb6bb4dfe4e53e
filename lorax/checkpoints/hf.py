"""Hugging Face checkpoints (config.json + *.safetensors) <-> lorax's canonical param trees."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import numpy as np
from safetensors import safe_open

from lorax import paths
from lorax.models.encoder import EncoderConfig

# Hugging Face BERT names -> canonical paths. "{i}" is the layer index; "T" marks a PyTorch
# Linear weight [out, in] that is transposed to our [in, out] kernel.
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
# Keys a BERT checkpoint may hold that the encoder does not use.
BERT_IGNORED = re.compile(r"^(embeddings\.position_ids|cls\..*|classifier\..*)$")


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_BERT_FROM_HF = [(_template_regex(hf), ours, t) for hf, ours, t in BERT_NAMES]


def read_config(model_dir: str | os.PathLike) -> dict:
    """The ``config.json`` of a Hugging Face model directory."""
    path = os.path.join(os.fspath(model_dir), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{model_dir} has no config.json; expected a Hugging Face model "
                                "directory (config.json + model.safetensors)")
    with open(path) as f:
        return json.load(f)


def read_safetensors(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of ``model.safetensors`` or of the shards a ``*.index.json`` lists."""
    model_dir = os.fspath(model_dir)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(model_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor "
                                "model.safetensors.index.json")
    tensors = {}
    for name in files:
        with safe_open(os.path.join(model_dir, name), framework="numpy") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def _hf_to_canonical(key: str) -> tuple[str, bool] | None:
    key = key.replace(".gamma", ".weight").replace(".beta", ".bias")
    for regex, ours, transpose in _BERT_FROM_HF:
        m = regex.match(key)
        if m:
            return (ours.replace("{i}", m.group(1)) if m.groups() else ours), transpose
    return None


def load_encoder(model_dir: str | os.PathLike,
                 dtype=np.float32) -> tuple[EncoderConfig, dict]:
    """Reads a Hugging Face BERT-family directory into ``(EncoderConfig, params)``.

    ``params`` is the nested dict of the :class:`~lorax.models.encoder.Encoder` module (no
    "encoder" prefix), in numpy ``dtype``. A ``bert.`` prefix (as in task checkpoints) is
    accepted. Unknown keys, missing weights and wrong shapes are errors naming the key.
    """
    raw = read_config(model_dir)
    if raw.get("model_type", "bert") not in ("bert",):
        raise ValueError(f"{model_dir}: model_type {raw.get('model_type')!r} is not a BERT-family "
                         "encoder; supported: 'bert'")
    config = EncoderConfig.from_hf(raw)
    flat = {}
    for key, value in read_safetensors(model_dir).items():
        key = key.removeprefix("bert.")
        if BERT_IGNORED.match(key):
            continue
        mapped = _hf_to_canonical(key)
        if mapped is None:
            raise ValueError(f"{model_dir}: checkpoint key {key!r} is not a BERT weight lorax "
                             f"knows; known names look like {BERT_NAMES[5][0]!r}")
        path, transpose = mapped
        flat[path] = np.ascontiguousarray(value.T if transpose else value).astype(dtype)
    _check_encoder_shapes(flat, config, model_dir)
    return config, paths.unflatten(flat)


def encoder_shapes(config: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """The canonical path -> shape table of a BERT encoder (with pooler)."""
    d, f = config.hidden_size, config.intermediate_size
    shapes = {"embed/token/embedding": (config.vocab_size, d),
              "embed/position/embedding": (config.max_position_embeddings, d),
              "embed/type/embedding": (config.type_vocab_size, d),
              "embed/norm/scale": (d,), "embed/norm/bias": (d,),
              "pooler/kernel": (d, d), "pooler/bias": (d,)}
    for i in range(config.num_layers):
        p = f"layers_{i}/"
        for n in "qkvo":
            shapes[p + f"attn/{n}/kernel"], shapes[p + f"attn/{n}/bias"] = (d, d), (d,)
        shapes[p + "mlp/mlp_in/kernel"], shapes[p + "mlp/mlp_in/bias"] = (d, f), (f,)
        shapes[p + "mlp/mlp_out/kernel"], shapes[p + "mlp/mlp_out/bias"] = (f, d), (d,)
        for n in ("attn_norm", "mlp_norm"):
            shapes[p + f"{n}/scale"], shapes[p + f"{n}/bias"] = (d,), (d,)
    return shapes


def _check_encoder_shapes(flat, config, where) -> None:
    want = encoder_shapes(config)
    for path in sorted(want):
        if path.startswith("pooler/") and path not in flat:
            continue  # a checkpoint without a pooler is fine for mean pooling
        if path not in flat:
            raise ValueError(f"{where}: checkpoint lacks the weight for {path} {want[path]}")
        if flat[path].shape != want[path]:
            raise ValueError(f"{where}: {path} has shape {flat[path].shape}; config.json implies "
                             f"{want[path]}")
    extra = sorted(set(flat) - set(want))
    if extra:
        raise ValueError(f"{where}: checkpoint has {extra[0]}, beyond the {config.num_layers} "
                         "layers config.json declares")


def encoder_to_hf(params: Mapping) -> dict[str, np.ndarray]:
    """Inverse of :func:`load_encoder`'s mapping: canonical encoder params -> HF BERT names."""
    out = {}
    inverse = [(_template_regex(ours), hf, t) for hf, ours, t in BERT_NAMES]
    for path, value in paths.flatten(params).items():
        for regex, hf, transpose in inverse:
            m = regex.match(path)
            if m:
                name = hf.replace("{i}", m.group(1)) if m.groups() else hf
                value = np.asarray(value)
                out[name] = np.ascontiguousarray(value.T if transpose else value)
                break
        else:
            raise ValueError(f"encoder param {path} has no Hugging Face BERT name")
    return out
