"""QLoRA on a Llama-3-70B-shaped base with random weights: the base's attention and MLP kernels
in NF4 (blocks of 64), LoRA r=16 on q, k, v, o in bf16 compute, on ONE device, 4 rows of 2048
tokens per step (see configs/plan_llama70b_lora.py for the shape).

  python -m lorax.plan --config=configs/plan_llama70b_qlora.py --gpu=h100
"""

from configs import plan_llama8b_lora, plan_llama70b_lora


def get_config():
    c = plan_llama8b_lora.get_config(plan_llama70b_lora.LLAMA3_70B, devices=1)
    c.model.quantize = "nf4"
    c.model.quant_block = 64
    c.mesh.fsdp = 1
    c.mesh.data = -1
    c.train.batch_size = 4
    c.eval_batch_size = 4
    return c
