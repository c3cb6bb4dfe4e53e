"""The real SmolLM2-135M-Instruct (dequantized from the packaged 4-bit GGUF): perplexity on
plain English, a sensible greedy continuation, and the SNLI-as-text config for a few steps."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

from lorax import assets, checkpoints, generate
from lorax import train as train_lib
from lorax.models import decoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Ordinary English prose, written for this test.
PASSAGE = (
    "The old harbour town wakes up slowly. Before the sun is high, fishermen carry their nets "
    "down to the boats, and the bakery on the corner opens its doors to the smell of fresh "
    "bread. Children walk to school along the sea wall, stopping to watch the gulls fight over "
    "scraps. By noon the market square is full of people buying fruit, fish and flowers, and "
    "the cafes set out their tables in the shade. In the evening, when the wind drops, families "
    "gather on the beach to watch the sun go down behind the lighthouse."
)


@pytest.fixture(scope="module")
def smollm2():
    directory = assets.resolve("smollm2-135m")
    config, params = checkpoints.load_pretrained(directory)
    return config, params, checkpoints.load_tokenizer(directory)


@pytest.mark.slow
def test_perplexity_on_plain_prose_is_low(smollm2):
    """Below 40 (measured ~27.5); a wrong RoPE row layout gives hundreds."""
    config, params, tok = smollm2
    ids = jnp.asarray([tok(PASSAGE)["input_ids"]])
    positions = jnp.arange(ids.shape[1])[None]
    model = decoder.Decoder(config)
    logits, _ = jax.jit(
        lambda p: model.apply({"params": p}, ids, positions, decoder.causal_mask(ids * 0 + 1))
    )(params)
    logp = jax.nn.log_softmax(logits[0, :-1])
    nll = -jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1).mean()
    perplexity = float(jnp.exp(nll))
    print(f"SmolLM2-135M perplexity on the passage: {perplexity:.2f}")
    assert perplexity < 40


@pytest.mark.slow
def test_greedy_continuation_is_sensible(smollm2):
    config, params, tok = smollm2
    prompt = tok("The capital of France is")["input_ids"]
    out = generate.generate(
        decoder.Decoder(config), params, [prompt], max_new_tokens=8, eos_id=tok.eos_token_id
    )
    assert "Paris" in tok.decode(out[0])


@pytest.mark.slow
def test_smollm2_snli_config_runs_a_few_steps_on_cpu(tmp_path):
    """configs/smollm2_snli_wq_wv_r4.py as is, but for 3 small steps in fp32 and a capped
    evaluation: it trains, scores SNLI as text and reports test accuracy."""
    sys.path.insert(0, REPO)
    from configs import smollm2_snli_wq_wv_r4

    c = smollm2_snli_wq_wv_r4.get_config()
    c.model.dtype = c.model.base_dtype = "float32"  # XLA:CPU emulates bf16 matmuls slowly
    c.train.num_steps = 3
    c.train.batch_size = 2
    c.task.max_length = 128
    c.eval_every = 0
    c.checkpoint_every = 0
    c.eval_batch_size = 4
    c.task.validation_size = 4  # the final validation scores every held-out row
    c.task.max_eval_examples = 4
    c.task.max_test_examples = 4
    summary = train_lib.train_and_evaluate(c, str(tmp_path / "run"))
    # LoRA r=4 on q (576 -> 576) and v (576 -> 3 KV heads x 64 = 192) in all 30 layers.
    assert summary["lora_params"] == 30 * (4 * (576 + 576) + 4 * (576 + 192))
    assert summary["test_examples"] == 4
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["base_params"] == 134_515_008
