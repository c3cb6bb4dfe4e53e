"""The paper's Table 6: the effect of the rank r for Wq, Wq+Wv and all four matrices.

Run: python -m experiments.table6 --model=minilm-l6 --task=snli --seeds=3
"""

from experiments.sweep import Run, main_for

TARGET_SETS = ("q", "q,v", "q,k,v,o")
RANKS = (1, 2, 4, 8, 64)


def grid(seeds: int) -> list[Run]:
    """Every (target set, rank) pair, for seeds 0..seeds-1 (alpha = 2r: a fixed alpha/r)."""
    return [
        Run(
            f"{targets.replace(',', '')}_r{rank}_s{seed}",
            {"lora.targets": targets, "lora.rank": rank, "lora.alpha": 2.0 * rank, "seed": seed},
        )
        for targets in TARGET_SETS
        for rank in RANKS
        for seed in range(seeds)
    ]


if __name__ == "__main__":
    main_for("table6", grid)
