"""The trainer on causal LMs: tiny random Llama / GPT-2 with SmolLM2's real tokenizer, on the
shipped instruction set and on a slice of SNLI as text; then generation from the adapter."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from experiments.sweep import apply_overrides
from lorax import assets, checkpoints, generate, lora, paths
from lorax import evaluate as evaluate_lib
from lorax import setup as setup_lib
from lorax import train as train_lib
from lorax.checkpoints import hf
from lorax.models import decoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 49152  # SmolLM2's tokenizer


def _write_tiny(d, hf_config: dict, tokenizer) -> None:
    (d / "config.json").write_text(json.dumps(hf_config))
    config = decoder.DecoderConfig.from_hf(hf_config)
    ids = jnp.zeros((1, 4), jnp.int32)
    mask = decoder.causal_mask(jnp.ones_like(ids))
    params = jax.jit(decoder.Decoder(config).init)(jax.random.key(0), ids, ids, mask)["params"]
    params = jax.tree_util.tree_map(np.asarray, params)
    # Embeddings of std 0.5 rather than 0.02: tied logits of a width-32 model then span a
    # useful range, so a few LoRA steps can visibly lower the loss.
    params["embed"]["token"]["embedding"] = params["embed"]["token"]["embedding"] * 25.0
    save_file(hf.decoder_to_hf(params, config), str(d / "model.safetensors"))
    tokenizer.save_pretrained(d)


@pytest.fixture(scope="module")
def smol_tokenizer():
    return checkpoints.load_tokenizer(assets.resolve("smollm2-135m"))


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer):
    d = tmp_path_factory.mktemp("tiny_llama")
    cfg = {
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        "max_position_embeddings": 256,
        "eos_token_id": smol_tokenizer.eos_token_id,
    }
    _write_tiny(d, cfg, smol_tokenizer)
    return d


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, smol_tokenizer):
    d = tmp_path_factory.mktemp("tiny_gpt2")
    cfg = {
        "model_type": "gpt2",
        "vocab_size": VOCAB,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 256,
    }
    _write_tiny(d, cfg, smol_tokenizer)
    return d


@pytest.fixture(scope="module")
def tiny_snli_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_snli")
    src = assets.resolve("snli")
    for name, n in (("train.jsonl", 400), ("test.jsonl", 60)):
        with open(src / name) as f, open(d / name, "w") as out:
            out.writelines(line for _, line in zip(range(n), f, strict=False))
    return d


def lm_config(model_dir, **overrides):
    """configs/smollm2_instructions_r8.py shrunk to seconds."""
    sys.path.insert(0, REPO)
    from configs import smollm2_instructions_r8

    c = smollm2_instructions_r8.get_config()
    c.model.name = str(model_dir)
    c.task.max_length = 96
    c.train.batch_size = 8
    c.train.num_steps = 12
    c.train.learning_rate = 1e-2
    c.log_every = 1
    c.eval_every = 0
    c.checkpoint_every = 6
    c.eval_batch_size = 8
    c.task.max_eval_examples = 16
    return apply_overrides(c, overrides)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.slow
def test_instruction_tuning_trains_only_the_delta_and_learns(tiny_llama_dir, tmp_path):
    """LoRA on q, v of a tiny Llama over the shipped instructions: the loss falls, the
    summary reports LM accuracy on the response tokens, the delta has the paper's count."""
    summary = train_lib.train_and_evaluate(lm_config(tiny_llama_dir), str(tmp_path / "run"))
    losses = _losses(tmp_path / "run")
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses
    # q: 8·(32 + 32), v: 8·(32 + 16) per layer (2 KV heads of width 8), 2 layers.
    assert summary["lora_params"] == 2 * (8 * 64 + 8 * 48)
    assert summary["head_params"] == 0
    assert summary["model_kind"] == "lm"
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["test_examples"] > 0
    assert summary["data_counts"]["test/rows"] == 100


