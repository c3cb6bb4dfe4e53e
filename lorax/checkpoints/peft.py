"""LoRA adapters in Hugging Face PEFT's format (adapter_config.json + safetensors) <-> deltas.

A PEFT LoRA adapter stores, for each adapted module ``M`` of the wrapped PyTorch model,
``base_model.model.M.lora_A.weight`` [R, D_in] and ``base_model.model.M.lora_B.weight``
[D_out, R]; the module computes ``base(x) + scaling · B(A(x))`` with ``scaling = alpha/r``
(``alpha/sqrt(r)`` with rsLoRA), r and alpha per module from ``rank_pattern`` and
``alpha_pattern``. A lorax delta holds ``a`` [D_in, R] and ``b`` [R, D_out] at each kernel, so
``lora_A = a.T`` and ``lora_B = b.T`` for every family, GPT-2's Conv1D modules included.

GPT-2 fuses q, k and v into one ``c_attn`` [D, 3D]; PEFT sees one module there. Export writes
the q/k/v adapters of a layer as one ``c_attn`` adapter of rank r_q + r_k + r_v: A stacks their
A factors along the rank axis and B is block-structured (q's rows 0:D under q's rank columns,
k's rows D:2D, v's rows 2D:3D, zeros elsewhere), with each adapter's own scale folded into its
B block and alpha chosen so that PEFT's scaling is 1. Import cuts B's rows back into three
blocks, drops a block that is exactly zero, and gives each kept kernel the full A.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from lorax import lora, paths
from lorax.checkpoints import hf
from lorax.models import decoder, encoder

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PeftModel wraps a LoraModel ("base_model") that wraps the transformers model ("model").
KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)
# PEFT's layers_to_transform reads the first number that follows two name parts.
_PEFT_LAYER_RE = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
_QKV_RE = re.compile(r"^(?P<head>.*/attn/)(?P<name>[qkv])/kernel$")
_LAYER_SPLIT_RE = re.compile(r"^(?P<prefix>.*?)layers_(?P<i>\d+)/(?P<rest>.*)$")

# adapter_config.json fields import understands, and those that never change the weights'
# meaning. Any other field must hold its default (None / False / empty) or import refuses it.
_HANDLED = {
    "peft_type", "task_type", "r", "lora_alpha", "target_modules", "exclude_modules",
    "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "bias", "fan_in_fan_out",
    "layers_to_transform", "layers_pattern", "init_lora_weights", "modules_to_save", "use_dora",
}  # fmt: skip
_IGNORED = {
    "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "megatron_core", "qalora_group_size", "ensure_weight_tying", "eva_config",
}  # fmt: skip
# Inits that rewrite the base weights: such an adapter only fits the modified base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# --- families --------------------------------------------------------------------------------


def _family(config) -> tuple[hf.NameMap, str, str, dict[str, tuple[int, ...]]]:
    """``(name table, default module prefix, default task_type, canonical param shapes)``."""
    if isinstance(config, encoder.EncoderConfig):
        return hf.BERT, "", "FEATURE_EXTRACTION", encoder.param_shapes(config)
    if isinstance(config, decoder.DecoderConfig):
        prefix = "transformer." if config.family == "gpt2" else ""
        return hf.decoder_names(config), prefix, "CAUSAL_LM", decoder.param_shapes(config)
    raise TypeError(f"config must be an EncoderConfig or a DecoderConfig, got {type(config)}")


def _fused(path: str, gpt2: bool) -> str:
    """GPT-2's q, k, v kernels live in one c_attn: ``attn/q/kernel`` -> ``attn/qkv/kernel``."""
    return _QKV_RE.sub(r"\g<head>qkv/kernel", path) if gpt2 else path


def _module(names: hf.NameMap, path: str, prefix: str) -> str:
    """The PyTorch module name of a canonical param path (``layers_0/attn/q/kernel`` ->
    ``encoder.layer.0.attention.self.query``); KeyError if the family has no such weight."""
    hf_name, _ = names.to_hf(path)
    return prefix + hf_name.rpartition(".")[0]


