"""DoRA (lora.dora) and LoRA+ (lora.lr_ratio_b): the math, PEFT parity both ways on MiniLM and
a tiny Llama, scan, merge, multi-adapter jobs; LoRA+'s learning rates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax import kernels, lora, paths
from lorax import step as step_lib
from lorax.checkpoints import hf
from lorax.checkpoints import peft as lpeft
from tests.test_peft import (
    TOL,
    _ids,
    _max_diff,
    _ours,
    _theirs,
    _torch_model,
    gpt2_dir,  # noqa: F401 -- fixture
    llama_dir,  # noqa: F401 -- fixture
    minilm,  # noqa: F401 -- fixture
)

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def _random_dora(base, spec, seed=0):
    """A DoRA delta with random non-zero b and magnitudes moved off the base's norms."""
    delta = lora.init(base, spec, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))

    def perturb(path, x):
        if path[-1].key == "b":
            return 0.2 * jax.random.normal(next(keys), x.shape)
        if path[-1].key == "m":
            return x * (1.0 + 0.3 * jax.random.uniform(next(keys), x.shape, minval=-1))
        return x

    return jax.tree_util.tree_map_with_path(perturb, delta)


def test_column_norms_are_the_norms_of_the_summed_kernel():
    """The norm from the factors (never building w + s·a@b) equals the built one, stacked too."""
    k = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(k[0], (3, 40, 24))
    a, b = jax.random.normal(k[1], (3, 40, 4)), jax.random.normal(k[2], (3, 4, 24))
    want = jnp.linalg.norm(w + 0.7 * a @ b, axis=-2)
    np.testing.assert_allclose(kernels.column_norms(w, a, b, 0.7), want, rtol=1e-5)


def test_dora_starts_as_the_base_and_its_norm_gets_no_gradient():
    """At init (b = 0, m = ‖w‖) the adapted kernel is w; the gradient is the one of
    m · (w + s·a@b) / c with c the norm held constant (DoRA §4.3, as PEFT computes it)."""
    k = jax.random.split(jax.random.key(1), 4)
    w, x = jax.random.normal(k[0], (16, 8)), jax.random.normal(k[1], (5, 16))
    spec = lora.make_spec("^w$", rank=2, alpha=4.0, dora=True)
    delta = lora.init({"w": w}, spec, k[2])
    np.testing.assert_allclose(lora.merge({"w": w}, delta, spec)["w"], w, rtol=1e-6)
    delta = _random_dora({"w": w}, spec, seed=3)
    from lorax import nn as lnn

    def ours(d):
        node = lora.wrap({"w": w}, d, spec)["w"]
        return jnp.sum(jnp.tanh(lnn.dora_matmul(None, x, node, jnp.float32, True)))

    def reference(d):
        merged = w + 2.0 * d["w"]["a"] @ d["w"]["b"]
        c = jax.lax.stop_gradient(jnp.linalg.norm(merged, axis=0))
        return jnp.sum(jnp.tanh(x @ (d["w"]["m"] * merged / c)))

    np.testing.assert_allclose(ours(delta), reference(delta), rtol=1e-5)
    leaves = jax.tree_util.tree_leaves
    got, want = leaves(jax.grad(ours)(delta)), leaves(jax.grad(reference)(delta))
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["minilm", "llama"])
def test_dora_export_loads_in_peft_with_our_outputs(tmp_path, family, request):
    """A DoRA delta exported with use_dora and its magnitudes: PeftModel's outputs are ours
    within 1e-4; imported back, the delta is the same; merged, the outputs stay."""
    if family == "minilm":
        directory, config, base = request.getfixturevalue("minilm")
        spec = lora.make_spec("q,v", rank=4, alpha=8.0, dora=True)
    else:
        directory = request.getfixturevalue("llama_dir")
        config, base = hf.load_decoder(directory)
        spec = lora.make_spec("q,v,o,mlp_out", rank=4, alpha=8.0, dora=True)
    delta = _random_dora(base, spec)
    ids = _ids(vocab=config.vocab_size)
    ours = _ours(config, lora.wrap(base, delta, spec), ids)
    assert _max_diff(ours, _ours(config, base, ids)) > 1e-2
    out = lpeft.export_peft(delta, spec, config, tmp_path / "adapter", base_model_name_or_path="x")
    model = peft.PeftModel.from_pretrained(_torch_model(directory, config), str(out)).eval()
    assert _max_diff(ours, _theirs(model, ids)) <= TOL
    spec2, delta2 = lpeft.import_peft(out, base, config)
    assert spec2.dora
    assert _max_diff(_ours(config, lora.wrap(base, delta2, spec2), ids), ours) <= TOL
    assert _max_diff(_ours(config, lora.merge(base, delta, spec), ids), ours) <= TOL
    if family == "llama":  # the same adapter over scanned layers
        stacked = paths.stack_layers(base)
        sdelta = paths.stack_layers(delta)
        scanned = _ours(config, lora.wrap(stacked, sdelta, spec), ids, scan=True)
        assert _max_diff(scanned, ours) <= TOL