@pytest.mark.slow
def test_scan_and_loop_follow_the_same_loss_curve(tiny_llama_dir, tmp_path):
    """model.scan (stacked base and delta) trains exactly like the unrolled layers."""
    over = {"train.num_steps": 4, "checkpoint_every": 0}
    train_lib.train_and_evaluate(lm_config(tiny_llama_dir, **over), str(tmp_path / "loop"))
    train_lib.train_and_evaluate(
        lm_config(tiny_llama_dir, **{**over, "model.scan": True, "model.remat": "block_inputs"}),
        str(tmp_path / "scan"),
    )
    np.testing.assert_allclose(_losses(tmp_path / "scan"), _losses(tmp_path / "loop"), rtol=1e-4)


@pytest.mark.slow
def test_the_chunked_lm_loss_trains_and_scores_like_dense_logits(
    tiny_gpt2_dir, tiny_snli_dir, tmp_path
):
    """model.loss_chunk = 7 (96-token rows: chunks that do not divide them) gives the dense
    logits' loss curve, and the same scored-choice test accuracy and loss, whether the
    chunks take the hidden states' gradient in the forward pass or recompute their logits."""
    over = {"task.name": "snli_text", "task.data": str(tiny_snli_dir), "train.num_steps": 4,
            "task.validation_size": 30, "task.buckets": (64, 128), "checkpoint_every": 0,
            "task.max_test_examples": 24}  # fmt: skip
    summaries = {}
    for chunk, grad in ((0, "forward"), (7, "forward"), (7, "recompute")):
        fields = {"model.loss_chunk": chunk, "model.loss_grad": grad}
        config = lm_config(tiny_gpt2_dir, **over, **fields)
        summaries[chunk, grad] = train_lib.train_and_evaluate(
            config, str(tmp_path / f"{chunk}{grad}")
        )
    dense = summaries[0, "forward"]
    for grad in evaluate_lib.LOSS_GRADS:
        np.testing.assert_allclose(
            _losses(tmp_path / f"7{grad}"), _losses(tmp_path / "0forward"), rtol=1e-5
        )
        assert summaries[7, grad]["test_accuracy"] == dense["test_accuracy"]
        np.testing.assert_allclose(summaries[7, grad]["test_loss"], dense["test_loss"], rtol=1e-5)
        assert summaries[7, grad]["loss_grad"] == grad


@pytest.mark.slow
def test_snli_as_text_on_gpt2_is_scored_by_choice_likelihood(
    tiny_gpt2_dir, tiny_snli_dir, tmp_path
):
    """GPT-2 (fused c_attn split on load) trains on SNLI as text; validation and test are
    scored over the three label words, one example per three rows."""
    c = lm_config(
        tiny_gpt2_dir,
        **{
            "task.name": "snli_text",
            "task.data": str(tiny_snli_dir),
            "task.validation_size": 30,
            "task.buckets": (64, 128),
            "train.num_steps": 3,
        },
    )
    summary = train_lib.train_and_evaluate(c, str(tmp_path / "run"))
    assert summary["test_examples"] == summary["data_counts"]["test/rows"]
    assert summary["validation_examples"] == 30
    assert 0.0 <= summary["test_accuracy"] <= 1.0


def test_classification_task_on_a_decoder_is_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match=r"task.name = 'snli' does not fit .* causal LM.*"):
        setup_lib.build(lm_config(tiny_llama_dir, **{"task.name": "snli"}))