def _peft_layer(module: str) -> int | None:
    m = _PEFT_LAYER_RE.match(module)
    return int(m["idx"]) if m else None


def _targeted(keys: Iterable[str], layers: frozenset[int] | None, module: str) -> bool:
    """Whether PEFT adapts ``module`` given ``target_modules=keys`` and ``layers_to_transform``:
    an exact name always matches; a suffix (after a ".") matches within the layers."""
    keys = set(keys)
    if module in keys:
        return True
    if not any(module.endswith("." + k) for k in keys):
        return False
    return layers is None or _peft_layer(module) in layers


def _pattern_matches(key: str, module: str) -> bool:
    """PEFT's rank_pattern / alpha_pattern rule: the key is a regex matching a name suffix."""
    return re.match(rf"(.*\.)?({key})$", module) is not None


def _pattern_lookup(pattern: Mapping[str, Any], module: str, default):
    """The value PEFT uses for ``module``: the first key that matches, else ``default``."""
    for key, value in pattern.items():
        if _pattern_matches(key, module):
            return value
    return default


def _suffixes(module: str) -> list[str]:
    """``a.b.c`` -> ``["c", "b.c", "a.b.c"]``: candidate keys, shortest first."""
    parts = module.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


# --- export ----------------------------------------------------------------------------------


def _target_of(spec: lora.LoraSpec, path: str) -> lora.Target:
    """The target that adapts ``path`` under :func:`lorax.lora.resolve`'s rules."""
    for target in spec.targets:
        if not re.search(target.pattern, path):
            continue
        if target.layers is not None:
            if paths.is_stacked(path):
                raise ValueError(
                    f"target {target.name!r} has a layer filter but {path} is a scanned stack"
                )
            if paths.layer_index(path) not in target.layers:
                continue
        return target
    raise ValueError(
        f"delta has an adapter for {path}, which no target of the spec matches; targets are "
        f"{[t.name for t in spec.targets]}"
    )


def _delta_factors(delta, spec, shapes, where):
    """``{canonical kernel path: (a_DR, b_RF, target)}``, per layer, fp32 numpy, checked.

    ``where`` is a prefix the delta's paths carry and the model's do not ("encoder/").
    """
    flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in paths.flatten(delta).items()}
    kernels = set()
    for key in flat:
        path, _, part = key.rpartition("/")
        if part not in ("a", "b"):
            raise ValueError(f"delta leaf {key} is not an adapter factor ('/a' or '/b')")
        kernels.add(path)
    targets = {}  # per-layer path -> target
    for path in sorted(kernels):
        if path + "/a" not in flat or path + "/b" not in flat:
            raise ValueError(f"delta for {path} lacks its 'a' or 'b' factor")
        target, rank = _target_of(spec, path), flat[path + "/a"].shape[-1]
        if rank != target.rank:
            raise ValueError(
                f"delta for {path} has rank {rank}; its target {target.name!r} says {target.rank}"
            )
        if paths.is_stacked(path):  # scanned layers: [L, ...] under layers/
            for i in range(flat[path + "/a"].shape[0]):
                targets[paths.layer_path(path, i)] = target
        else:
            targets[path] = target
    per_layer = paths.flatten(paths.unstack_layers(paths.unflatten(flat)))
    out = {}
    for path, target in sorted(targets.items()):
        canonical = path.removeprefix(where)
        if canonical not in shapes:
            raise ValueError(
                f"delta adapts {path}, which this model's config does not have; param paths "
                f"look like: {paths.describe_paths(shapes)}"
            )
        if not canonical.endswith("/kernel"):
            raise ValueError(
                f"delta adapts {path}; PEFT export supports Linear/Conv1D kernels only "
                "(PEFT stores embedding adapters differently)"
            )
        a, b = per_layer[path + "/a"], per_layer[path + "/b"]
        d_in, d_out = shapes[canonical]
        if a.shape != (d_in, target.rank) or b.shape != (target.rank, d_out):
            raise ValueError(
                f"delta for {path} has a{a.shape} b{b.shape}; the kernel [{d_in}, {d_out}] and "
                f"rank {target.rank} need a{(d_in, target.rank)} b{(target.rank, d_out)}"
            )
        out[canonical] = (a, b, target)
    return out


