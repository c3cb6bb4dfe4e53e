"""Before/after numbers of a DPO run on held-out preference pairs (README "Preference tuning").

Run: python -m experiments.preference_report --sft=SFT_WORKDIR --dpo=DPO_WORKDIR [--out FILE]

For the base model, the SFT adapter (DPO's reference and starting point) and the DPO adapter, on
the DPO run's test pairs: each response's summed log-probability (the same sums DPO trains on),
the win rate of chosen over rejected (log π(chosen) > log π(rejected)), the implicit reward's
preference accuracy β·(log π − log π_ref)(chosen) > (rejected) with the SFT adapter as π_ref (as
DPO defines it; for the SFT adapter against the base model too), and exact-match accuracy of greedy
answers on the held-out prompts, with a few generations side by side. The same log-prob scores
also on ``same_form`` pairs: each test prompt's reference answer against a wrong answer of the
same form (experiments/reward_probe.py), where the set's "shorter wins" shortcut does not hold.
Writes JSON.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from lorax import evaluate, generate, lora, runs
from lorax import setup as setup_lib
from lorax.models import decoder


def _logps(setup, params, examples, batch_size=8) -> np.ndarray:
    """[N, 2] summed response log-probs (chosen, rejected) of every pair, in order."""

    @jax.jit
    def rows(params, batch):
        mask = decoder.causal_mask(batch["segment_ids"])
        logits, _ = setup.model.apply({"params": params}, batch["input_ids"], batch["positions"],
                                      mask)  # fmt: skip
        return evaluate.response_logps(logits, batch)[0]

    from lorax import data as data_lib

    # one bucket: the eval batches keep the split's order
    task = type("Task", (), {"buckets": (128,), "max_length": 128})
    batcher = data_lib.make_batcher(examples, batch_size, task, seed=0, pad_id=setup.pad_id)
    out = []
    for batch in batcher.eval_batches():
        real = int(batch["weights"].sum())
        r = np.asarray(rows(params, {k: v for k, v in batch.items() if k != "weights"}))
        out.append(r.reshape(-1, 2)[:real])
    return np.concatenate(out)


def _scores(logps: dict, beta: float) -> dict:
    """Per model: the win rate of chosen over rejected by log-prob, the mean log-probs, and
    the implicit reward's preference accuracy and margin against its reference (SFT against
    the base, DPO against SFT)."""
    out = {}
    for name, lp in logps.items():
        entry = {"win_rate_chosen_over_rejected": float(np.mean(lp[:, 0] > lp[:, 1])),
                 "mean_logp_chosen": float(lp[:, 0].mean()),
                 "mean_logp_rejected": float(lp[:, 1].mean())}  # fmt: skip
        ref = {"sft": "base", "dpo": "sft"}.get(name)
        if ref:
            r = beta * (lp - logps[ref])
            entry[f"implicit_reward_accuracy_vs_{ref}"] = float(np.mean(r[:, 0] > r[:, 1]))
            entry[f"implicit_reward_margin_vs_{ref}"] = float(np.mean(r[:, 0] - r[:, 1]))
        out[name] = entry
    return out


def _same_form(setup):
    """The test prompts' reference answers against a wrong answer of the same form
    (:func:`experiments.reward_probe.same_form_wrong`): no length shortcut."""
    from experiments.reward_probe import same_form_wrong
    from lorax.data import PREFERENCES_TINY_DIR
    from lorax.data.preferences import encode_preferences

    with open(PREFERENCES_TINY_DIR / "test.jsonl") as f:
        rows = [json.loads(line) for line in f]
    pairs = [(r["prompt"], r["chosen"], same_form_wrong(r)) for r in rows]
    pairs = [p for p in pairs if p[2] is not None and p[2] != p[1]]
    return encode_preferences(setup.tokenizer, pairs, max_length=128, counts={}, split="probe")


def _greedy(setup, params, test, n_shown: int, max_new_tokens: int) -> tuple[dict, list]:
    """Exact-match accuracy of each model's greedy answers to the test prompts (against the
    reference answers), and ``n_shown`` prompts' answers side by side."""
    tok = setup.tokenizer
    prompts = [list(p) for p in test.prompts]
    answers = [tok.decode(c[:-1]).strip() for c in test.chosen]
    texts, exact = {}, {}
    for name, p in params.items():
        outs = []
        for start in range(0, len(prompts), 50):
            outs += generate.generate(setup.model, p, prompts[start : start + 50],
                                      max_new_tokens=max_new_tokens,
                                      eos_id=tok.eos_token_id, pad_id=setup.pad_id)  # fmt: skip
        texts[name] = [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
        exact[name] = float(np.mean([t == a for t, a in zip(texts[name], answers, strict=True)]))
    shown = np.linspace(0, len(prompts) - 1, n_shown).astype(int)
    examples = [
        {"prompt": tok.decode(prompts[i]), "reference": answers[i],
         **{name: texts[name][i] for name in params}}
        for i in shown
    ]  # fmt: skip
    return exact, examples


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", required=True)
    parser.add_argument("--dpo", required=True)
    parser.add_argument("--out", default="")
    parser.add_argument("--generations", type=int, default=6, help="prompts shown side by side")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--no_greedy", action="store_true", help="log-probs only")
    args = parser.parse_args()

    config = runs.read_config(args.dpo)
    setup = setup_lib.build(config)
    base = setup.frozen
    test = setup.task.splits["test"]
    params = {"base": base}
    for name, workdir in (("sft", args.sft), ("dpo", args.dpo)):
        delta, spec = runs.load_adapter(workdir, base)
        params[name] = lora.wrap(base, delta, spec)
    beta = float(config.dpo.beta)
    report = {"beta": beta}
    for set_name, examples in (("test", test), ("same_form", _same_form(setup))):
        logps = {name: _logps(setup, p, examples) for name, p in params.items()}
        report[set_name] = {"pairs": len(examples), **_scores(logps, beta)}
    if not args.no_greedy:
        exact, examples = _greedy(setup, params, test, args.generations, args.max_new_tokens)
        report["greedy_exact_match"], report["examples"] = exact, examples
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
