"""Many adapters over one base at inference: a bank of deltas, one chosen per batch row.

Shape letters: N bank slots, D / F a kernel's input / output width, R the bank's rank, B rows.

A bank holds, at every kernel any of its adapters targets, ``a`` [N, D, R] and ``b`` [N, R, F]
with each adapter's scale folded into ``b`` and lower ranks zero-padded, so every adapter has
exactly its own ΔW. Slot 0 is all zeros: the base alone. :func:`wrap` puts
:class:`lorax.kernels.BankedLoraWeight` nodes into the params with a slot id per row, so one batch
mixes adapters freely, and since the bank's shapes do not depend on which adapter sits in a slot
or which rows use it, neither choosing nor replacing adapters recompiles anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lorax import kernels, lora, paths


@dataclasses.dataclass
class Bank:
    """Stacked adapters: ``factors[path] = {"a": [*L, N, D, R], "b": [*L, N, R, F]}``.

    ``*L`` is the layer axis of a scanned stack (``layers/...``), absent otherwise.
    ``names[i]`` labels slot i (slot 0 is "base").
    """

    factors: dict[str, dict[str, jax.Array]]
    names: list[str]
    rank: int

    @property
    def capacity(self) -> int:
        return len(self.names)


def _padded(site: lora.Site, delta_flat: Mapping, rank: int) -> tuple[jax.Array, jax.Array]:
    """This adapter's (a, scale·b) at ``site``, zero-padded to ``rank``."""
    a = jnp.asarray(delta_flat[site.path + "/a"], jnp.float32)
    b = jnp.asarray(delta_flat[site.path + "/b"], jnp.float32) * site.scale
    pad = rank - site.rank
    stack = [(0, 0)] * len(site.stack)
    a = jnp.pad(a, [*stack, (0, 0), (0, pad)])
    b = jnp.pad(b, [*stack, (0, pad), (0, 0)])
    return a, b


def make_bank(
    base: Mapping[str, Any],
    adapters: Sequence[tuple[Mapping, lora.LoraSpec]],
    *,
    names: Sequence[str] | None = None,
    capacity: int | None = None,
    rank: int | None = None,
) -> Bank:
    """Stacks ``adapters`` (each a ``(delta, spec)`` fitting ``base``) into a bank.

    Args:
      base: the frozen params the adapters were trained on.
      adapters: slot i + 1 holds adapter i; their targets and ranks may differ.
      names: labels of the adapters (default "adapter_1", …).
      capacity: slots in all, base included (default: one per adapter, plus the base); spare
        slots are zeros until :func:`set_slot` fills them.
      rank: the bank's R (default: the largest rank); room for later, larger adapters.

    Raises:
      ValueError: an adapter does not fit the base, or targets the embedding table.
    """
    names = list(names or [f"adapter_{i + 1}" for i in range(len(adapters))])
    if len(names) != len(adapters):
        raise ValueError(f"{len(names)} names for {len(adapters)} adapters")
    capacity = capacity or len(adapters) + 1
    if capacity < len(adapters) + 1:
        raise ValueError(f"capacity {capacity} < {len(adapters)} adapters + the base slot")
    sites_per = [
        _sites(base, delta, spec, name) for (delta, spec), name in zip(adapters, names, strict=True)
    ]
    rank = rank or max((s.rank for sites in sites_per for s in sites.values()), default=1)
    union: dict[str, lora.Site] = {}
    for sites in sites_per:
        for path, site in sites.items():
            union.setdefault(path, site)
    factors = {}
    for path, site in union.items():
        a_shape = (*site.stack, capacity, site.d_in, rank)
        b_shape = (*site.stack, capacity, rank, site.d_out)
        factors[path] = {"a": jnp.zeros(a_shape, jnp.float32), "b": jnp.zeros(b_shape)}
    bank = Bank(factors, ["base", *names, *[""] * (capacity - 1 - len(names))], rank)
    for slot, (delta, spec) in enumerate(adapters, start=1):
        bank = set_slot(bank, base, slot, delta, spec, names[slot - 1])
    return bank


def _sites(base, delta, spec, name) -> dict[str, lora.Site]:
    if spec.dora:
        raise ValueError(
            f"adapter {name!r} is a DoRA adapter; a bank serves plain LoRA adapters (its "
            "magnitudes rescale the whole kernel): merge it (lorax.export --merged) instead"
        )
    sites = lora.resolve(base, spec)
    lora.wrap(base, delta, spec)  # raises, naming the path, if the delta does not fit
    for path in sites:
        if path.endswith("embedding"):
            raise ValueError(
                f"adapter {name!r} adapts {path}; a bank serves kernel adapters only "
                "(merge an embedding adapter into the base instead)"
            )
    return sites


def set_slot(
    bank: Bank, base: Mapping, slot: int, delta: Mapping, spec: lora.LoraSpec, name: str
) -> Bank:
    """A bank with ``slot`` holding this adapter (the old occupant removed); same shapes, so
    functions compiled for the old bank run the new one without recompiling.

    Raises:
      ValueError: slot 0 (the base) or out of range, a rank above the bank's, or a target the
        bank has no room for.
    """
    if not 1 <= slot < bank.capacity:
        raise ValueError(f"slot {slot} is not in 1..{bank.capacity - 1} (slot 0 is the base)")
    sites = _sites(base, delta, spec, name)
    outside = sorted(set(sites) - set(bank.factors))
    if outside:
        raise ValueError(
            f"adapter {name!r} targets {outside[0]}, which the bank has no factors for; "
            f"bank targets: {sorted(bank.factors)[:4]}… (build a new bank)"
        )
    too_big = [s for s in sites.values() if s.rank > bank.rank]
    if too_big:
        raise ValueError(
            f"adapter {name!r} has rank {too_big[0].rank} at {too_big[0].path}; the bank's "
            f"rank is {bank.rank} (build a bank with rank >= {too_big[0].rank})"
        )
    flat = paths.flatten(delta)
    factors = {}
    for path, f in bank.factors.items():
        axis = len(f["a"].shape) - 3  # the slot axis, after any layer axis
        if path in sites:
            a, b = _padded(sites[path], flat, bank.rank)
        else:
            a = jnp.zeros(f["a"].shape[:axis] + f["a"].shape[axis + 1 :])
            b = jnp.zeros(f["b"].shape[:axis] + f["b"].shape[axis + 1 :])
        index = (slice(None),) * axis + (slot,)
        factors[path] = {"a": f["a"].at[index].set(a), "b": f["b"].at[index].set(b)}
    names = list(bank.names)
    names[slot] = name
    return Bank(factors, names, bank.rank)


def wrap(base: Mapping[str, Any], bank: Bank, ids_B: jax.Array) -> dict[str, Any]:
    """Params for a batch whose row b uses bank slot ``ids_B[b]`` (0 = the base)."""
    flat = paths.flatten(base)
    ids_B = jnp.asarray(ids_B, jnp.int32)
    for path, f in bank.factors.items():
        stack = f["a"].shape[:-3]
        ids = jnp.broadcast_to(ids_B, (*stack, ids_B.shape[0]))  # nn.scan slices every leaf
        flat[path] = kernels.BankedLoraWeight(flat[path], f["a"], f["b"], ids)
    return paths.unflatten(flat)
