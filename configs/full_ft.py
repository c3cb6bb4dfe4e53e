"""Full fine-tuning baseline: every base leaf (the delta of method "full") and the head.

Run: python -m lorax.train --config=configs/full_ft.py
"""

from configs import wq_wv_r4


def get_config():
    c = wq_wv_r4.get_config()
    c.method = "full"
    c.train.learning_rate = 5e-5  # full fine-tuning wants a much smaller step than LoRA
    return c
