"""The default main job: LoRA r=4 on Wq and Wv (the paper's pick), all-MiniLM-L6-v2 on SNLI.

Sized to finish within 15 minutes on a 2-core CPU.
Run: python -m lorax.train --config=configs/wq_wv_r4.py
"""

from configs import base


def get_config():
    c = base.get_config()
    c.lora.targets = "q,v"
    c.lora.rank = 4
    # Sized for a 2-core CPU (the whole `make demo` in well under 15 minutes): 600 steps of 32
    # pairs see ~19k of SNLI's 93k training pairs and reach ~0.75 test accuracy.
    c.train.num_steps = 600
    c.train.learning_rate = 1e-3
    c.model.dropout = 0.0  # dropout in the frozen base costs ~20% of a CPU step
    c.task.validation_size = 2000
    c.eval_every = 200
    c.task.max_eval_examples = 500  # periodic validation on 500 rows; the final one uses all
    return c
