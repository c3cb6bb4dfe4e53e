"""Models described by shape with random weights (``model.architecture``): the Llama-3-8B and
-70B plan configs have the published shapes, and a run builds such a model on its mesh without
reading any weights file."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from lorax import paths
from lorax import setup as setup_lib
from lorax.models import decoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import plan_llama8b_lora, plan_llama70b_lora, plan_llama70b_qlora  # noqa: E402


@pytest.mark.parametrize(
    "module, params, layers",
    [(plan_llama8b_lora, 8_030_261_248, 32), (plan_llama70b_lora, 70_553_706_496, 80),
     (plan_llama70b_qlora, 70_553_706_496, 80)],
    ids=["8b", "70b", "70b-qlora"],
)  # fmt: skip
def test_plan_configs_have_the_published_llama3_shapes(module, params, layers):
    """Meta's parameter counts (Llama-3-8B 8,030,261,248; -70B 70,553,706,496), GQA with 8
    key/value heads of 128, vocabulary 128256, RoPE theta 500000; LoRA r=16 on q,k,v,o, bf16."""
    c = module.get_config()
    config = setup_lib.read_architecture(c.model.architecture)
    assert config.num_params() == params
    assert (config.num_layers, config.num_kv_heads, config.head_dim) == (layers, 8, 128)
    assert (config.vocab_size, config.rope_theta, config.tie_embeddings) == (128256, 5e5, False)
    assert (c.lora.targets, c.lora.rank, c.model.dtype, c.model.base_dtype) == (
        "q,k,v,o", 16, "bfloat16", "bfloat16")  # fmt: skip
    assert c.model.quantize == ("nf4" if module is plan_llama70b_qlora else "")


TINY = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_a_described_model_builds_with_random_weights_on_its_mesh(scan):
    """``model.architecture`` as JSON text: the base is made by a jitted init in base_dtype,
    already placed on the mesh, seeded (scan on/off give the same weights, stacked), its
    count the architecture's, and the forward pass runs; no tokenizer without model.name."""
    c = plan_llama8b_lora.get_config(TINY, devices=jax.device_count())
    c.model.architecture = json.dumps(TINY)
    c.model.name = ""
    c.model.scan = scan
    c.lora.rank = 4
    c.mesh.fsdp = 1
    c.mesh.data = -1
    s = setup_lib.build(c, with_task=False)
    assert s.tokenizer is None
    assert s.base_params == decoder.DecoderConfig.from_hf(TINY).num_params()
    leaves = jax.tree_util.tree_leaves(s.frozen)
    assert all(isinstance(x, jax.Array) and x.dtype == np.dtype("bfloat16") for x in leaves)
    c.model.scan = False
    flat = paths.flatten(setup_lib.build(c, with_task=False).frozen)
    if scan:
        flat = paths.flatten(paths.stack_layers(paths.unflatten(flat)))
    for path, leaf in paths.flatten(s.frozen).items():
        np.testing.assert_array_equal(
            np.asarray(leaf, np.float32), np.asarray(flat[path], np.float32)
        )
    forward = setup_lib.make_forward(s, logits=True)
    ids = np.zeros((2, 8), np.int32)
    batch = {"input_ids": ids, "positions": np.broadcast_to(np.arange(8), (2, 8))}
    logits = jax.jit(lambda d, f: forward(d, f, batch, None, False))(
        {"delta": s.delta, "head": s.head}, s.frozen
    )
    assert logits.shape == (2, 8, 64) and np.all(np.isfinite(np.asarray(logits)))


def test_a_bad_architecture_is_named():
    with pytest.raises(ValueError, match="model.architecture = 'nope' is neither JSON"):
        setup_lib.read_architecture("nope")
    with pytest.raises(ValueError, match="model.architecture is not valid JSON"):
        setup_lib.read_architecture("{nope")


@pytest.mark.slow
def test_the_8b_plan_config_trains_with_lorax_train_when_shrunk(tmp_path):
    """configs/plan_llama8b_lora.py as lorax.train runs it (random weights, SmolLM2's tokenizer,
    the instructions task, bf16, scan, block_inputs remat), its shape shrunk to seconds: the
    run finishes with a finite loss and its summary counts the described base."""
    from lorax import train as train_lib

    c = plan_llama8b_lora.get_config(TINY, devices=jax.device_count())
    c.model.architecture = json.dumps({**TINY, "vocab_size": 49152})  # the tokenizer's ids
    c.lora.rank = 4
    c.task.max_length = 64
    c.train.num_steps = 2
    c.eval_every = c.checkpoint_every = 0
    c.task.max_eval_examples = 8
    summary = train_lib.train_and_evaluate(c, str(tmp_path / "run"))
    assert (
        summary["base_params"]
        == decoder.DecoderConfig.from_hf({**TINY, "vocab_size": 49152}).num_params()
    )
    assert np.isfinite(summary["test_loss"])
