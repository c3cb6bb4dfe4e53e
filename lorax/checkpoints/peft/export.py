"""lorax delta -> PEFT adapter directory (and its size next to the base)."""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lorax import lora, paths, runfiles
from lorax.checkpoints.peft import layout
from lorax.models import decoder, encoder


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
    parts = ("a", "b", "m") if spec.dora else ("a", "b")
    for key in flat:
        path, _, part = key.rpartition("/")
        if part not in parts:
            raise ValueError(
                f"delta leaf {key} is not an adapter factor ("
                + " or ".join(f"'/{p}'" for p in parts)
                + ")"
            )
        kernels.add(path)
    targets = {}  # per-layer path -> target
    for path in sorted(kernels):
        if any(path + "/" + p not in flat for p in parts):
            raise ValueError(f"delta for {path} lacks one of its factors {list(parts)}")
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
        out[canonical] = (a, b, target, per_layer.get(path + "/m"))
    return out


def _choose_target_modules(adapted: set[str], modules: set[str], layers):
    """The fewest ``target_modules`` keys that make PEFT adapt exactly ``adapted``."""
    keys: list[str] = []
    for m in sorted(adapted):
        if layout.targeted(keys, layers, m):
            continue
        for s in layout.suffixes(m):
            hits = {b for b in modules | adapted if layout.targeted([s], layers, b)}
            if m in hits and hits <= adapted:
                keys.append(s)
                break
    return sorted(keys)


