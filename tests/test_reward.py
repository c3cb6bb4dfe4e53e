"""Reward models: a score head on a decoder's last non-pad token, trained on preference pairs
with the Bradley–Terry loss, exported for PEFT's AutoPeftModelForSequenceClassification."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax import evaluate, lora
from lorax.checkpoints import hf
from lorax.checkpoints import peft as lpeft
from lorax.models import decoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 101
PAD = 0


def _save_random(hf_config, directory, seed=0):
    """A tiny transformers decoder with random non-trivial weights, saved as safetensors."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():  # norms and biases away from 1 and 0, so they matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    return directory


TINY = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=1,
        eos_token_id=1,
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny_dir(request, tmp_path_factory):
    return _save_random(TINY[request.param](), tmp_path_factory.mktemp(request.param))


def _rows():
    """Right-padded rows of different lengths; row 2 holds the pad id inside its text (a
    separator), which must not end it: the score is read at the rightmost non-pad token."""
    rng = np.random.default_rng(0)
    lengths = [12, 7, 10, 3]
    ids = np.full((len(lengths), 12), PAD, np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, VOCAB, n)
    ids[2, 4] = PAD
    return ids, np.array(lengths)


def _lorax_rewards(config, params, ids, lengths):
    """Rewards of the rows through Decoder.reward, with the masks a lorax batch has."""
    b, t = ids.shape
    segments = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    positions = np.broadcast_to(np.arange(t), (b, t))
    model = decoder.Decoder(config)
    return np.asarray(
        model.apply(
            {"params": params}, ids, positions, decoder.causal_mask(segments), PAD,
            method="reward",
        )
    )  # fmt: skip


def test_last_token_index_is_transformers_rule():
    """The rightmost token that is not the pad id, with padding on either side."""
    ids = jnp.array([[5, 6, 0, 0], [0, 0, 5, 6], [5, 0, 6, 0], [0, 0, 0, 0]])
    assert decoder.last_token_index(ids, 0).tolist() == [1, 3, 2, 0]


def test_reward_sums_are_bradley_terry_with_margin():
    """loss = −log σ(r_c − r_r − margin) summed over real pairs; accuracy and margin count
    real pairs only, by hand."""
    chosen, rejected = np.array([2.0, -1.0, 0.5]), np.array([1.0, 0.5, 3.0])
    margin, weights = np.array([0.5, 0.0, 1.0]), np.array([1.0, 1.0, 0.0])
    rewards = jnp.asarray(np.stack([chosen, rejected], 1).reshape(-1))  # interleaved rows
    batch = {"weights": jnp.asarray(weights), "margin": jnp.asarray(margin)}
    sums = jax.device_get(evaluate.reward_sums(rewards, batch))
    diff = chosen - rejected
    want = -np.log(1 / (1 + np.exp(-(diff - margin))))
    np.testing.assert_allclose(sums["loss_sum"], (want * weights).sum(), rtol=1e-6)
    assert sums["correct"] == 1.0 and sums["count"] == 2.0
    np.testing.assert_allclose(sums["margin_sum"], diff[:2].sum(), rtol=1e-6)
    no_margin = jax.device_get(evaluate.reward_sums(rewards, {"weights": batch["weights"]}))
    np.testing.assert_allclose(no_margin["loss_sum"], (np.log1p(np.exp(-diff)) * weights).sum(),
                               rtol=1e-6)  # fmt: skip


def _random_delta(base, spec, seed=0):
    """A delta with random non-zero a AND b (lora.init leaves b at zero)."""
    delta = lora.init(base, spec, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.2 * jax.random.normal(next(keys), x.shape) if p[-1].key == "b" else x,
        delta,
    )


def test_reward_export_loads_in_auto_peft_seq_cls_with_our_rewards(tiny_dir, tmp_path):
    """LoRA (q, v, mlp_out) + score head, exported as a SEQ_CLS adapter with the head in
    modules_to_save: AutoPeftModelForSequenceClassification(num_labels=1) gives our rewards
    within 1e-4 on right-padded rows (Llama and GPT-2's fused c_attn), where reading each
    row's last position instead would be far off."""
    config, base = hf.load_decoder(tiny_dir)
    spec = lora.make_spec("q,v,mlp_out", rank=4, alpha=8)
    delta = _random_delta(base, spec)
    kernel = np.asarray(decoder.init_score(config, jax.random.key(3))["kernel"]) * 50
    params = {**lora.wrap(base, delta, spec), "score": {"kernel": jnp.asarray(kernel)}}
    ids, lengths = _rows()
    ours = _lorax_rewards(config, params, ids, lengths)
    out = lpeft.export_peft(
        delta, spec, config, tmp_path / "rm", base_model_name_or_path=str(tiny_dir),
        task_type="SEQ_CLS", modules_to_save={"score": {"weight": kernel.T}},
    )  # fmt: skip
    model = peft.AutoPeftModelForSequenceClassification.from_pretrained(
        str(out), num_labels=1, pad_token_id=PAD
    ).eval()
    mask = torch.tensor(np.arange(ids.shape[1])[None] < lengths[:, None], dtype=torch.long)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=mask)
    theirs = theirs.logits.numpy()
    assert theirs.shape == (4, 1)
    np.testing.assert_allclose(ours, theirs[:, 0], atol=1e-4)
    plain = _lorax_rewards(config, {**base, "score": {"kernel": jnp.asarray(kernel)}}, ids,
                           lengths)  # fmt: skip
    assert np.abs(ours - plain).max() > 1e-2, "the adapter should change the rewards"
    # what a last-position read would give on the padded rows: not what either model does
    b, t = ids.shape
    segments = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    hidden, _ = decoder.Decoder(config).apply(
        {"params": params}, ids, np.broadcast_to(np.arange(t), (b, t)),
        decoder.causal_mask(segments), logits=False,
    )  # fmt: skip
    naive = np.asarray(hidden[:, -1] @ kernel)[:, 0]
    assert np.abs(naive[1:] - ours[1:]).min() > 1e-3
