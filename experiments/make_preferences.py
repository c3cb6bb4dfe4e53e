"""Writes lorax/data/files/preferences_tiny: the pairs of the README's "Preference tuning" run.

Run: python -m experiments.make_preferences [--out DIR] [--limit N]  (the shipped set: --limit 300)

Built from the shipped instruction set (lorax/data/files/instructions_tiny, six checkable kinds:
reverse a word, add numbers, plurals, sort numbers, capitalise, count words). For each row the
prompt is the instruction prompt the SFT run trains on (:func:`lorax.data.format_prompt`), the
``chosen`` answer is the row's reference answer, and the ``rejected`` answer is what
SmolLM2-135M-Instruct itself (the base model, no adapter) writes for that prompt by greedy
decoding (at most ``MAX_NEW_TOKENS`` tokens, cut at its eos). A row is kept only when the base
model's answer is wrong: after stripping whitespace it differs from the reference answer (every
kind has exactly one right answer, so a different text is a wrong one). Rows where the base model
is right, or writes nothing, are dropped and counted. train.jsonl comes from the instruction
set's train rows, test.jsonl from its test rows (disjoint inputs), so the held-out pairs are
prompts neither SFT nor DPO trained on. The output is a function of the model's weights alone
(greedy decoding, fixed order).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib

from configs import smollm2_instructions_r8
from lorax import data as data_lib
from lorax import generate as gen

MAX_NEW_TOKENS = 32  # the reference answers are at most ~20 tokens
BATCH = 100
OUT = pathlib.Path(__file__).resolve().parent.parent / "lorax/data/files/preferences_tiny"


def _kind(instruction: str) -> str:
    """The instruction kind, by its first word (reverse, what (add), write (plural), sort,
    capitalize, count)."""
    return instruction.split()[0].lower()


def make(out: pathlib.Path, limit: int = 0) -> dict:
    config = smollm2_instructions_r8.get_config()
    setup, params = gen.load_for_generation(config, None)
    tok = setup.tokenizer
    stats = {}
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [
            json.loads(line)
            for line in (data_lib.INSTRUCTIONS_TINY_DIR / f"{split}.jsonl").read_text().splitlines()
        ]
        rows = rows[:limit] if limit and split == "train" else rows
        prompts = [data_lib.format_prompt(r["instruction"], r.get("context") or "") for r in rows]
        answers = []
        for start in range(0, len(prompts), BATCH):
            ids = [tok(p)["input_ids"] for p in prompts[start : start + BATCH]]
            outs = gen.generate(setup.model, params, ids, max_new_tokens=MAX_NEW_TOKENS,
                                eos_id=tok.eos_token_id, pad_id=setup.pad_id)  # fmt: skip
            answers += [tok.decode(o, skip_special_tokens=True) for o in outs]
            print(f"{split}: {len(answers)}/{len(prompts)} generated", flush=True)
        kept, dropped = [], collections.Counter()
        for row, prompt, answer in zip(rows, prompts, answers, strict=True):
            if not answer.strip():
                dropped["base_answer_empty"] += 1
            elif answer.strip() == row["response"].strip():
                dropped["base_answer_right"] += 1
            else:
                kind = _kind(row["instruction"])
                kept.append({"prompt": prompt, "chosen": row["response"],
                             "rejected": answer.strip(), "kind": kind})  # fmt: skip
        with open(out / f"{split}.jsonl", "w") as f:
            for row in kept:
                f.write(json.dumps(row) + "\n")
        stats[split] = {"rows": len(rows), "kept": len(kept), **dropped}
        print(split, stats[split], flush=True)
    (out / "README.txt").write_text(
        "Preference pairs written by experiments/make_preferences.py (see its docstring):\n"
        "chosen = the instruction set's reference answer, rejected = SmolLM2-135M-Instruct's own\n"
        f"greedy answer (<= {MAX_NEW_TOKENS} tokens) where it is wrong; train from the first "
        f"{limit or 'all'} train rows of instructions_tiny, test from its test rows.\n"
        f"{json.dumps(stats)}\n"
    )
    return stats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    parser.add_argument("--limit", type=int, default=0, help="train rows used (0 = all)")
    args = parser.parse_args()
    make(args.out, args.limit)


if __name__ == "__main__":
    main()
