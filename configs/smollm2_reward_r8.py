"""A reward model on a 2-core CPU: SmolLM2-135M-Instruct with LoRA r=8 on q, v and a score head
on the last token, trained on the repo's preference pairs (lorax/data/files/preferences_tiny:
chosen = the instruction set's reference answer, rejected = the base model's own wrong greedy
answer; experiments/make_preferences.py). Then score answers or export it for PEFT:
  python -m lorax.train --config=configs/smollm2_reward_r8.py --workdir=runs/smollm2_reward_r8
  python -m lorax.predict --workdir=runs/smollm2_reward_r8 \\
      --text=$'Instruction:\\nWhat is 12 plus 30?\\n\\nResponse:\\n' --text_pair=42
  python -m lorax.export --workdir=runs/smollm2_reward_r8 --out=rm_adapter
"""

from configs import base
from lorax.data import PREFERENCES_TINY_DIR


def get_config():
    c = base.get_config()
    c.model.name = "smollm2-135m"
    c.model.dropout = 0.0
    c.task.name = "preferences"
    c.task.data = str(PREFERENCES_TINY_DIR)
    c.task.max_length = 96  # prompt + the longer answer; longer answers are cut and counted
    c.task.buckets = (48, 96)
    c.task.validation_size = 30  # pairs held out of train.jsonl (test.jsonl is its own file)
    c.train.objective = "reward"
    c.train.trainable = ()  # the score head is always trained beside the LoRA delta
    c.train.batch_size = 4  # pairs: 8 rows a step
    c.train.num_steps = 60
    c.train.learning_rate = 2e-3
    c.lora.targets = "q,v"
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.eval_batch_size = 16
    c.eval_every = 0
    c.checkpoint_every = 20
    c.log_every = 5
    return c