def test_gpt2_dora_on_q_v_exports_as_one_c_attn_and_back(tmp_path, gpt2_dir):  # noqa: F811
    """GPT-2 DoRA on q and v: one fused c_attn DoRA adapter whose magnitude is q's, k's base
    column norms and v's (the base is needed for k's, and asked for by name without it);
    PeftModel's outputs are ours within 1e-4; imported, k (B zero, magnitude its base norms)
    is dropped again and the outputs stay."""
    config, base = hf.load_decoder(gpt2_dir)
    spec = lora.make_spec("q,v", rank=4, alpha=8.0, dora=True)
    delta = _random_dora(base, spec)
    ids = _ids(vocab=config.vocab_size)
    ours = _ours(config, lora.wrap(base, delta, spec), ids)
    with pytest.raises(ValueError, match="magnitude of k is its base kernel's column norms"):
        lpeft.export_peft(delta, spec, config, tmp_path / "no_base")
    out = lpeft.export_peft(delta, spec, config, tmp_path / "adapter", base=base)
    model = peft.PeftModel.from_pretrained(_torch_model(gpt2_dir, config), str(out)).eval()
    assert _max_diff(ours, _theirs(model, ids)) <= TOL
    spec2, delta2 = lpeft.import_peft(out, base, config)
    assert sorted(paths.flatten(delta2)) == sorted(paths.flatten(delta))
    assert _max_diff(_ours(config, lora.wrap(base, delta2, spec2), ids), ours) <= TOL


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dora_adapter_made_by_peft_imports_with_its_outputs(tmp_path, family, request):
    """peft.get_peft_model(use_dora=True) on Llama's q, v or GPT-2's fused c_attn, B and
    magnitudes moved, save_pretrained: imported (GPT-2: every c_attn block moved, so q, k and
    v), the wrapped model gives PEFT's outputs within 1e-4."""
    directory = request.getfixturevalue(f"{family}_dir")
    config, params = hf.load_decoder(directory)
    torch.manual_seed(0)
    targets = {"llama": dict(target_modules=["q_proj", "v_proj"]),
               "gpt2": dict(target_modules=["c_attn"], fan_in_fan_out=True)}  # fmt: skip
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, **targets[family])
    model = peft.get_peft_model(_torch_model(directory, config), cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.3 * torch.rand_like(p))
    model.save_pretrained(str(tmp_path))
    ids = _ids(vocab=config.vocab_size)
    spec, delta = lpeft.import_peft(tmp_path, params, config)
    assert spec.dora and "m" in delta["layers_0"]["attn"]["q"]["kernel"]
    assert set(delta["layers_0"]["attn"]) == ({"q", "v"} if family == "llama" else {"q", "k", "v"})
    assert _max_diff(_ours(config, lora.wrap(params, delta, spec), ids), _theirs(model, ids)) <= TOL


def test_lora_plus_trains_b_at_its_ratio_of_the_rate():
    """With lora.lr_ratio_b = 4 the first AdamW step moves every B entry 4 times as far as
    with 1 (A's steps are unchanged); heads keep their own rate."""
    from configs import base as base_config

    t = base_config.get_config().train
    t.warmup_fraction, t.num_steps = 0.0, 10
    params = {"delta": {"k": {"a": jnp.ones((6, 2)), "b": jnp.zeros((2, 5))}},
              "head": {"w": jnp.ones((5, 3))}}  # fmt: skip
    grads = jax.tree_util.tree_map(lambda x: jnp.full(x.shape, 0.5), params)
    moves = {}
    for ratio in (1.0, 4.0):
        tx = step_lib.make_optimizer(t, lr_ratio_b=ratio)
        updates, _ = tx.update(grads, tx.init(params), params)
        moves[ratio] = jax.tree_util.tree_map(lambda u: float(jnp.abs(u).max()), updates)
    assert moves[4.0]["delta"]["k"]["b"] == pytest.approx(4 * moves[1.0]["delta"]["k"]["b"])
    assert moves[4.0]["delta"]["k"]["a"] == pytest.approx(moves[1.0]["delta"]["k"]["a"])
    assert moves[4.0]["head"]["w"] == pytest.approx(moves[1.0]["head"]["w"])


def test_lora_plus_ratio_is_checked_before_any_compute():
    """lr_ratio_b must be a number > 0 and applies to LoRA only; each error names the field."""
    from configs import base as base_config
    from lorax import methods

    c = base_config.get_config()
    c.lora.lr_ratio_b = 16.0
    assert methods.lr_ratio_b(c) == 16.0
    c.method = "bitfit"
    with pytest.raises(ValueError, match=r"lora.lr_ratio_b = 16.0 \(LoRA\+\) applies to method"):
        methods.lr_ratio_b(c)
    c.method, c.lora.lr_ratio_b = "lora", 0.0
    with pytest.raises(ValueError, match=r"lora.lr_ratio_b = 0.0 is not valid; .* > 0"):
        methods.lr_ratio_b(c)
