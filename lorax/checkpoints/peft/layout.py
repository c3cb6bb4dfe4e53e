"""PEFT's adapter layout: file and key names, each family's module names, and the
``target_modules`` / ``layers_to_transform`` / pattern matching both directions share."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from lorax.checkpoints import hf
from lorax.models import decoder, encoder

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PeftModel wraps a LoraModel ("base_model") that wraps the transformers model ("model").
KEY_PREFIX = "base_model.model."
KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)
# DoRA's magnitude: saved as "<module>.lora_magnitude_vector", in a live model's state dict
# "<module>.lora_magnitude_vector.<adapter>.weight".
MAGNITUDE_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector"
    r"(?:\.(?!weight$)(?P<adapter>[^.]+))?(?:\.weight)?$"
)
# PEFT's layers_to_transform reads the first number that follows two name parts.
_PEFT_LAYER_RE = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
QKV_RE = re.compile(r"^(?P<head>.*/attn/)(?P<name>[qkv])/kernel$")
LAYER_SPLIT_RE = re.compile(r"^(?P<prefix>.*?)layers_(?P<i>\d+)/(?P<rest>.*)$")

# adapter_config.json fields import understands, and those that never change the weights'
# meaning. Any other field must hold its default (None / False / empty) or import refuses it.
HANDLED = {
    "peft_type", "task_type", "r", "lora_alpha", "target_modules", "exclude_modules",
    "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "bias", "fan_in_fan_out",
    "layers_to_transform", "layers_pattern", "init_lora_weights", "modules_to_save", "use_dora",
}  # fmt: skip
IGNORED = {
    "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "megatron_core", "qalora_group_size", "ensure_weight_tying", "eva_config",
}  # fmt: skip
# Inits that rewrite the base weights: such an adapter only fits the modified base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# --- families --------------------------------------------------------------------------------


def family(config) -> tuple[hf.NameMap, str, str, dict[str, tuple[int, ...]]]:
    """``(name table, default module prefix, default task_type, canonical param shapes)``."""
    if isinstance(config, encoder.EncoderConfig):
        return hf.BERT, "", "FEATURE_EXTRACTION", encoder.param_shapes(config)
    if isinstance(config, decoder.DecoderConfig):
        prefix = "transformer." if config.family == "gpt2" else ""
        return hf.decoder_names(config), prefix, "CAUSAL_LM", decoder.param_shapes(config)
    raise TypeError(f"config must be an EncoderConfig or a DecoderConfig, got {type(config)}")


def fused(path: str, gpt2: bool) -> str:
    """GPT-2's q, k, v kernels live in one c_attn: ``attn/q/kernel`` -> ``attn/qkv/kernel``."""
    return QKV_RE.sub(r"\g<head>qkv/kernel", path) if gpt2 else path


def module_name(names: hf.NameMap, path: str, prefix: str) -> str:
    """The PyTorch module name of a canonical param path (``layers_0/attn/q/kernel`` ->
    ``encoder.layer.0.attention.self.query``); KeyError if the family has no such weight."""
    hf_name, _ = names.to_hf(path)
    return prefix + hf_name.rpartition(".")[0]


def peft_layer(module: str) -> int | None:
    m = _PEFT_LAYER_RE.match(module)
    return int(m["idx"]) if m else None


def targeted(keys: Iterable[str], layers: frozenset[int] | None, module: str) -> bool:
    """Whether PEFT adapts ``module`` given ``target_modules=keys`` and ``layers_to_transform``:
    an exact name always matches; a suffix (after a ".") matches within the layers."""
    keys = set(keys)
    if module in keys:
        return True
    if not any(module.endswith("." + k) for k in keys):
        return False
    return layers is None or peft_layer(module) in layers


def pattern_matches(key: str, module: str) -> bool:
    """PEFT's rank_pattern / alpha_pattern rule: the key is a regex matching a name suffix."""
    return re.match(rf"(.*\.)?({key})$", module) is not None


def pattern_lookup(pattern: Mapping[str, Any], module: str, default):
    """The value PEFT uses for ``module``: the first key that matches, else ``default``."""
    for key, value in pattern.items():
        if pattern_matches(key, module):
            return value
    return default


def suffixes(module: str) -> list[str]:
    """``a.b.c`` -> ``["c", "b.c", "a.b.c"]``: candidate keys, shortest first."""
    parts = module.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]
