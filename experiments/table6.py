"""The paper's Table 6: the effect of the rank r for Wq, Wq+Wv and all four matrices.

Run: python -m experiments.table6 --model=minilm-l6 --task=rotten_tomatoes --seeds=3 \
         [--targets=q,qv]
LoRA's alpha is the base config's at every rank (``--alpha_per_rank``: alpha = 2r).
"""

from experiments.sweep import Run, alpha_overrides, main_for

TARGET_SETS = ("q", "q,v", "q,k,v,o")
RANKS = (1, 2, 4, 8, 64)


def grid(seeds: int, alpha_per_rank: bool = False, target_sets=TARGET_SETS) -> list[Run]:
    """Every (target set, rank) pair, target set by target set, then seed by seed, then rank:
    a job of ``len(RANKS)`` adapters is one seed's rank row, so a study run on some target
    sets first and extended later keeps its jobs (and their checkpoints) as they were."""
    unknown = sorted(set(target_sets) - set(TARGET_SETS))
    if unknown:
        raise ValueError(f"unknown table6 target sets {unknown}; valid: {list(TARGET_SETS)}")
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
        for targets in TARGET_SETS
        if targets in target_sets
        for seed in range(seeds)
        for rank in RANKS
    ]


if __name__ == "__main__":
    main_for("table6", grid, per_job=len(RANKS), target_sets=TARGET_SETS)
