"""The many-adapters claim, timed: a Table-5 grid as multi-adapter jobs against one-by-one runs.

``python -m benchmarks.grid --record=FILE --workdir=DIR [--smoke] [--single-runs=N]``

The grid is ``experiments.table5.grid`` (7 budget-matched target sets × 3 seeds = 21 runs) on
the CPU study budget of (MiniLM-L6, SNLI) (``configs/study_snli.py``: 250 steps of 16 pairs,
1,000 validation and 3,000 test pairs), over a random-init encoder of MiniLM-L6's shape (6
layers, d 384, 12 heads, FFN 1536, vocab 30522) with a synthetic word-level tokenizer and
synthetic SNLI-format pairs: speed does not depend on the values, and nothing needs a network.

Both sides are the library's own commands, timed by the wall clock from config to
``summary.json`` (model load, tokenising, compiling, training, evaluating, checkpoints):
the jobs are ``experiments.sweep.run_study`` (``lorax.multi.train_many``, 7 adapters per job),
the one-by-one runs ``lorax.train.train_and_evaluate``, both in this one process, jobs first,
so the single runs find the process warm (a favour to them). Where ``--single-runs`` is less
than the grid, the one-by-one total is the measured mean per run times the grid's runs (the
first 7 runs are one seed's 7 target sets, and a seed does not change a run's cost); the
record says how many runs were measured. The persistent compilation cache should be off
(the run-book turns it off), so that every compile is paid as a fresh process would pay it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

MINILM_L6 = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
             "intermediate_size": 1536, "vocab_size": 30522}  # fmt: skip
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 256, "vocab_size": 2000}  # fmt: skip
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
LABELS = ("entailment", "neutral", "contradiction")
SPEEDUP_GOAL = 5.0  # the goal: the grid as jobs >= 5x faster than one by one


def write_model(directory: str, shape: dict[str, int], seed: int = 0) -> None:
    """A Hugging Face BERT directory: ``config.json``, random ``model.safetensors`` and a
    word-level WordPiece vocabulary ("w0", "w1", ... after BERT's special tokens)."""
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    from lorax.checkpoints import hf
    from lorax.models import encoder

    os.makedirs(directory, exist_ok=True)
    config = {"model_type": "bert", **shape, "max_position_embeddings": 512,
              "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
              "pad_token_id": 0}  # fmt: skip
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    model = encoder.Encoder(encoder.EncoderConfig.from_hf(config), with_pooler=True)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(seed), ids, ids, jnp.ones_like(ids))["params"]
    weights = hf.encoder_to_hf(jax.device_get(params))
    save_file(weights, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.writelines(w + "\n" for w in vocabulary(shape["vocab_size"]))
    tokenizer = {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                 "model_max_length": 512}  # fmt: skip
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer, f)


def vocabulary(size: int) -> list[str]:
    return [*SPECIALS, *(f"w{i}" for i in range(size - len(SPECIALS)))]