def _choose_target_modules(adapted: set[str], modules: set[str], layers):
    """The fewest ``target_modules`` keys that make PEFT adapt exactly ``adapted``."""
    keys: list[str] = []
    for m in sorted(adapted):
        if _targeted(keys, layers, m):
            continue
        for s in _suffixes(m):
            hits = {b for b in modules | adapted if _targeted([s], layers, b)}
            if m in hits and hits <= adapted:
                keys.append(s)
                break
    return sorted(keys)


def _choose_pattern(values: Mapping[str, Any], default) -> dict[str, Any]:
    """rank_pattern / alpha_pattern keys giving each module its value (short suffixes first)."""
    pattern: dict[str, Any] = {}
    for m in sorted(values):
        if _pattern_lookup(pattern, m, default) == values[m]:
            continue
        for s in _suffixes(m):
            if all(values[b] == values[m] for b in values if _pattern_matches(s, b)):
                pattern[s] = values[m]
                break
    for m, v in values.items():  # belt and braces: PEFT must read back every module's value
        assert _pattern_lookup(pattern, m, default) == v, (m, v, pattern)
    return pattern


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def export_peft(
    delta: Mapping[str, Any],
    spec: lora.LoraSpec,
    config: encoder.EncoderConfig | decoder.DecoderConfig,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    module_prefix: str | None = None,
    task_type: str | None = "auto",
) -> pathlib.Path:
    """Writes ``delta`` as a PEFT LoRA adapter that ``PeftModel.from_pretrained`` loads.

    Args:
      delta: a lorax delta (per-layer ``layers_i`` or scanned ``layers`` layout; an encoder
        delta may sit under ``encoder/`` as in :class:`EncoderClassifier`'s params).
      spec: the spec it was trained with (ranks, alphas and rsLoRA give the scales).
      config: the model's config: BERT-family encoder, Llama-family or GPT-2 decoder.
      out_dir: created if needed; gets ``adapter_config.json`` and ``adapter_model.safetensors``.
      base_model_name_or_path: recorded in the config (PEFT loads the base from it if asked).
      module_prefix: what precedes the family's module names in the PyTorch model PEFT wraps;
        by default ``""`` for ``BertModel`` and ``LlamaForCausalLM`` and ``"transformer."`` for
        ``GPT2LMHeadModel``; ``"bert."`` targets ``BertForSequenceClassification``.
      task_type: PEFT's task type; "auto" is FEATURE_EXTRACTION for encoders, CAUSAL_LM for
        decoders; None leaves it unset.

    Returns:
      ``out_dir`` as a path. Tensors are written in fp32.

    Raises:
      ValueError: the delta adapts something the model (or PEFT) has no Linear module for, or
        its shapes or ranks do not fit the config and spec.
    """
    from safetensors.numpy import save_file

    names, default_prefix, default_task, shapes = _family(config)
    prefix = default_prefix if module_prefix is None else module_prefix
    gpt2 = isinstance(config, decoder.DecoderConfig) and config.family == "gpt2"
    # EncoderClassifier keeps the encoder under "encoder/"; PEFT wraps the bare BertModel.
    is_classifier = any(k.startswith("encoder/") for k in paths.flatten(delta))
    where = "encoder/" if isinstance(config, encoder.EncoderConfig) and is_classifier else ""
    factors = _delta_factors(delta, spec, shapes, where)
    if not factors:
        raise ValueError("delta is empty: there is nothing to export")
    modules = _peft_modules(factors, spec, names, prefix, gpt2, getattr(config, "hidden_size", 0))
    target_modules, layers = _targets(set(modules), shapes, names, prefix, gpt2)
    task = default_task if task_type == "auto" else task_type
    peft_config = _adapter_config(modules, spec, target_modules, layers, gpt2, task)
    peft_config["base_model_name_or_path"] = base_model_name_or_path
    tensors = {}
    for module in sorted(modules):
        a_RD, b_FR, _, _ = modules[module]
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a_RD, np.float32)
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b_FR, np.float32)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def _peft_modules(factors, spec, names, prefix, gpt2, d) -> dict[str, tuple]:
    """PEFT module name -> (A [R, D_in], B [D_out, R], rank, alpha), alpha chosen so PEFT's
    scaling is ours; GPT-2's q, k, v factors are fused into one ``c_attn`` adapter."""
    modules: dict[str, tuple[np.ndarray, np.ndarray, int, float]] = {}
    fused: dict[str, dict[str, tuple]] = collections.defaultdict(dict)
    for path, (a, b, target) in factors.items():
        m = _QKV_RE.match(path) if gpt2 else None
        if m:
            fused[_module(names, _fused(path, gpt2), prefix)][m["name"]] = (a, b, target)
        else:  # same r and alpha as ours: PEFT's scaling formula is the same as lorax's
            modules[_module(names, path, prefix)] = (a.T, b.T, target.rank, target.alpha)
    for module, parts in fused.items():
        order = [n for n in "qkv" if n in parts]
        a_RD = np.concatenate([parts[n][0].T for n in order], axis=0)
        r_total = a_RD.shape[0]
        b_FR = np.zeros((3 * d, r_total), np.float32)
        col = 0
        for n in order:
            a, b, target = parts[n]
            row = "qkv".index(n) * d
            # Each adapter's own scale goes into its block; alpha below makes PEFT's scaling 1.
            b_FR[row : row + d, col : col + a.shape[1]] = spec.scale(target) * b.T
            col += a.shape[1]
        modules[module] = (a_RD, b_FR, r_total, math.sqrt(r_total) if spec.rslora else r_total)
    return modules


