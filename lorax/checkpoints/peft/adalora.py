"""AdaLoRA adapters in PEFT's layout (``peft_type = "ADALORA"``) <-> lorax AdaLoRA deltas.

PEFT stores, for each adapted module ``M``, ``base_model.model.M.lora_A`` [r, D_in],
``M.lora_E`` [r, 1] and ``M.lora_B`` [D_out, r] with r the rank the module *kept*, and in
``adapter_config.json`` a ``rank_pattern`` {``M.lora_E``: [kept?] × init_r} from which it
rebuilds the layer at its kept rank; its scaling stays ``lora_alpha / (init_r + 1e-5)``. A lorax
AdaLoRA delta keeps every kernel at the initial rank with the pruned λ at zero
(:mod:`lorax.adalora`), so export drops the zero triplets and writes the pattern, and import
puts the kept triplets back at their places, zeros elsewhere.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lorax import adalora, lora, paths, runfiles
from lorax.checkpoints import hf
from lorax.checkpoints.peft import export, layout, load
from lorax.models import decoder, encoder

KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<part>[AEB])(?:\.default)?$"
)
_SCHEDULE = {  # PEFT's AdaLoraConfig field -> AdaSpec field
    "target_r": "target_r", "total_step": "total_step", "tinit": "tinit", "tfinal": "tfinal",
    "deltaT": "delta_t", "beta1": "beta1", "beta2": "beta2", "orth_reg_weight": "orth_reg_weight",
}  # fmt: skip


def _where(config, flat: Mapping[str, Any]) -> str:
    """ "encoder/" where an encoder's params sit under it (EncoderClassifier), else ""."""
    classifier = any(k.startswith("encoder/") for k in flat)
    return "encoder/" if isinstance(config, encoder.EncoderConfig) and classifier else ""


