"""Paper Table 5 budget-matched variant: LoRA r=4 on Wq and Wk.

Same trainable count as Wq,Wv r=4.

Run: python -m lorax.train --config=configs/wq_wk_r4.py
"""

from configs import wq_wv_r4


def get_config():
    c = wq_wv_r4.get_config()
    c.lora.targets = "q,k"
    c.lora.rank = 4
    return c
