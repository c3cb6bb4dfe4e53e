"""PEFT adapter directory -> lorax spec and delta, every field and factor checked."""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from lorax import lora, paths
from lorax.checkpoints import hf
from lorax.checkpoints.peft import layout
from lorax.models import decoder, encoder


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """``adapter_config.json``, checked to describe a plain LoRA adapter lorax can reproduce.

    Raises:
      FileNotFoundError: no adapter_config.json.
      ValueError: a non-LoRA ``peft_type``, DoRA, trained biases, ``modules_to_save``, an init
        that rewrote the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or any other option that
        changes what the weights mean; the message names the option.
    """
    path = pathlib.Path(adapter_dir) / layout.CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{adapter_dir} has no {layout.CONFIG_NAME}; is it a PEFT adapter?")
    where = f"{path}"
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where} holds {type(raw).__name__}; expected a JSON object")
    if raw.get("peft_type") != "LORA":
        raise ValueError(
            f"{where}: peft_type {raw.get('peft_type')!r} is not supported; only 'LORA'"
        )
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={raw['bias']!r} is not supported; only 'none'")
    if raw.get("modules_to_save"):
        raise ValueError(
            f"{where}: modules_to_save={raw['modules_to_save']} is not supported; lorax imports "
            "only the LoRA factors"
        )
    init = str(raw.get("init_lora_weights", True)).lower()
    if init.startswith(layout.BASE_CHANGING_INITS):
        raise ValueError(
            f"{where}: init_lora_weights={raw['init_lora_weights']!r} rewrites the base "
            "weights, so the adapter does not fit the original base; convert it with PEFT's "
            "path_initial_model_for_weight_conversion first"
        )
    for key, value in raw.items():
        if (
            key not in layout.HANDLED
            and key not in layout.IGNORED
            and value not in (None, False, [], {}, "")
        ):
            raise ValueError(f"{where}: option {key}={value!r} is not supported by lorax's import")
    _check_numbers(raw, where)
    return raw


