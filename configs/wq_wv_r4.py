"""The default main job: LoRA r=4 on Wq and Wv (the paper's pick), all-MiniLM-L6-v2 on SNLI.

Sized to finish within 15 minutes on a 2-core CPU.
Run: python -m lorax.train --config=configs/wq_wv_r4.py
"""

from configs import base


def get_config():
    c = base.get_config()
    c.lora.targets = "q,v"
    c.lora.rank = 4
    return c