def _targets(adapted: set[str], shapes, names, prefix, gpt2):
    """PEFT's ``target_modules`` for the adapted modules, and the layer indices when naming
    ``layers_to_transform`` gives the shorter list (else None)."""
    all_modules = set()
    for path in shapes:
        try:
            all_modules.add(_module(names, _fused(path, gpt2), prefix))
        except KeyError:
            pass
    options = [_choose_target_modules(adapted, all_modules, None)]
    layer_set = {_peft_layer(m) for m in adapted}
    all_layers = {_peft_layer(m) for m in all_modules} - {None}
    if None not in layer_set and layer_set != all_layers:
        options.append(_choose_target_modules(adapted, all_modules, frozenset(layer_set)))
    use_layers = len(options) == 2 and len(options[1]) < len(options[0])
    return (options[1], sorted(layer_set)) if use_layers else (options[0], None)


def _adapter_config(modules, spec, target_modules, layers, gpt2, task_type) -> dict[str, Any]:
    """``adapter_config.json``: the most common rank and alpha, the rest as patterns."""
    ranks = {m: v[2] for m, v in modules.items()}
    alphas = {m: _json_number(v[3]) for m, v in modules.items()}
    r = collections.Counter(ranks[m] for m in sorted(ranks)).most_common(1)[0][0]
    alpha = collections.Counter(alphas[m] for m in sorted(alphas)).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": target_modules,
        "rank_pattern": _choose_pattern(ranks, r),
        "alpha_pattern": _choose_pattern(alphas, alpha),
        "layers_to_transform": layers,
        "layers_pattern": None,
        "use_rslora": spec.rslora,
        "lora_dropout": spec.dropout,
        "bias": "none",
        "fan_in_fan_out": gpt2,  # GPT-2's Conv1D stores weights [in, out]
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "inference_mode": True,
    }


