"""LoRA as a functional transform of parameter trees: spec, init, wrap, merge, count.

Shape letters: D = a kernel's input width, F = its output width, R = the LoRA rank.

A *base* is a frozen nested dict of arrays. A *delta* mirrors the base's nesting but holds, at each
targeted kernel, ``{"a": a_DR, "b": b_RF}``. ``wrap`` replaces each targeted kernel by a
:class:`LoraWeight` node that :mod:`lorax.nn` layers multiply as ``x@w + scale·(x@a)@b``, so the
dense ``W0 + BA`` is never built during training (Hu et al. 2021, §4.1).
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lorax import paths, quant
from lorax.kernels import DoraWeight, LoraWeight, merge_kernel

# Canonical target names -> regexes over "/"-joined param paths. Every model family in
# lorax.models uses these module names, so a target set means the same thing on every model.
CANONICAL_TARGETS: dict[str, str] = {
    "q": r"(?:^|/)attn/q/kernel$",
    "k": r"(?:^|/)attn/k/kernel$",
    "v": r"(?:^|/)attn/v/kernel$",
    "o": r"(?:^|/)attn/o/kernel$",
    "mlp_in": r"(?:^|/)mlp/mlp_in/kernel$",
    "mlp_gate": r"(?:^|/)mlp/mlp_gate/kernel$",
    "mlp_out": r"(?:^|/)mlp/mlp_out/kernel$",
    "embed": r"(?:^|/)embed/token/embedding$",
}
INITS = ("kaiming", "gaussian")
_NAME_RE = re.compile(r"^\w+$")


@dataclasses.dataclass(frozen=True)
class Target:
    """One target: a canonical name or a path regex, with its own rank, alpha and layers.

    Attributes:
      name: a key of :data:`CANONICAL_TARGETS` (a bare word) or a regex over param paths
        (anything that is not a bare word, e.g. ``"attn/(q|v)/kernel$"``).
      rank: the LoRA rank r, 1 <= r <= min(D, F).
      alpha: the LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).
      layers: only paths under these ``layers_N`` are adapted; None means every layer.
    """

    name: str
    rank: int
    alpha: float
    layers: tuple[int, ...] | None = None

    @property
    def pattern(self) -> str:
        if _NAME_RE.match(self.name):
            if self.name not in CANONICAL_TARGETS:
                raise ValueError(
                    f"unknown LoRA target {self.name!r}; valid names are "
                    f"{sorted(CANONICAL_TARGETS)}, or a path regex such as 'attn/q/kernel$'"
                )
            return CANONICAL_TARGETS[self.name]
        return self.name


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Static description of an adapter: which kernels, rank, alpha, init, dropout, rsLoRA.

    Targets are tried in order and the first that matches a path wins, so a path regex listed
    before a canonical name can give some kernels their own rank.
    """

    targets: tuple[Target, ...]
    init: str = "kaiming"
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False  # DoRA (Liu et al. 2024): a learned magnitude "m" [F] per kernel too

    def __post_init__(self):
        if not self.targets:
            raise ValueError(
                f"LoraSpec needs at least one target; valid names are {sorted(CANONICAL_TARGETS)}"
            )
        if self.init not in INITS:
            raise ValueError(f"unknown LoRA init {self.init!r}; valid: {list(INITS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        for t in self.targets:
            if not isinstance(t.rank, int) or t.rank <= 0:
                raise ValueError(
                    f"LoRA rank (lora.rank, lora.rank_pattern) for target {t.name!r} must be a "
                    f"positive integer, got {t.rank!r}"
                )
            t.pattern  # noqa: B018 -- validates the name early

    def scale(self, target: Target) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
        return target.alpha / (math.sqrt(target.rank) if self.rslora else target.rank)


def make_spec(
    targets: str | Sequence[str],
    *,
    rank: int,
    alpha: float,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    layers: Sequence[int] | None = None,
    init: str = "kaiming",
    dropout: float = 0.0,
    rslora: bool = False,
    dora: bool = False,
) -> LoraSpec:
    """Builds a :class:`LoraSpec` the way configs describe one.

    Args:
      targets: target names/regexes, as a sequence or a comma-separated string ("q,v").
      rank, alpha: defaults for every target.
      rank_pattern, alpha_pattern: per-target overrides keyed by target name (as in PEFT).
      layers: layer filter applied to every target; None or empty means all layers.
      init, dropout, rslora, dora: see :class:`LoraSpec`.
    """
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets)
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    for field, overrides in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        unknown = sorted(set(overrides) - set(targets))
        if unknown:
            raise ValueError(
                f"lora.{field} names {unknown}, which are not targets; targets are {targets}"
            )
    layer_filter = tuple(int(i) for i in layers) if layers else None
    return LoraSpec(
        targets=tuple(
            Target(
                t, int(rank_pattern.get(t, rank)), float(alpha_pattern.get(t, alpha)), layer_filter
            )
            for t in targets
        ),
        init=init,
        dropout=float(dropout),
        rslora=bool(rslora),
        dora=bool(dora),
    )


