"""Before/after numbers of a DPO run on held-out preference pairs (README "Preference tuning").

Run: python -m experiments.preference_report --sft=SFT_WORKDIR --dpo=DPO_WORKDIR [--out FILE]

For the base model, the SFT adapter (DPO's reference and starting point) and the DPO adapter, on
the DPO run's test pairs: each response's summed log-probability (the same sums DPO trains on),
the win rate of chosen over rejected (log π(chosen) > log π(rejected)), the implicit reward's
preference accuracy β·(log π − log π_ref)(chosen) > (rejected) with the SFT adapter as π_ref (as
DPO defines it; for the SFT adapter against the base model too), and exact-match accuracy of greedy
answers on the held-out prompts, with a few generations side by side. Writes JSON.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", required=True)
    parser.add_argument("--dpo", required=True)
    parser.add_argument("--out", default="")
    parser.add_argument("--generations", type=int, default=6, help="prompts shown side by side")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    args = parser.parse_args()

    config = runs.read_config(args.dpo)
    setup = setup_lib.build(config)
    base = setup.frozen
    tok = setup.tokenizer
    test = setup.task.splits["test"]
    params = {"base": base}
    for name, workdir in (("sft", args.sft), ("dpo", args.dpo)):
        delta, spec = runs.load_adapter(workdir, base)
        params[name] = lora.wrap(base, delta, spec)
    beta = float(config.dpo.beta)
    logps = {name: _logps(setup, p, test) for name, p in params.items()}
    report = {"pairs": len(test), "beta": beta, "models": {}}
    for name, lp in logps.items():
        entry = {"win_rate_chosen_over_rejected": float(np.mean(lp[:, 0] > lp[:, 1])),
                 "mean_logp_chosen": float(lp[:, 0].mean()),
                 "mean_logp_rejected": float(lp[:, 1].mean())}  # fmt: skip
        ref = {"sft": "base", "dpo": "sft"}.get(name)
        if ref:
            r = beta * (lp - logps[ref])
            entry[f"implicit_reward_accuracy_vs_{ref}"] = float(np.mean(r[:, 0] > r[:, 1]))
            entry[f"implicit_reward_margin_vs_{ref}"] = float(np.mean(r[:, 0] - r[:, 1]))
        report["models"][name] = entry

    # greedy answers on the held-out prompts: exact match against the chosen (reference) answer
    prompts = [list(p) for p in test.prompts]
    answers = [tok.decode(c[:-1]) for c in test.chosen]
    for name, p in params.items():
        outs = []
        for start in range(0, len(prompts), 50):
            outs += generate.generate(setup.model, p, prompts[start : start + 50],
                                      max_new_tokens=args.max_new_tokens,
                                      eos_id=tok.eos_token_id, pad_id=setup.pad_id)  # fmt: skip
        texts = [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
        report["models"][name]["greedy_exact_match"] = float(
            np.mean([t == a.strip() for t, a in zip(texts, answers, strict=True)])
        )
        report["models"][name]["greedy"] = texts
    shown = np.linspace(0, len(prompts) - 1, args.generations).astype(int)
    report["examples"] = [
        {"prompt": tok.decode(prompts[i]), "reference": answers[i],
         **{name: report["models"][name]["greedy"][i] for name in params}}
        for i in shown
    ]  # fmt: skip
    for name in params:
        report["models"][name].pop("greedy")
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