# --- import ----------------------------------------------------------------------------------


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """``adapter_config.json``, checked to describe a plain LoRA adapter lorax can reproduce.

    Raises:
      FileNotFoundError: no adapter_config.json.
      ValueError: a non-LoRA ``peft_type``, DoRA, trained biases, ``modules_to_save``, an init
        that rewrote the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or any other option that
        changes what the weights mean; the message names the option.
    """
    path = pathlib.Path(adapter_dir) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{adapter_dir} has no {CONFIG_NAME}; is it a PEFT adapter?")
    raw = json.loads(path.read_text())
    where = f"{path}"
    if raw.get("peft_type") != "LORA":
        raise ValueError(
            f"{where}: peft_type {raw.get('peft_type')!r} is not supported; only 'LORA'"
        )
    if raw.get("use_dora"):
        raise ValueError(f"{where}: use_dora=true (DoRA) is not supported; only plain LoRA")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={raw['bias']!r} is not supported; only 'none'")
    if raw.get("modules_to_save"):
        raise ValueError(
            f"{where}: modules_to_save={raw['modules_to_save']} is not supported; lorax imports "
            "only the LoRA factors"
        )
    init = str(raw.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{where}: init_lora_weights={raw['init_lora_weights']!r} rewrites the base "
            "weights, so the adapter does not fit the original base; convert it with PEFT's "
            "path_initial_model_for_weight_conversion first"
        )
    for key, value in raw.items():
        if key not in _HANDLED and key not in _IGNORED and value not in (None, False, [], {}, ""):
            raise ValueError(f"{where}: option {key}={value!r} is not supported by lorax's import")
    return raw


def _read_factors(adapter_dir: pathlib.Path) -> dict[str, dict[str, tuple[str, np.ndarray]]]:
    """``{module: {"A"|"B": (key, array)}}`` from adapter_model.safetensors, every key accounted."""
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.exists():
        other = " (it has adapter_model.bin: re-save it with safe_serialization=True)"
        raise FileNotFoundError(
            f"{adapter_dir} has no {WEIGHTS_NAME}"
            + (other if (adapter_dir / "adapter_model.bin").exists() else "")
        )
    factors: dict[str, dict[str, tuple[str, np.ndarray]]] = collections.defaultdict(dict)
    adapter_names = set()
    for key, value in sorted(hf.read_safetensors_file(weights).items()):
        m = _KEY_RE.match(key)
        if not m:
            raise ValueError(
                f"{weights}: key {key!r} is not a LoRA factor; keys look like "
                f"'{KEY_PREFIX}<module>.lora_A.weight' (DoRA magnitudes, biases, embedding "
                "adapters and saved modules are not supported)"
            )
        adapter_names.add(m["adapter"])
        factors[m["module"]][m["part"]] = (key, value)
    if len(adapter_names) > 1:
        raise ValueError(f"{weights}: keys name several adapters {sorted(map(str, adapter_names))}")
    for parts in factors.values():
        if set(parts) != {"A", "B"}:
            key = next(iter(parts.values()))[0]
            raise ValueError(f"{weights}: {key!r} has no lora_{'AB'[parts.keys() == {'B'}]}")
    return factors


def _spec_targets(sites: Mapping[str, tuple[int, float]]) -> tuple[lora.Target, ...]:
    """One path-regex target per (kernel within a layer, rank, alpha): ``^layers_(?:0|1)/...``."""
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    for path, (rank, alpha) in sorted(sites.items()):
        m = _LAYER_SPLIT_RE.match(path)
        if m:
            groups[(m["prefix"], m["rest"], rank, alpha)].append(int(m["i"]))
        else:
            groups[(path, None, rank, alpha)] = []
    targets = []
    for (head, rest, rank, alpha), layers in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if rest is None:
            pattern = f"^{re.escape(head)}$"
        else:
            alternatives = "|".join(str(i) for i in sorted(layers))
            pattern = f"^{re.escape(head)}layers_(?:{alternatives})/{re.escape(rest)}$"
        targets.append(lora.Target(pattern, rank, alpha))
    return tuple(targets)