def _choose_pattern(values: Mapping[str, Any], default) -> dict[str, Any]:
    """rank_pattern / alpha_pattern keys giving each module its value (short suffixes first)."""
    pattern: dict[str, Any] = {}
    for m in sorted(values):
        if layout.pattern_lookup(pattern, m, default) == values[m]:
            continue
        for s in layout.suffixes(m):
            if all(values[b] == values[m] for b in values if layout.pattern_matches(s, b)):
                pattern[s] = values[m]
                break
    for m, v in values.items():  # belt and braces: PEFT must read back every module's value
        assert layout.pattern_lookup(pattern, m, default) == v, (m, v, pattern)
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
    modules_to_save: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    base: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Writes ``delta`` as a PEFT LoRA adapter (DoRA's with ``spec.dora``: ``use_dora`` and
    each kernel's ``lora_magnitude_vector``) that ``PeftModel.from_pretrained`` loads.

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
      modules_to_save: whole modules trained beside the adapter, by PyTorch module name, each
        ``{param name: array in PyTorch's layout}`` (e.g. ``{"classifier": {"weight": [C, D],
        "bias": [C]}}``): saved as PEFT saves ``modules_to_save`` and listed in the config.
      base: the frozen params, for DoRA on GPT-2's fused ``c_attn`` with some of q, k, v not
        adapted (their magnitudes are their base column norms); otherwise unused.

    Returns:
      ``out_dir`` as a path. Tensors are written in fp32.

    Raises:
      ValueError: the delta adapts something the model (or PEFT) has no Linear module for, or
        its shapes or ranks do not fit the config and spec.
    """
    names, default_prefix, default_task, shapes = layout.family(config)
    prefix = default_prefix if module_prefix is None else module_prefix
    gpt2 = isinstance(config, decoder.DecoderConfig) and config.family == "gpt2"
    # EncoderClassifier keeps the encoder under "encoder/"; PEFT wraps the bare BertModel.
    is_classifier = any(k.startswith("encoder/") for k in paths.flatten(delta))
    where = "encoder/" if isinstance(config, encoder.EncoderConfig) and is_classifier else ""
    factors = _delta_factors(delta, spec, shapes, where)
    if not factors:
        raise ValueError("delta is empty: there is nothing to export")
    needed = base is not None and gpt2 and spec.dora  # the fused magnitudes' base norms
    flat_base = paths.flatten(paths.unstack_layers(base)) if needed else None
    d = getattr(config, "hidden_size", 0)
    modules = _peft_modules(factors, spec, names, prefix, gpt2, d, flat_base)
    target_modules, layers = _targets(set(modules), shapes, names, prefix, gpt2)
    task = default_task if task_type == "auto" else task_type
    peft_config = _adapter_config(modules, spec, target_modules, layers, gpt2, task)
    peft_config["base_model_name_or_path"] = base_model_name_or_path
    tensors = {}
    if modules_to_save:
        peft_config["modules_to_save"] = sorted(modules_to_save)
        for module, params in modules_to_save.items():
            for name, value in params.items():
                tensors[f"{layout.KEY_PREFIX}{module}.{name}"] = np.ascontiguousarray(
                    value, np.float32
                )
    for module in sorted(modules):
        a_RD, b_FR, _, _, magnitude = modules[module]
        parts = {"lora_A.weight": a_RD, "lora_B.weight": b_FR, "lora_magnitude_vector": magnitude}
        for name, value in parts.items():
            if value is not None:
                tensors[f"{layout.KEY_PREFIX}{module}.{name}"] = np.ascontiguousarray(value, "f4")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / layout.CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")
    runfiles.save_safetensors(tensors, out / layout.WEIGHTS_NAME, metadata={"format": "pt"})
    return out


def _peft_modules(factors, spec, names, prefix, gpt2, d, flat_base=None) -> dict[str, tuple]:
    """PEFT module name -> (A [R, D_in], B [D_out, R], rank, alpha, magnitude or None), alpha
    chosen so PEFT's scaling is ours; GPT-2's q, k, v factors are fused into one ``c_attn``
    adapter (with DoRA, its magnitude the q, k, v ones end to end)."""
    modules: dict[str, tuple] = {}
    fused: dict[str, dict[str, tuple]] = collections.defaultdict(dict)
    heads: dict[str, str] = {}  # fused module -> its layer's ".../attn/" path
    for path, (a, b, target, magnitude) in factors.items():
        m = layout.QKV_RE.match(path) if gpt2 else None
        if m:
            module = layout.module_name(names, layout.fused(path, gpt2), prefix)
            fused[module][m["name"]] = (a, b, target, magnitude)
            heads[module] = m["head"]
        else:  # same r and alpha as ours: PEFT's scaling formula is the same as lorax's
            module = layout.module_name(names, path, prefix)
            modules[module] = (a.T, b.T, target.rank, target.alpha, magnitude)
    for module, parts in fused.items():
        order = [n for n in "qkv" if n in parts]
        a_RD = np.concatenate([parts[n][0].T for n in order], axis=0)
        r_total = a_RD.shape[0]
        b_FR = np.zeros((3 * d, r_total), np.float32)
        col = 0
        for n in order:
            a, b, target, _ = parts[n]
            row = "qkv".index(n) * d
            # Each adapter's own scale goes into its block; alpha below makes PEFT's scaling 1.
            b_FR[row : row + d, col : col + a.shape[1]] = spec.scale(target) * b.T
            col += a.shape[1]
        alpha = math.sqrt(r_total) if spec.rslora else r_total
        magnitude = _fused_magnitude(parts, heads[module], flat_base) if spec.dora else None
        modules[module] = (a_RD, b_FR, r_total, alpha, magnitude)
    return modules


def _fused_magnitude(parts, head: str, flat_base) -> np.ndarray:
    """A DoRA ``c_attn``'s magnitude [3D]: each adapted block's own, an un-adapted block's
    base column norms (its kernel unchanged, as DoRA starts). Each column of the fused kernel
    lies in one block, so its norm is that block's: the fused module computes what the three
    kernels do."""
    blocks = []
    for n in "qkv":
        if n in parts:
            blocks.append(parts[n][3])
            continue
        if flat_base is None:
            raise ValueError(
                f"DoRA on GPT-2's c_attn adapts {sorted(parts)} of {head}{{q,k,v}}: the "
                f"magnitude of {n} is its base kernel's column norms; pass base= (the frozen "
                "params) to export_peft"
            )
        w = np.asarray(jax.device_get(flat_base[f"{head}{n}/kernel"]), np.float32)
        blocks.append(np.linalg.norm(w, axis=0))
    return np.concatenate(blocks).astype(np.float32)


def _targets(adapted: set[str], shapes, names, prefix, gpt2):
    """PEFT's ``target_modules`` for the adapted modules, and the layer indices when naming
    ``layers_to_transform`` gives the shorter list (else None)."""
    all_modules = set()
    for path in shapes:
        try:
            all_modules.add(layout.module_name(names, layout.fused(path, gpt2), prefix))
        except KeyError:
            pass
    options = [_choose_target_modules(adapted, all_modules, None)]
    layer_set = {layout.peft_layer(m) for m in adapted}
    all_layers = {layout.peft_layer(m) for m in all_modules} - {None}
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
        "use_dora": spec.dora,
        "inference_mode": True,
    }


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
        files = [p] if p.is_file() else [p / layout.CONFIG_NAME, p / layout.WEIGHTS_NAME]
        report["file_bytes"] = sum(f.stat().st_size for f in files)
    return report
