"""Issue 30's plan gates (marked ``plan``: ``make plan-test``; they need JAX's CUDA plugin, the
``[plan]`` extra): FSDP that gathers one layer at a time, compiled by ``lorax.plan`` for
described H100s, bf16, on the Llama-3-shaped configs with random weights.

- the 8B LoRA at 8 × 2048 tokens per device on "1x1x8" with fsdp = 8 within 1.3× of its
  analytic lower bound (``step.memory_bound``), the old whole-tree gather's footprint stated
  beside it (and failing that gate);
- its compiled all-gathers of base weights are per layer: each one layer's kernel (never an
  [L, ...] stack), inside the scanned bodies, gathered again in the backward pass;
- the 70B LoRA on "1x1x8" fits the card; its QLoRA NF4 variant fits one H100;
- on 2 hosts × 8 the README's recipe (mesh.data = hosts, mesh.fsdp = 8) keeps every
  all-gather on one host's devices.

Each plan prints its footprint beside its bound (``pytest -s`` shows them).
"""

import re
import sys

import jax
import numpy as np
import pytest
from helpers import REPO
from test_plan import needs_plugin

from lorax import hlo, plan, sharding, targets
from lorax import step as step_lib

sys.path.insert(0, REPO)
from configs import plan_llama8b_lora, plan_llama70b_lora, plan_llama70b_qlora  # noqa: E402

pytestmark = [pytest.mark.plan, needs_plugin]
GIB = 2**30


def compile_plan(config, gpus: int, hosts: int = 1):
    """``(setup, train state shapes, compiled step)`` of ``config`` for ``hosts × gpus`` H100s,
    as ``lorax.plan`` builds and lowers it."""
    target = plan.Target("h100", gpus, hosts)
    setup, lowered, state = plan.build_step(config, target)
    cached = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # a deviceless executable: no cache
    try:
        return setup, state, lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)


def bound_of(config, setup, state) -> dict:
    rows = config.train.batch_size // sharding.data_parallel_size(setup.mesh)
    return step_lib.memory_bound(
        setup.model.config, setup.frozen, state["trainable"], setup.mesh, rows,
        config.task.max_length, config.model.remat, setup.model.dtype,
    )  # fmt: skip


def report(name, footprint, bound=None):
    ratio = (
        f", {footprint / bound['total']:.3f} × its bound {bound['total'] / GIB:.2f} GiB"
        if bound
        else ""
    )
    parts = ", ".join(
        f"{k} {v / GIB:.2f}"
        for k, v in (bound or {}).items()
        if k not in ("total", "footprint_ratio")
    )
    print(f"{name}: {footprint:,} B = {footprint / GIB:.2f} GiB per device{ratio} ({parts})")


