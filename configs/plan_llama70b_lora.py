"""A Llama-3-70B-shaped LoRA run with random weights (no download): r=16 on q, k, v, o, bf16,
FSDP over 8 devices, 8 rows of 2048 tokens per device (see configs/plan_llama8b_lora.py).

  python -m lorax.plan --config=configs/plan_llama70b_lora.py --gpu=h100 --gpus=8

The shape is Meta's published Llama-3-70B ``config.json``: 80 layers, width 8192, 64 query and
8 key/value heads of 128, SwiGLU 28672, vocabulary 128256, RoPE theta 500000, untied output.
"""

from configs import plan_llama8b_lora

LLAMA3_70B = {
    **plan_llama8b_lora.LLAMA3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}


def get_config():
    return plan_llama8b_lora.get_config(LLAMA3_70B)
