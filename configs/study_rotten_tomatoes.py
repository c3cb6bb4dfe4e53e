"""The CPU budget of the paper's Table 5 / 6 studies on (MiniLM-L6, Rotten Tomatoes).

Run: python -m experiments.table5 --model=minilm-l6 --task=rotten_tomatoes --seeds=3
     python -m experiments.table6 --model=minilm-l6 --task=rotten_tomatoes --seeds=3
     (or any LoRA run: python -m lorax.train --config=configs/study_rotten_tomatoes.py)

Sized so Table 5 on both tasks and Table 6 on this one ({Wq} and {Wq,Wv}, 3 seeds: 72 runs)
take about two to three hours of a 2-core CPU. Measured there (2026-11-27): a step of one
adapter over 16 reviews costs ~0.45 s; 7 adapters trained as one multi-adapter job cost
about as much per adapter as one by one (the CPU has no parallelism to spare) but load, compile
and evaluate once. 250 steps × 16 reviews = 4,000 reviews, ~0.4 of an epoch of the 10,528
training reviews. LoRA's alpha stays the base config's 8 for every rank (the paper's
convention: alpha is set once and not retuned, so the scale alpha/r shrinks as r grows).
"""

from configs import rotten_tomatoes_wq_wv_r4


def get_config():
    c = rotten_tomatoes_wq_wv_r4.get_config()
    c.train.batch_size = 16
    c.train.num_steps = 250
    c.train.learning_rate = 1e-3
    c.eval_every = 0  # multi-adapter jobs evaluate at the end only
    c.log_every = 10  # the training-loss curve, 25 points per run
    c.checkpoint_every = 50  # a job cut off loses at most 50 steps
    c.task.validation_size = 1000  # validation: 1,000 reviews; test: the fixed 1,280
    return c
