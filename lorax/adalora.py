"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"):
LoRA in SVD form, ``ΔW = P·diag(λ)·Q``, whose total rank is moved while training to the
kernels where it matters most.

Shape letters: D = a kernel's input width, F = its output width, R = the initial rank.

The delta holds, at each targeted kernel, ``{"a": P [D, R], "e": λ [R], "b": Q [R, F]}`` (PEFT's
``lora_A`` is ``aᵀ``, ``lora_B`` is ``bᵀ``, ``lora_E`` is ``e`` as a column), and the model runs
``x@w + scale·(x@(a·e))@b`` with ``scale = alpha / (R + 1e-5)`` as PEFT computes it: the
unmerged LoRA path (:class:`lorax.kernels.LoraWeight`) with ``e`` folded into ``a``.

Training adds two things to LoRA's step, both inside the one compiled step:

- the orthogonality regulariser ``orth_reg_weight · mean ‖aᵀa − I‖_F, ‖bbᵀ − I‖_F`` over every
  factor (:func:`orth_penalty`), added to the loss;
- the rank allocator (:func:`allocate`), after each optimizer update: the sensitivity
  ``|θ·∂L/∂θ|`` of every entry, smoothed (β1) and its uncertainty (β2), scores each triplet
  ``(a[:, i], e[i], b[i, :])``; the budget follows the cubic schedule from the initial total
  rank to ``target_r`` per kernel between ``tinit`` and ``total_step − tfinal``, and every
  ``delta_t`` steps the lowest-scoring triplets have ``e[i]`` set to zero. Shapes never
  change: pruning is a mask, so the step compiles once. The mask after the final allocation is
  the rank pattern, which the last ``tfinal`` steps keep.

The schedule and the scores follow PEFT's ``RankAllocator`` (peft 0.21), with the step counted
as optimizer steps taken (1 after the first), so a run with ``tfinal = 0`` ends at the target
budget exactly. Two choices where PEFT leaves them to the training loop: the sensitivity uses
the gradient before ``train.grad_clip`` (the paper's ``|θ·∇L|``; a PyTorch loop that clips in
place would score the clipped one), and λ, a vector, gets no weight decay (lorax decays
matrices only).
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax import lora, paths, runfiles
from lorax.kernels import LoraWeight, merge_kernel

PARTS = ("a", "e", "b")


@dataclasses.dataclass(frozen=True)
class AdaSpec:
    """An AdaLoRA adapter: LoRA's targets (their ranks are the initial ranks) and the allocator.

    Attributes:
      lora: targets, initial ranks, alphas, layer filter and dropout (rsLoRA, DoRA and the
        init of ``a`` do not apply: P and Q start N(0, 0.02²) and λ at 0, as in PEFT).
      target_r: the average rank per kernel at the end of the budget schedule.
      total_step: the run's optimizer steps.
      tinit: steps before the first pruning (all ranks train).
      tfinal: steps at the end with the rank pattern fixed.
      delta_t: steps between two allocations during the schedule.
      beta1, beta2: the smoothing of the sensitivity and of its uncertainty.
      orth_reg_weight: the weight of the orthogonality regulariser.
    """

    lora: lora.LoraSpec
    target_r: int
    total_step: int
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def __post_init__(self):
        def bad(field, value, valid):
            return ValueError(f"adalora.{field} = {value!r} is not valid; it must be {valid}")

        if self.lora.rslora or self.lora.dora:
            raise ValueError("AdaLoRA scales by alpha / r and has no magnitudes; set "
                             "lora.rslora = False and lora.dora = False")  # fmt: skip
        top = max(t.rank for t in self.lora.targets)
        if not isinstance(self.target_r, int) or not 1 <= self.target_r <= top:
            raise bad("target_r", self.target_r, f"an integer in [1, {top}] (the initial rank, "
                      "lora.rank, that AdaLoRA prunes from)")  # fmt: skip
        for field in ("tinit", "tfinal"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 0:
                raise bad(field, getattr(self, field), "an integer >= 0")
        if not isinstance(self.delta_t, int) or self.delta_t < 1:
            raise bad("delta_t", self.delta_t, "an integer >= 1")
        for field in ("beta1", "beta2"):
            if not 0.0 < getattr(self, field) < 1.0:
                raise bad(field, getattr(self, field), "in (0, 1)")
        if not self.orth_reg_weight >= 0.0:
            raise bad("orth_reg_weight", self.orth_reg_weight, ">= 0")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"adalora.tinit = {self.tinit} and adalora.tfinal = {self.tfinal} leave no "
                f"steps of the {self.total_step} (train.num_steps) to reallocate ranks in; "
                "they must satisfy tinit + tfinal < train.num_steps"
            )

    def scale(self, target: lora.Target) -> float:
        """PEFT's ``lora_alpha / (ranknum + 1e-5)``, ranknum being the initial rank."""
        return target.alpha / (target.rank + 1e-5)


