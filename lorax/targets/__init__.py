"""Accelerators lorax can plan for without having one: GPU descriptions and datasheet numbers,
and the deviceless devices XLA compiles for (``python -m lorax.plan``).

A GPU is described to XLA's compiler by a ``GpuTargetConfig`` text file (``*.txtpb`` beside
this module, taken from XLA's ``xla/tools/hlo_opt/gpu_specs``; each file states its source) and
to a reader by :class:`Card` (its memory and where the numbers come from); the datasheet's
compute and bandwidth figures, which the step-time estimate needs, are
:data:`lorax.roofline.SPECS`, under the same names. JAX's CUDA plugin turns a target config
into devices of a topology with no GPU behind them
(``jax.experimental.topologies.get_topology_desc``); ``jit(...).lower(...).compile()`` then runs
the real GPU compiler on a CPU-only machine. The plugin is the ``[plan]`` extra
(``pip install -e '.[plan]'``).
"""

from __future__ import annotations

import dataclasses
import importlib.resources

PLAN_EXTRA = "pip install -e '.[plan]'"
TPU_EXTRA = "pip install -e '.[plan-tpu]' (libtpu, pinned to this jax)"


@dataclasses.dataclass(frozen=True)
class Card:
    """One GPU as a plan describes it.

    Attributes:
      name: the ``--gpu`` name (also the key of its datasheet figures in
        :data:`lorax.roofline.SPECS`).
      title: the product, as the vendor names it.
      target_config: the XLA ``GpuTargetConfig`` file beside this module.
      memory_bytes: device memory (the target config's ``device_memory_size``).
      source: where the target config and the memory size come from.
    """

    name: str
    title: str
    target_config: str
    memory_bytes: int
    source: str


CARDS: dict[str, Card] = {
    c.name: c
    for c in (
        Card("h100", "NVIDIA H100 SXM5 80GB", "h100_sxm.txtpb", 84_978_434_048,
             "XLA's xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb"),
        Card("h200", "NVIDIA H200 SXM 141GB", "h200.txtpb", 150_754_820_096,
             "h100_sxm.txtpb with the H200's memory: the 143,771 MiB nvidia-smi reported on the "
             "H200 of benchmarks/results/runbook-gpu, and 4.8 TB/s (NVIDIA H200 datasheet)"),
        Card("a100", "NVIDIA A100 SXM4 80GB", "a100_sxm_80.txtpb", 85_100_068_864,
             "XLA's xla/tools/hlo_opt/gpu_specs/a100_sxm_80.txtpb"),
    )
}  # fmt: skip


# TPU chips a plan describes by their slice (--tpu=v5e:4x4); libtpu makes the devices. One
# device per chip on these generations (v4 exposes each TensorCore: not listed).
TPU_CHIPS: dict[str, Card] = {
    c.name: c
    for c in (
        Card("v5e", "TPU v5e", "", 16 * 2**30, "Cloud TPU docs, TPU v5e: 16 GiB HBM2 per chip"),
        Card("v5p", "TPU v5p", "", 95 * 2**30, "Cloud TPU docs, TPU v5p: 95 GiB HBM2e per chip"),
        Card("v6e", "TPU v6e (Trillium)", "", 32 * 2**30,
             "Cloud TPU docs, TPU v6e: 32 GiB HBM per chip"),
    )
}  # fmt: skip


def card(name: str) -> Card:
    """The card called ``name``; raises naming the valid names."""
    if name not in CARDS:
        raise ValueError(f"--gpu = {name!r} is not known; choose one of {sorted(CARDS)}")
    return CARDS[name]


def target_config(name: str) -> str:
    """The XLA ``GpuTargetConfig`` text of card ``name``."""
    files = importlib.resources.files(__name__)
    return files.joinpath(card(name).target_config).read_text()


def _allow_cuda_plugin_without_gpu() -> None:
    """Lets the CUDA plugin load on a machine with no CUDA runtime: its version check runs only
    when JAX may use CUDA itself, so where no platform is chosen (``JAX_PLATFORMS``) the host's
    own is pinned to the CPU (the deviceless devices need no runtime). Takes effect only before
    JAX first initialises its backends (the test suite's conftest sets ``JAX_PLATFORMS=cpu``)."""
    import jax

    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")


def gpu_devices(name: str, count: int = 1, hosts: int = 1) -> list:
    """``hosts × count`` deviceless GPUs of card ``name``, in one topology.

    Args:
      name: a key of :data:`CARDS`.
      count: GPUs per host.
      hosts: hosts (each process of a multi-host run holds ``count`` of the devices).

    Raises:
      ValueError: an unknown card, a count below 1, or JAX's CUDA plugin not installed (naming
        the extra that installs it; a command line prints it as one line).
    """
    if count < 1 or hosts < 1:
        raise ValueError(f"--gpus = {count} and --hosts = {hosts} must be >= 1")
    config = target_config(name)
    _allow_cuda_plugin_without_gpu()
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=config, topology=f"{hosts}x1x{count}"
        )
    except (NotImplementedError, RuntimeError) as e:
        raise ValueError(
            f"cannot describe {card(name).title} devices here ({str(e).splitlines()[0]}): "
            f"JAX's CUDA plugin is missing (install it with {PLAN_EXTRA}), or JAX started its "
            "backends before the plugin could load (set JAX_PLATFORMS=cpu)"
        ) from None
    return list(topology.devices)


def tpu_card(slice_name: str) -> Card:
    """The chip of a TPU slice ``"v5e:4x4"``; raises naming the valid generations."""
    chip = slice_name.partition(":")[0]
    if chip not in TPU_CHIPS or ":" not in slice_name:
        raise ValueError(
            f"--tpu = {slice_name!r} is not known; give a generation and its chips, e.g. "
            f"'v5e:4x4' (generations: {sorted(TPU_CHIPS)})"
        )
    return TPU_CHIPS[chip]


def tpu_devices(slice_name: str) -> list:
    """The deviceless chips of a TPU slice (``"v5e:4x4"``: 16 chips, 4 to a host), from libtpu.

    Raises:
      ValueError: an unknown generation, libtpu not installed, or a slice it does not know.
    """
    tpu_card(slice_name)
    _allow_cuda_plugin_without_gpu()
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            topology_name=slice_name, platform="tpu", chip_config_name="default",
            chips_per_host_bounds=(2, 2, 1), num_slices=1,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 -- libtpu absent or the slice unknown: say which
        raise ValueError(
            f"cannot describe the TPU slice {slice_name!r} ({str(e).splitlines()[0]}); TPU plans "
            f"need libtpu: {TPU_EXTRA}"
        ) from None
    return list(topology.devices)
