"""Subspace similarity and amplification (lorax/analysis.py) on cases with known answers."""

import numpy as np

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