def _check_numbers(raw: Mapping[str, Any], where: str) -> None:
    """``r`` a positive int and ``lora_alpha`` a finite number, in the defaults and patterns."""
    if "r" not in raw:
        raise ValueError(f"{where}: no 'r' (the LoRA rank, a positive integer)")

    def rank_ok(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def alpha_ok(v):
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    checks = (("r", "rank_pattern", rank_ok, "a positive integer"),
              ("lora_alpha", "alpha_pattern", alpha_ok, "a finite number"))  # fmt: skip
    for field, pattern, ok, valid in checks:
        values = {field: raw[field]} if field in raw else {}
        table = raw.get(pattern) or {}
        if not isinstance(table, dict):
            raise ValueError(f"{where}: {pattern} is {table!r}; expected an object")
        values.update({f"{pattern}[{k!r}]": v for k, v in table.items()})
        for name, value in values.items():
            if not ok(value):
                raise ValueError(f"{where}: {name} is {value!r}; it must be {valid}")


def _read_factors(adapter_dir: pathlib.Path) -> dict[str, dict[str, tuple[str, np.ndarray]]]:
    """``{module: {"A"|"B": (key, array)}}`` from adapter_model.safetensors, every key accounted."""
    weights = adapter_dir / layout.WEIGHTS_NAME
    if not weights.exists():
        other = " (it has adapter_model.bin: re-save it with safe_serialization=True)"
        raise FileNotFoundError(
            f"{adapter_dir} has no {layout.WEIGHTS_NAME}"
            + (other if (adapter_dir / "adapter_model.bin").exists() else "")
        )
    factors: dict[str, dict[str, tuple[str, np.ndarray]]] = collections.defaultdict(dict)
    adapter_names = set()
    for key, value in sorted(hf.read_safetensors_file(weights).items()):
        m = layout.KEY_RE.match(key)
        part = m and m["part"]
        if not m:
            m, part = layout.MAGNITUDE_RE.match(key), "M"
        if not m:
            raise ValueError(
                f"{weights}: key {key!r} is not a LoRA factor; keys look like "
                f"'{layout.KEY_PREFIX}<module>.lora_A.weight' or DoRA's "
                f"'<module>.lora_magnitude_vector' (biases, embedding adapters and saved modules "
                "are not supported)"
            )
        adapter_names.add(m["adapter"])
        factors[m["module"]][part] = (key, value)
    if len(adapter_names) > 1:
        raise ValueError(f"{weights}: keys name several adapters {sorted(map(str, adapter_names))}")
    for parts in factors.values():
        if not {"A", "B"} <= set(parts):
            key, have = next((key, p) for p, (key, _) in sorted(parts.items()))
            missing = "B" if have == "A" else "A"
            raise ValueError(f"{weights}: {key!r} has no matching lora_{missing} factor")
    for parts in factors.values():
        for key, value in parts.values():
            bad = int(np.size(value) - np.isfinite(np.asarray(value, np.float32)).sum())
            if bad:
                raise ValueError(f"{weights}: {key!r} holds {bad} NaN or infinite values")
    return factors


def _spec_targets(sites: Mapping[str, tuple[int, float]]) -> tuple[lora.Target, ...]:
    """One path-regex target per (kernel within a layer, rank, alpha): ``^layers_(?:0|1)/...``."""
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    for path, (rank, alpha) in sorted(sites.items()):
        m = layout.LAYER_SPLIT_RE.match(path)
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
    """Reads a PEFT LoRA adapter (DoRA's too: ``use_dora``) into a lorax spec and delta
    fitting ``base``.

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
    names, prefix, _, _ = layout.family(config)
    gpt2 = isinstance(config, decoder.DecoderConfig) and config.family == "gpt2"
    flat_base = paths.flatten(base)
    if any(paths.is_stacked(p) for p in flat_base):
        raise ValueError("base is a scanned layer stack; pass paths.unstack_layers(base)")
    where = ""
    if isinstance(config, encoder.EncoderConfig) and not any(
        p.startswith("layers_") for p in flat_base
    ):
        where = "encoder/"
    example = layout.KEY_PREFIX + layout.module_name(
        names, layout.fused("layers_0/attn/q/kernel", gpt2), prefix
    )
    delta, sites = _import_factors(
        adapter_dir, factors, raw, config, flat_base, where=where, example=example
    )
    if not delta:
        raise ValueError(f"{adapter_dir}: {layout.WEIGHTS_NAME} holds no LoRA factors")
    spec = lora.LoraSpec(
        targets=_spec_targets(sites),
        init="gaussian" if raw.get("init_lora_weights") == "gaussian" else "kaiming",
        dropout=float(raw.get("lora_dropout") or 0.0),
        rslora=bool(raw.get("use_rslora", False)),
        dora=bool(raw.get("use_dora", False)),
    )
    resolved = lora.resolve(base, spec)
    if set(resolved) != set(delta):  # the targets are built from the paths: a bug if not
        raise AssertionError(f"spec resolves to {sorted(resolved)} but delta has {sorted(delta)}")
    return spec, paths.unflatten({f"{p}/{k}": v for p, d in delta.items() for k, v in d.items()})


def _split_c_attn(q_path, a_DR, b_RF, m_F, flat_base) -> dict[str, dict[str, np.ndarray]]:
    """GPT-2's fused ``c_attn`` adapter as q, k, v adapters sharing its A: each B block (and
    DoRA magnitude block), a block dropped when it changes nothing (B exactly zero and, with
    DoRA, the magnitude its base kernel's column norms, as DoRA starts), unless none does."""
    blocks = dict(zip("qkv", np.split(b_RF, 3, axis=1), strict=True))
    mags = dict(zip("qkv", np.split(m_F, 3), strict=True)) if m_F is not None else {}
    parts, kept = {}, {}
    for n, b in blocks.items():
        p = q_path.replace("/attn/q/", f"/attn/{n}/")
        parts[p] = {"a": a_DR, "b": np.ascontiguousarray(b), **({"m": mags[n]} if mags else {})}
        moved = bool(np.any(b))
        if mags:
            norms = np.linalg.norm(np.asarray(flat_base[p], np.float32), axis=0)
            moved = moved or not np.allclose(mags[n], norms, rtol=1e-6, atol=0)
        if moved:
            kept[p] = parts[p]
    return kept or parts


def _import_factors(adapter_dir, factors, raw, config, flat_base, *, where, example):
    """``({kernel path: {"a", "b"}}, {kernel path: (rank, alpha)})`` from PEFT's factors,
    each checked against its base kernel (a GPT-2 ``c_attn`` split into q, k, v)."""
    names, _, _, _ = layout.family(config)
    gpt2 = isinstance(config, decoder.DecoderConfig) and config.family == "gpt2"
    r_default, alpha_default = int(raw["r"]), raw.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    delta, sites = {}, {}
    dora = bool(raw.get("use_dora", False))
    for module in sorted(factors):
        (key_a, a_RD), (key_b, b_FR) = factors[module]["A"], factors[module]["B"]
        if dora != ("M" in factors[module]):
            raise ValueError(
                f"{adapter_dir}: {key_a!r} "
                + ("has no lora_magnitude_vector, but" if dora else "has a DoRA magnitude, but not")
                + f" use_dora=true in {layout.CONFIG_NAME}"
            )
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
        rank = int(layout.pattern_lookup(rank_pattern, module, r_default))
        alpha = float(layout.pattern_lookup(alpha_pattern, module, alpha_default))
        for key, got, want in ((key_a, a_RD, (rank, d_in)), (key_b, b_FR, (d_out, rank))):
            if tuple(got.shape) != want:
                raise ValueError(
                    f"{adapter_dir}: {key!r} has shape {tuple(got.shape)}; the base kernel "
                    f"{fused_path} [{d_in}, {d_out}] with r={rank} (from "
                    f"{layout.CONFIG_NAME}) needs {want}"
                )
        a_DR = np.ascontiguousarray(np.asarray(a_RD, np.float32).T)
        b_RF = np.ascontiguousarray(np.asarray(b_FR, np.float32).T)
        m_F = None
        if dora:
            key_m, m_F = factors[module]["M"]
            if tuple(np.shape(m_F)) != (d_out,):
                raise ValueError(
                    f"{adapter_dir}: {key_m!r} has shape {tuple(np.shape(m_F))}; the base "
                    f"kernel {fused_path} [{d_in}, {d_out}] needs ({d_out},)"
                )
            m_F = np.asarray(m_F, np.float32)
        if qkv:
            for p, part in _split_c_attn(path, a_DR, b_RF, m_F, flat_base).items():
                delta[p], sites[p] = part, (rank, alpha)
        elif dora:
            delta[path] = {"a": a_DR, "b": b_RF, "m": m_F}
            sites[path] = (rank, alpha)
        else:
            delta[path] = {"a": a_DR, "b": b_RF}
            sites[path] = (rank, alpha)
    return delta, sites
