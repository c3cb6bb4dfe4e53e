"""Device mesh and shardings: params replicated, batches split over the "data" axis."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def make_mesh(data: int = -1, devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over ``data`` devices (-1 = all visible devices).

    Works unchanged on one CPU, many fake CPU devices
    (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), one GPU, or a multi-host run
    started with ``jax.distributed.initialize()``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        data = len(devices)
    if not 1 <= data <= len(devices):
        raise ValueError(
            f"mesh.data = {data}, but {len(devices)} devices are visible; "
            f"valid: -1 (all) or 1..{len(devices)}"
        )
    return Mesh(np.asarray(devices[:data]), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (the base, delta and head here)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over "data"; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
    """Raises unless ``batch_size`` divides evenly over the data axis."""
    n = mesh.shape[DATA]
    if batch_size % n:
        lower, upper = batch_size - batch_size % n, batch_size + n - batch_size % n
        raise ValueError(
            f"{field} = {batch_size} does not divide over the {n} devices of the "
            f"'data' mesh axis; use a multiple of {n} (e.g. {lower or n} or {upper})"
        )


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Moves this process's share of a batch onto the mesh, split along the batch axis.

    On one host the share is the whole batch; on several, each host passes its own rows.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
