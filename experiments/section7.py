"""The paper's §7 on a finished Table 6 study: ``python -m experiments.section7``.

From the {Wq, Wv} runs of ``runs/sweeps/table6_<model>_<task>`` (Hu et al. 2021, §7):

- Figure 3's question, "how much do the top directions of a rank-8 adapter overlap a
  rank-64 one's": the normalised subspace similarity φ(A_r8, A_r64, i, j) for ΔWq and ΔWv,
  one heatmap per layer (``phi_r8_vs_r64.png``), seed 0;
- Figure 4's control, two seeds at r = 8 (``phi_seed0_vs_seed1.png``);
- Table 7's amplification factor ‖ΔW‖_F / ‖UᵀWVᵀ‖_F, with U, V ΔW's top-r singular directions,
  beside ‖UᵀWVᵀ‖_F in W's own and in random top-r directions, at r = 4 and r = 64, every layer
  (``amplification.md``).

Also written: ``section7.md`` (the tables, and the mean φ over the top-left blocks the paper
discusses) and ``section7.json`` (every number), into ``--out``.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from absl import flags

from lorax import analysis, cli, paths

KERNELS = ("attn/q/kernel", "attn/v/kernel")
_LAYER = re.compile(r"^.*layers_\d+/")


def _runs(study_dir: str, names: list[str]) -> dict[str, tuple]:
    out = {}
    for name in names:
        path = os.path.join(study_dir, name)
        if not os.path.exists(os.path.join(path, "summary.json")):
            raise FileNotFoundError(
                f"{path} is not a finished run; run python -m experiments.table6 "
                "--targets=qv --seeds=2 first"
            )
        out[name] = analysis.load(path)
    return out


def _grids(d1, d2) -> dict[tuple[int, str], np.ndarray]:
    """φ grids by (layer, kernel) for the kernels both adapters adapt."""
    grids = {}
    for path, grid in analysis.compare(d1, d2).items():
        layer, kernel = paths.layer_index(path), _LAYER.sub("", path)
        if kernel in KERNELS:
            grids[layer, kernel] = grid
    return grids


def _heatmaps(grids, path: str, title: str, top: int = 8) -> None:
    """A grid of panels: a row per matrix (ΔWq, ΔWv), a column per layer, each φ(i, j) for
    i, j ≤ ``top`` (the paper's view of the top directions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({layer for layer, _ in grids})
    fig, axes = plt.subplots(
        len(KERNELS), len(layers), figsize=(1.9 * len(layers) + 1, 4.2), squeeze=False
    )
    for row, kernel in enumerate(KERNELS):
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            grid = grids.get((layer, kernel))
            if grid is not None:
                im = ax.imshow(grid[:top, :top], vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"layer {layer} Δ{'Wq' if '/q/' in kernel else 'Wv'}", fontsize=8)
            ax.set_xticks([0, top - 1], [1, top], fontsize=7)
            ax.set_yticks([0, top - 1], [1, top], fontsize=7)
            if col == 0:
                ax.set_ylabel("i", fontsize=8)
            if row == len(KERNELS) - 1:
                ax.set_xlabel("j", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def amplification_rows(runs: dict[str, tuple], names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        base, delta, scales = runs[name]
        flat_base, flat = paths.flatten(base), paths.flatten(delta)
        for kernel_path in sorted(k[: -len("/a")] for k in flat if k.endswith("/a")):
            kernel = _LAYER.sub("", kernel_path)
            if kernel not in KERNELS:
                continue
            a, b = (np.asarray(flat[f"{kernel_path}/{x}"], np.float64) for x in "ab")
            delta_w = scales[kernel_path] * (a @ b)
            m = analysis.amplification(np.asarray(flat_base[kernel_path]), delta_w, a.shape[1])
            matrix = "Wq" if "/q/" in kernel else "Wv"
            layer = paths.layer_index(kernel_path)
            rows.append({"run": name, "layer": layer, "matrix": matrix, "r": a.shape[1], **m})
    return rows


def _amplification_md(rows: list[dict]) -> str:
    lines = [
        "| r | matrix | layer | ‖ΔW‖_F | ‖UᵀWVᵀ‖_F in ΔW's dirs | in W's dirs | random | factor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["r"], r["matrix"], r["layer"])):
        lines.append(
            f"| {r['r']} | {r['matrix']} | {r['layer']} | {r['delta_norm']:.3g} | "
            f"{r['w_in_delta_dirs']:.3g} | {r['w_in_w_dirs']:.3g} | "
            f"{r['w_in_random_dirs']:.3g} | {r['factor']:.1f} |"
        )
    return "\n".join(lines)


def _block_means(grids, size: int) -> dict[str, float]:
    """Mean φ over each kernel's top-left ``size``×``size`` block, averaged over layers."""
    out = {}
    for matrix, key in (("Wq", "/q/"), ("Wv", "/v/")):
        blocks = [g[:size, :size].mean() for (_, k), g in grids.items() if key in f"/{k}"]
        out[matrix] = float(np.mean(blocks)) if blocks else float("nan")
    return out


def section7(study_dir: str, out: str) -> dict:
    runs = _runs(study_dir, ["qv_r4_s0", "qv_r8_s0", "qv_r64_s0", "qv_r8_s1"])
    os.makedirs(out, exist_ok=True)
    ranks = _grids(runs["qv_r8_s0"][1], runs["qv_r64_s0"][1])
    seeds = _grids(runs["qv_r8_s0"][1], runs["qv_r8_s1"][1])
    _heatmaps(ranks, os.path.join(out, "phi_r8_vs_r64.png"), "φ(A_r=8, A_r=64, i, j), seed 0")
    _heatmaps(seeds, os.path.join(out, "phi_seed0_vs_seed1.png"), "φ(A_r=8 seed 0, seed 1, i, j)")
    amp = amplification_rows(runs, ["qv_r4_s0", "qv_r64_s0"])
    result = {
        "phi_r8_vs_r64_top1": {f"{k}@{i}": float(g[0, 0]) for (i, k), g in ranks.items()},
        "phi_mean_r8_vs_r64": {f"{n}x{n}": _block_means(ranks, n) for n in (1, 4, 8)},
        "phi_mean_seeds": {f"{n}x{n}": _block_means(seeds, n) for n in (1, 4, 8)},
        "amplification": amp,
    }
    md = ["# §7 on " + os.path.basename(os.path.normpath(study_dir)), "",
          "Mean φ over the top-left i, j ≤ n block, averaged over the 6 layers:", "",
          "| n | Wq r8 vs r64 | Wv r8 vs r64 | Wq seed 0 vs 1 | Wv seed 0 vs 1 |",
          "|---|---|---|---|---|"]  # fmt: skip
    for n in (1, 4, 8):
        a, b = result["phi_mean_r8_vs_r64"][f"{n}x{n}"], result["phi_mean_seeds"][f"{n}x{n}"]
        md.append(f"| {n} | {a['Wq']:.2f} | {a['Wv']:.2f} | {b['Wq']:.2f} | {b['Wv']:.2f} |")
    md += ["", "![φ r8 vs r64](phi_r8_vs_r64.png)", "", "![φ seeds](phi_seed0_vs_seed1.png)",
           "", "Amplification (Table 7's quantities):", "", _amplification_md(amp), ""]  # fmt: skip
    with open(os.path.join(out, "amplification.md"), "w") as f:
        f.write(_amplification_md(amp) + "\n")
    with open(os.path.join(out, "section7.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(out, "section7.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv):
    del argv
    f = flags.FLAGS
    section7(os.path.join(f.root, f.study), f.out)
    print(open(os.path.join(f.out, "section7.md")).read())


if __name__ == "__main__":
    flags.DEFINE_string("root", "runs/sweeps", "Directory holding the studies.")
    flags.DEFINE_string("study", "table6_minilm-l6_rotten_tomatoes", "The Table 6 study.")
    flags.DEFINE_string("out", "experiments/results/section7", "Where the PNGs and tables go.")
    cli.run(main, "experiments.section7")
