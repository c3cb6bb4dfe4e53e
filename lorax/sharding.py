"""Device mesh and shardings: a (data, fsdp, tensor) mesh, path-regex rules for params, batches.

The mesh has three axes, outermost first:

- ``data``: pure data parallelism; params are copied on every position of this axis.
- ``fsdp``: data parallel too (batches split over data × fsdp jointly), and each large kernel
  is also stored split along one dimension over it (FSDP / ZeRO-3). Each layer all-gathers
  its own weights where it reads them (:func:`layer_gather`; ``mesh.fsdp_gather``, by default
  again in the backward pass rather than kept) while activations stay split over the batch,
  and the gradients are reduce-scattered back to the split layout layer by layer; the older
  way, the whole tree gathered at the top of the forward pass, is :func:`gather_fsdp`.
- ``tensor``: Megatron-style tensor parallelism; q/k/v and MLP up/gate kernels split along
  their output dimension, o and MLP down along their input dimension, so each attention and
  MLP block needs one reduction. The batch is not split over it.

Which dimensions of a param are split is decided by :data:`RULES`, a list of (path regex,
PartitionSpec) pairs over the "/"-joined paths of :mod:`lorax.paths`, first match wins and an
unmatched param is replicated (big_vision's style). Unlike LoRA targets, a rule that matches
nothing is not an error: one table serves every model family, and a BERT has no ``lm_head``.

The mesh's product must be the number of devices (all hosts together); -1 on one axis takes
the rest. Devices are laid out by ``mesh_utils.create_device_mesh``, tensor innermost, so on
several hosts the tensor (then fsdp) axis stays on one host's fast links where it can.

A rule's spec names the param's own trailing dimensions (a kernel's [D, F], a table's [V, D],
a bias's [F]); leading axes — the [L] of a scanned layer stack, the [K] of a multi-adapter
stack — are never split. A dimension whose size does not divide by its mesh axes' size is
kept whole (replicated on that dimension) instead of failing: e.g. BERT's 30522-word vocab
over a tensor axis of 4. Each LoRA factor is split beside its kernel: ``a`` [D, R] takes the
kernel's D-dim spec, ``b`` [R, F] its F-dim spec, and R is never split. Optimizer states
mirror the params' paths (``.../mu/delta/<kernel>/a``), so the same rules place them too.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lorax import paths

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)
BATCH_AXES = (DATA, FSDP)  # the batch is split over both: FSDP is data parallel too

P = PartitionSpec
Rule = tuple[str, PartitionSpec]

_ATTN_IN = r"(?:^|/)attn/(?:q|k|v)"
_MLP_IN = r"(?:^|/)mlp/(?:mlp_in|mlp_gate)"

# (path regex, spec of the param's own trailing dims); first match wins, the rest replicated.
RULES: tuple[Rule, ...] = (
    (_ATTN_IN + "/kernel$", P(FSDP, TENSOR)),  # [D, H·E] column parallel
    (_ATTN_IN + "/bias$", P(TENSOR)),  # [H·E]
    (r"(?:^|/)attn/o/kernel$", P(TENSOR, FSDP)),  # [H·E, D] row parallel
    (_MLP_IN + "/kernel$", P(FSDP, TENSOR)),  # [D, F] column parallel
    (_MLP_IN + "/bias$", P(TENSOR)),  # [F]
    (r"(?:^|/)mlp/mlp_out/kernel$", P(TENSOR, FSDP)),  # [F, D] row parallel
    (r"(?:^|/)embed/token/embedding$", P(TENSOR, FSDP)),  # [V, D] vocab parallel
    (r"(?:^|/)embed/\w+/embedding$", P(None, FSDP)),  # position / type tables [P, D]
    (r"(?:^|/)lm_head/kernel$", P(FSDP, TENSOR)),  # [D, V] logits split over vocab
    (r"(?:^|/)pooler/kernel$", P(FSDP, TENSOR)),  # [D, D]
)
_FACTOR_RE = re.compile(r"^(.*)/(a|b)$")


# --------------------------------------------------------------------------- the mesh


def mesh_shape(
    data: int = -1, fsdp: int = 1, tensor: int = 1, num_devices: int | None = None
) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes, with a -1 resolved to the rest of the devices.

    Raises:
      ValueError: naming the ``mesh.*`` field at fault and the valid sizes.
    """
    n = jax.device_count() if num_devices is None else num_devices
    sizes = {DATA: data, FSDP: fsdp, TENSOR: tensor}
    for axis, size in sizes.items():
        if not isinstance(size, int | np.integer) or (size < 1 and size != -1):
            raise ValueError(
                f"mesh.{axis} = {size!r} is not valid; use a positive size or -1 (the rest of "
                f"the {n} devices)"
            )
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(
            f"{' and '.join(f'mesh.{a}' for a in free)} are -1; at most one axis may be -1 "
            f"(the rest of the devices); valid for {n} devices: {valid_shapes(n)}"
        )
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if n % fixed:
            others = " × ".join(f"mesh.{a}" for a in AXES if a != free[0])
            raise ValueError(
                f"{others} = {fixed} does not divide the {n} visible devices, so mesh.{free[0]} "
                f"= -1 has no size; valid: {valid_shapes(n)}"
            )
        sizes[free[0]] = n // fixed
    elif fixed != n:
        raise ValueError(
            f"mesh.data × mesh.fsdp × mesh.tensor = {data} × {fsdp} × {tensor} = {fixed}, but "
            f"{n} devices are visible; valid: {valid_shapes(n)}"
        )
    return sizes[DATA], sizes[FSDP], sizes[TENSOR]