def write_data(directory: str, n_train: int, n_test: int, vocab_size: int, seed: int = 0):
    """SNLI-format ``train.jsonl`` / ``test.jsonl``: random words, SNLI-like lengths (premise
    6-22 words, hypothesis 3-12), random gold labels."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    words = len(SPECIALS) + np.arange(vocab_size - len(SPECIALS))

    def sentence(lo, hi):
        return " ".join(f"w{i - len(SPECIALS)}" for i in rng.choice(words, rng.integers(lo, hi)))

    for name, n in (("train.jsonl", n_train), ("test.jsonl", n_test)):
        with open(os.path.join(directory, name), "w") as f:
            for _ in range(n):
                row = {"sentence1": sentence(6, 23), "sentence2": sentence(3, 13),
                       "gold_label": LABELS[rng.integers(3)]}  # fmt: skip
                f.write(json.dumps(row) + "\n")


def base_config(model_dir: str, data_dir: str, smoke: bool):
    """configs/study_snli.py over the synthetic model and data; seconds-sized for ``smoke``."""
    from experiments import sweep

    config = sweep.base_config("minilm-l6", "snli", sweep.STUDY_CONFIGS)
    config.model.name, config.task.data = model_dir, data_dir
    if smoke:
        config = sweep.apply_overrides(config, {
            "train.num_steps": 3, "train.batch_size": 8, "task.validation_size": 16,
            "task.max_test_examples": 16, "task.max_length": 32, "task.buckets": (32,),
            "eval_batch_size": 16, "checkpoint_every": 0, "log_every": 1,
        })  # fmt: skip
    return config


def _rows(config) -> tuple[int, int]:
    """(train, test) rows enough for the config: every step a fresh batch after the held-out
    validation rows (a count, or a fraction of train), and the capped test split."""
    used = config.train.num_steps * config.train.batch_size
    held = config.task.validation_size
    train = math.ceil(used / (1 - held)) if held < 1 else used + int(held)
    return train + 64, int(config.task.max_test_examples) or 3000


def time_grid(workdir: str, smoke: bool, single_runs: int) -> dict[str, Any]:
    """Builds the model and data, then times the grid both ways; returns the record."""
    from experiments import sweep, table5
    from lorax import train

    shutil.rmtree(workdir, ignore_errors=True)  # every attempt times a fresh grid
    shape = TINY if smoke else MINILM_L6
    model_dir, data_dir = os.path.join(workdir, "model"), os.path.join(workdir, "data")
    write_model(model_dir, shape)
    base = base_config(model_dir, data_dir, smoke)
    write_data(data_dir, *_rows(base), shape["vocab_size"])
    runs = table5.grid(1 if smoke else 3)
    per_job = len(table5.TARGET_SETS)

    start = time.perf_counter()
    rows = sweep.run_study("grid", runs, base, root=os.path.join(workdir, "jobs"),
                           max_adapters=per_job)  # fmt: skip
    multi_s = time.perf_counter() - start
    single_s, single_acc = [], []
    for run in runs[:single_runs]:
        config = sweep.apply_overrides(base, run.overrides)
        start = time.perf_counter()
        summary = train.train_and_evaluate(config, os.path.join(workdir, "single", run.name))
        single_s.append(time.perf_counter() - start)
        single_acc.append(summary["test_accuracy"])
    return _record(shape, base, runs, per_job, multi_s, rows, single_s, single_acc)


def _record(shape, base, runs, per_job, multi_s, rows, single_s, single_acc) -> dict[str, Any]:
    import jax

    projected = statistics.mean(single_s) * len(runs) if single_s else None
    job_acc = [r["test_accuracy"] for r in rows[: len(single_acc)]]
    speedup = projected / multi_s if projected else None
    return {
        "device": jax.devices()[0].device_kind,
        "shape": shape,
        "runs": len(runs),
        "adapters_per_job": per_job,
        "steps": base.train.num_steps,
        "batch": base.train.batch_size,
        "multi_seconds": multi_s,
        "single_seconds": single_s,
        "single_measured_runs": len(single_s),
        "single_projected_seconds": projected,
        "single_projection": "measured" if len(single_s) == len(runs) else (
            f"mean of the first {len(single_s)} runs x {len(runs)} runs"),
        "speedup": speedup,
        "goal": SPEEDUP_GOAL,
        "met": None if speedup is None else speedup >= SPEEDUP_GOAL,
        # the same runs trained both ways reach the same test accuracy (a job is no shortcut)
        "test_accuracy_single": single_acc,
        "test_accuracy_job": job_acc,
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--record", required=True, help="where the JSON record goes")
    p.add_argument("--workdir", required=True, help="model, data and runs (emptied first)")
    p.add_argument("--smoke", action="store_true", help="a tiny encoder, 3 steps, 1 seed")
    p.add_argument("--single-runs", type=int, default=-1,
                   help="one-by-one runs to time (-1: 7, one seed; 2 with --smoke)")  # fmt: skip
    args = p.parse_args(argv)
    single = args.single_runs if args.single_runs >= 0 else (2 if args.smoke else 7)
    record = time_grid(args.workdir, args.smoke, single)
    from benchmarks import records

    records.write(record, args.record)
    print(json.dumps({k: record[k] for k in ("multi_seconds", "single_seconds", "speedup")}))
    return record


if __name__ == "__main__":
    main()
