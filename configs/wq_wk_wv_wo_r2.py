"""Paper Table 5 budget-matched variant: LoRA r=2 on Wq, Wk, Wv and Wo.

Same trainable count as Wq,Wv r=4.

Run: python -m lorax.train --config=configs/wq_wk_wv_wo_r2.py
"""

from configs import wq_wv_r4


def get_config():
    c = wq_wv_r4.get_config()
    c.lora.targets = "q,k,v,o"
    c.lora.rank = 2
    return c
