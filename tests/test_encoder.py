"""Tests of the BERT/MiniLM encoder (lorax/models/encoder.py) and its Hugging Face loader,
against transformers' PyTorch BertModel."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from lorax import lora, paths
from lorax.checkpoints import hf
from lorax.models import encoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PAIRS = [("A man is playing a guitar on stage.", "The man plays music for a large crowd."),
         ("Two dogs run through a field.", "Animals are outside."),
         ("A woman in a red coat reads a newspaper while waiting for the early train "
          "at a crowded station in winter.", "Nobody is reading.")]


@pytest.fixture(scope="module")
def real(minilm_dir, tokenizer):
    config, params = hf.load_encoder(minilm_dir)
    torch_model = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    enc = tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], padding="longest",
                    return_tensors="np")
    return config, params, torch_model, dict(enc)


def _torch_outputs(model, enc):
    with torch.no_grad():
        out = model(**{k: torch.tensor(v) for k, v in enc.items()})
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def test_minilm_matches_transformers_bertmodel_on_real_weights(real):
    """Last hidden state (real tokens), pooler output and mean pooling match PyTorch BertModel
    on all-MiniLM-L6-v2 within 1e-4 (fp32), with padding in the batch."""
    config, params, torch_model, enc = real
    hidden, pooled = encoder.Encoder(config, with_pooler=True).apply(
        {"params": params}, enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
    ref_hidden, ref_pooled = _torch_outputs(torch_model, enc)
    mask = enc["attention_mask"].astype(bool)
    assert not mask.all(), "the batch should contain padding"
    assert np.abs(np.asarray(hidden)[mask] - ref_hidden[mask]).max() <= 1e-4
    assert np.abs(np.asarray(pooled) - ref_pooled).max() <= 1e-4
    m = mask[..., None]
    ref_mean = (ref_hidden * m).sum(1) / m.sum(1)
    ours_mean = encoder.mean_pool(hidden, jnp.asarray(enc["attention_mask"]))
    assert np.abs(np.asarray(ours_mean) - ref_mean).max() <= 1e-4


def _tiny_hf_dir(tmp_path, seed=0):
    cfg = {"model_type": "bert", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 40,
           "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**cfg)).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): give them values worth testing
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.numpy() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    return model


def test_tiny_random_bert_matches_and_round_trips(tmp_path):
    """A random tiny BERT saved by PyTorch loads through load_encoder, matches BertModel within
    1e-5, and encoder_to_hf gives back exactly the checkpoint's tensors."""
    torch_model = _tiny_hf_dir(tmp_path)
    config, params = hf.load_encoder(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, (3, 11)).astype(np.int32)
    types = (np.arange(11) > 5).astype(np.int32)[None].repeat(3, 0)
    mask = np.ones((3, 11), np.int32)
    mask[1, 7:] = 0
    hidden, pooled = encoder.Encoder(config, with_pooler=True).apply(
        {"params": params}, ids, types, mask)
    ref_hidden, ref_pooled = _torch_outputs(
        torch_model, {"input_ids": ids, "token_type_ids": types, "attention_mask": mask})
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[real], ref_hidden[real], atol=1e-5)
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-5)
    back = hf.encoder_to_hf(params)
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items() if "position_ids" not in k}
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_loader_errors_name_the_key(tmp_path):
    """A missing weight and a wrong shape each get an error naming the path."""
    _tiny_hf_dir(tmp_path)
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["encoder.layer.1.attention.self.value.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks the weight for layers_1/attn/v/kernel"):
        hf.load_encoder(tmp_path)
    tensors["encoder.layer.1.attention.self.value.weight"] = np.zeros((32, 31), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers_1/attn/v/kernel has shape \(31, 32\)"):
        hf.load_encoder(tmp_path)


def test_pretrained_tree_that_does_not_fit_the_model_is_refused(real):
    """init_params refuses encoder weights of another width, naming the path and shapes."""
    config, params, _, _ = real
    model = encoder.EncoderClassifier(
        encoder.EncoderConfig(**{**config.__dict__, "hidden_size": 192, "num_heads": 6}), 3)
    with pytest.raises(ValueError, match=r"encoder/embed/norm/bias has shape \(384,\); the "
                                         r"model needs \(192,\)"):
        encoder.init_params(model, params, jax.random.key(0))


@pytest.fixture(scope="module")
def classifier(real):
    config, params, _, enc = real
    model = encoder.EncoderClassifier(config, num_classes=3)
    full = encoder.init_params(model, params, jax.random.key(0))
    apply = jax.jit(lambda p: model.apply({"params": p}, enc["input_ids"],
                                          enc["token_type_ids"], enc["attention_mask"]))
    return full, apply


def test_lora_count_on_minilm_is_the_papers_theta(classifier):
    """q,v r=4 on MiniLM-L6: Θ = 2·L_LoRA·d·r = 2·12·384·4 = 36864."""
    full, _ = classifier
    delta = lora.init(full, lora.make_spec("q,v", rank=4, alpha=8), jax.random.key(0))
    assert lora.count(delta) == 36864


@pytest.mark.parametrize("targets", ["q,v", "q,k,v,o", "mlp_in,mlp_out"])
def test_wrapped_model_equals_base_at_init_and_merge_equals_wrap(classifier, targets):
    """At init the wrapped classifier's logits equal the base's exactly; with non-zero B,
    merged params give the wrapped logits within 1e-5 (fp32)."""
    full, apply = classifier
    spec = lora.make_spec(targets, rank=4, alpha=8)
    delta = lora.init(full, spec, jax.random.key(1))
    np.testing.assert_array_equal(apply(lora.wrap(full, delta, spec)), apply(full))
    keys = iter(jax.random.split(jax.random.key(2), 100))
    delta = jax.tree_util.tree_map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape),
                                   delta)
    wrapped, merged = apply(lora.wrap(full, delta, spec)), apply(lora.merge(full, delta, spec))
    assert np.abs(np.asarray(wrapped) - np.asarray(apply(full))).max() > 1e-3
    np.testing.assert_allclose(merged, wrapped, atol=1e-5, rtol=1e-5)


def test_bf16_base_runs_close_to_fp32(real):
    """A base stored and computed in bf16 gives logits close to fp32 (loose, bf16 tolerance)."""
    config, params, _, enc = real
    f32 = encoder.EncoderClassifier(config, 3)
    b16 = encoder.EncoderClassifier(config, 3, dtype=jnp.bfloat16)
    full = encoder.init_params(f32, params, jax.random.key(0))
    half = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), full)
    args = (enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
    a = f32.apply({"params": full}, *args)
    b = b16.apply({"params": half}, *args)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(b, a, atol=0.1)
    assert set(paths.flatten(full)) == set(paths.flatten(half))
