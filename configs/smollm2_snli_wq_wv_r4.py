"""SNLI as text on SmolLM2-135M (a base dequantized from 4-bit): LoRA r=4 on Wq and Wv. For a GPU.

The small-scale twin of the paper's MNLI-on-GPT-3 set-up: the model reads
"{premise}\\nQuestion: {hypothesis} True, False, or Neither?\\nAnswer:" and is scored by which of
" True" / " Neither" / " False" it finds likeliest. Table 5 variants: override lora.targets and
lora.rank, e.g. --config.lora.targets=q --config.lora.rank=8.
Run: python -m lorax.train --config=configs/smollm2_snli_wq_wv_r4.py
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.name = "smollm2-135m"
    c.model.dtype = "bfloat16"  # compute in bf16; the delta and Adam moments stay fp32
    c.model.base_dtype = "bfloat16"
    c.model.dropout = 0.0
    c.model.scan = True
    c.task.name = "snli_text"
    c.task.data = "snli"
    c.task.max_length = 512  # packed training rows of 512 tokens (~10 pairs each)
    c.task.buckets = (64, 128, 256)  # scored-choice evaluation rows
    c.task.validation_size = 2000
    c.task.max_eval_examples = 1000
    c.train.trainable = ()  # no task head: the LM head scores the label words
    c.train.batch_size = 16
    c.train.num_steps = 1500
    c.train.learning_rate = 5e-4
    c.lora.targets = "q,v"
    c.lora.rank = 4
    c.lora.alpha = 8.0
    c.eval_batch_size = 64
    c.eval_every = 500
    c.checkpoint_every = 500
    c.log_every = 50
    return c
