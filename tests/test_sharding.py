"""Scaling past one device (lorax/sharding.py): the (data, fsdp, tensor) mesh, the path-regex
sharding rules, and training on 8 fake CPU devices in every mesh shape."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import tiny_config
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from lorax import lora, paths, sharding
from lorax import setup as setup_lib
from lorax import step as step_lib
from lorax import train as train_lib
from lorax.models import decoder, encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1), (1, 2, 4))  # (data, fsdp, tensor)
F, T = sharding.FSDP, sharding.TENSOR


def abstract_mesh(data, fsdp, tensor):
    """A mesh of the given sizes without devices: the rules only read the axis sizes."""
    return AbstractMesh((data, fsdp, tensor), sharding.AXES)


# --------------------------------------------------------------------------- the rules

# What each param of a layer should get, by the path below layers_i/ (or layers/), written
# out by hand from the Megatron + FSDP layout rather than read back from sharding.RULES.
LAYER_SPECS = {
    "attn/q/kernel": (F, T),
    "attn/k/kernel": (F, T),
    "attn/v/kernel": (F, T),
    "attn/q/bias": (T,),
    "attn/k/bias": (T,),
    "attn/v/bias": (T,),
    "attn/o/kernel": (T, F),
    "attn/o/bias": (None,),
    "mlp/mlp_in/kernel": (F, T),
    "mlp/mlp_gate/kernel": (F, T),
    "mlp/mlp_in/bias": (T,),
    "mlp/mlp_out/kernel": (T, F),
    "mlp/mlp_out/bias": (None,),
    "attn_norm/scale": (None,),
    "attn_norm/bias": (None,),
    "mlp_norm/scale": (None,),
    "mlp_norm/bias": (None,),
}
OTHER_SPECS = {
    "embed/token/embedding": (T, F),
    "embed/position/embedding": (None, F),
    "embed/type/embedding": (None, F),
    "embed/norm/scale": (None,),
    "embed/norm/bias": (None,),
    "pooler/kernel": (F, T),
    "pooler/bias": (None,),
    "final_norm/scale": (None,),
    "lm_head/kernel": (F, T),
}

TINY_ENCODER = encoder.EncoderConfig(
    vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24
)
TINY_LLAMA = decoder.DecoderConfig(
    vocab_size=32, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
    intermediate_size=24,
)  # fmt: skip


def expected_spec(path, ndim):
    """The hand-written spec of ``path``, with None on the leading [L] axis of a stack."""
    rest = path.split("/", 1)[1] if path.startswith(("layers/", "layers_")) else path
    dims = LAYER_SPECS.get(rest) or OTHER_SPECS[rest]
    return P(*([None] * (ndim - len(dims)) + list(dims)))


def padded(spec, ndim):
    """``spec`` with its implicit trailing Nones written out (P() == P(None, None) in effect)."""
    return P(*spec, *([None] * (ndim - len(spec))))


def shape_tree(shapes):
    return paths.unflatten({p: jax.ShapeDtypeStruct(s, np.float32) for p, s in shapes.items()})


MODELS = {
    "encoder": lambda: encoder.param_shapes(TINY_ENCODER, with_pooler=True),
    "llama": lambda: decoder.param_shapes(TINY_LLAMA, scan=False),
    "llama-scan": lambda: decoder.param_shapes(TINY_LLAMA, scan=True),
}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_param_gets_its_megatron_fsdp_spec(model):
    """On a 2×2×2 mesh (every dim of these tiny models divides by 2) each param of the tiny
    BERT and tiny Llama (scan off and on) gets its hand-written spec; a scanned stack's [L]
    axis is never split; nothing is left out of the table."""
    shapes = MODELS[model]()
    specs = paths.flatten(sharding.tree_specs(shape_tree(shapes), abstract_mesh(2, 2, 2)))
    assert specs.keys() == shapes.keys()
    for path, spec in specs.items():
        assert padded(spec, len(shapes[path])) == expected_spec(path, len(shapes[path])), path
    if model == "llama-scan":
        assert specs["layers/attn/q/kernel"] == P(None, F, T)
        stacked = [padded(s, len(shapes[p])) for p, s in specs.items() if p.startswith("layers/")]
        assert stacked and all(spec[0] is None for spec in stacked)
    kernels = [p for p in specs if p.endswith("kernel") or p.endswith("embedding")]
    assert all(specs[p] != P(None, None) for p in kernels), "a kernel was left whole"


@pytest.mark.parametrize("model", sorted(MODELS))
def test_delta_factors_and_adam_moments_sit_beside_their_kernels(model):
    """Every LoRA target (q, k, v, o, mlp, embedding): ``a`` [.., D, R] takes its kernel's
    D-dim spec and ``b`` [.., R, F] its F-dim spec, R never split; Adam's moments of the delta
    get the delta's specs, the step count is replicated."""
    shapes = MODELS[model]()
    base = shape_tree(shapes)
    targets = [t for t in lora.CANONICAL_TARGETS if t != "mlp_gate" or "llama" in model]
    spec = lora.make_spec(targets, rank=2, alpha=4.0)
    delta = jax.eval_shape(lambda b: lora.init(b, spec, jax.random.key(0)), base)
    mesh = abstract_mesh(2, 2, 2)
    kernel_specs = paths.flatten(sharding.tree_specs(base, mesh))
    factor_specs = paths.flatten(sharding.tree_specs(delta, mesh))
    assert len(factor_specs) == 2 * len(lora.resolve(base, spec)) >= 2 * 8
    for key, got in factor_specs.items():
        kernel, _, part = key.rpartition("/")
        *lead, d_dim, f_dim = kernel_specs[kernel]
        want = P(*lead, d_dim, None) if part == "a" else P(*lead, None, f_dim)
        assert got == want, key
    o = "layers/attn/o/kernel" if model == "llama-scan" else "layers_0/attn/o/kernel"
    assert tuple(factor_specs[o + "/a"])[-2:] == (T, None)
    assert tuple(factor_specs[o + "/b"])[-2:] == (None, F)

    config = tiny_config("unused", "unused")
    tx = step_lib.make_optimizer(config.train)
    trainable = {"delta": delta, "head": {}}
    state = jax.eval_shape(lambda t: step_lib.fresh_state(t, tx), trainable)
    state_specs = flat_specs(sharding.tree_specs(state, mesh))
    moments = {k: v for k, v in state_specs.items() if "/mu/delta/" in k or "/nu/delta/" in k}
    assert len(moments) == 2 * len(factor_specs)
    for key, got in moments.items():
        assert got == factor_specs[re.sub(r"^.*/(?:mu|nu)/delta/", "", key)], key
    assert state_specs["step"] == P()


