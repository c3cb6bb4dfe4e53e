"""A Llama-3-8B-shaped LoRA run with random weights (no download): r=16 on q, k, v, o, bf16,
FSDP over every device, 8 rows of 2048 tokens per device. For ``lorax.plan`` (will it fit, which
collectives, what step time) and, on real GPUs, ``lorax.train`` as a speed run; its loss says
nothing (random base, tokens from SmolLM2's tokenizer).

  python -m lorax.plan --config=configs/plan_llama8b_lora.py --gpu=h100 --gpus=8
  python -m lorax.train --config=configs/plan_llama8b_lora.py   # on 8 GPUs

The shape is Meta's published Llama-3-8B ``config.json``: 32 layers, width 4096, 32 query and
8 key/value heads of 128, SwiGLU 14336, vocabulary 128256, RoPE theta 500000, untied output.
"""

import json

from configs import smollm2_instructions_r8

LLAMA3_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

DEVICES = 8  # the global batch is 8 rows per device: change both together
ROWS_PER_DEVICE = 8


def get_config(architecture=LLAMA3_8B, devices=DEVICES):
    c = smollm2_instructions_r8.get_config()
    c.model.architecture = json.dumps(architecture)
    c.model.name = "smollm2-135m"  # only its tokenizer (token ids < 49152)
    c.model.dtype = "bfloat16"
    c.model.base_dtype = "bfloat16"
    c.model.scan = True  # one layer compiled, not 32
    c.model.remat = "block_inputs"  # only each layer's input kept: 8 × 2048 × 4096 bf16 a layer
    c.mesh.data = 1
    c.mesh.fsdp = -1  # every device: the base split 8 ways
    c.mesh.tensor = 1
    c.mesh.fsdp_gather = "layer"  # each layer gathers its weights, again in the backward pass
    c.task.max_length = 2048
    c.train.batch_size = ROWS_PER_DEVICE * devices
    c.eval_batch_size = ROWS_PER_DEVICE * devices
    c.lora.targets = "q,k,v,o"
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.train.learning_rate = 2e-4
    return c
