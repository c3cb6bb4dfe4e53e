"""Will a run fit, and what will it run? Compiles a config's train step for GPUs that are not
here: ``python -m lorax.plan --config=configs/FILE.py --gpu=h100 [--gpus=8] [--hosts=1]``, or
a TPU slice: ``--tpu=v5e:4x4`` (libtpu, the ``[plan-tpu]`` extra).

The run is built as ``lorax.train`` builds it (:func:`lorax.setup.build`, the same mesh rules,
``loop.Stepper``'s optimizer, step and jit; a ``lorax.multi`` job's step with ``--adapters``),
with ``jax.ShapeDtypeStruct`` s where the weights would be: only the model's ``config.json``
(or GGUF header) is read, so a 70B config plans on a laptop. The step is lowered for the
largest training batch and compiled by XLA's real GPU compiler for deviceless devices of the
described card (:mod:`lorax.targets`; JAX's CUDA plugin, the ``[plan]`` extra). Printed per
device: the footprint and its parts, whether it fits the card, the attention kernel chosen (the
``auto`` choices are made for the target, not for this host), the largest buffers and the op
that makes each, the collectives per step, and the step-time estimate of :mod:`lorax.roofline`
(an estimate: a roofline over the optimized HLO). ``--json`` prints the same as one JSON
object.

What a plan cannot know: XLA's autotuning does not run without a GPU (kernel choices may
differ, not the buffers' shapes); cuDNN's workspace is counted as 0 bytes; the cuDNN probe of
``model.attention = "auto"`` cannot run, so its shapes are reported unprobed; the memory the
CUDA context, cuBLAS and NCCL take outside XLA's accounting is not included.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lorax import attention, cli, hlo, loop, multi, roofline, sharding, targets
from lorax import data as data_lib
from lorax import setup as setup_lib
from lorax import step as step_lib
from lorax.models import decoder

GIB = 2**30
# JAX preallocates this fraction of a GPU's memory for XLA (XLA_PYTHON_CLIENT_MEM_FRACTION).
JAX_MEM_FRACTION = 0.75
FMHA_PREFIX = "__cudnn$fmha"


@dataclasses.dataclass(frozen=True)
class Target:
    """What a plan compiles for: ``hosts`` × ``gpus`` of card ``gpu``, or (``tpu`` set) the
    chips of a TPU slice such as ``"v5e:4x4"``."""

    gpu: str = "h100"
    gpus: int = 1
    hosts: int = 1
    tpu: str = ""

    @property
    def card(self) -> targets.Card:
        return targets.tpu_card(self.tpu) if self.tpu else targets.card(self.gpu)

    @property
    def memory_fraction(self) -> float:
        """The share of a device's memory XLA may use: JAX preallocates 75% of a GPU's
        (``XLA_PYTHON_CLIENT_MEM_FRACTION``); a TPU's HBM is XLA's."""
        return 1.0 if self.tpu else JAX_MEM_FRACTION

    def devices(self) -> list:
        if self.tpu:
            return targets.tpu_devices(self.tpu)
        return targets.gpu_devices(self.gpu, self.gpus, self.hosts)


def build_step(
    config: ml_collections.ConfigDict, target: Target, *, adapters: int = 0, batch=None
) -> tuple[setup_lib.Setup, Any, Any]:
    """The run's setup (abstract, on the target's devices), its train step lowered for the
    largest training batch (or ``batch``: ``ShapeDtypeStruct`` s of one adapter's batch), and
    the train state's shapes.

    ``adapters`` = K > 0 plans a ``lorax.multi`` job of K adapters of ``config``.
    """
    setup = setup_lib.build(config, with_task=False, devices=target.devices(), abstract=True)
    if batch is None:
        batch = data_lib.train_batch_shapes(setup.kind, config.train.batch_size, config.task)
    if adapters:
        stepper = multi.MultiStepper([config] * adapters, [f"adapter {k}" for k in range(adapters)],
                                     setup=setup)  # fmt: skip
        state = stepper.state_shapes()
        batch = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((adapters, *x.shape), x.dtype), batch
        )
    else:
        stepper = loop.Stepper(setup, config, "plan")
        state = stepper.state_shapes()
    step = stepper.jit(state)
    # every argument as its shape: the stepper's own keys and rates live on this host's device
    shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x
    args = jax.tree_util.tree_map(shape, stepper.args(state, batch))
    return stepper.setup, step.lower(*args), state


def analyse(
    compiled, setup: setup_lib.Setup, target: Target, tokens: int, top: int = 10
) -> dict[str, Any]:
    """The per-device report of a compiled step (see the module doc); ``tokens``: what one
    device trains on per step (for the estimate's tokens/s)."""
    memory = compiled.memory_analysis()
    footprint = step_lib.compiled_memory_bytes(compiled)
    card = target.card
    usable = int(card.memory_bytes * target.memory_fraction)
    text = compiled.as_text()
    insts = hlo.instructions(text)
    fmha = hlo.custom_calls(insts, FMHA_PREFIX)
    model = setup.model
    kernel = getattr(model, "attention", "xla")
    return {
        "memory": {
            "footprint_bytes": footprint,
            "arguments_bytes": int(memory.argument_size_in_bytes),
            "outputs_bytes": int(memory.output_size_in_bytes),
            "aliased_bytes": int(memory.alias_size_in_bytes),
            "temporaries_bytes": int(memory.temp_size_in_bytes),
            "card_bytes": card.memory_bytes,
            "usable_bytes": usable,
            "fits": footprint <= usable,
            "headroom_bytes": usable - footprint,
        },
        "attention": {
            "kernel": kernel,
            "probed": kernel != "cudnn" or attention.probed("gpu"),
            "fused_calls": fmha,
        },
        "loss_chunk": setup.loss_chunk,
        "largest": [dataclasses.asdict(b) for b in hlo.largest(insts, top)],
        "collectives": hlo.collectives(insts),
        "estimate": _estimate(text, target, tokens),
    }


def _estimate(text: str, target: Target, tokens: int) -> dict[str, Any] | None:
    """The roofline's step-time estimate on a GPU (:mod:`lorax.roofline`, calibrated on the
    GPU records; it says it is an estimate); None on a TPU, which it has no figures for (and
    XLA's TPU cost model gave a negative ``optimal_seconds`` for a scanned step)."""
    if target.tpu:
        return None
    est = roofline.estimate(text, target.gpu, tokens)
    return {**est.to_json(), "summary": est.summary()}


def plan(
    config: ml_collections.ConfigDict,
    target: Target,
    *,
    adapters: int = 0,
    batch=None,
    top: int = 10,
) -> dict[str, Any]:
    """Builds, compiles and analyses ``config``'s train step for ``target``; returns the report
    (what ``--json`` prints)."""
    start = time.perf_counter()
    setup, lowered, state = build_step(config, target, adapters=adapters, batch=batch)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    rows = config.train.batch_size
    per_device = rows // sharding.data_parallel_size(setup.mesh)
    tokens = (adapters or 1) * per_device * _length(setup, config)
    report = {
        "target": {
            "gpu": "" if target.tpu else target.gpu,
            "tpu": target.tpu,
            "title": target.card.title,
            "devices": setup.mesh.devices.size,
            "hosts": len({d.process_index for d in setup.mesh.devices.flat}),
        },  # fmt: skip
        "mesh": sharding.describe(setup.mesh),
        "model": {"name": _model_name(config), "kind": setup.kind},
        "method": config.method,
        "adapters": adapters or 1,
        "parameters": {"base": setup.base_params, "trainable": _count(state["trainable"])},
        "state_bytes": _bytes_per_device(state),
        "batch": {"rows": rows, "per_device_rows": per_device, "length": _length(setup, config)},
        **analyse(compiled, setup, target, tokens, top),
        "compile_seconds": round(seconds, 1),
    }
    bound = _bound(setup, state, per_device, _length(setup, config)) if not adapters else None
    if bound:
        ratio = report["memory"]["footprint_bytes"] / bound["total"]
        report["memory"]["lower_bound"] = {**bound, "footprint_ratio": round(ratio, 3)}
    if not report["attention"]["probed"]:
        c = setup.model.config
        heads = (c.num_heads, getattr(c, "num_kv_heads", c.num_heads))
        report["attention"]["unprobed_shapes"] = {
            "heads": heads[0], "kv_heads": heads[1], "head_dim": _head_dim(c),
            "dtype": config.model.dtype,
        }  # fmt: skip
    return report


def _bound(setup, state, rows: int, length: int) -> dict[str, int] | None:
    """A decoder's analytic lower bound of the step's bytes per device
    (:func:`lorax.step.memory_bound`), or None for another model."""
    model = setup.model
    if not isinstance(getattr(model, "config", None), decoder.DecoderConfig):
        return None
    return step_lib.memory_bound(
        model.config, setup.frozen, state["trainable"], setup.mesh, rows, length,
        model.remat, model.dtype,
    )  # fmt: skip


def _model_name(config) -> str:
    if config.model.get("architecture"):  # random weights of a described shape
        c = setup_lib.read_architecture(config.model.architecture)
        return (
            f"model.architecture ({c.family}, {c.num_layers} layers × {c.hidden_size}, "
            f"{c.num_params():,} parameters; random weights)"
        )
    return config.model.name


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct`` s."""
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves
    )


def _length(setup, config) -> int:
    return int(config.task.max_length if setup.kind == "lm" else max(config.task.buckets))


def _head_dim(c) -> int:
    return int(getattr(c, "head_dim", 0) or c.hidden_size // c.num_heads)


# --------------------------------------------------------------------------- printing


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def describe(report: dict[str, Any]) -> str:
    """The report as text, one fact a line."""
    t, m, a = report["target"], report["memory"], report["attention"]
    b = report["batch"]
    lines = [
        f"plan: {report['model']['name']}, {report['method']} on {t['devices']} × {t['title']}"
        f"{f' ({tpu})' if (tpu := t['tpu']) else ''} ({t['hosts']} host(s)), mesh {report['mesh']}"
        + (f", {report['adapters']} adapters" if report["adapters"] > 1 else ""),
        f"batch: {b['rows']} rows × {b['length']} tokens ({b['per_device_rows']} rows per device)",
        f"parameters: base {report['parameters']['base']:,}, trained "
        f"{report['parameters']['trainable']:,}; train state {_gib(report['state_bytes'])} "
        "per device",
        f"footprint per device: {_gib(m['footprint_bytes'])} = arguments "
        f"{_gib(m['arguments_bytes'])} + outputs {_gib(m['outputs_bytes'])} − aliased "
        f"{_gib(m['aliased_bytes'])} + temporaries {_gib(m['temporaries_bytes'])}",
        f"fits: {'yes' if m['fits'] else 'NO'}, {_gib(abs(m['headroom_bytes']))} "
        f"{'to spare' if m['fits'] else 'over'} of the {_gib(m['usable_bytes'])} XLA may use of "
        f"the device's {_gib(m['card_bytes'])}"
        + ("" if t["tpu"] else f" (XLA_PYTHON_CLIENT_MEM_FRACTION = {JAX_MEM_FRACTION})"),
    ]
    if "lower_bound" in m:
        lb = m["lower_bound"]
        lines.append(
            f"analytic lower bound: {_gib(lb['total'])} = base {_gib(lb['base'])} + two layers' "
            f"gathered weights {_gib(lb['gathered'])} + trained params, gradients, Adam "
            f"{_gib(lb['trainable'])} + activations the remat policy keeps "
            f"{_gib(lb['activations'])} + a layer's largest temporaries "
            f"{_gib(lb['temporaries'])}; the footprint is {lb['footprint_ratio']}× it"
        )
    calls = ", ".join(f"{k} × {v}" for k, v in a["fused_calls"].items()) or "none"
    lines.append(f"attention: {a['kernel']} (cuDNN fused calls per step: {calls})")
    if not a["probed"]:
        lines.append(
            f"  cuDNN probe not run (no GPU here) for shapes {a['unprobed_shapes']}; the GPU "
            "compiler accepted them"
        )
    chunk = report["loss_chunk"]
    if report["model"]["kind"] == "lm":
        lines.append(f"LM loss: {f'chunks of {chunk} positions' if chunk else 'dense logits'}")
    lines.append("largest buffers:")
    for row in report["largest"]:
        count = f"{row['count']} × " if row["count"] > 1 else ""
        size, loop = (
            _gib(row["bytes"]),
            f" (in a loop: {row['runs']} trips)" if row["runs"] > 1 else "",
        )
        lines.append(f"  {count}{size}  {row['shape']}  {row['op']}{loop}  {row['op_name']}")
    lines.append("collectives per step:")
    for kind, row in report["collectives"].items():
        lines.append(f"  {kind}: {row['count']} ({_gib(row['bytes'])})")
    if not report["collectives"]:
        lines.append("  none")
    est = report["estimate"]
    summary = est["summary"] if est else "no estimate (lorax.roofline knows GPUs only)"
    lines.append(f"step time (one device's program): {summary}")
    lines.append(f"compiled in {report['compile_seconds']} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
    flags.DEFINE_string("gpu", "h100", f"the card: one of {sorted(targets.CARDS)}")
    flags.DEFINE_string(
        "tpu", "", f"a TPU slice instead, e.g. v5e:4x4 ({sorted(targets.TPU_CHIPS)})"
    )
    flags.DEFINE_integer("gpus", 1, "GPUs per host")
    flags.DEFINE_integer("hosts", 1, "hosts")
    flags.DEFINE_integer("adapters", 0, "plan a lorax.multi job of this many adapters (0: a run)")
    flags.DEFINE_integer("top", 10, "how many of the largest buffers to list")
    flags.DEFINE_bool("json", False, "print the report as one JSON object")
    flags.mark_flag_as_required("config")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # as lorax.train: no per-file INFO lines
    f = flags.FLAGS
    target = Target(f.gpu, f.gpus, f.hosts, f.tpu)
    target.card  # noqa: B018 -- an unknown --gpu or --tpu fails before anything is built
    report = plan(f.config, target, adapters=f.adapters, top=f.top)
    print(json.dumps(report, indent=1) if f.json else describe(report))


if __name__ == "__main__":
    # No persistent XLA cache (lorax.cli keeps one for the command lines): a deviceless
    # executable cannot be read back from it, there being no device to load it on.
    os.environ["LORAX_XLA_CACHE"] = "0"
    define_flags()
    cli.run(main, "lorax.plan")