def valid_shapes(n: int, limit: int = 8) -> str:
    """Some (data, fsdp, tensor) sizes whose product is ``n``, for error messages."""
    shapes = [
        (d, f, n // (d * f))
        for d, f in itertools.product(range(n, 0, -1), range(1, n + 1))
        if n % (d * f) == 0
    ]
    shown = ", ".join(f"{d}×{f}×{t}" for d, f, t in shapes[:limit])
    more = f", … ({len(shapes)} in all)" if len(shapes) > limit else ""
    return f"data×fsdp×tensor sizes with product {n} ({shown}{more}), or -1 on one axis"


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None
) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor") over all ``devices`` (default: all visible).

    -1 on one axis means the rest of the devices; the product must be the device count. The
    device order comes from ``mesh_utils.create_device_mesh``, which puts the inner axes
    (tensor, then fsdp) on the best-connected devices. Works unchanged on one CPU, many fake
    CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), GPUs, or a
    multi-host run started with ``jax.distributed.initialize()``.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    grid = mesh_utils.create_device_mesh(shape, devices)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_from_config(mesh_config: Mapping[str, Any], devices: Sequence | None = None) -> Mesh:
    """The mesh a config's ``mesh`` section describes (``mesh.data``, ``.fsdp``, ``.tensor``)
    over ``devices`` (default: all visible; a plan passes the devices it describes)."""
    get = lambda axis, default: int(mesh_config.get(axis, default))  # older configs: data only
    return make_mesh(get(DATA, -1), get(FSDP, 1), get(TENSOR, 1), devices)


def initialize_distributed(mesh_config: Mapping[str, Any]) -> None:
    """Joins a multi-host run (``jax.distributed.initialize``) before anything touches devices.

    Empty ``coordinator_address`` / ``num_processes`` 0 / ``process_id`` -1 leave the value
    to JAX's cluster detection (Slurm, Open MPI, Cloud TPU, Kubernetes, ...).
    """
    kwargs = {}
    if mesh_config.get("coordinator_address"):
        kwargs["coordinator_address"] = mesh_config["coordinator_address"]
    if mesh_config.get("num_processes", 0) > 0:
        kwargs["num_processes"] = int(mesh_config["num_processes"])
    if mesh_config.get("process_id", -1) >= 0:
        kwargs["process_id"] = int(mesh_config["process_id"])
    jax.distributed.initialize(**kwargs)


def describe(mesh: Mesh) -> str:
    """``data×fsdp×tensor = 2×4×1``, for logs."""
    return f"{'×'.join(mesh.shape)} = {'×'.join(str(n) for n in mesh.shape.values())}"


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split: the product of the data and fsdp axes."""
    return math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)


# --------------------------------------------------------------------------- param rules


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _fit(dims: Sequence, shape: Sequence[int], mesh: Mesh, where: str) -> PartitionSpec:
    """``dims`` (for the trailing dims of ``shape``) left-padded with None to ``len(shape)``;
    a dim that does not divide by its axes' size is kept whole."""
    if len(dims) > len(shape):
        raise ValueError(
            f"sharding rule {tuple(dims)} for {where} names {len(dims)} dims, but its shape "
            f"{tuple(shape)} has {len(shape)}"
        )
    dims = [None] * (len(shape) - len(dims)) + list(dims)
    return P(
        *(ax if n % _axis_size(mesh, ax) == 0 else None for ax, n in zip(dims, shape, strict=True))
    )


