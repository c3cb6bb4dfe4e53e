"""FSDP that gathers one layer at a time (lorax/sharding.py ``layer_gather``, ``mesh.fsdp_gather``):
on 8 fake CPU devices the compiled step all-gathers each layer's weights inside that layer
(inside the scanned body of a scanned model), again in the backward pass unless they are kept,
and trains to the one-device loss curve and to the old whole-tree gather's."""

import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = 2
# Per layer, the leaves split over fsdp: q, k, v, o, mlp_in, mlp_gate, mlp_out kernels, the
# a factors of q and v ([D, R], split beside their kernels' D); the b factors are not.
SPLIT_PER_LAYER = 9

SCRIPT = r"""
import json, os, re, sys
sys.path.insert(0, {repo!r})
import jax, jax.numpy as jnp, numpy as np
from safetensors.numpy import save_file
from configs import smollm2_instructions_r8
from experiments.sweep import apply_overrides
from lorax import assets, checkpoints, setup, sharding, step
from lorax.checkpoints import hf
from lorax.models import decoder

out = {out!r}
hf_config = {{"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": {layers}, "num_attention_heads": 4, "num_key_value_heads": 2,
    "tie_word_embeddings": False, "max_position_embeddings": 64}}
model_dir = os.path.join(out, "model")
os.makedirs(model_dir, exist_ok=True)
with open(os.path.join(model_dir, "config.json"), "w") as f:
    json.dump(hf_config, f)
c = decoder.DecoderConfig.from_hf(hf_config)
ids = jnp.zeros((1, 4), jnp.int32)
mask = decoder.causal_mask(jnp.ones_like(ids))
params = decoder.Decoder(c).init(jax.random.key(0), ids, ids, mask)["params"]
save_file(hf.decoder_to_hf(jax.tree_util.tree_map(np.asarray, params), c),
          os.path.join(model_dir, "model.safetensors"))
checkpoints.load_tokenizer(assets.resolve("smollm2-135m")).save_pretrained(model_dir)

rng = np.random.default_rng(0)
batches = []
for _ in range({steps}):
    tokens = rng.integers(0, 96, (8, 17)).astype(np.int32)
    batches.append({{"input_ids": tokens[:, :-1], "targets": tokens[:, 1:],
                    "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)),
                    "loss_mask": np.ones((8, 16), np.float32)}})

def op_shapes(hlo, op):
    # [computation, result type] of every `op` in the optimized module
    found, comp = [], None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{{"):
            comp = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
        if re.search(r" " + op + r"(-start)?\(", line):
            found.append([comp, line.split(" = ", 1)[1].split(" " + op, 1)[0]])
    return found

results = {{}}
for name, mesh, scan, mode, *extra in {runs!r}:
    config = apply_overrides(smollm2_instructions_r8.get_config(), {{
        "model.name": model_dir, "train.batch_size": 8, "lora.dropout": 0.1,
        "train.learning_rate": 1e-2, "model.scan": scan, "mesh.fsdp_gather": mode,
        "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2], **dict(extra)}})
    s = setup.build(config, with_task=False)
    tx = step.make_optimizer(config.train)
    state = step.initial_state({{"delta": s.delta, "head": s.head}}, tx, s.mesh)
    train_step = step.make_train_step(setup.make_forward(s), tx, setup.train_sums(s))
    fn = step.jit_train_step(train_step, s.mesh, state, s.frozen)
    key = jax.random.key(0)
    compiled = fn.lower(state, s.frozen, sharding.put_batch(batches[0], s.mesh), key).compile()
    hlo = compiled.as_text()
    losses = []
    for batch in batches[: {steps}]:
        state, sums = fn(state, s.frozen, sharding.put_batch(batch, s.mesh), key)
        losses.append(float(sums["loss_sum"] / sums["count"]))
    whiles = re.findall(r"body=(%[\w.\-]+)", hlo)
    results[name] = {{"losses": losses, "all_gathers": op_shapes(hlo, "all-gather"),
                     "while_bodies": whiles,
                     "temp": compiled.memory_analysis().temp_size_in_bytes}}
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(results, f)
"""