def import_peft(
    adapter_dir: str | os.PathLike,
    base: Mapping[str, Any],
    config: encoder.EncoderConfig | decoder.DecoderConfig,
) -> tuple[lora.LoraSpec, dict[str, Any]]:
    """Reads a PEFT LoRA adapter into a lorax spec and delta fitting ``base``.

    Args:
      adapter_dir: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``
        (keys with or without the adapter name, e.g. ``...lora_A.weight`` or
        ``...lora_A.default.weight``; any module prefix the family's loader knows, such as
        ``bert.`` or ``transformer.``).
      base: the model's params in the per-layer ``layers_i`` layout (an encoder's may sit
        under ``encoder/``, as in :class:`EncoderClassifier`'s params).
      config: the base's config (chooses the family's module names).

    Returns:
      ``(spec, delta)``: one path-regex target per adapted kernel group, with PEFT's rank and
      alpha (so ``spec.scale`` equals PEFT's scaling, rsLoRA and rank/alpha patterns included),
      and ``{"a": lora_A.T, "b": lora_B.T}`` in fp32 at each kernel. ``lora.wrap(base, delta,
      spec)`` then computes what the PEFT model computes. A GPT-2 ``c_attn`` adapter becomes q,
      k and v adapters sharing its A, with a B block that is exactly zero dropped.

    Raises:
      ValueError: an unsupported option (named), a key that is not a LoRA factor or whose
        module the base lacks, a factor whose shape does not fit its kernel (naming the key,
        its shape and the expected one), or a rank that disagrees with the config.
    """
    adapter_dir = pathlib.Path(adapter_dir)
    raw = read_adapter_config(adapter_dir)
    factors = _read_factors(adapter_dir)
    names, prefix, _, _ = _family(config)
    gpt2 = isinstance(config, decoder.DecoderConfig) and config.family == "gpt2"
    flat_base = paths.flatten(base)
    if any(paths.is_stacked(p) for p in flat_base):
        raise ValueError("base is a scanned layer stack; pass paths.unstack_layers(base)")
    where = ""
    if isinstance(config, encoder.EncoderConfig) and not any(
        p.startswith("layers_") for p in flat_base
    ):
        where = "encoder/"
    example = KEY_PREFIX + _module(names, _fused("layers_0/attn/q/kernel", gpt2), prefix)
    delta, sites = _import_factors(
        adapter_dir, factors, raw, config, flat_base, where=where, example=example
    )
    if not delta:
        raise ValueError(f"{adapter_dir}: {WEIGHTS_NAME} holds no LoRA factors")
    spec = lora.LoraSpec(
        targets=_spec_targets(sites),
        init="gaussian" if raw.get("init_lora_weights") == "gaussian" else "kaiming",
        dropout=float(raw.get("lora_dropout") or 0.0),
        rslora=bool(raw.get("use_rslora", False)),
    )
    resolved = lora.resolve(base, spec)
    if set(resolved) != set(delta):  # the targets are built from the paths: a bug if not
        raise AssertionError(f"spec resolves to {sorted(resolved)} but delta has {sorted(delta)}")
    return spec, paths.unflatten({f"{p}/{k}": v for p, d in delta.items() for k, v in d.items()})