def spec(lora_spec: lora.LoraSpec, section, train) -> AdaSpec:
    """The spec of a config's ``adalora`` section (configs/base.py) over its LoRA spec, for a
    run of ``train.num_steps`` steps."""
    return AdaSpec(
        lora_spec, section.target_r, train.num_steps, section.tinit, section.tfinal,
        section.delta_t, section.beta1, section.beta2, section.orth_reg_weight,
    )  # fmt: skip


# --------------------------------------------------------------------------- the verbs


def init(base: Mapping[str, Any], spec: AdaSpec, key: jax.Array) -> dict[str, Any]:
    """A new delta: ``a``, ``b`` drawn N(0, 0.02²), ``e`` zero, so ΔW = 0. Keys per kernel path
    (per ``layers_i`` path in a scanned stack), as :func:`lorax.lora.init`."""

    def draw(path: str, part: str, shape) -> jax.Array:
        k = jax.random.fold_in(key, zlib.crc32(f"{path}/{part}".encode()))
        return 0.02 * jax.random.normal(k, shape, jnp.float32)

    delta = {}
    for path, site in lora.resolve(base, spec.lora).items():
        a_shape, b_shape = site.shapes
        factors = {}
        for part, shape in (("a", a_shape[-2:]), ("b", b_shape[-2:])):
            if site.stack:
                n = math.prod(site.stack)
                layers = [draw(paths.layer_path(path, i), part, shape) for i in range(n)]
                factors[part] = jnp.stack(layers).reshape((*site.stack, *shape))
            else:
                factors[part] = draw(path, part, shape)
        delta[path] = {"a": factors["a"], "e": jnp.zeros((*site.stack, site.rank)), **factors}
    return paths.unflatten(delta)


def _sites(base, delta, spec: AdaSpec) -> tuple[dict, dict, dict]:
    """``(base_flat, delta_flat, sites)``, the delta checked against the spec."""
    base_flat, delta_flat = paths.flatten(base), paths.flatten(delta)
    sites = lora.resolve(base, spec.lora)
    expected = {p: (*s.shapes[:1], (*s.stack, s.rank), s.shapes[1]) for p, s in sites.items()}
    got: dict[str, list] = {}
    for key, leaf in delta_flat.items():
        path, _, part = key.rpartition(paths.SEP)
        if part not in PARTS:
            raise ValueError(f"delta leaf {key} is not an AdaLoRA factor (a, e or b)")
        got.setdefault(path, [None] * 3)[PARTS.index(part)] = tuple(jnp.shape(leaf))
    paths.check_tree(
        {p: tuple(v) for p, v in got.items()},
        expected,
        missing="delta has no AdaLoRA factors for {path}, which the spec targets",
        unexpected="delta has AdaLoRA factors for {path}, which the spec does not target",
        mismatch="delta for {path} has shapes a, e, b {got}; the kernel and spec need {want}",
    )
    return base_flat, delta_flat, sites


def _nodes(base, delta, spec: AdaSpec, dropout: float) -> dict[str, Any]:
    base_flat, delta_flat, sites = _sites(base, delta, spec)
    for path, site in sites.items():
        a, e, b = (delta_flat[f"{path}/{p}"] for p in PARTS)
        base_flat[path] = LoraWeight(base_flat[path], a * e[..., None, :], b,
                                     spec.scale(site.target), dropout)  # fmt: skip
    return base_flat


def wrap(base: Mapping[str, Any], delta: Mapping[str, Any], spec: AdaSpec) -> dict[str, Any]:
    """Params in which each targeted kernel is a :class:`LoraWeight` with ``a·e`` as its A."""
    return paths.unflatten(_nodes(base, delta, spec, spec.lora.dropout))


def merge(base: Mapping[str, Any], delta: Mapping[str, Any], spec: AdaSpec) -> dict[str, Any]:
    """Plain arrays ``W0 + scale·(a·e)@b`` at every target."""
    flat = _nodes(base, delta, spec, 0.0)
    merged = {
        k: merge_kernel(v.w, v.a, v.b, v.scale) if isinstance(v, LoraWeight) else v
        for k, v in flat.items()
    }
    return paths.unflatten(merged)


def _factors(delta) -> dict[str, dict[str, jax.Array]]:
    """``{kernel path: {"a", "e", "b"}}`` of a delta (or of a tree shaped like one)."""
    out: dict[str, dict[str, jax.Array]] = {}
    for key, leaf in paths.flatten(delta).items():
        path, _, part = key.rpartition(paths.SEP)
        out.setdefault(path, {})[part] = leaf
    return out


