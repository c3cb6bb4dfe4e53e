"""Decoder LMs: parity with transformers' PyTorch Llama / Qwen2 / GPT-2, scan, KV cache, LoRA."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax import generate, lora, paths
from lorax.checkpoints import hf
from lorax.models import decoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 101


def _llama(heads=8, kv_heads=2, tied=False, **kw):
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        max_position_embeddings=128,
        rope_theta=10000.0,
        **kw,
    )


def _gpt2():
    return transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip


def _qwen2():
    return transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    )


def _save_random(hf_config, directory, seed=0, **save_kw):
    """A transformers model with random non-trivial weights, saved as safetensors."""
    torch.manual_seed(seed)
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "gpt2": transformers.GPT2LMHeadModel,
        "qwen2": transformers.Qwen2ForCausalLM,
    }[hf_config.model_type]
    model = cls(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases away from 1 and 0, so they matter
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory, **save_kw)
    return model


def _inputs(batch=2, length=12, seed=0):
    ids = np.random.default_rng(seed).integers(0, VOCAB, (batch, length))
    positions = np.broadcast_to(np.arange(length), (batch, length))
    mask = decoder.causal_mask(jnp.ones((batch, length), jnp.int32))
    return ids, positions, mask


CASES = {
    "llama-gqa-untied": _llama,
    "llama-mha-tied": lambda: _llama(heads=4, kv_heads=4, tied=True),
    "llama-mqa-tied": lambda: _llama(heads=4, kv_heads=1, tied=True),
    "llama3-rope-scaling": lambda: _llama(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    ),
    "qwen2-qkv-bias": _qwen2,
    "gpt2": _gpt2,
}


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = _save_random(CASES[request.param](), directory)
    ids, _, _ = _inputs()
    with torch.no_grad():
        reference = model(torch.tensor(ids)).logits.numpy()
    return request.param, directory, reference


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_logits_match_transformers(saved, scan):
    """Our decoder on the loaded weights gives transformers' fp32 logits within 1e-4, for
    GQA / MHA / MQA, tied and untied embeddings, Llama 3 RoPE scaling, Qwen2 biases and GPT-2,
    with the layers unrolled and under nn.scan."""
    name, directory, reference = saved
    config, params = hf.load_decoder(directory)
    if scan:
        params = paths.stack_layers(params)
    ids, positions, mask = _inputs()
    logits, _ = decoder.Decoder(config, scan=scan).apply({"params": params}, ids, positions, mask)
    err = float(np.abs(np.asarray(logits) - reference).max())
    assert err <= 1e-4, f"{name}: max abs logit difference {err}"


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    """A model.safetensors.index.json with several shards loads to the same params."""
    _save_random(_llama(), tmp_path / "one")
    _save_random(_llama(), tmp_path / "many", max_shard_size="40KB")
    assert (tmp_path / "many" / "model.safetensors.index.json").exists()
    shards = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(shards["weight_map"].values())) > 1
    _, one = hf.load_decoder(tmp_path / "one")
    _, many = hf.load_decoder(tmp_path / "many")
    flat_one, flat_many = paths.flatten(one), paths.flatten(many)
    assert flat_one.keys() == flat_many.keys()
    for k in flat_one:
        np.testing.assert_array_equal(flat_one[k], flat_many[k])


def test_gpt2_fused_c_attn_splits_and_fuses_back_exactly(tmp_path):
    """c_attn [D, 3D] becomes q, k, v kernels [D, D] (columns in that order) and back."""
    model = _save_random(_gpt2(), tmp_path)
    config, params = hf.load_decoder(tmp_path)
    c_attn = model.transformer.h[1].attn.c_attn.weight.detach().numpy()
    d = config.hidden_size
    for i, name in enumerate("qkv"):
        kernel = params["layers_1"]["attn"][name]["kernel"]
        np.testing.assert_array_equal(kernel, c_attn[:, i * d : (i + 1) * d])
    back = hf.decoder_to_hf(params, config)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for name, value in back.items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)


def _tiny(family="llama", tied=True):
    if family == "gpt2":
        return decoder.DecoderConfig.from_hf(_gpt2().to_dict())
    return decoder.DecoderConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, intermediate_size=48, tie_embeddings=tied,
    )  # fmt: skip


def _init(config, scan=False, seed=0):
    ids, positions, mask = _inputs(1, 4)
    params = decoder.Decoder(config, scan=scan).init(jax.random.key(seed), ids, positions, mask)
    # Sharper weights than the init: greedy decoding then depends on every logit.
    return jax.tree_util.tree_map(lambda x: x * 3 if x.ndim >= 2 else x, params["params"])


def _greedy_by_recomputation(model, params, prompt, max_new_tokens):
    """Greedy continuation that reruns the whole sequence for every token (no cache): slow
    and simple, the reference the cached ``generate`` is tested against. The sequence is
    right-padded to its final length so one compiled forward serves every token; the causal
    mask keeps the padding after position i from reaching position i's logits."""
    tokens = list(prompt)
    total = len(prompt) + max_new_tokens
    positions = jnp.arange(total)[None]
    mask = decoder.causal_mask(jnp.ones((1, total), jnp.int32))
    forward = jax.jit(lambda ids: model.apply({"params": params}, ids, positions, mask)[0])
    for _ in range(max_new_tokens):
        ids = jnp.asarray([tokens + [0] * (total - len(tokens))], jnp.int32)
        tokens.append(int(jnp.argmax(forward(ids)[0, len(tokens) - 1])))
    return tokens[len(prompt) :]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_cached_generation_equals_full_recomputation(family, scan):
    """Greedy decoding with the KV cache (left-padded batch of unequal prompts) produces the
    same tokens as rerunning the whole sequence for each token."""
    config = _tiny(family)
    params = _init(config)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
    model = decoder.Decoder(config)
    expected = [_greedy_by_recomputation(model, params, p, 10) for p in prompts]
    assert len({tuple(e) for e in expected}) == 2  # the prompts lead to different tokens
    run_params = paths.stack_layers(params) if scan else params
    got = generate.generate(
        decoder.Decoder(config, scan=scan), run_params, prompts, max_new_tokens=10
    )
    assert got == expected


