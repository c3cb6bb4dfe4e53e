"""DPO on a 2-core CPU: SmolLM2-135M, LoRA r=8 on q, v, from the instruction-tuned (SFT) adapter.

The pairs (lorax/data/files/preferences_tiny, written by experiments/make_preferences.py) are the
instruction set's prompts with chosen = the reference answer and rejected = the base model's own
wrong greedy answer. The reference model is the base + the SFT adapter (dpo.reference), which the
policy starts from; its LoRA settings are the SFT run's (configs/smollm2_instructions_r8.py):
  python -m lorax.train --config=configs/smollm2_instructions_r8.py
  python -m lorax.train --config=configs/smollm2_dpo_r8.py
  python -m experiments.preference_report --sft=runs/smollm2_instructions_r8 \\
      --dpo=runs/smollm2_dpo_r8
"""

from configs import smollm2_instructions_r8
from lorax.data import PREFERENCES_TINY_DIR


def get_config():
    c = smollm2_instructions_r8.get_config()  # model, LoRA and optimizer as the SFT run
    c.task.name = "preferences"
    c.task.data = str(PREFERENCES_TINY_DIR)
    c.task.max_length = 96  # prompt + the longer response (rejected ones are cut at 32 tokens)
    c.task.buckets = (64, 96)
    c.task.validation_size = 30  # held out of the 300 train pairs; test.jsonl's 100 are the test
    c.train.objective = "dpo"
    c.dpo.beta = 0.1
    c.dpo.reference = "runs/smollm2_instructions_r8"
    c.train.batch_size = 4  # pairs: 8 rows
    c.train.num_steps = 48
    c.train.learning_rate = 5e-4
    c.train.warmup_fraction = 0.1
    c.eval_batch_size = 8
    c.eval_every = 0
    c.checkpoint_every = 12
    c.log_every = 4
    return c
