"""The paper's Table 5: which attention matrices to adapt at a fixed parameter budget.

Run: python -m experiments.table5 --model=minilm-l6 --task=rotten_tomatoes --seeds=3
Budget-matched: Wq r8, Wk r8, Wv r8, Wo r8, Wq+Wk r4, Wq+Wv r4, all four r2.
LoRA's alpha is the base config's at every rank (``--alpha_per_rank`` for the alpha = 2r
ablation; see :func:`experiments.sweep.alpha_overrides`).
"""

from experiments.sweep import Run, alpha_overrides, main_for

TARGET_SETS = (
    ("q", 8),
    ("k", 8),
    ("v", 8),
    ("o", 8),
    ("q,k", 4),
    ("q,v", 4),
    ("q,k,v,o", 2),
)


def grid(seeds: int, alpha_per_rank: bool = False) -> list[Run]:
    """Every target set at its budget-matched rank, seed by seed (seed 0's whole table
    first, so a study cut short has every cell at its first seeds): a job of 7 is one seed."""
    return [
        Run(
            f"{targets.replace(',', '')}_r{rank}_s{seed}",
            {
                "lora.targets": targets,
                "lora.rank": rank,
                **alpha_overrides(rank, alpha_per_rank),
                "seed": seed,
            },
        )
        for seed in range(seeds)
        for targets, rank in TARGET_SETS
    ]


if __name__ == "__main__":
    main_for("table5", grid, per_job=len(TARGET_SETS))