@pytest.mark.slow
def test_generate_command_applies_the_trained_adapter(tiny_llama_dir, tmp_path):
    """`python -m lorax.generate --adapter=WORKDIR` decodes with the run's delta: the same
    tokens as lorax.generate.generate on lora.wrap(base, delta), and not the base's."""
    c = lm_config(tiny_llama_dir, **{"train.num_steps": 6})
    workdir = str(tmp_path / "run")
    train_lib.train_and_evaluate(c, workdir)
    setup, wrapped = generate.load_for_generation(c, workdir)
    _, merged = generate.load_for_generation(c, workdir, merge=True)
    prompt = setup.tokenizer(
        "Instruction:\nWhat is 2 plus 2?\n\nResponse:\n", add_special_tokens=True
    )["input_ids"]
    kw = dict(max_new_tokens=6, pad_id=setup.pad_id, eos_id=setup.tokenizer.eos_token_id)
    base = generate.generate(setup.model, {**setup.frozen}, [prompt], **kw)
    adapted = generate.generate(setup.model, wrapped, [prompt], **kw)
    assert adapted == generate.generate(setup.model, merged, [prompt], **kw)
    ids = jnp.asarray([prompt])
    positions, mask = jnp.arange(len(prompt))[None], decoder.causal_mask(jnp.ones_like(ids))
    with_adapter, _ = setup.model.apply({"params": wrapped}, ids, positions, mask)
    without, _ = setup.model.apply({"params": setup.frozen}, ids, positions, mask)
    assert float(jnp.abs(with_adapter - without).max()) > 1e-3  # the adapter is applied
    assert any(isinstance(x, lora.LoraWeight) for x in paths.flatten(wrapped).values())

    cmd = [
        sys.executable,
        "-m",
        "lorax.generate",
        "--config=configs/smollm2_instructions_r8.py",
        f"--config.model.name={tiny_llama_dir}",
        f"--adapter={workdir}",
        "--prompt=What is 2 plus 2?",
        "--max_new_tokens=6",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    expected = setup.tokenizer.decode(adapted[0], skip_special_tokens=True)
    assert "Instruction:\nWhat is 2 plus 2?\n\nResponse:\n" + expected in out.stdout

    # Two adapters (other targets and rank) in one batch, chosen per prompt: adapter 2 for
    # the first prompt, the base for the second.
    other = str(tmp_path / "other")
    c2 = lm_config(tiny_llama_dir, **{"train.num_steps": 6, "lora.targets": "v,o", "seed": 1})
    c2.lora.rank = 4
    train_lib.train_and_evaluate(c2, other)
    _, second = generate.load_for_generation(c2, other)
    by_second = generate.generate(setup.model, second, [prompt], **kw)
    both = [*cmd[:-2], f"--adapter={other}", *["--prompt=What is 2 plus 2?"] * 2,
            "--prompt_adapter=2", "--prompt_adapter=0", "--max_new_tokens=6"]  # fmt: skip
    out = subprocess.run(both, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    blocks = out.stdout.split("--- ")[1:]
    assert blocks[0].startswith(f"adapter {other}")
    assert blocks[0].endswith(setup.tokenizer.decode(by_second[0], skip_special_tokens=True) + "\n")
    assert blocks[1].startswith("base model")
    assert blocks[1].endswith(setup.tokenizer.decode(base[0], skip_special_tokens=True) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_export_loads_in_transformers_and_matches(
    family, tiny_llama_dir, tiny_gpt2_dir, tmp_path
):
    """`python -m lorax.export --merged` writes a checkpoint that transformers loads as a
    plain LlamaForCausalLM / GPT2LMHeadModel (GPT-2's q, v re-fused into c_attn) whose logits
    equal the wrapped (unmerged) lorax model's."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model_dir = tiny_llama_dir if family == "llama" else tiny_gpt2_dir
    c = lm_config(model_dir, **{"train.num_steps": 3, "lora.targets": "q,v,mlp_out"})
    workdir, out = str(tmp_path / "run"), tmp_path / "merged"
    train_lib.train_and_evaluate(c, workdir)
    cmd = [sys.executable, "-m", "lorax.export", f"--workdir={workdir}", f"--out={out}"]
    done = subprocess.run([*cmd, "--merged"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "adapter" in done.stdout and "smaller" in done.stdout

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(torch_model).__name__ == (
        "LlamaForCausalLM" if family == "llama" else "GPT2LMHeadModel"
    )
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 10))
    with torch.no_grad():
        reference = torch_model(torch.tensor(ids)).logits.numpy()
    setup, wrapped = generate.load_for_generation(c, workdir)
    positions = np.broadcast_to(np.arange(10), (2, 10))
    mask = decoder.causal_mask(jnp.ones((2, 10), jnp.int32))
    logits, _ = setup.model.apply({"params": wrapped}, ids, positions, mask)
    assert float(np.abs(np.asarray(logits) - reference).max()) <= 1e-4
    # The adapter moved the model: the merged checkpoint is not the base's.
    base_logits, _ = setup.model.apply({"params": setup.frozen}, ids, positions, mask)
    assert float(np.abs(np.asarray(base_logits) - reference).max()) > 1e-4
