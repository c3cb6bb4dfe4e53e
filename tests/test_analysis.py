"""Subspace similarity and amplification (lorax/analysis.py) on cases with known answers."""

import numpy as np
import pytest

from lorax import analysis


def test_similarity_of_a_subspace_with_itself_and_with_a_disjoint_one():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 8))
    same = analysis.subspace_similarity(a, a @ np.linalg.qr(rng.standard_normal((8, 8)))[0])
    assert same.shape == (8, 8)
    np.testing.assert_allclose(same[-1, -1], 1.0, atol=1e-9)  # same span, any basis
    eye = np.eye(64)
    disjoint = analysis.subspace_similarity(eye[:, :4], eye[:, 4:12])
    np.testing.assert_allclose(disjoint, 0.0, atol=1e-12)
    bigger = analysis.subspace_similarity(eye[:, :2], eye[:, :8] @ np.diag(np.arange(8, 0, -1)))
    np.testing.assert_allclose(bigger[:, -1], 1.0, atol=1e-12)  # span(a1) ⊂ span(a2)
    grid = analysis.subspace_similarity(rng.standard_normal((64, 8)), rng.standard_normal((64, 64)))
    assert grid.shape == (8, 64) and np.all(grid >= -1e-12) and np.all(grid <= 1 + 1e-12)


def test_amplification_of_a_direction_w_barely_has():
    d = 32
    w = np.diag(np.linspace(10.0, 0.01, d))  # W hardly uses its last direction
    delta = np.zeros((d, d))
    delta[d - 1, d - 1] = 2.0  # ΔW puts weight 2 exactly there
    m = analysis.amplification(w, delta, r=1)
    np.testing.assert_allclose(m["delta_norm"], 2.0)
    np.testing.assert_allclose(m["w_in_delta_dirs"], 0.01, rtol=1e-9)
    np.testing.assert_allclose(m["factor"], 200.0, rtol=1e-9)
    np.testing.assert_allclose(m["w_in_w_dirs"], 10.0, rtol=1e-9)


@pytest.mark.slow
def test_section7_renders_the_papers_figures_and_tables_from_a_table6_study(
    tiny_model_dir, tiny_snli_dir, tmp_path
):
    """experiments.section7 on the {Wq, Wv} runs of a (tiny) Table 6 study: both heatmaps,
    the amplification table at r = 4 and 64 for every layer, and φ's summary in [0, 1]."""
    from helpers import tiny_config

    from experiments import section7, sweep, table6

    names = ("qv_r4_s0", "qv_r8_s0", "qv_r64_s0", "qv_r8_s1")
    runs = [r for r in table6.grid(seeds=2, target_sets=("q,v",)) if r.name in names]
    base = tiny_config(tiny_model_dir, tiny_snli_dir, **{"train.num_steps": 3})
    sweep.run_study("t6", runs, base, root=str(tmp_path), max_adapters=4)
    result = section7.section7(str(tmp_path / "t6"), str(tmp_path / "out"))
    for name in ("phi_r8_vs_r64.png", "phi_seed0_vs_seed1.png", "section7.md", "amplification.md"):
        assert (tmp_path / "out" / name).stat().st_size > 100, name
    amp = result["amplification"]
    assert sorted({(r["r"], r["matrix"]) for r in amp}) == [
        (4, "Wq"), (4, "Wv"), (64, "Wq"), (64, "Wv"),
    ]  # fmt: skip
    assert len(amp) == 4 * 2  # two layers of the tiny model
    # W's own top-r directions hold the most of W (all of it at r = 64 = d here)
    assert all(
        r["factor"] > 0 and r["w_in_w_dirs"] >= r["w_in_random_dirs"] * (1 - 1e-9) for r in amp
    )
    for n in ("1x1", "4x4", "8x8"):
        for v in (*result["phi_mean_r8_vs_r64"][n].values(), *result["phi_mean_seeds"][n].values()):
            assert 0 <= v <= 1
