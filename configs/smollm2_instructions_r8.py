"""Instruction tuning on a 2-core CPU: SmolLM2-135M, LoRA r=8 on q, v, the repo's tiny JSONL.

The data (lorax/data/files/instructions_tiny, written by experiments/make_instructions.py) are six
checkable formats: reverse a word, add numbers, plurals, sort numbers, capitalise, count words.
Compare before and after (C=configs/smollm2_instructions_r8.py, P="What is 12 plus 30?"):
  python -m lorax.generate --config=$C --prompt="$P"
  python -m lorax.train --config=$C
  python -m lorax.generate --config=$C --adapter=runs/smollm2_instructions_r8 --prompt="$P"
"""

from configs import base
from lorax.data import INSTRUCTIONS_TINY_DIR


def get_config():
    c = base.get_config()
    c.model.name = "smollm2-135m"
    c.model.dropout = 0.0
    c.task.name = "instructions"
    c.task.data = str(INSTRUCTIONS_TINY_DIR)
    c.task.max_length = 128  # packed rows of 128 tokens (~3 examples each)
    c.task.validation_size = 50
    c.train.trainable = ()
    c.train.batch_size = 4
    c.train.num_steps = 150
    c.train.learning_rate = 2e-3
    c.lora.targets = "q,v"
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.eval_batch_size = 8
    c.eval_every = 50
    c.checkpoint_every = 50
    c.log_every = 10
    return c
