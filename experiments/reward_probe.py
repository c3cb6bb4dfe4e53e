"""What a reward model trained on the repo's preference pairs has learned, on held-out pairs.

Run: python -m experiments.reward_probe --workdir=runs/smollm2_reward_r8 [--data=TEST.jsonl]

The pairs of lorax/data/files/preferences_tiny (experiments/make_preferences.py) set the
reference answer against the base model's own wrong answer, which is always the longer one: a
"shorter wins" rule scores 100% on them. So besides those pairs (``test``) this scores each
held-out prompt's reference answer against a wrong answer of the same form (``same_form``):
the word not reversed, the sum off by one, the numbers in the input's order, the count off by
one, the singular for the plural, the words not capitalized. Those are as long as the right
answer (the singular is shorter), so the length rule cannot pass them; a reward model that
learned the tasks can. Prints, per set and per kind, the reward model's accuracy (chosen
scored above rejected) beside the length rule's (ties count half), and writes them as JSON
(``--out``).
"""

from __future__ import annotations

import argparse
import collections
import json
import re

from lorax.data import PREFERENCES_TINY_DIR
from lorax.predict import Predictor

TEST = PREFERENCES_TINY_DIR / "test.jsonl"


def same_form_wrong(row: dict) -> str | None:
    """A wrong answer to ``row``'s prompt in the reference answer's own form (None: none)."""
    kind, chosen, prompt = row["kind"], row["chosen"], row["prompt"]
    if kind == "reverse":
        return chosen[::-1] if chosen[::-1] != chosen else None
    if kind in ("what", "count") and chosen.strip().isdigit():
        return str(int(chosen) + 1)
    if kind == "sort":
        given = re.search(r"largest: (.*)\n", prompt)[1]
        if given != chosen:
            return given
        parts = chosen.split(", ")
        return ", ".join(parts[:-2] + parts[-2:][::-1])
    if kind == "write" and chosen.endswith("s"):
        return re.search(r"plural of: (.*)\n", prompt)[1]
    if kind == "capitalize":
        return chosen.lower()
    return None


def length_rule(chosen: str, rejected: str) -> float:
    """1 if the shorter answer is the chosen one, 0.5 on a tie, else 0."""
    return 0.5 if len(chosen) == len(rejected) else float(len(chosen) < len(rejected))


def accuracies(predictor: Predictor, pairs: list[dict]) -> dict:
    """Reward-model and length-rule accuracy over ``pairs``, in all and per kind."""
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    rewards = predictor.rewards(prompts, responses, progress=True)
    n = len(pairs)
    per_kind = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for i, p in enumerate(pairs):
        stats = per_kind[p["kind"]]
        stats[0] += 1
        stats[1] += float(rewards[i] > rewards[n + i])
        stats[2] += length_rule(p["chosen"], p["rejected"])
    total = [sum(s[j] for s in per_kind.values()) for j in range(3)]
    return {
        "pairs": n,
        "reward_model": total[1] / n,
        "length_rule": total[2] / n,
        "mean_margin": float((rewards[:n] - rewards[n:]).mean()),
        "per_kind": {k: {"pairs": s[0], "reward_model": s[1] / s[0], "length_rule": s[2] / s[0]}
                     for k, s in sorted(per_kind.items())},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a finished reward-model run")
    parser.add_argument("--data", default=str(TEST), help="held-out preference pairs (jsonl)")
    parser.add_argument("--out", default="", help="write the results here as JSON")
    args = parser.parse_args()
    with open(args.data) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    same_form = [{**r, "rejected": w} for r in rows if (w := same_form_wrong(r)) is not None]
    predictor = Predictor(args.workdir)
    results = {"test": accuracies(predictor, rows), "same_form": accuracies(predictor, same_form)}
    for name, r in results.items():
        print(f"{name}: {r['pairs']} pairs, reward model {r['reward_model']:.3f}, length rule "
              f"{r['length_rule']:.3f}, mean margin {r['mean_margin']:.3f}")  # fmt: skip
        for kind, k in r["per_kind"].items():
            print(f"  {kind:<10} {k['pairs']:3d}  reward model {k['reward_model']:.3f}  "
                  f"length rule {k['length_rule']:.3f}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