def orth_penalty(delta: Mapping[str, Any], weight: float) -> jax.Array:
    """``weight`` × the mean over every P and Q (each layer's own, in a scanned stack) of
    ``‖PᵀP − I‖_F`` and ``‖QQᵀ − I‖_F``: the paper's Eq. 4 with PEFT's (unsquared) norm."""
    total, count = jnp.zeros((), jnp.float32), 0
    for f in _factors(delta).values():
        r = f["e"].shape[-1]
        eye = jnp.eye(r, dtype=jnp.float32)
        for gram in (
            jnp.einsum("...dr,...ds->...rs", f["a"], f["a"]),
            jnp.einsum("...rf,...sf->...rs", f["b"], f["b"]),
        ):
            sq = jnp.sum(jnp.square(gram - eye), axis=(-2, -1))
            total += jnp.sum(jnp.sqrt(jnp.maximum(sq, 1e-30)))  # no NaN gradient at 0
            count += math.prod(sq.shape)
    return weight * total / max(count, 1)


# --------------------------------------------------------------------------- the allocator


def budget_schedule(spec: AdaSpec, init_budget: int, target_budget: int):
    """``(budget [T+1], allocate [T+1])`` indexed by optimizer steps taken t = 0..T: the
    total rank kept after step t and whether step t prunes to it (PEFT's cubic schedule:
    ``target + (init − target)·(1 − (t − tinit)/(T − tfinal − tinit))³``, every ``delta_t``
    steps in between, and the final allocation at ``t = T − tfinal``)."""
    t_total, ti, tf = spec.total_step, spec.tinit, spec.tfinal
    budget = np.full(t_total + 1, init_budget, np.int32)
    prune = np.zeros(t_total + 1, bool)
    for t in range(ti + 1, t_total + 1):
        if t > t_total - tf:
            budget[t] = target_budget
            continue
        coeff = 1 - (t - ti) / (t_total - tf - ti)
        budget[t] = int((init_budget - target_budget) * coeff**3 + target_budget)
        prune[t] = t % spec.delta_t == 0 or t == t_total - tf
    return budget, prune


def init_state(delta: Mapping[str, Any]) -> dict[str, Any]:
    """The allocator's state: the smoothed sensitivity ``ipt`` and uncertainty ``unc`` of every
    delta entry, and the rank ``mask`` ([..., R] of 0/1, all kept at first) of every kernel."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, delta)
    masks = {f"{p}/e": jnp.ones_like(f["e"]) for p, f in _factors(delta).items()}
    return {"ipt": zeros, "unc": zeros, "mask": paths.unflatten(masks)}


def triplet_scores(state: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Each kernel's [..., R] triplet importance: ``s(e_i) + mean_d s(a_di) + mean_f s(b_if)``
    with ``s = ipt · unc`` (the paper's Eq. 7-9)."""
    ipt, unc = _factors(state["ipt"]), _factors(state["unc"])
    scores = {}
    for path in ipt:
        s = {p: ipt[path][p] * unc[path][p] for p in PARTS}
        scores[path] = s["e"] + jnp.mean(s["a"], axis=-2) + jnp.mean(s["b"], axis=-1)
    return scores