def _import_factors(adapter_dir, factors, raw, config, flat_base, *, where, example):
    """``({kernel path: {"a", "b"}}, {kernel path: (rank, alpha)})`` from PEFT's factors,
    each checked against its base kernel (a GPT-2 ``c_attn`` split into q, k, v)."""
    names, _, _, _ = _family(config)
    gpt2 = isinstance(config, decoder.DecoderConfig) and config.family == "gpt2"
    r_default, alpha_default = int(raw["r"]), raw.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    delta, sites = {}, {}
    for module in sorted(factors):
        (key_a, a_RD), (key_b, b_FR) = factors[module]["A"], factors[module]["B"]
        try:
            mapped = names.to_canonical(module + ".weight")
        except KeyError:
            mapped = None
        path = where + mapped[0] if mapped else None
        fused_path = path
        qkv = gpt2 and path is not None and path.endswith("/attn/qkv/kernel")
        if qkv:  # the fused c_attn: its shapes are checked against q's [D, D] times 3
            path = path.replace("/attn/qkv/", "/attn/q/")
        if path is None or not path.endswith("/kernel") or path not in flat_base:
            raise ValueError(
                f"{adapter_dir}: key {key_a!r} is for module {module!r}, which the base "
                f"({names.family}, {getattr(config, 'num_layers', '?')} layers) does not have; "
                f"keys look like '{example}.lora_A.weight'"
            )
        d_in, d_out = np.shape(flat_base[path])
        d_out *= 3 if qkv else 1
        rank = int(_pattern_lookup(rank_pattern, module, r_default))
        alpha = float(_pattern_lookup(alpha_pattern, module, alpha_default))
        for key, got, want in ((key_a, a_RD, (rank, d_in)), (key_b, b_FR, (d_out, rank))):
            if tuple(got.shape) != want:
                raise ValueError(
                    f"{adapter_dir}: {key!r} has shape {tuple(got.shape)}; the base kernel "
                    f"{fused_path} [{d_in}, {d_out}] with r={rank} (from {CONFIG_NAME}) needs "
                    f"{want}"
                )
        a_DR = np.ascontiguousarray(np.asarray(a_RD, np.float32).T)
        b_RF = np.ascontiguousarray(np.asarray(b_FR, np.float32).T)
        if qkv:
            blocks = dict(zip("qkv", np.split(b_RF, 3, axis=1), strict=True))
            kept = {n: blk for n, blk in blocks.items() if np.any(blk)} or blocks
            for n, blk in kept.items():
                p = path.replace("/attn/q/", f"/attn/{n}/")
                delta[p] = {"a": a_DR, "b": np.ascontiguousarray(blk)}
                sites[p] = (rank, alpha)
        else:
            delta[path] = {"a": a_DR, "b": b_RF}
            sites[path] = (rank, alpha)
    return delta, sites


# --- size ------------------------------------------------------------------------------------


def adapter_size_report(
    delta: Mapping[str, Any], base: Mapping[str, Any], path: str | os.PathLike | None = None
) -> dict[str, float]:
    """How small the adapter is next to its base (the paper's "350 GB -> 35 MB").

    Args:
      delta: the adapter's factors.
      base: the frozen params it adapts.
      path: optionally an exported adapter directory (or file), whose size is added.

    Returns:
      ``adapter_params``, ``adapter_bytes`` (in memory), ``base_params``, ``base_bytes``,
      ``base_over_adapter`` (base_bytes / adapter_bytes), and with ``path``, ``file_bytes``.
    """
    leaves = jax.tree_util.tree_leaves(delta)
    base_leaves = jax.tree_util.tree_leaves(base)
    report = {
        "adapter_params": sum(int(np.size(x)) for x in leaves),
        "adapter_bytes": paths.nbytes(delta),
        "base_params": sum(int(np.size(x)) for x in base_leaves),
        "base_bytes": paths.nbytes(base),
    }
    report["base_over_adapter"] = report["base_bytes"] / max(report["adapter_bytes"], 1)
    if path is not None:
        p = pathlib.Path(path)
        files = [p] if p.is_file() else [p / CONFIG_NAME, p / WEIGHTS_NAME]
        report["file_bytes"] = sum(f.stat().st_size for f in files)
    return report