def test_generation_with_wrapped_and_merged_adapter_agree():
    """An adapter decodes to the same tokens wrapped (unmerged) and merged, and differently
    from the base, so the adapter is really applied."""
    config = _tiny()
    params = _init(config)
    spec = lora.make_spec("q,v,mlp_out", rank=4, alpha=32)
    delta = lora.init(params, spec, jax.random.key(1))
    delta = jax.tree_util.tree_map(
        lambda x: x + jax.random.normal(jax.random.key(2), x.shape), delta
    )
    model = decoder.Decoder(config)
    prompts = [[5, 6, 7, 8]]
    base = generate.generate(model, params, prompts, max_new_tokens=12)
    wrapped = generate.generate(model, lora.wrap(params, delta, spec), prompts, max_new_tokens=12)
    merged = generate.generate(model, lora.merge(params, delta, spec), prompts, max_new_tokens=12)
    assert wrapped == merged
    assert wrapped != base


def test_sampling_is_seeded_and_top_p_small_is_greedy():
    config = _tiny()
    params = _init(config)
    model = decoder.Decoder(config)
    kw = dict(max_new_tokens=8, temperature=1.0)
    a = generate.generate(model, params, [[1, 2]], seed=3, **kw)
    assert a == generate.generate(model, params, [[1, 2]], seed=3, **kw)
    assert a != generate.generate(model, params, [[1, 2]], seed=4, **kw)
    greedy = generate.generate(model, params, [[1, 2]], max_new_tokens=8)
    assert generate.generate(model, params, [[1, 2]], top_p=1e-6, seed=5, **kw) == greedy


def test_generation_stops_at_eos():
    config = _tiny()
    params = _init(config)
    model = decoder.Decoder(config)
    free = generate.generate(model, params, [[1, 2, 3]], max_new_tokens=8)[0]
    eos = free[2]
    stopped = generate.generate(model, params, [[1, 2, 3]], max_new_tokens=8, eos_id=eos)[0]
    assert stopped == free[: free.index(eos) + 1]


@pytest.mark.slow
def test_lora_under_scan_equals_lora_per_layer():
    """Stacking base and delta for nn.scan changes neither the outputs nor the count."""
    config = _tiny(tied=False)
    params = _init(config)
    spec = lora.make_spec("q,v,mlp_gate", rank=4, alpha=8)
    delta = jax.tree_util.tree_map(lambda x: x + 0.05, lora.init(params, spec, jax.random.key(1)))
    ids, positions, mask = _inputs(2, 9)
    loop, _ = decoder.Decoder(config).apply(
        {"params": lora.wrap(params, delta, spec)}, ids, positions, mask
    )
    stacked_base, stacked_delta = paths.stack_layers(params), paths.stack_layers(delta)
    scanned, _ = decoder.Decoder(config, scan=True, remat=True).apply(
        {"params": lora.wrap(stacked_base, stacked_delta, spec)}, ids, positions, mask
    )
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(loop), atol=1e-4)
    assert lora.count(stacked_delta) == lora.count(delta)
    fresh = lora.init(stacked_base, spec, jax.random.key(1))
    assert fresh["layers"]["attn"]["q"]["kernel"]["a"].shape == (2, 32, 4)
    # The same adapter init with scan on or off: layer i of a stack draws as layers_i.
    per_layer = paths.stack_layers(lora.init(params, spec, jax.random.key(1)))
    for path, leaf in paths.flatten(per_layer).items():
        np.testing.assert_array_equal(np.asarray(paths.flatten(fresh)[path]), np.asarray(leaf))
    assert paths.flatten(paths.unstack_layers(stacked_delta)).keys() == paths.flatten(delta).keys()


