"""LoRA r=4 on Wq and Wv of all-MiniLM-L6-v2 on Rotten Tomatoes (fresh vs rotten reviews).

A clean check for the encoder: unlike SNLI, MiniLM was not trained on this corpus.
Run: python -m lorax.train --config=configs/rotten_tomatoes_wq_wv_r4.py
"""

from configs import wq_wv_r4


def get_config():
    c = wq_wv_r4.get_config()
    c.task.name = "rotten_tomatoes"
    c.task.data = "rotten-tomatoes"
    c.task.validation_size = 1000  # test: a fixed 1,280 of the 12,808 reviews
    c.task.max_eval_examples = 0
    return c
