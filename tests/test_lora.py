"""Tests of the LoRA tree transform (lorax/lora.py) on small hand-built trees."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax import lora, paths
from lorax import nn as lnn


def _base(d=16, f=24, layers=2, seed=0):
    """A small tree in the canonical layout: layers_i/attn/{q,k,v,o}, layers_i/mlp/*."""
    rng = np.random.default_rng(seed)
    tree = {}
    for i in range(layers):
        tree[f"layers_{i}"] = {
            "attn": {
                n: {
                    "kernel": rng.normal(size=(d, d)).astype(np.float32),
                    "bias": np.zeros(d, np.float32),
                }
                for n in "qkvo"
            },
            "mlp": {
                "mlp_in": {"kernel": rng.normal(size=(d, f)).astype(np.float32)},
                "mlp_out": {"kernel": rng.normal(size=(f, d)).astype(np.float32)},
            },
        }
    tree["head"] = {"kernel": rng.normal(size=(d, 3)).astype(np.float32)}
    return jax.tree_util.tree_map(jnp.asarray, tree)


def _nonzero(delta, seed=1):
    """Gives every b a random non-zero value so the update is not trivially zero."""
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    return jax.tree_util.tree_map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), delta)


def test_init_shapes_and_zero_update():
    """init puts a [D,R] and zero b [R,F] at exactly the targeted kernels; ΔW = 0."""
    base = _base()
    spec = lora.make_spec("q,v,mlp_in", rank=4, alpha=8)
    delta = lora.init(base, spec, jax.random.key(0))
    flat = paths.flatten(delta)
    assert sorted(flat) == sorted(
        f"layers_{i}/{m}/kernel/{p}"
        for i in range(2)
        for m in ("attn/q", "attn/v", "mlp/mlp_in")
        for p in "ab"
    )
    assert flat["layers_0/mlp/mlp_in/kernel/a"].shape == (16, 4)
    assert flat["layers_0/mlp/mlp_in/kernel/b"].shape == (4, 24)
    for k, v in flat.items():
        if k.endswith("/b"):
            assert not np.any(v)
        else:
            assert np.any(v)
    merged = lora.merge(base, delta, spec)
    chex.assert_trees_all_equal(merged, base)


@pytest.mark.parametrize("init,expect", [("kaiming", "uniform"), ("gaussian", "normal")])
def test_init_distribution(init, expect):
    """Kaiming A lies within ±1/sqrt(D); Gaussian A has std ≈ 1/r."""
    base = {"attn": {"q": {"kernel": jnp.zeros((256, 256))}}}
    spec = lora.make_spec("q", rank=8, alpha=8, init=init)
    a = lora.init(base, spec, jax.random.key(0))["attn"]["q"]["kernel"]["a"]
    if expect == "uniform":
        assert float(jnp.abs(a).max()) <= 1 / 16 and float(jnp.abs(a).max()) > 0.9 / 16
    else:
        assert abs(float(a.std()) - 1 / 8) < 0.01


def test_init_is_per_path_stable():
    """Adding a target does not change the init of the others (keys fold in the path)."""
    base = _base()
    d1 = lora.init(base, lora.make_spec("q", rank=2, alpha=2), jax.random.key(3))
    d2 = lora.init(base, lora.make_spec("q,v", rank=2, alpha=2), jax.random.key(3))
    chex.assert_trees_all_equal(d1["layers_1"]["attn"]["q"], d2["layers_1"]["attn"]["q"])


@pytest.mark.parametrize("targets", ["q,v", "q,k,v,o", "mlp_in,mlp_out", r"attn/(q|k)/kernel$"])
@pytest.mark.parametrize("rslora", [False, True])
def test_merge_matches_wrap_and_unmerge_inverts(targets, rslora):
    """x@merge(W) equals the unmerged x@W + s(x@A)@B; unmerge(merge(W)) gives W back."""
    base = _base()
    spec = lora.make_spec(targets, rank=3, alpha=6, rslora=rslora)
    delta = _nonzero(lora.init(base, spec, jax.random.key(0)))
    wrapped, merged = lora.wrap(base, delta, spec), lora.merge(base, delta, spec)
    x = jax.random.normal(jax.random.key(9), (5, 16))
    scale = 6 / (np.sqrt(3) if rslora else 3)
    for path, leaf in paths.flatten(wrapped).items():
        if isinstance(leaf, lora.LoraWeight):
            assert leaf.scale == pytest.approx(scale)
            xin = x if leaf.w.shape[0] == 16 else jax.random.normal(jax.random.key(1), (5, 24))
            unmerged = xin @ leaf.w + leaf.scale * (xin @ leaf.a) @ leaf.b
            np.testing.assert_allclose(
                xin @ paths.flatten(merged)[path], unmerged, rtol=1e-5, atol=1e-5
            )
    chex.assert_trees_all_close(lora.unmerge(merged, delta, spec), base, atol=1e-5)


def test_wrap_through_a_flax_layer_equals_merge():
    """lorax.nn.Attention computes the same output from wrapped and merged params, and the
    same as the base at init (bit-exact)."""
    attn = lnn.Attention(num_heads=2, head_dim=8)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    base = {"attn": attn.init(jax.random.key(1), x)["params"]}
    spec = lora.make_spec("q,k,v,o", rank=4, alpha=4)
    delta = lora.init(base, spec, jax.random.key(2))
    run = lambda p: attn.apply({"params": p["attn"]}, x)  # noqa: E731
    np.testing.assert_array_equal(run(lora.wrap(base, delta, spec)), run(base))
    delta = _nonzero(delta)
    np.testing.assert_allclose(
        run(lora.wrap(base, delta, spec)), run(lora.merge(base, delta, spec)), rtol=1e-5, atol=1e-5
    )


def test_count_matches_paper_formula():
    """count = Σ r(D+F) = 2·L_LoRA·d·r for square targets (paper §4.2)."""
    base = _base(d=16, layers=3)
    for targets, r in (("q,v", 4), ("q", 8), ("q,k,v,o", 2)):
        delta = lora.init(base, lora.make_spec(targets, rank=r, alpha=1), jax.random.key(0))
        n_matrices = 3 * len(targets.split(","))
        assert lora.count(delta) == 2 * n_matrices * 16 * r
    delta = lora.init(base, lora.make_spec("mlp_in", rank=2, alpha=1), jax.random.key(0))
    assert lora.count(delta) == 3 * 2 * (16 + 24)


def test_rank_pattern_alpha_pattern_and_layer_filter():
    """Per-target rank/alpha overrides and a layer filter select what they say."""
    base = _base(layers=3)
    spec = lora.make_spec(
        "q,v", rank=4, alpha=8, rank_pattern={"v": 2}, alpha_pattern={"v": 1}, layers=[0, 2]
    )
    sites = lora.resolve(base, spec)
    assert sorted(sites) == [
        "layers_0/attn/q/kernel",
        "layers_0/attn/v/kernel",
        "layers_2/attn/q/kernel",
        "layers_2/attn/v/kernel",
    ]
    assert sites["layers_2/attn/v/kernel"].rank == 2
    assert sites["layers_2/attn/v/kernel"].scale == 0.5
    assert sites["layers_0/attn/q/kernel"].scale == 2.0


def test_first_match_wins():
    """A regex listed before a canonical name claims its kernels with its own rank."""
    base = _base(layers=2)
    spec = lora.LoraSpec(
        (lora.Target(r"layers_1/attn/q/kernel$", 1, 1.0), lora.Target("q", 4, 4.0))
    )
    sites = lora.resolve(base, spec)
    assert sites["layers_1/attn/q/kernel"].rank == 1
    assert sites["layers_0/attn/q/kernel"].rank == 4


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(targets="qq", rank=4, alpha=8), "unknown LoRA target 'qq'; valid names are"),
        (dict(targets="q", rank=0, alpha=8), "must be a positive integer"),
        (dict(targets="q", rank=-2, alpha=8), "must be a positive integer"),
        (dict(targets="q", rank=17, alpha=8), r"larger than min\(d_in, d_out\) = 16"),
        (dict(targets="mlp_gate", rank=2, alpha=8), "'mlp_gate'.*matches no kernel"),
        (dict(targets=r"attn/nope/kernel$", rank=2, alpha=8), "matches no kernel"),
        (dict(targets="q", rank=2, alpha=8, layers=[7]), "matches no kernel in layers"),
        (dict(targets="q", rank=2, alpha=8, rank_pattern={"v": 2}), "rank_pattern names"),
        (dict(targets="q", rank=2, alpha=8, init="xavier"), "unknown LoRA init"),
        (dict(targets=r"attn/q/bias$", rank=2, alpha=8), "only 2-D kernels"),
    ],
)
def test_bad_specs_get_clear_errors(kwargs, message):
    """Each bad spec raises an error that names the problem and the valid choices."""
    with pytest.raises(ValueError, match=message):
        lora.resolve(_base(), lora.make_spec(**kwargs))


def test_delta_that_does_not_fit_is_refused():
    """A delta built for another width or another target set is refused, naming the path."""
    spec = lora.make_spec("q", rank=2, alpha=2)
    delta = lora.init(_base(d=16), spec, jax.random.key(0))
    with pytest.raises(ValueError, match=r"layers_0/attn/q/kernel has shapes a\(16, 2\)"):
        lora.wrap(_base(d=32), delta, spec)
    with pytest.raises(ValueError, match="delta has no adapter for layers_0/attn/v/kernel"):
        lora.wrap(_base(), delta, lora.make_spec("q,v", rank=2, alpha=2))