def flat_specs(tree):
    """``{"1/inner_states/lora/.../mu/delta/<kernel>/a": spec}`` for any tree of specs."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))
    return {paths.key_str(k): v for k, v in leaves}


def test_dims_that_do_not_divide_fall_back_to_whole():
    """fsdp = 3 divides no dim of the tiny encoder (width 16) and tensor = 4 does not divide
    its 30-word vocab: those dims stay whole, the others are still split."""
    config = encoder.EncoderConfig(
        vocab_size=30, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24
    )
    shapes = encoder.param_shapes(config, with_pooler=False)
    specs = paths.flatten(sharding.tree_specs(shape_tree(shapes), abstract_mesh(1, 3, 4)))
    assert specs["layers_0/attn/q/kernel"] == P(None, T)  # [16, 16]: 16 % 3, 16 % 4 == 0
    assert specs["layers_0/attn/o/kernel"] == P(T, None)
    assert specs["layers_0/mlp/mlp_in/kernel"] == P(None, T)  # [16, 24]
    assert specs["layers_0/mlp/mlp_out/kernel"] == P(T, None)  # [24, 16]
    assert specs["embed/token/embedding"] == P(None, None)  # [30, 16]: neither divides
    assert specs["embed/position/embedding"] == P(None, None)
    a = sharding.spec_for("layers_0/attn/q/kernel/a", (16, 4), abstract_mesh(1, 2, 4))
    b = sharding.spec_for("layers_0/attn/q/kernel/b", (4, 16), abstract_mesh(1, 2, 4))
    assert (a, b) == (P(F, None), P(None, T))
    # a rank of 3 over tensor = 4 would not divide either, but R is never split anyway
    assert sharding.spec_for("layers_0/attn/o/kernel/b", (3, 16), abstract_mesh(1, 2, 4)) == (
        P(None, F)
    )


def test_multi_adapter_stacks_keep_k_and_l_whole():
    """A stacked job's leaves carry [K] (and [L] when scanned) before the kernel's dims: only
    the kernel's own dims are split, as in a single run."""
    mesh = abstract_mesh(1, 2, 2)
    path = "trainable/delta/layers/attn/q/kernel"
    assert sharding.spec_for(path + "/a", (3, 2, 16, 4), mesh) == P(None, None, F, None)
    assert sharding.spec_for(path + "/b", (3, 2, 4, 16), mesh) == P(None, None, None, T)
    moment = "opt_state/1/inner_states/lora/inner_state/0/nu/delta/layers_0/attn/o/kernel/b"
    assert sharding.spec_for(moment, (3, 4, 16), mesh) == P(None, None, F)
    assert sharding.spec_for("step", (3,), mesh) == P()


