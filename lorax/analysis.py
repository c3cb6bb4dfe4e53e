"""What the update looks like (Hu et al. 2021, §7): subspace similarity and amplification.

``python -m lorax.analysis --run=DIR_A --run=DIR_B --out=DIR`` compares two trained adapters
(e.g. rank 8 and rank 64, or two seeds) kernel by kernel: a heatmap PNG of the normalised
subspace similarity φ per adapted matrix of one layer, and a markdown table of how much ΔW
amplifies directions of W.

Orientation: lorax stores ``a`` [D_in, R], the transpose of the paper's A [R, D_in]; the
paper's right-singular vectors of A are the left-singular vectors of ``a``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import app, flags

from lorax import cli


def top_directions(a_DR: np.ndarray) -> np.ndarray:
    """Orthonormal columns [D, R]: the paper's right-singular vectors of A, by singular value."""
    u, _, _ = np.linalg.svd(np.asarray(a_DR, np.float64), full_matrices=False)
    return u


def subspace_similarity(a1_DR: np.ndarray, a2_DR: np.ndarray) -> np.ndarray:
    """φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j) for i ≤ R1, j ≤ R2, as [R1, R2].

    1 when one subspace contains the other; near min(i,j)-independent noise for unrelated
    random subspaces (about max(i, j)/D).
    """
    u1, u2 = top_directions(a1_DR), top_directions(a2_DR)
    overlap = (u1.T @ u2) ** 2  # [R1, R2]
    cumulative = overlap.cumsum(0).cumsum(1)
    i = np.arange(1, u1.shape[1] + 1)[:, None]
    j = np.arange(1, u2.shape[1] + 1)[None, :]
    return cumulative / np.minimum(i, j)


def amplification(w_DF: np.ndarray, delta_DF: np.ndarray, r: int, seed: int = 0) -> dict:
    """How ΔW relates to W (paper Table 7), in ΔW's top-r directions.

    With U, V ΔW's top-r singular vectors (our kernels are [in, out]; the paper's W is
    [out, in], so the roles of U and V swap, which leaves the norms unchanged):

    Returns:
      ``delta_norm`` ‖ΔW‖_F; ``w_in_delta_dirs`` ‖Uᵀ W V‖_F; ``w_in_w_dirs`` the same in W's
      own top-r directions; ``w_in_random_dirs`` in random orthonormal directions; and
      ``factor`` = delta_norm / w_in_delta_dirs (the paper: ≈ 21.5 at r = 4 on GPT-3).
    """
    w, d = np.asarray(w_DF, np.float64), np.asarray(delta_DF, np.float64)
    u_d, _, vt_d = np.linalg.svd(d, full_matrices=False)
    u_w, _, vt_w = np.linalg.svd(w, full_matrices=False)
    rng = np.random.default_rng(seed)
    u_r = np.linalg.qr(rng.standard_normal((w.shape[0], r)))[0]
    v_r = np.linalg.qr(rng.standard_normal((w.shape[1], r)))[0]

    def proj(u, v):
        return float(np.linalg.norm(u.T @ w @ v))

    in_delta = proj(u_d[:, :r], vt_d[:r].T)
    return {
        "delta_norm": float(np.linalg.norm(d)),
        "w_in_delta_dirs": in_delta,
        "w_in_w_dirs": proj(u_w[:, :r], vt_w[:r].T),
        "w_in_random_dirs": proj(u_r, v_r),
        "factor": float(np.linalg.norm(d)) / max(in_delta, 1e-30),
    }


def compare(delta1: Mapping, delta2: Mapping) -> dict[str, np.ndarray]:
    """φ grids for every kernel both deltas adapt (flat "/" paths -> [R1, R2])."""
    from lorax import paths

    f1, f2 = paths.flatten(delta1), paths.flatten(delta2)
    kernels = sorted({k[: -len("/a")] for k in f1 if k.endswith("/a")} & {
        k[: -len("/a")] for k in f2 if k.endswith("/a")
    })  # fmt: skip
    return {k: subspace_similarity(f1[k + "/a"], f2[k + "/a"]) for k in kernels}


def heatmap(grids: Mapping[str, np.ndarray], path: str, title: str) -> None:
    """One panel per kernel: φ(i, j) with i along rows, j along columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items(), strict=True):
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("j")
        ax.set_ylabel("i")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load(workdir: str) -> tuple[Any, dict, dict[str, float]]:
    """A run's per-layer base, delta, and the scale of each adapted kernel."""
    from lorax import lora, methods, paths, runs

    _, setup, trainable = runs.load_run(workdir)
    if not isinstance(setup.method, methods.LoRA):
        raise ValueError(
            f"{workdir} is a method = {setup.method.name!r} run; §7 compares LoRA runs"
        )
    base = paths.unstack_layers(setup.frozen)
    delta = paths.unstack_layers(trainable["delta"])
    # The spec resolved on the per-layer base; a scanned run's regexes match both layouts.
    scales = {p: s.scale for p, s in lora.resolve(base, setup.method.spec).items()}
    return base, delta, scales


def main(argv):
    del argv
    from lorax import paths

    runs, out, layer = flags.FLAGS.run, flags.FLAGS.out, flags.FLAGS.layer
    if len(runs) != 2:
        raise app.UsageError("give exactly two --run directories to compare")
    os.makedirs(out, exist_ok=True)
    (base, d1, s1), (_, d2, s2) = load(runs[0]), load(runs[1])
    grids = {k: g for k, g in compare(d1, d2).items() if paths.layer_index(k) == layer}
    if not grids:
        raise app.UsageError(f"the two runs share no adapted kernel in layer {layer}")
    names = [os.path.basename(os.path.normpath(r)) for r in runs]
    png = os.path.join(out, f"subspace_similarity_layer{layer}.png")
    heatmap(grids, png, f"φ: {names[0]} (i) vs {names[1]} (j), layer {layer}")
    rows = ["| run | kernel | r | ‖ΔW‖_F | ‖UᵀWV‖ ΔW dirs | W dirs | random | factor |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    flat_base = paths.flatten(base)
    for run, delta, scales in zip(names, (d1, d2), (s1, s2), strict=True):
        flat = paths.flatten(delta)
        for kernel in sorted(grids):
            a, b = np.asarray(flat[kernel + "/a"]), np.asarray(flat[kernel + "/b"])
            w = np.asarray(flat_base[kernel], np.float64)
            delta_w = scales[kernel] * (a.astype(np.float64) @ b.astype(np.float64))
            m = amplification(w, delta_w, a.shape[1])
            rows.append(
                f"| {run} | {kernel} | {a.shape[1]} | {m['delta_norm']:.3g} | "
                f"{m['w_in_delta_dirs']:.3g} | {m['w_in_w_dirs']:.3g} | "
                f"{m['w_in_random_dirs']:.3g} | {m['factor']:.1f} |"
            )
    table = "\n".join(rows) + "\n"
    with open(os.path.join(out, "amplification.md"), "w") as f:
        f.write(table)
    print(f"wrote {png}\n{table}")


if __name__ == "__main__":
    flags.DEFINE_multi_string("run", [], "Two lorax.train workdirs to compare.")
    flags.DEFINE_string("out", "runs/analysis", "Where to write the PNG and the table.")
    flags.DEFINE_integer("layer", 0, "The layer whose kernels are compared.")
    cli.run(main, "lorax.analysis")
