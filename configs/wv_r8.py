"""Paper Table 5 budget-matched variant: LoRA r=8 on Wv.

Same trainable count as Wq,Wv r=4.

Run: python -m lorax.train --config=configs/wv_r8.py
"""

from configs import wq_wv_r4


def get_config():
    c = wq_wv_r4.get_config()
    c.lora.targets = "v"
    c.lora.rank = 8
    return c