def test_rules_are_first_match_and_unmatched_is_replicated():
    mesh = abstract_mesh(1, 2, 2)
    rules = ((r"attn/q/kernel$", P(None, T)), (r"attn/\w/kernel$", P(F, None)))
    assert sharding.spec_for("layers_0/attn/q/kernel", (4, 4), mesh, rules) == P(None, T)
    assert sharding.spec_for("layers_0/attn/k/kernel", (4, 4), mesh, rules) == P(F, None)
    assert sharding.spec_for("head/kernel", (4, 3), mesh, rules) == P()
    with pytest.raises(ValueError, match=r"names 2 dims, but its shape \(4,\) has 1"):
        sharding.spec_for("layers_0/attn/q/kernel", (4,), mesh, rules)


# --------------------------------------------------------------------------- the mesh


@pytest.mark.parametrize(
    "sizes,message",
    [
        ((3, 1, 1), r"mesh.data × mesh.fsdp × mesh.tensor = 3 × 1 × 1 = 3, but 8 devices are "
                    r"visible; valid: .*8×1×1"),
        ((2, 2, 1), r"= 4, but 8 devices are visible; valid: .*2×2×2"),
        ((-1, -1, 1), r"mesh.data and mesh.fsdp are -1; at most one axis may be -1"),
        ((-1, 3, 1), r"mesh.fsdp × mesh.tensor = 3 does not divide the 8 visible devices, so "
                     r"mesh.data = -1 has no size"),
        ((0, 1, 1), r"mesh.data = 0 is not valid; use a positive size or -1"),
        ((2, 4, -2), r"mesh.tensor = -2 is not valid"),
    ],
)  # fmt: skip
def test_bad_mesh_sizes_name_the_field_and_valid_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(*sizes, num_devices=8)


def test_mesh_sizes_resolve_minus_one_to_the_rest():
    assert sharding.mesh_shape(-1, 4, 1, num_devices=8) == (2, 4, 1)
    assert sharding.mesh_shape(2, -1, 2, num_devices=8) == (2, 2, 2)
    assert sharding.mesh_shape(1, 2, -1, num_devices=8) == (1, 2, 4)
    assert sharding.mesh_shape(num_devices=8) == (8, 1, 1)


def test_bad_mesh_config_fails_in_build_naming_the_field(tiny_model_dir, tiny_snli_dir):
    """A config whose mesh.fsdp cannot divide the visible devices fails in build(), before
    the model is loaded, naming the fields."""
    n = jax.device_count()
    config = tiny_config(tiny_model_dir, tiny_snli_dir, **{"mesh.fsdp": n + 1})
    message = rf"mesh.fsdp × mesh.tensor = {n + 1} does not divide the {n} visible devices"
    with pytest.raises(ValueError, match=message):
        setup_lib.build(config)


def test_batch_must_divide_over_data_times_fsdp_not_tensor():
    message = (
        r"train.batch_size = 12 does not divide over the 8 data-parallel devices "
        r"\(mesh.data × mesh.fsdp = 2 × 4\); use a multiple of 8 \(e.g. 8 or 16\)"
    )
    with pytest.raises(ValueError, match=message):
        sharding.check_batch_size(12, abstract_mesh(2, 4, 1), "train.batch_size")
    sharding.check_batch_size(4, abstract_mesh(1, 2, 4), "train.batch_size")  # tensor: not split


# --------------------------------------------------------------------------- 8 fake devices


def tiny_bert_bytes_per_device(fsdp, tensor, vocab=30522, d=64, f=256, pos=128, layers=2):
    """Per-device bytes of the tiny BERT's frozen base (fp32, mean pooling: no pooler), from
    the layout: kernels and tables split over fsdp (and tensor), q/k/v/mlp_in biases over
    tensor, norms and o/mlp_out biases whole; a dim that does not divide stays whole."""

    def part(n, k):
        return n // k if n % k == 0 else n

    embed = part(vocab, tensor) * part(d, fsdp) + (pos + 2) * part(d, fsdp) + 2 * d
    layer = (
        4 * part(d, fsdp) * part(d, tensor)  # q, k, v [D, D] and o [D, D]
        + 3 * part(d, tensor)  # q, k, v biases
        + d  # o bias
        + 2 * part(d, fsdp) * part(f, tensor)  # mlp_in [D, F], mlp_out [F, D]
        + part(f, tensor)  # mlp_in bias
        + d  # mlp_out bias
        + 4 * d  # two LayerNorms
    )
    return 4 * (embed + layers * layer)