def gathers(compiled):
    """[(shape of the gathered array, times it runs per step)] of every all-gather."""
    out = []
    for inst in hlo.instructions(compiled.as_text()):
        if inst.opcode not in ("all-gather", "all-gather-start"):
            continue
        shapes = re.findall(r"\w+\[[\d,]*\]", inst.shape)
        # an async start's type is (operands, results): the results are the second half
        out += [(s, inst.runs) for s in shapes[len(shapes) // 2 if "start" in inst.opcode else 0 :]]
    return out


def test_8b_lora_on_8_h100s_gathers_one_layer_at_a_time_within_its_bound():
    config = plan_llama8b_lora.get_config()
    setup, state, compiled = compile_plan(config, 8)
    footprint = step_lib.compiled_memory_bytes(compiled)
    bound = bound_of(config, setup, state)
    report("8B LoRA, 1x1x8, fsdp 8, per-layer gather", footprint, bound)
    assert dict(setup.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert footprint <= 1.3 * bound["total"], (footprint, bound)

    # Per layer: every gathered array is one layer's leaf (or the embedding / output table),
    # none the [32, ...] stack of a leaf; the layers' run in the scanned bodies, 32 times.
    c = setup.model.config
    layer_shapes = {
        f"bf16[{','.join(map(str, x.shape[1:]))}]"
        for x in jax.tree_util.tree_leaves((setup.frozen["layers"], setup.delta))
        if x.ndim == 3
    }
    tables = {f"bf16[{c.vocab_size},{c.hidden_size}]", f"bf16[{c.hidden_size},{c.vocab_size}]"}
    found = gathers(compiled)
    assert {s for s, _ in found} <= layer_shapes | tables, found
    # the output layer once a step for all the loss's chunks (not again inside their loop)
    assert all(runs == 1 for s, runs in found if s in tables), found
    per_layer = [(s, runs) for s, runs in found if s in layer_shapes]
    assert per_layer and all(runs == c.num_layers for _, runs in per_layer), per_layer
    # forward, and again in the backward pass: q, o [4096,4096], mlp_in, mlp_gate [4096,14336],
    # mlp_out [14336,4096] twice per layer (k, v and the LoRA a factors are combined by XLA)
    counts = {s: sum(1 for t, _ in per_layer if t == s) for s in layer_shapes}
    assert counts["bf16[4096,14336]"] == 4 and counts["bf16[14336,4096]"] == 2, counts

    # The old whole-tree gather, same config: its footprint stated, and over the gate.
    config.mesh.fsdp_gather = "tree"
    _, _, old = compile_plan(config, 8)
    old_footprint = step_lib.compiled_memory_bytes(old)
    report("8B LoRA, 1x1x8, fsdp 8, whole-tree gather (old)", old_footprint, bound)
    assert old_footprint > 1.3 * bound["total"]
    assert any(s.startswith(f"bf16[{c.num_layers},") for s, _ in gathers(old))


@pytest.mark.parametrize("module, gpus", [(plan_llama70b_lora, 8), (plan_llama70b_qlora, 1)],
                         ids=["70b-lora-8-gpus", "70b-qlora-1-gpu"])  # fmt: skip
def test_70b_lora_on_8_h100s_and_its_qlora_on_one_fit(module, gpus):
    """Fits = within the memory JAX gives XLA on the card (plan.JAX_MEM_FRACTION of it)."""
    config = module.get_config()
    memory = plan.plan(config, plan.Target("h100", gpus))["memory"]  # what lorax.plan prints
    footprint, bound = memory["footprint_bytes"], memory["lower_bound"]
    report(f"{module.__name__} on {gpus} H100", footprint, bound)
    usable = int(targets.card("h100").memory_bytes * plan.JAX_MEM_FRACTION)
    assert memory["usable_bytes"] == usable and bound["total"] < footprint
    print(f"  headroom {memory['headroom_bytes'] / GIB:.2f} GiB of {usable / GIB:.2f} GiB usable")
    assert memory["fits"], f"does not fit: {-memory['headroom_bytes'] / GIB:.2f} GiB over"


def replica_groups(line: str, devices: int) -> list[list[int]]:
    """The device groups of a collective's ``replica_groups`` (explicit ``{{0,1},{2,3}}``, or
    the mesh form ``mesh['axis_0'=8,...], device_ids=([2,8]T(1,0)) {'axis_0'}``)."""
    explicit = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
    if explicit:
        return [
            [int(d) for d in g.split(",") if d] for g in re.findall(r"\{([\d,]*)\}", explicit[1])
        ]
    ids_form = r"(?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]" + ids_form + r" \{([^}]*)\}", line)
    assert m, f"a replica_groups form this test does not read: {line[:300]}"
    axes = re.findall(r"'(\w+)'=(\d+)", m[1])
    ids = np.arange(devices)
    if m[2]:
        ids = ids.reshape([int(d) for d in m[2].split(",")])
        if m[3]:
            ids = ids.transpose([int(p) for p in m[3].split(",")])
    ids = ids.reshape([int(n) for _, n in axes])
    named = [i for i, (a, _) in enumerate(axes) if f"'{a}'" in m[4]]
    rest = [i for i in range(len(axes)) if i not in named]
    size = int(np.prod([int(axes[i][1]) for i in named]))
    return ids.transpose(rest + named).reshape(-1, size).tolist()


def test_two_hosts_keep_the_all_gathers_on_each_host():
    """The README's multi-host recipe on 2 hosts × 8 H100s (mesh.data = 2 hosts, mesh.fsdp = 8):
    the mesh's fsdp rows are each one host's 8 devices, every all-gather stays on one host, and
    what crosses hosts is the gradient all-reduce over data (the LoRA factors and metric sums)."""
    config = plan_llama8b_lora.get_config()
    config.mesh.data, config.mesh.fsdp = 2, 8
    config.train.batch_size = config.eval_batch_size = 8 * 16
    setup, state, compiled = compile_plan(config, 8, hosts=2)
    host = {d.id: d.process_index for d in setup.mesh.devices.flat}
    assert sorted(set(host.values())) == [0, 1]
    for row in setup.mesh.devices[:, :, 0]:
        assert len({d.process_index for d in row}) == 1, "an fsdp row spans hosts"
    crossing = {}
    for line in compiled.as_text().splitlines():
        op = re.search(r" (all-gather|all-reduce|reduce-scatter)(-start)?\(", line)
        if not op or "replica_groups=" not in line:
            continue
        for group in replica_groups(line, len(host)):
            if len({host[d] for d in group}) > 1:
                crossing[op[1]] = crossing.get(op[1], 0) + 1
    print(f"2 hosts × 8 H100, data 2 × fsdp 8: collective groups crossing hosts {crossing}")
    assert "all-gather" not in crossing and "reduce-scatter" not in crossing, crossing
    assert crossing.get("all-reduce", 0) > 0  # the data-parallel gradient reduction
    report("8B LoRA, 2 hosts x 8, data 2 x fsdp 8", step_lib.compiled_memory_bytes(compiled),
           bound_of(config, setup, state))  # fmt: skip