def fake_devices(n):
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
            "JAX_PLATFORMS": "cpu"}  # fmt: skip


def run_script(tmp_path, runs, steps, devices=8):
    """Runs ``runs`` ((name, (data, fsdp, tensor), scan, fsdp_gather), ...) in one process on
    ``devices`` fake CPU devices: ``steps`` train steps each; their losses and compiled HLO."""
    script = SCRIPT.format(repo=REPO, out=str(tmp_path), layers=LAYERS, runs=runs, steps=steps)
    subprocess.run([sys.executable, "-c", script], check=True, env=fake_devices(devices), cwd=REPO)
    return json.loads((tmp_path / "result.json").read_text())


def layer_shapes():
    """The per-layer f32 shapes of the fsdp-split leaves (q, o [32,32], k, v [32,16],
    mlp_in, mlp_gate [32,64], mlp_out [64,32], the q, v a factors [32,8]: rank 8)."""
    return {"f32[32,32]", "f32[32,16]", "f32[32,64]", "f32[64,32]", "f32[32,8]"}


def gathered(run, where=None):
    """Counter of the all-gathered shapes (layout dropped), in ``where``: "body" (a while
    body: a scanned layer), "entry" or anywhere."""
    bodies = set(run["while_bodies"])
    shapes = collections.Counter()
    for comp, out_type in run["all_gathers"]:
        if where == "body" and comp not in bodies or where == "entry" and comp in bodies:
            continue
        for shape in re.findall(r"\w+\[[\d,]*\]", out_type):
            shapes[shape] += 1
    return shapes


def layer_gathers(counter):
    return sum(n for shape, n in counter.items() if shape in layer_shapes())


def test_each_layer_gathers_its_own_weights_in_the_compiled_step(tmp_path):
    """Scanned and looped 2-layer Llamas on a 1×8×1 mesh: every all-gathered weight has one
    layer's shape (never the [L, ...] stack), a scanned model gathers inside the scanned
    bodies (forward and backward), and each of the 9 fsdp-split leaves of a layer is gathered
    again in the backward pass (ZeRO-3) where that pass reads it."""
    runs = (("scan", (1, 8, 1), True, "layer"), ("loop", (1, 8, 1), False, "layer"))
    result = run_script(tmp_path, runs, steps=1)
    scan, loop = result["scan"], result["loop"]
    for run in (scan, loop):
        assert not any(re.match(r"f32\[2,", s) for s in gathered(run)), gathered(run)
    # Scanned: 9 leaves gathered in the forward body and 9 in the backward body.
    assert layer_gathers(gathered(scan, "body")) == 2 * SPLIT_PER_LAYER, gathered(scan)
    assert layer_gathers(gathered(scan, "entry")) == 0, gathered(scan)
    # Looped: 9 leaves × 2 layers × (forward + backward), less the 5 that layer 0's backward
    # pass does not read: no gradient flows below layer 0, so its q, k, v kernels and the q, v
    # a factors (which only carry the gradient to the layer's input) are not gathered again.
    assert layer_gathers(gathered(loop)) == 2 * LAYERS * SPLIT_PER_LAYER - 5, gathered(loop)