# One length bucket (one compile per step), one checkpoint (the last), a short test split.
FAST = {"task.buckets": (64,), "checkpoint_every": 0, "task.max_test_examples": 32}

SCRIPT = r"""
import json, re, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import jax
import numpy as np
assert jax.device_count() == 8, jax.devices()
from helpers import tiny_config
from lorax import setup, sharding, step, train
from lorax.checkpoints.state import Checkpointer

def config(d, f, t):
    return tiny_config({model!r}, {data!r}, **{{
        "mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t, "model.dropout": 0.1,
        "lora.dropout": 0.1, "train.num_steps": 5, **{fast!r}}})

for d, f, t in {shapes!r}:
    train.train_and_evaluate(config(d, f, t), {out!r} + f"/m{{d}}{{f}}{{t}}")

# Resuming on an fsdp × tensor mesh restores into the state's own (sharded) shardings.
c = config(1, 2, 4)
s = setup.build(c)
tx = step.make_optimizer(c.train)
state = step.initial_state({{"delta": s.delta, "head": s.head}}, tx, s.mesh)
with Checkpointer({out!r} + "/m124") as ckpt:
    restored, notes = ckpt.restore_latest_good(state)
pairs = list(zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)))
result = {{
    "step": int(restored["step"]),
    "same_shardings": all(r.sharding.is_equivalent_to(s.sharding, r.ndim) for r, s in pairs),
    "split_leaves": sum(not s.sharding.is_fully_replicated for _, s in pairs),
}}

# Each device holds its own rows of a global batch.
batch = np.arange(16 * 3).reshape(16, 3)
result["rows"] = {{}}
for d, f, t in {shapes!r}:
    shards = sharding.put_batch({{"x": batch}}, sharding.make_mesh(d, f, t))["x"].addressable_shards
    held = {{tuple(int(r) for r in np.asarray(s.data)[:, 0] // 3) for s in shards}}
    result["rows"][f"{{d}}{{f}}{{t}}"] = sorted(held)  # the distinct row sets the devices hold

# FSDP proper: the step all-gathers weights (param-shaped), never the batch's activations.
c = config(1, 8, 1)
s = setup.build(c)
tx = step.make_optimizer(c.train)
state = step.initial_state({{"delta": s.delta, "head": s.head}}, tx, s.mesh)
fn = step.jit_train_step(
    step.make_train_step(setup.make_forward(s), tx), s.mesh, state, s.frozen)
batch16 = setup.make_batcher(s, s.task.splits["train"], 16, c).train_batch(0)
args = (state, s.frozen, sharding.put_batch(batch16, s.mesh), jax.random.key(0))
gathered = set()
for line in fn.lower(*args).compile().as_text().splitlines():
    if re.search(r" all-gather(-start)?\(", line):
        out_type = line.split(" = ", 1)[1].split(" all-gather", 1)[0]
        gathered |= set(re.findall(r"\w+\[[\d,]*\]", out_type))
result["gathered"] = sorted(gathered)
leaves = jax.tree_util.tree_leaves((s.frozen, state["trainable"]))
result["params"] = sorted({{f"f32[{{','.join(map(str, x.shape))}}]" for x in leaves}})
with open({out!r} + "/result.json", "w") as f:
    json.dump(result, f)
"""


def train_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def fake_devices(n):
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
            "JAX_PLATFORMS": "cpu"}  # fmt: skip


@pytest.fixture(scope="module")
def one_device_losses(tiny_model_dir, tiny_snli_dir, tmp_path_factory):
    """The train loss curve of the run every mesh must reproduce, on this process's device."""
    workdir = tmp_path_factory.mktemp("one_device")
    reference = tiny_config(
        tiny_model_dir, tiny_snli_dir,
        **{"model.dropout": 0.1, "lora.dropout": 0.1, "train.num_steps": 5, **FAST},
    )  # fmt: skip
    train_lib.train_and_evaluate(reference, str(workdir))
    losses = train_losses(workdir)
    assert len(losses) == 5
    return losses


