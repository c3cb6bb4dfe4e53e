"""Tests of the BERT/MiniLM encoder (lorax/models/encoder.py) and its Hugging Face loader,
against transformers' PyTorch BertModel."""

import json

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lorax import assets, lora, paths
from lorax.checkpoints import hf
from lorax.models import encoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PAIRS = [
    ("A man is playing a guitar on stage.", "The man plays music for a large crowd."),
    ("Two dogs run through a field.", "Animals are outside."),
    (
        "A woman in a red coat reads a newspaper while waiting for the early train "
        "at a crowded station in winter.",
        "Nobody is reading.",
    ),
    ("Hi.", "Yes."),
]


@pytest.fixture(scope="session")
def minilm_dir():
    """all-MiniLM-L6-v2 in Hugging Face layout, resolved through lorax.assets (no Hub)."""
    return assets.resolve("minilm-l6")


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    """MiniLM's real fast tokenizer (its tokenizer.json pads to 128 unless told otherwise)."""
    return transformers.AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="module")
def real(minilm_dir, tokenizer):
    config, params = hf.load_encoder(minilm_dir)
    torch_model = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    enc = tokenizer(
        [a for a, _ in PAIRS], [b for _, b in PAIRS], padding="longest", return_tensors="np"
    )
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
        {"params": params}, enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]
    )
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
    cfg = {
        "model_type": "bert",
        "vocab_size": 99,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 40,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
    }
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**cfg)).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): give them values worth testing
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(
        {k: v.numpy() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors")
    )
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
        {"params": params}, ids, types, mask
    )
    ref_hidden, ref_pooled = _torch_outputs(
        torch_model, {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    )
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[real], ref_hidden[real], atol=1e-5)
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-5)
    back = hf.encoder_to_hf(params)
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items() if "position_ids" not in k}
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_loader_errors_name_the_key(tmp_path):
    """A missing weight, a wrong shape and an unknown key each get an error naming it."""
    _tiny_hf_dir(tmp_path)
    good = load_file(str(tmp_path / "model.safetensors"))
    missing = {k: v for k, v in good.items() if k != "encoder.layer.1.attention.self.value.weight"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks the weight for layers_1/attn/v/kernel \(32, 32\)"):
        hf.load_encoder(tmp_path)
    wrong = {**good, "encoder.layer.1.attention.self.value.weight": np.zeros((32, 31), np.float32)}
    save_file(wrong, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"layers_1/attn/v/kernel has shape \(31, 32\); config.json implies"
    ):
        hf.load_encoder(tmp_path)
    unknown = {**good, "encoder.layer.0.attention.self.rotary.weight": np.zeros(3, np.float32)}
    save_file(unknown, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention.self.rotary.weight' is not"):
        hf.load_encoder(tmp_path)
    extra = {**good, "encoder.layer.2.output.dense.bias": np.zeros(32, np.float32)}
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"checkpoint has layers_2/mlp/mlp_out/bias"):
        hf.load_encoder(tmp_path)


def test_config_from_hf_names_the_missing_key():
    """EncoderConfig.from_hf refuses a config.json without num_attention_heads, naming it."""
    cfg = {"vocab_size": 9, "hidden_size": 8, "num_hidden_layers": 1, "intermediate_size": 16}
    with pytest.raises(ValueError, match=r"lacks \['num_attention_heads'\]"):
        encoder.EncoderConfig.from_hf(cfg)


@pytest.mark.parametrize(
    "field, value",
    [("position_embedding_type", "relative_key"), ("is_decoder", True),
     ("add_cross_attention", True)],
)  # fmt: skip
def test_config_fields_an_encoder_does_not_compute_are_refused_by_name(field, value):
    transformers = pytest.importorskip("transformers")
    raw = transformers.BertConfig(hidden_size=8, num_attention_heads=2).to_dict()
    encoder.EncoderConfig.from_hf(raw)  # the defaults of every such field load
    raw[field] = value
    with pytest.raises(ValueError, match=rf"{field}={value!r} changes the model's math"):
        encoder.EncoderConfig.from_hf(raw)


def test_loader_reads_task_checkpoints_old_names_and_shards(tmp_path):
    """A "bert."-prefixed checkpoint with gamma/beta LayerNorm names and a classifier, split
    over two shards with an index, loads to exactly the params of the plain checkpoint."""
    plain_dir, task_dir = tmp_path / "plain", tmp_path / "task"
    plain_dir.mkdir(), task_dir.mkdir()
    _tiny_hf_dir(plain_dir)
    _, want = hf.load_encoder(plain_dir)
    tensors = load_file(str(plain_dir / "model.safetensors"))
    renamed = {
        "bert."
        + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in tensors.items()
    }
    renamed["classifier.weight"] = np.zeros((3, 32), np.float32)
    names = sorted(renamed)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: renamed[k] for k in keys}, str(task_dir / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (task_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (task_dir / "config.json").write_text((plain_dir / "config.json").read_text())
    _, got = hf.load_encoder(task_dir)
    chex.assert_trees_all_equal(got, want)


def test_loader_reads_bf16_checkpoints(tmp_path):
    """A bf16 safetensors file (which safetensors.numpy cannot read) loads, bit-exact in bf16
    and as the same values in fp32."""
    from safetensors.torch import save_file as save_torch

    model = _tiny_hf_dir(tmp_path)
    state = {
        k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if "position_ids" not in k
    }
    save_torch(state, str(tmp_path / "model.safetensors"))
    _, p16 = hf.load_encoder(tmp_path, dtype=ml_dtypes.bfloat16)
    _, p32 = hf.load_encoder(tmp_path)
    ref = state["encoder.layer.0.attention.self.query.weight"].float().numpy().T
    k16 = p16["layers_0"]["attn"]["q"]["kernel"]
    assert k16.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(k16.astype(np.float32), ref)
    np.testing.assert_array_equal(p32["layers_0"]["attn"]["q"]["kernel"], ref)


def test_dropout_follows_the_dropout_rng(tmp_path):
    """deterministic=True ignores dropout; deterministic=False changes the output, is
    reproducible for one "dropout" key and differs for another."""
    _tiny_hf_dir(tmp_path)
    config, params = hf.load_encoder(tmp_path)
    model = encoder.EncoderClassifier(config, 3, head_dropout=0.5)
    full = encoder.init_params(model, params, jax.random.key(0))
    ids = np.arange(1, 17, dtype=np.int32).reshape(2, 8)
    zeros, ones = np.zeros_like(ids), np.ones_like(ids)
    # jitted (det is static) because unjitted linen applies cost seconds each on 2 CPU cores
    run = jax.jit(
        lambda det, k: model.apply(
            {"params": full}, ids, zeros, ones, det, rngs={"dropout": jax.random.key(k)}
        ),
        static_argnums=0,
    )
    np.testing.assert_array_equal(run(True, 0), run(True, 5))  # the key is not used
    np.testing.assert_array_equal(run(False, 1), run(False, 1))
    assert np.abs(run(False, 1) - run(True, 0)).max() > 1e-3
    assert np.abs(run(False, 1) - run(False, 2)).max() > 1e-3


def test_param_layout_is_the_canonical_one(real):
    """The classifier's param tree is exactly the documented canonical layout (which the LoRA
    target regexes rely on), and the real checkpoint fills all of it."""
    config, params, _, _ = real
    layer = {
        f"{n}/{leaf}"
        for n in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/mlp_in", "mlp/mlp_out")
        for leaf in ("kernel", "bias")
    } | {f"{n}/{leaf}" for n in ("attn_norm", "mlp_norm") for leaf in ("scale", "bias")}
    want = (
        {f"embed/{n}/embedding" for n in ("token", "position", "type")}
        | {"embed/norm/scale", "embed/norm/bias", "pooler/kernel", "pooler/bias"}
        | {f"layers_{i}/{p}" for i in range(config.num_layers) for p in layer}
    )
    shapes = encoder.param_shapes(config)
    assert set(shapes) == want
    assert shapes["layers_0/mlp/mlp_in/kernel"] == (384, 1536)
    assert shapes["layers_0/attn/q/kernel"] == (384, 384)
    assert {p: v.shape for p, v in paths.flatten(params).items()} == shapes
    assert config.num_params() == 22_713_216  # all-MiniLM-L6-v2's published size, 22.7M
    model = encoder.EncoderClassifier(config, 3, pooling="cls")
    full = encoder.init_params(model, params, jax.random.key(0))
    assert set(full) == {"encoder", "head"}
    assert full["head"]["kernel"].shape == (384, 3) and full["head"]["bias"].shape == (3,)
    assert "pooler" in full["encoder"]
    mean = encoder.init_params(encoder.EncoderClassifier(config, 3), params, jax.random.key(0))
    assert "pooler" not in mean["encoder"]


def test_pretrained_tree_that_does_not_fit_the_model_is_refused(real):
    """init_params refuses encoder weights of another width, naming the path and shapes."""
    config, params, _, _ = real
    model = encoder.EncoderClassifier(
        encoder.EncoderConfig(**{**config.__dict__, "hidden_size": 192, "num_heads": 6}), 3
    )
    with pytest.raises(
        ValueError,
        match=r"encoder/embed/norm/bias has shape \(384,\); the "
        r"model needs \(192,\)",
    ):
        encoder.init_params(model, params, jax.random.key(0))


@pytest.fixture(scope="module")
def classifier(real):
    config, params, _, enc = real
    model = encoder.EncoderClassifier(config, num_classes=3)
    full = encoder.init_params(model, params, jax.random.key(0))
    apply = jax.jit(
        lambda p: model.apply(
            {"params": p}, enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]
        )
    )
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
    delta = jax.tree_util.tree_map_with_path(  # b starts at zero; give it values
        lambda p, x: 0.05 * jax.random.normal(next(keys), x.shape) if p[-1].key == "b" else x,
        delta,
    )
    wrapped, merged = apply(lora.wrap(full, delta, spec)), apply(lora.merge(full, delta, spec))
    assert np.abs(np.asarray(wrapped) - np.asarray(apply(full))).max() > 1e-3
    np.testing.assert_allclose(merged, wrapped, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_bf16_base_runs_close_to_fp32(real):
    """A base stored and computed in bf16 really runs in bf16 (hidden states are bf16 and the
    logits are not bit-equal to fp32), returns fp32 logits within 0.05 of fp32's (measured
    ~0.015 on logits of size ~0.5), and mean-pooled sentence vectors at cosine > 0.999."""
    config, params, _, enc = real
    f32 = encoder.EncoderClassifier(config, 3)
    b16 = encoder.EncoderClassifier(config, 3, dtype=jnp.bfloat16)
    full = encoder.init_params(f32, params, jax.random.key(0))
    half = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), full)
    args = (enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
    a = f32.apply({"params": full}, *args)
    b = b16.apply({"params": half}, *args)
    assert b.dtype == jnp.float32
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(b, a, atol=0.05)
    h32, _ = encoder.Encoder(config).apply({"params": full["encoder"]}, *args)
    h16, _ = encoder.Encoder(config, jnp.bfloat16).apply({"params": half["encoder"]}, *args)
    assert h16.dtype == jnp.bfloat16
    m32, m16 = encoder.mean_pool(h32, args[2]), encoder.mean_pool(h16, args[2])
    cos = jnp.sum(m32 * m16, -1) / jnp.linalg.norm(m32, axis=-1) / jnp.linalg.norm(m16, axis=-1)
    assert float(cos.min()) > 0.999