def allocate(spec: AdaSpec, state, delta, grads, steps_taken: jax.Array):
    """One step of the allocator, after the optimizer's update: ``(delta, state)``.

    Args:
      state: from :func:`init_state`.
      delta: the delta the optimizer just produced.
      grads: the gradient of the step's loss (task + regulariser) w.r.t. the delta.
      steps_taken: optimizer steps so far, this one included (traced).
    """
    factors = _factors(delta)
    n_kernels = sum(math.prod(f["e"].shape[:-1]) for f in factors.values())
    init_budget = sum(math.prod(f["e"].shape) for f in factors.values())
    target_budget = min(spec.target_r * n_kernels, init_budget)
    budget_np, prune_np = budget_schedule(spec, init_budget, target_budget)
    t = jnp.minimum(steps_taken, spec.total_step)
    learning = t < spec.total_step - spec.tfinal

    def smooth(avg, unc, p, g):  # PEFT's update_ipt, while the budget still moves
        ipt = jnp.abs(p * g)
        new_avg = spec.beta1 * avg + (1 - spec.beta1) * ipt
        new_unc = spec.beta2 * unc + (1 - spec.beta2) * jnp.abs(ipt - new_avg)
        return jnp.where(learning, new_avg, avg), jnp.where(learning, new_unc, unc)

    pairs = jax.tree_util.tree_map(smooth, state["ipt"], state["unc"], delta, grads)
    is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
    ipt = jax.tree_util.tree_map(lambda x: x[0], pairs, is_leaf=is_pair)
    unc = jax.tree_util.tree_map(lambda x: x[1], pairs, is_leaf=is_pair)
    scores = triplet_scores({"ipt": ipt, "unc": unc})
    order = sorted(scores)
    every = jnp.concatenate([scores[p].reshape(-1) for p in order])
    k = init_budget - jnp.asarray(budget_np)[t]  # triplets to prune: at or below the k-th
    threshold = jnp.where(k >= 1, jnp.sort(every)[jnp.maximum(k - 1, 0)], -jnp.inf)
    prune = jnp.asarray(prune_np)[t]
    fixed = t > spec.total_step - spec.tfinal  # the final phase: the kept pattern, every step
    masks = _factors(state["mask"])
    new_delta, new_masks = paths.flatten(delta), {}
    for path in order:
        kept = (scores[path] > threshold).astype(jnp.float32)
        mask = jnp.where(prune, kept, masks[path]["e"])
        new_masks[f"{path}/e"] = mask
        e = factors[path]["e"]
        new_delta[f"{path}/e"] = jnp.where(prune | fixed, e * mask, e)
    final = t == spec.total_step - spec.tfinal  # PEFT resets the scores after the final pruning
    ipt, unc = (jax.tree_util.tree_map(lambda x: jnp.where(final, 0.0, x), x) for x in (ipt, unc))
    return paths.unflatten(new_delta), {"ipt": ipt, "unc": unc, "mask": paths.unflatten(new_masks)}


def ranks(state: Mapping[str, Any]) -> dict[str, int]:
    """The rank each kernel keeps (per ``layers_i`` path for a scanned stack)."""
    masks = paths.unstack_layers(state["mask"])
    return {p: int(np.sum(np.asarray(f["e"]))) for p, f in sorted(_factors(masks).items())}


def kept_params(state: Mapping[str, Any]) -> int:
    """Parameters of the kept triplets, Σ r_kept·(D + 1 + F): the delta's size at its final
    ranks (what a PEFT export of it holds)."""
    masks, total = _factors(state["mask"]), 0
    for path, f in _factors(state["ipt"]).items():
        kept = int(np.sum(np.asarray(masks[path]["e"])))
        total += kept * (f["a"].shape[-2] + 1 + f["b"].shape[-1])
    return total


def summary(state: Mapping[str, Any]) -> dict[str, Any]:
    """What a run's summary.json records: ``adalora_ranks`` and ``adalora_kept_params``."""
    return {"adalora_ranks": ranks(state), "adalora_kept_params": kept_params(state)}


def rank_grid(ranks: Mapping[str, int]) -> tuple[list[str], list[int], np.ndarray]:
    """``(kernels, layers, grid [kernel, layer])`` of :func:`ranks`' output, a kernel named by
    its path inside a layer (``attn/q``); -1 where a layer does not adapt that kernel."""
    cells = {}
    for path, r in ranks.items():
        layer = paths.layer_index(path)
        inner = path.split(f"layers_{layer}/", 1)[-1] if layer is not None else path
        cells[(inner.removesuffix("/kernel"), -1 if layer is None else layer)] = r
    kernels = sorted({k for k, _ in cells})
    layers = sorted({n for _, n in cells})
    grid = np.full((len(kernels), len(layers)), -1, np.int64)
    for (k, n), r in cells.items():
        grid[kernels.index(k), layers.index(n)] = r
    return kernels, layers, grid


def plot_ranks(ranks: Mapping[str, int], path: str, title: str) -> None:
    """The final rank of every adapted kernel, kernels × layers (the AdaLoRA paper's Fig. 1
    view of where the budget went), as a PNG with the rank in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels, layers, grid = rank_grid(ranks)
    width = min(max(5.0, 1.0 + 0.5 * len(layers)), 16)
    fig, ax = plt.subplots(figsize=(width, 1.4 + 0.45 * len(kernels)))
    ax.imshow(np.ma.masked_less(grid, 0), cmap="YlGn", vmin=0, aspect="auto")
    ax.set_xticks(range(len(layers)), [str(n) if n >= 0 else "-" for n in layers])
    ax.set_yticks(range(len(kernels)), kernels)
    ax.set_xlabel("layer")
    for (i, j), r in np.ndenumerate(grid):
        if r >= 0:
            ax.text(j, i, str(r), ha="center", va="center", fontsize=8)
    ax.set_title(textwrap.fill(title, int(width * 11)), fontsize=9)
    fig.tight_layout()
    runfiles.save_figure(fig, path)
