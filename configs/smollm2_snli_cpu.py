"""SNLI as text on SmolLM2-135M, sized for a 2-core CPU: LoRA r=4 on Wq and Wv.

The CPU twin of ``smollm2_snli_wq_wv_r4.py`` (which stays the GPU config): fp32 compute (a CPU
has no fast bf16), packed training rows of 256 tokens (~5 pairs each), 4 rows a step, 200 steps
(~4,000 SNLI pairs seen once), and the first 600 test pairs scored by which of " True" /
" Neither" / " False" the model finds likeliest. Its zero-shot line is the same config with
``--config.train.learning_rate=0 --config.train.num_steps=1`` (the LoRA delta stays zero, so the
base model is scored through the same path).
Run: python -m lorax.train --config=configs/smollm2_snli_cpu.py --workdir=runs/smollm2_snli_cpu
"""

from configs import smollm2_snli_wq_wv_r4


def get_config():
    c = smollm2_snli_wq_wv_r4.get_config()
    c.model.dtype = "float32"
    c.model.base_dtype = "float32"
    c.task.max_length = 256
    c.task.buckets = (64, 128)
    c.task.validation_size = 300
    c.task.max_eval_examples = 300
    c.task.max_test_examples = 600
    c.train.batch_size = 4
    c.train.num_steps = 200
    c.train.learning_rate = 1e-3
    c.eval_batch_size = 32
    c.eval_every = 0
    c.checkpoint_every = 50
    c.log_every = 10
    return c
