"""Full fine-tuning baseline: every base leaf and the head are trained; no LoRA delta.

Run: python -m lorax.train --config=configs/full_ft.py
"""

from configs import wq_wv_r4


def get_config():
    c = wq_wv_r4.get_config()
    c.method = "full"
    c.train.trainable = (".*",)
    c.train.learning_rate = 5e-5  # full fine-tuning wants a much smaller step than LoRA
    return c