@pytest.mark.slow
def test_per_layer_gathering_follows_one_device_and_whole_tree_loss_curves(tmp_path):
    """Meshes 1×8×1, 2×4×1 and 2×2×2 (data×fsdp×tensor), looped and scanned, with LoRA dropout
    on: per-layer gathering trains 4 steps to the one-device loss curve within 1e-4 (relative)
    and to the old whole-tree gather's (also with the chunked LM loss and block_inputs remat);
    keeping the gathered weights ("layer_keep") gathers each leaf once and holds more temporary
    memory than gathering again; the whole-tree gather of a scanned model all-gathers the
    [L, ...] stacks (what the per-layer check rejects)."""
    runs, one_device = [], []
    for scan in (False, True):
        tag = "scan" if scan else "loop"
        one_device.append((f"{tag}-one", (1, 1, 1), scan, "layer"))
        for mesh in ((1, 8, 1), (2, 4, 1), (2, 2, 2)):
            runs.append((f"{tag}-layer-{mesh}", mesh, scan, "layer"))
        runs.append((f"{tag}-tree", (2, 2, 2), scan, "tree"))
        runs.append((f"{tag}-keep", (1, 8, 1), scan, "layer_keep"))
    # the chunked LM loss (the output layer gathered once for all chunks) and a remat policy
    chunked = {"model.loss_chunk": 4, "model.remat": "block_inputs"}
    runs.append(("scan-chunked", (2, 4, 1), True, "layer", *chunked.items()))
    (tmp_path / "one").mkdir()
    result = run_script(tmp_path / "one", tuple(one_device), steps=4, devices=1)
    result.update(run_script(tmp_path, tuple(runs), steps=4))
    for tag in ("loop", "scan"):
        one = result[f"{tag}-one"]["losses"]
        assert len(one) == 4 and np.all(np.isfinite(one))
        for mesh in ((1, 8, 1), (2, 4, 1), (2, 2, 2)):
            losses = result[f"{tag}-layer-{mesh}"]["losses"]
            np.testing.assert_allclose(losses, one, rtol=1e-4, err_msg=f"{tag} {mesh}")
        tree = result[f"{tag}-tree"]["losses"]
        np.testing.assert_allclose(tree, result[f"{tag}-layer-(2, 2, 2)"]["losses"], rtol=1e-4)
        layer, keep = result[f"{tag}-layer-(1, 8, 1)"], result[f"{tag}-keep"]
        np.testing.assert_allclose(keep["losses"], one, rtol=1e-4)
        fewer = 5 if tag == "loop" else 0  # layer 0's backward reads 5 leaves fewer (above)
        assert layer_gathers(gathered(layer)) == 2 * layer_gathers(gathered(keep)) - fewer > 0
    np.testing.assert_allclose(result["scan-chunked"]["losses"], result["scan-one"]["losses"],
                               rtol=1e-4)  # fmt: skip
    scan_layer, scan_keep = result["scan-layer-(1, 8, 1)"], result["scan-keep"]
    assert scan_layer["temp"] < scan_keep["temp"], (scan_layer["temp"], scan_keep["temp"])
    stacks = [s for s in gathered(result["scan-tree"]) if re.match(r"f32\[2,", s)]
    assert len(stacks) >= 5, gathered(result["scan-tree"])  # the old way: whole stacks


@pytest.mark.parametrize("remat", ["none", "block_inputs", "dots"])
def test_remat_policies_never_keep_gathered_weights_unless_asked(remat, capsys):
    """Under each model.remat policy a layer's gathered weights (a sharding constraint's output
    tagged sharding.GATHERED, as layer_gather makes them) are not saved for the backward pass,
    and are with regather=False; "none" and "dots" keep the matmul outputs, "block_inputs"
    keeps neither (only the inputs)."""
    import jax
    import jax.numpy as jnp
    from jax.ad_checkpoint import checkpoint_name
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lorax import nn, sharding

    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])

    def gathered(w):
        w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))
        return checkpoint_name(w, sharding.GATHERED)

    def layer(w1, w2, x):  # [7, 5] and [5, 3] weights: shapes no activation has
        return jnp.sum(jnp.tanh(x @ gathered(w1)) @ gathered(w2))

    args = (jnp.ones((7, 5)), jnp.ones((5, 3)), jnp.ones((4, 7)))

    def saved(regather):  # what the backward pass gets from the forward pass, as JAX says
        policy = nn.remat_policy(remat, regather=regather)
        f = layer if policy is None else jax.checkpoint(layer, policy=policy)
        capsys.readouterr()
        jax.ad_checkpoint.print_saved_residuals(lambda w1, w2: f(w1, w2, args[2]), *args[:2])
        return capsys.readouterr().out

    regathered, kept = saved(regather=True), saved(regather=False)
    assert f"named '{sharding.GATHERED}'" not in regathered, regathered  # the stored w's only
    assert f"named '{sharding.GATHERED}'" in kept, kept
    matmul_kept = "[4,5] output of" in regathered
    assert matmul_kept == (remat != "block_inputs"), regathered
