"""The paper's Table 5: which attention matrices to adapt at a fixed parameter budget.

Run: python -m experiments.table5 --model=minilm-l6 --task=snli --seeds=3
Budget-matched: Wq r8, Wk r8, Wv r8, Wo r8, Wq+Wk r4, Wq+Wv r4, all four r2.
"""

from experiments.sweep import Run, main_for

TARGET_SETS = (
    ("q", 8),
    ("k", 8),
    ("v", 8),
    ("o", 8),
    ("q,k", 4),
    ("q,v", 4),
    ("q,k,v,o", 2),
)


def grid(seeds: int) -> list[Run]:
    """Every target set at its budget-matched rank, for seeds 0..seeds-1."""
    return [
        Run(
            f"{targets.replace(',', '')}_r{rank}_s{seed}",
            {"lora.targets": targets, "lora.rank": rank, "lora.alpha": 2.0 * rank, "seed": seed},
        )
        for targets, rank in TARGET_SETS
        for seed in range(seeds)
    ]


if __name__ == "__main__":
    main_for("table5", grid)