@pytest.mark.slow
def test_every_mesh_shape_follows_the_one_device_loss_curve(
    tiny_model_dir, tiny_snli_dir, tmp_path, one_device_losses
):
    """On 8 fake CPU devices, meshes 8×1×1, 2×4×1, 2×2×2, 1×8×1 and 1×2×4 (data×fsdp×tensor)
    each train 5 steps with dropout on to the one-device loss curve within 1e-4 relative;
    the frozen base's bytes per device are exactly what the layout predicts, shrink as fsdp
    grows, and are at most 1/4 of a full copy at fsdp = 8; a checkpoint of the 1×2×4 run
    restores into the state's own sharded layout."""
    script = SCRIPT.format(
        repo=REPO,
        tests=os.path.dirname(__file__),
        model=str(tiny_model_dir),
        data=str(tiny_snli_dir),
        shapes=SHAPES,
        fast=FAST,
        out=str(tmp_path),
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=fake_devices(8), cwd=REPO)

    full = tiny_bert_bytes_per_device(fsdp=1, tensor=1)
    per_device = {}
    for d, f, t in SHAPES:
        run = tmp_path / f"m{d}{f}{t}"
        np.testing.assert_allclose(
            train_losses(run), one_device_losses, rtol=1e-4, err_msg=str((d, f, t))
        )
        summary = json.loads((run / "summary.json").read_text())
        assert summary["devices"] == 8
        assert summary["mesh"] == {"data": d, "fsdp": f, "tensor": t}
        assert summary["base_bytes"] == full
        per_device[d, f, t] = summary["base_bytes_per_device"]
        assert per_device[d, f, t] == tiny_bert_bytes_per_device(f, t), (d, f, t)
    assert per_device[8, 1, 1] == full
    assert per_device[8, 1, 1] > per_device[2, 4, 1] > per_device[1, 8, 1]
    assert per_device[1, 8, 1] <= full / 4, per_device[1, 8, 1] / full

    result = json.loads((tmp_path / "result.json").read_text())
    assert "f32[30522,64]" in result["gathered"]  # e.g. the token table, for its lookup
    assert set(result["gathered"]) <= set(result["params"]), result["gathered"]
    assert result["step"] == 5 and result["same_shardings"]
    assert result["split_leaves"] >= 8  # the q, v factors and their moments are split
    for d, f, t in SHAPES:  # each device holds its own 16/(data·fsdp) rows, tensor copies them
        n = d * f
        want_rows = [list(range(i * 16 // n, (i + 1) * 16 // n)) for i in range(n)]
        assert result["rows"][f"{d}{f}{t}"] == want_rows, (d, f, t)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes × 4 fake devices: ~40 s alone, 105 s on the shared 2 cores
def test_two_hosts_follow_the_one_device_loss_curve(
    tiny_model_dir, tiny_snli_dir, tmp_path, one_device_losses
):
    """The multi-host command: two processes of 4 fake CPU devices each join one run with
    mesh.distributed=True on a 1×4×2 mesh (fsdp spans both processes, each layer gathering
    its weights across them), each building the same global batches; the loss curve is the
    one-device one within 1e-4 and only process 0 writes the run's files."""
    overrides = {
        "model.name": tiny_model_dir, "task.data": tiny_snli_dir, "task.max_length": 64,
        "task.validation_size": 64, "train.batch_size": 16, "train.num_steps": 5,
        "train.learning_rate": 0.01, "log_every": 1, "eval_every": 0, "eval_batch_size": 32,
        "model.dropout": 0.1, "lora.dropout": 0.1, **FAST, "task.buckets": "(64,)",
        "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2, "mesh.distributed": True,
        "mesh.coordinator_address": f"localhost:{free_port()}", "mesh.num_processes": 2,
    }  # fmt: skip
    command = [sys.executable, "-m", "lorax.train", "--config=configs/wq_wv_r4.py"]
    command += [f"--config.{k}={v}" for k, v in overrides.items()]
    command += [f"--workdir={tmp_path / 'run'}"]
    procs = [
        subprocess.Popen(
            [*command, f"--config.mesh.process_id={i}"],
            cwd=REPO,
            env=fake_devices(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    # (had process 1 also written metrics.jsonl, every step would be there twice)
    np.testing.assert_allclose(train_losses(tmp_path / "run"), one_device_losses, rtol=1e-4)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["processes"], summary["devices"]) == (2, 8)
    assert summary["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