@dataclasses.dataclass(frozen=True)
class Site:
    """A resolved target: one kernel path with its rank and scale.

    ``stack`` is the kernel's leading shape when it lies in a scanned stack of layers
    (``layers/...`` [L, D, F], see :func:`lorax.paths.stack_layers`), else ``()``; its
    factors then carry the same leading axes: ``a`` [L, D, R], ``b`` [L, R, F].
    """

    path: str
    target: Target
    d_in: int
    d_out: int
    rank: int
    scale: float
    stack: tuple[int, ...] = ()

    @property
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of ``a`` and ``b``."""
        return (*self.stack, self.d_in, self.rank), (*self.stack, self.rank, self.d_out)


def resolve(base: Mapping[str, Any], spec: LoraSpec) -> dict[str, Site]:
    """Finds the kernels ``spec`` adapts in ``base``; shapes only, so it works under ``jit``.

    Raises:
      ValueError: a target matches nothing (listing paths that exist), matches a leaf that is
        not a 2-D kernel (3-D in a scanned layer stack), has a rank above min(D, F), or has a
        layer filter over scanned layers.
    """
    flat = paths.flatten(base)
    compiled = paths.compile_patterns(t.pattern for t in spec.targets)
    sites: dict[str, Site] = {}
    hits = [0] * len(spec.targets)
    for path, leaf in flat.items():
        for i, (target, pattern) in enumerate(zip(spec.targets, compiled, strict=True)):
            if not pattern.search(path):
                continue
            stacked = paths.is_stacked(path)
            if target.layers is not None:
                if stacked:
                    raise ValueError(
                        f"LoRA target {target.name!r} has a layer filter {list(target.layers)}, "
                        f"but {path} is a scanned stack of every layer; set model.scan=False "
                        "to adapt only some layers"
                    )
                if paths.layer_index(path) not in target.layers:
                    continue
            shape = tuple(jnp.shape(leaf))
            if len(shape) != 2 + stacked:
                raise ValueError(
                    f"LoRA target {target.name!r} matched {path} of shape {shape}; "
                    "only 2-D kernels [d_in, d_out] can be adapted"
                    + (" ([L, d_in, d_out] in a scanned layer stack)" if stacked else "")
                )
            *stack, d_in, d_out = shape
            if target.rank > min(d_in, d_out):
                raise ValueError(
                    f"LoRA rank {target.rank} for target {target.name!r} is larger than "
                    f"min(d_in, d_out) = {min(d_in, d_out)} of {path} {shape}; valid ranks are "
                    f"1..{min(d_in, d_out)}"
                )
            hits[i] += 1
            sites[path] = Site(
                path, target, d_in, d_out, target.rank, spec.scale(target), tuple(stack)
            )
            break  # first match wins
    for target, n in zip(spec.targets, hits, strict=True):
        if n == 0:
            where = f" in layers {list(target.layers)}" if target.layers is not None else ""
            raise ValueError(
                f"LoRA target {target.name!r} (regex {target.pattern!r}) matches no kernel"
                f"{where}; parameter paths look like: {paths.describe_paths(flat)}"
            )
    return sites


def init(
    base: Mapping[str, Any], spec: LoraSpec, key: jax.Array, dtype: jnp.dtype = jnp.float32
) -> dict[str, Any]:
    """A new delta with ``a`` random and ``b`` zero, so the adapted model equals the base.

    ``a`` is Kaiming-uniform with bound 1/sqrt(D) (the default of ``torch.nn.Linear`` and
    PEFT) or Gaussian with std 1/r (PEFT's "gaussian"). Each kernel's key is folded from
    ``key`` and a hash of its path, so adding a target does not change the others' init. A
    scanned stack ``layers/X`` [L, ...] draws layer i from the key of ``layers_i/X``, so a
    model gets the same adapter with ``scan`` on or off.
    """

    def draw(path: str, site: Site) -> jax.Array:
        k = jax.random.fold_in(key, zlib.crc32(path.encode()))
        shape = (site.d_in, site.rank)
        if spec.init == "kaiming":
            bound = 1.0 / math.sqrt(site.d_in)
            return jax.random.uniform(k, shape, dtype, -bound, bound)
        return jax.random.normal(k, shape, dtype) / site.rank

    delta, base_flat = {}, paths.flatten(base)
    for path, site in resolve(base, spec).items():
        a_shape, b_shape = site.shapes
        if site.stack:
            per_layer = [
                draw(paths.layer_path(path, i), site) for i in range(math.prod(site.stack))
            ]
            a = jnp.stack(per_layer).reshape(a_shape)
        else:
            a = draw(path, site)
        delta[path] = {"a": a, "b": jnp.zeros(b_shape, dtype)}
        if spec.dora:  # m = ‖w‖ per column, so the adapted model starts as the base
            w = base_flat[path]
            if quant.is_quantized(w):
                raise ValueError(
                    f"DoRA over a quantized base ({path} is {w.kind}) is not supported; set "
                    "model.quantize = '' or lora.dora = False"
                )
            delta[path]["m"] = jnp.linalg.norm(jnp.asarray(w, jnp.float32), axis=-2).astype(dtype)
    return paths.unflatten(delta)


def _check_fits(base_flat, delta_flat, sites, dora: bool = False) -> None:
    """Raises if ``delta`` does not have exactly the kernels and shapes ``spec`` implies."""
    parts = ("a", "b", "m") if dora else ("a", "b")
    expected = {p: s.shapes + (((*s.stack, s.d_out),) if dora else ()) for p, s in sites.items()}
    got = {}
    for key, leaf in delta_flat.items():
        path, _, part = key.rpartition(paths.SEP)
        if part not in parts:
            raise ValueError(
                f"delta leaf {key} is not an adapter factor; delta leaves end in "
                + " or ".join(f"'/{p}'" for p in parts)
            )
        got.setdefault(path, [None] * len(parts))[parts.index(part)] = jnp.shape(leaf)

    def unexpected(path, **_):
        return f"delta has an adapter for {path}, which the spec does not target" + (
            "" if path in base_flat else " and the base does not contain"
        )

    paths.check_tree(
        {p: tuple(ab) for p, ab in got.items()},
        expected,
        missing="delta has no adapter for {path}, which the spec targets",
        unexpected=unexpected,
        mismatch=(
            "delta for {path} has shapes a, b, m {got}; the base kernel and spec need {want}"
            if dora
            else "delta for {path} has shapes a{got[0]} b{got[1]}; "
            "the base kernel and spec need a{want[0]} b{want[1]}"
        ),
    )


def wrap(base: Mapping[str, Any], delta: Mapping[str, Any], spec: LoraSpec) -> dict[str, Any]:
    """Params in which each targeted kernel is a :class:`LoraWeight` (unmerged compute)."""
    base_flat, delta_flat = paths.flatten(base), paths.flatten(delta)
    sites = resolve(base, spec)
    _check_fits(base_flat, delta_flat, sites, spec.dora)
    for path, site in sites.items():
        a, b = delta_flat[path + "/a"], delta_flat[path + "/b"]
        if spec.dora:
            m = delta_flat[path + "/m"]
            base_flat[path] = DoraWeight(base_flat[path], a, b, m, site.scale, spec.dropout)
        else:
            base_flat[path] = LoraWeight(base_flat[path], a, b, site.scale, spec.dropout)
    return paths.unflatten(base_flat)


def merge(base: Mapping[str, Any], delta: Mapping[str, Any], spec: LoraSpec) -> dict[str, Any]:
    """Plain arrays ``W0 + scale·A@B`` at every target (with DoRA, rescaled to the learned
    column magnitudes): zero added latency, exportable."""
    return _apply(base, delta, spec, sign=1.0)


def unmerge(merged: Mapping[str, Any], delta: Mapping[str, Any], spec: LoraSpec) -> dict[str, Any]:
    """Inverse of :func:`merge`: subtracts ``scale·A@B`` from each targeted kernel."""
    return _apply(merged, delta, spec, sign=-1.0)


def _apply(base, delta, spec, sign):
    if spec.dora and sign < 0:
        raise ValueError("a DoRA merge cannot be undone from the delta alone (its column "
                         "norms depend on the base); keep the base and merge again")  # fmt: skip
    base_flat, delta_flat = paths.flatten(base), paths.flatten(delta)
    sites = resolve(base, spec)
    _check_fits(base_flat, delta_flat, sites, spec.dora)
    for path, site in sites.items():
        a, b = delta_flat[path + "/a"], delta_flat[path + "/b"]
        if spec.dora:
            node = DoraWeight(base_flat[path], a, b, delta_flat[path + "/m"], site.scale)
            base_flat[path] = node.materialize()
        else:
            base_flat[path] = merge_kernel(base_flat[path], a, b, sign * site.scale)
    return paths.unflatten(base_flat)


def count(delta: Any) -> int:
    """Trainable parameters in a delta: Σ r·(D + F); for square targets 2·L_LoRA·d·r."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(delta)))