def _rule_dims(path: str, compiled, rules: Sequence[Rule]) -> tuple | None:
    i = paths.first_match(path, compiled)
    return None if i is None else tuple(rules[i][1])


def spec_for(
    path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[Rule] = RULES
) -> PartitionSpec:
    """The PartitionSpec of the leaf at ``path`` with ``shape`` under ``rules``.

    A LoRA factor ``<kernel>/a`` [.., D, R] takes the D-dim spec of its kernel's rule and
    ``<kernel>/b`` [.., R, F] its F-dim spec; anything no rule matches is replicated.
    """
    return _spec(path, tuple(shape), mesh, rules, paths.compile_patterns(p for p, _ in rules))


def _spec(path, shape, mesh, rules, compiled) -> PartitionSpec:
    factor = _FACTOR_RE.match(path)
    if factor:
        kernel = _rule_dims(factor.group(1), compiled, rules)
        if kernel is not None:
            d_dim, f_dim = ((None, None) + kernel)[-2:]
            dims = (d_dim, None) if factor.group(2) == "a" else (None, f_dim)
            return _fit(dims, shape, mesh, path)
    dims = _rule_dims(path, compiled, rules)
    return P() if dims is None else _fit(dims, shape, mesh, path)


def tree_specs(tree: Any, mesh: Mesh, rules: Sequence[Rule] = RULES) -> Any:
    """A PartitionSpec per leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``), by its path.

    Works on params, deltas, ``{"delta", "head"}`` trees and whole train states: an optax
    state's leaves sit at paths such as ``1/inner_states/delta/inner_state/0/mu/delta/<kernel>/a``
    and so follow the param they mirror; step counts and other scalars are replicated.
    """
    compiled = paths.compile_patterns(p for p, _ in rules)

    def spec(path, leaf):
        return _spec(paths.key_str(path), tuple(np.shape(leaf)), mesh, rules, compiled)

    return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Rule] = RULES) -> Any:
    """:func:`tree_specs` as ``NamedSharding`` s on ``mesh`` (for ``jit`` and ``device_put``)."""
    return jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, spec),
        tree_specs(tree, mesh, rules),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def gather_fsdp(tree: Any, mesh: Mesh, rules: Sequence[Rule] = RULES) -> Any:
    """``tree`` (inside ``jit``) constrained to its compute layout: its specs without "fsdp".

    Called on the params at the top of the forward pass, so that XLA all-gathers each
    FSDP-split weight and keeps the activations split over the batch; left to itself, XLA's
    sharding propagation may instead gather the whole batch's activations onto every device
    and reduce them across the fsdp axis. The identity when the fsdp axis has size 1.
    """
    if mesh.shape.get(FSDP, 1) == 1:
        return tree
    specs = tree_specs(tree, mesh, rules)
    shardings = jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, _without(spec, FSDP)),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    return jax.lax.with_sharding_constraint(tree, shardings)


GATHER_MODES = {
    "layer": "each layer all-gathers its own weights, again in the backward pass (ZeRO-3)",
    "layer_keep": "each layer all-gathers its own weights, kept for the backward pass",
    "tree": "the whole params tree all-gathered at the top of the forward pass",
}
GATHERED = "fsdp_gathered"  # checkpoint_name of gathered weights (lorax.nn's remat policies)