def export_adalora(
    delta: Mapping[str, Any],
    spec: adalora.AdaSpec,
    config: encoder.EncoderConfig | decoder.DecoderConfig,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    module_prefix: str | None = None,
    task_type: str | None = "auto",
) -> pathlib.Path:
    """Writes an AdaLoRA delta as a PEFT AdaLoRA adapter that ``PeftModel.from_pretrained``
    loads, each module at the rank it kept (its nonzero λ).

    Args: as :func:`lorax.checkpoints.peft.export_peft`'s (no ``modules_to_save``).

    Raises:
      ValueError: targets with different initial ranks or alphas (PEFT's AdaLoRA has one
        ``init_r`` and one ``lora_alpha``), GPT-2's fused q/k/v, or a kernel the model lacks.
    """
    names, default_prefix, default_task, shapes = layout.family(config)
    prefix = default_prefix if module_prefix is None else module_prefix
    gpt2 = isinstance(config, decoder.DecoderConfig) and config.family == "gpt2"
    ranks = sorted({t.rank for t in spec.lora.targets})
    alphas = sorted({t.alpha for t in spec.lora.targets})
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(
            f"PEFT's AdaLoRA has one init_r and one lora_alpha; this spec has ranks {ranks} and "
            f"alphas {alphas}: export with one lora.rank and lora.alpha"
        )
    flat = paths.flatten(paths.unstack_layers(delta))
    flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in flat.items()}
    where = _where(config, flat)
    tensors, pattern = {}, {}
    for key in sorted(k for k in flat if k.endswith("/e")):
        path = key.removesuffix("/e")
        canonical = path.removeprefix(where)
        if gpt2 and layout.QKV_RE.match(canonical):
            raise ValueError(
                f"delta for {path}: AdaLoRA on GPT-2's q, k, v (PEFT's fused c_attn) cannot be "
                "exported; AdaLoRA on o and the MLP kernels can"
            )
        if canonical not in shapes:
            raise ValueError(
                f"delta adapts {path}, which this model's config does not have; param paths "
                f"look like: {paths.describe_paths(shapes)}"
            )
        a, e, b = (flat[f"{path}/{p}"] for p in adalora.PARTS)
        kept = e != 0
        module = layout.module_name(names, canonical, prefix)
        for part, value in (("A", a[:, kept].T), ("E", e[kept][:, None]), ("B", b[kept].T)):
            tensors[f"{layout.KEY_PREFIX}{module}.lora_{part}"] = np.ascontiguousarray(value)
        pattern[f"{module}.lora_E"] = [bool(x) for x in kept]
    if not pattern:
        raise ValueError("delta is empty: there is nothing to export")
    modules = {k.removesuffix(".lora_E") for k in pattern}
    target_modules, layers = export._targets(modules, shapes, names, prefix, gpt2)
    peft_config = {
        "peft_type": "ADALORA",
        "task_type": default_task if task_type == "auto" else task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "init_r": ranks[0],
        **{theirs: getattr(spec, ours) for theirs, ours in _SCHEDULE.items()},
        "lora_alpha": export._json_number(alphas[0]),
        "target_modules": target_modules,
        "layers_to_transform": layers,
        "rank_pattern": pattern,
        "lora_dropout": spec.lora.dropout,
        "bias": "none",
        "fan_in_fan_out": gpt2,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / layout.CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")
    runfiles.save_safetensors(tensors, out / layout.WEIGHTS_NAME, metadata={"format": "pt"})
    return out


def import_adalora(
    adapter_dir: str | os.PathLike,
    base: Mapping[str, Any],
    config: encoder.EncoderConfig | decoder.DecoderConfig,
) -> tuple[adalora.AdaSpec, dict[str, Any]]:
    """Reads a PEFT AdaLoRA adapter into an :class:`AdaSpec` and a delta at the initial rank
    (kept triplets at their ``rank_pattern`` places, zeros elsewhere), fitting ``base`` in the
    per-layer layout; ``adalora.wrap`` then computes what the PEFT model computes.

    Raises:
      FileNotFoundError: no adapter_config.json or adapter_model.safetensors.
      ValueError: not an AdaLoRA adapter, an option that changes the weights' meaning, a key
        that is not an AdaLoRA factor, a module the base lacks, or shapes that disagree with
        ``init_r``, the rank pattern or the base kernel (each named).
    """
    adapter_dir = pathlib.Path(adapter_dir)
    raw = _read_config(adapter_dir)
    weights = adapter_dir / layout.WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{adapter_dir} has no {layout.WEIGHTS_NAME}")
    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, value in hf.read_safetensors_file(weights).items():
        m = KEY_RE.match(key)
        if not m:
            raise ValueError(
                f"{weights}: key {key!r} is not an AdaLoRA factor "
                f"('{layout.KEY_PREFIX}<module>.lora_A', lora_E or lora_B)"
            )
        factors.setdefault(m["module"], {})[m["part"]] = np.asarray(value, np.float32)
    names, _, _, _ = layout.family(config)
    flat_base = paths.flatten(base)
    where = _where(config, flat_base)
    init_r, alpha = int(raw["init_r"]), float(raw.get("lora_alpha", 8))
    pattern = {
        k.removeprefix(layout.KEY_PREFIX): v for k, v in (raw.get("rank_pattern") or {}).items()
    }
    delta, sites = {}, {}
    for module, parts in sorted(factors.items()):
        if set(parts) != {"A", "E", "B"}:
            raise ValueError(f"{weights}: module {module!r} has lora_{sorted(parts)} only; "
                             "AdaLoRA needs lora_A, lora_E and lora_B")  # fmt: skip
        try:
            path = where + names.to_canonical(module + ".weight")[0]
        except KeyError:
            path = None
        if path is None or path not in flat_base or not path.endswith("/kernel"):
            raise ValueError(
                f"{weights}: module {module!r} is not an adaptable kernel of this base "
                f"({names.family}); GPT-2's fused c_attn is not supported"
            )
        kept = np.asarray(pattern.get(f"{module}.lora_E", [True] * init_r), bool)
        d_in, d_out = np.shape(flat_base[path])
        r = int(kept.sum())
        want = {"A": (r, d_in), "E": (r, 1), "B": (d_out, r)}
        for part, shape in want.items():
            if len(kept) != init_r or parts[part].shape != shape:
                raise ValueError(
                    f"{weights}: {module}.lora_{part} has shape {parts[part].shape}; the kernel "
                    f"{path} [{d_in}, {d_out}] with init_r={init_r} and {r} kept ranks of "
                    f"{len(kept)} in rank_pattern needs {shape}"
                )
        a, e, b = np.zeros((d_in, init_r)), np.zeros(init_r), np.zeros((init_r, d_out))
        a[:, kept], e[kept], b[kept] = parts["A"].T, parts["E"][:, 0], parts["B"].T
        delta[path] = {"a": a, "e": e, "b": b}
        sites[path] = (init_r, alpha)
    if not delta:
        raise ValueError(f"{adapter_dir}: {layout.WEIGHTS_NAME} holds no AdaLoRA factors")
    lspec = lora.LoraSpec(load._spec_targets(sites), dropout=float(raw.get("lora_dropout") or 0))
    spec = adalora.AdaSpec(lspec, **{ours: raw[theirs] for theirs, ours in _SCHEDULE.items()})
    flat = {f"{p}/{k}": v.astype(np.float32) for p, d in delta.items() for k, v in d.items()}
    return spec, paths.unflatten(flat)


def _read_config(adapter_dir: pathlib.Path) -> dict:
    """adapter_config.json, checked to be an AdaLoRA adapter lorax reproduces."""
    path = adapter_dir / layout.CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{adapter_dir} has no {layout.CONFIG_NAME}; is it a PEFT adapter?")
    raw = json.loads(path.read_text())
    if raw.get("peft_type") != "ADALORA":
        raise ValueError(f"{path}: peft_type {raw.get('peft_type')!r} is not 'ADALORA' (a LoRA "
                         "adapter imports with lorax.checkpoints.peft.import_peft)")  # fmt: skip
    for key, ok in (("bias", "none"), ("use_dora", False), ("use_rslora", False)):
        if raw.get(key, ok) != ok:
            raise ValueError(f"{path}: {key}={raw[key]!r} is not supported for AdaLoRA")
    if raw.get("modules_to_save"):
        raise ValueError(f"{path}: modules_to_save is not supported; lorax imports the factors")
    missing = [k for k in ("init_r", *_SCHEDULE) if raw.get(k) is None]
    if missing:
        raise ValueError(f"{path}: AdaLoRA fields {missing} are missing")
    return raw