def test_layer_filter_on_scanned_layers_is_a_clear_error():
    params = paths.stack_layers(_init(_tiny()))
    spec = lora.make_spec("q", rank=2, alpha=2, layers=[0])
    with pytest.raises(ValueError, match=r"layer filter \[0\].*model.scan=False"):
        lora.init(params, spec, jax.random.key(0))


def test_gpt2_v_only_adapter_leaves_q_and_k_untouched(tmp_path):
    """On a GPT-2 checkpoint (fused c_attn), a v-only adapter changes the v projection's
    output and leaves q's and k's bit-identical; merged and re-fused, only c_attn's v
    columns differ from the original."""
    _save_random(_gpt2(), tmp_path)
    config, params = hf.load_decoder(tmp_path)
    spec = lora.make_spec("v", rank=4, alpha=8)
    delta = jax.tree_util.tree_map(lambda x: x + 0.1, lora.init(params, spec, jax.random.key(0)))
    ids, positions, mask = _inputs()
    model = decoder.Decoder(config)

    def projections(p):
        _, state = model.apply(
            {"params": p}, ids, positions, mask, capture_intermediates=True, mutable="intermediates"
        )
        attn = state["intermediates"]["layers_0"]["attn"]
        return {n: np.asarray(attn[n]["__call__"][0]) for n in "qkv"}

    base, adapted = projections(params), projections(lora.wrap(params, delta, spec))
    np.testing.assert_array_equal(adapted["q"], base["q"])
    np.testing.assert_array_equal(adapted["k"], base["k"])
    assert np.abs(adapted["v"] - base["v"]).max() > 1e-3

    d = config.hidden_size
    before = hf.decoder_to_hf(params, config)["transformer.h.0.attn.c_attn.weight"]
    after = hf.decoder_to_hf(lora.merge(params, delta, spec), config)[
        "transformer.h.0.attn.c_attn.weight"
    ]
    np.testing.assert_array_equal(after[:, : 2 * d], before[:, : 2 * d])
    assert np.abs(after[:, 2 * d :] - before[:, 2 * d :]).max() > 1e-3


def test_unsupported_configs_are_clear_errors():
    with pytest.raises(ValueError, match=r"model_type 'mamba'.*supported: \['llama', 'qwen2'"):
        decoder.DecoderConfig.from_hf({"model_type": "mamba"})
    with pytest.raises(ValueError, match=r"lacks \['num_hidden_layers'\]"):
        decoder.DecoderConfig.from_hf(
            {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_attention_heads": 2,
             "intermediate_size": 8}
        )  # fmt: skip
    raw = _llama().to_dict()
    raw["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match=r"rope_scaling type 'yarn'.*'default', 'llama3'"):
        decoder.DecoderConfig.from_hf(raw)
    with pytest.raises(ValueError, match=r"not a multiple of num_kv_heads"):
        decoder.DecoderConfig.from_hf(_llama(heads=8, kv_heads=3).to_dict())


@pytest.mark.parametrize(
    "make, field, value",
    [
        (_gpt2, "scale_attn_by_inverse_layer_idx", True),
        (_gpt2, "scale_attn_weights", False),
        (_gpt2, "tie_word_embeddings", False),
        (_gpt2, "add_cross_attention", True),
        (_llama, "partial_rotary_factor", 0.5),
        (_llama, "layer_types", ["full_attention", "sliding_attention", "full_attention"]),
        (_qwen2, "use_sliding_window", True),
    ],
)
def test_config_fields_lorax_does_not_compute_are_refused_by_name(tmp_path, make, field, value):
    """Loaded silently, each of these would give other logits than transformers; the default
    dicts of every family (which hold these fields at their defaults) load as before."""
    raw = make().to_dict()
    decoder.DecoderConfig.from_hf(raw)
    raw[field] = value
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}") + " changes the"):
        decoder.DecoderConfig.from_hf(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}: config.json: {field}="):
        hf.load_decoder(tmp_path)


def test_gpt2_inverse_layer_scaling_really_changes_the_logits():
    """Why the refusal above matters: transformers' output moves with the field."""
    ids = torch.tensor(np.random.default_rng(0).integers(0, VOCAB, (1, 12)))
    logits = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(
            _gpt2().__class__(**{**_gpt2().to_dict(), "scale_attn_by_inverse_layer_idx": flag})
        ).eval()
        with torch.no_grad():
            logits.append(model(ids).logits.numpy())
    assert np.abs(logits[0] - logits[1]).max() > 1e-3


def test_wrong_shape_in_checkpoint_names_the_path(tmp_path):
    _save_random(_llama(), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"layers_0/mlp/mlp_gate/kernel has shape \(64, 96\)"):
        hf.load_decoder(tmp_path)