def layer_gather(
    mesh: Mesh, rules: Sequence[Rule] = RULES, dtype: Any = None
) -> Callable[[Any], Any] | None:
    """A function taking one layer's params (inside ``jit``) to their compute layout, for the
    model to call where the layer reads them; None when the fsdp axis has size 1.

    Each FSDP-split leaf is constrained first to its stored layout and then to that layout
    without "fsdp": the forward pass all-gathers it inside the layer (inside the scanned body
    of a scanned model), and the transpose of the first constraint reduce-scatters its
    gradient back over fsdp inside the layer's backward pass, instead of after the last layer.
    Gathered leaves are tagged :data:`GATHERED` (``jax.ad_checkpoint.checkpoint_name``) for
    the remat policies. The leaves may sit in pytree nodes (LoraWeight and the like): a
    node's ``w`` takes its kernel's rule, its ``a`` / ``b`` the factor rules; paths are
    relative (``attn/q/kernel``), which the rules match anywhere. Leaves the rules leave
    unsplit over fsdp pass through untouched.

    ``dtype`` (the compute dtype): floating leaves are cast to it before they are gathered,
    as the layer would cast them after: an fp32 leaf (a LoRA factor, a fully fine-tuned
    kernel) crosses the links in half the bytes, and its gradient is reduce-scattered in that
    dtype (compiled for H100s, XLA all-reduced the whole bf16 gradient of each layer's kernels
    and sliced it after the cast back instead).
    """
    if mesh.shape.get(FSDP, 1) == 1:
        return None
    compiled = paths.compile_patterns(p for p, _ in rules)

    def gather(tree):
        def one(path, leaf):
            keys = tuple(path)
            if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "w":
                keys = keys[:-1]  # a node's frozen kernel sits where the kernel was
            spec = _spec(paths.key_str(keys), tuple(np.shape(leaf)), mesh, rules, compiled)
            if not any(FSDP in _names(axes) for axes in spec):
                return leaf
            if dtype is not None and jnp.issubdtype(leaf.dtype, jnp.floating):
                leaf = leaf.astype(dtype)
            leaf = jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, spec))
            leaf = jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, _without(spec, FSDP)))
            return checkpoint_name(leaf, GATHERED)

        return jax.tree_util.tree_map_with_path(one, tree)

    return gather


def _names(axes) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _without(spec: PartitionSpec, axis: str) -> PartitionSpec:
    """``spec`` with mesh axis ``axis`` taken out of every dim."""

    def keep(axes):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        names = tuple(a for a in names if a != axis)
        return names[0] if len(names) == 1 else (names or None)

    return P(*(keep(axes) for axes in spec))


def put(tree: Any, mesh: Mesh, rules: Sequence[Rule] = RULES) -> Any:
    """Places each leaf of ``tree`` straight into its sharding under ``rules``.

    From host (numpy) arrays each device receives only its own slice, so a base that does
    not fit one device can be placed as long as it fits the host.
    """
    return jax.device_put(tree, tree_shardings(tree, mesh, rules))


def shaped(tree: Any, mesh: Mesh, rules: Sequence[Rule] = RULES) -> Any:
    """``tree`` (arrays or ``jax.ShapeDtypeStruct`` s) as ``jax.ShapeDtypeStruct`` s carrying
    the shardings :func:`put` would give them: the abstract counterpart of a placed tree, for
    compiling a step without its arrays (``lorax.plan``)."""
    return jax.tree_util.tree_map(
        lambda x, sh: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh),
        tree,
        tree_shardings(tree, mesh, rules),
    )


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of ``tree`` (its first shard of each leaf)."""
    return int(sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(tree)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (metric sums, keys, scalars)."""
    return NamedSharding(mesh, P())


# --------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """The batch axis (after ``leading`` unsplit axes) split over data × fsdp; others whole."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
    """Raises unless ``batch_size`` divides evenly over the data × fsdp devices."""
    n = data_parallel_size(mesh)
    if batch_size % n:
        lower, upper = batch_size - batch_size % n, batch_size + n - batch_size % n
        raise ValueError(
            f"{field} = {batch_size} does not divide over the {n} data-parallel devices "
            f"(mesh.data × mesh.fsdp = {mesh.shape.get(DATA, 1)} × {mesh.shape.get(FSDP, 1)}); "
            f"use a multiple of {n} (e.g. {lower or n} or {upper})"
        )


def put_batch(
    batch: Mapping[str, np.ndarray], mesh: Mesh, leading: int = 0
) -> dict[str, jax.Array]:
    """Places a global batch on the mesh, its batch axis split over data × fsdp.

    ``batch`` is the whole global batch, which every process builds alike (the batchers are
    deterministic in seed and step); each device copies only its own rows from it, so the
    result is right however the mesh lays rows out over hosts. ``leading`` is the number of
    unsplit axes before the batch axis (1 for the multi-adapter [K, B, ...] batches).
    """
    sharding = batch_sharding(mesh, leading)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return {k: put(v) for k, v in batch.items()}
