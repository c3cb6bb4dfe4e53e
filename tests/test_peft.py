"""PEFT adapters: export loads in peft.PeftModel with our outputs; PEFT-made adapters import."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax import lora, paths
from lorax.checkpoints import hf
from lorax.checkpoints import peft as lpeft
from lorax.models import decoder, encoder
from tests.helpers import random_delta, save_random_decoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 101
TOL = 1e-4


# --- models ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Llama with grouped-query attention (8 heads, 2 kv heads), 2 layers."""
    directory = tmp_path_factory.mktemp("llama")
    save_random_decoder(
        transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
        ),
        directory,
    )  # fmt: skip
    return directory


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    save_random_decoder(
        transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
        ),
        directory,
    )
    return directory


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    config, params = hf.load_encoder(minilm_dir)
    return minilm_dir, config, params


def _ids(batch=2, length=10, vocab=VOCAB, seed=0):
    return np.random.default_rng(seed).integers(1, vocab, (batch, length)).astype(np.int32)


def _ours(config, params, ids, scan=False):
    """Our model's output on ids: decoder logits, or the encoder's last hidden state."""
    if isinstance(config, encoder.EncoderConfig):
        ones = jnp.ones_like(ids)
        hidden, _ = encoder.Encoder(config).apply({"params": params}, ids, 0 * ones, ones)
        return np.asarray(hidden)
    b, t = ids.shape
    positions = np.broadcast_to(np.arange(t), (b, t))
    mask = decoder.causal_mask(jnp.ones((b, t), jnp.int32))
    logits, _ = decoder.Decoder(config, scan=scan).apply({"params": params}, ids, positions, mask)
    return np.asarray(logits)


def _torch_model(directory, config):
    if isinstance(config, encoder.EncoderConfig):
        return transformers.BertModel.from_pretrained(str(directory)).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()


def _theirs(model, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def _max_diff(x, y):
    return float(np.abs(np.asarray(x) - np.asarray(y)).max())


# --- export ----------------------------------------------------------------------------------


def _export_and_compare(tmp_path, directory, config, base, spec, scan=False):
    """Exports a random delta, loads it with PeftModel and compares outputs; returns the
    delta and the written adapter_config.json."""
    delta = random_delta(base, spec)
    ours = _ours(config, lora.wrap(base, delta, spec), _ids(vocab=config.vocab_size), scan)
    plain = _ours(config, base, _ids(vocab=config.vocab_size), scan)
    assert _max_diff(ours, plain) > 1e-2, "the adapter should change the outputs"
    out = lpeft.export_peft(delta, spec, config, tmp_path / "adapter", base_model_name_or_path="x")
    model = peft.PeftModel.from_pretrained(_torch_model(directory, config), str(out)).eval()
    theirs = _theirs(model, _ids(vocab=config.vocab_size))
    assert _max_diff(ours, theirs) <= TOL
    return delta, json.loads((out / lpeft.CONFIG_NAME).read_text())


@pytest.mark.slow
def test_export_minilm_q_v_loads_in_peft_with_our_outputs(tmp_path, minilm):
    """q,v r=4 on real MiniLM: PeftModel(BertModel) gives our hidden states within 1e-4, and
    the config names the modules the way PEFT users write them."""
    directory, config, params = minilm
    spec = lora.make_spec("q,v", rank=4, alpha=8)
    _, cfg = _export_and_compare(tmp_path, directory, config, params, spec)
    assert cfg["target_modules"] == ["query", "value"]
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (
        4,
        8,
        {},
        {},
    )
    assert cfg["layers_to_transform"] is None and cfg["task_type"] == "FEATURE_EXTRACTION"


def test_export_minilm_rank_alpha_patterns_and_some_layers(tmp_path, minilm):
    """Per-target rank and alpha and a layer filter: rank_pattern / alpha_pattern keys and
    layers_to_transform that PEFT reads back exactly (o is BERT's ambiguous 'dense')."""
    directory, config, params = minilm
    spec = lora.make_spec(
        "q,v,o", rank=4, alpha=8, rank_pattern={"v": 2}, alpha_pattern={"o": 16}, layers=[1, 4]
    )
    _, cfg = _export_and_compare(tmp_path, directory, config, params, spec)
    assert cfg["target_modules"] == ["attention.output.dense", "query", "value"]
    assert cfg["layers_to_transform"] == [1, 4]
    assert cfg["rank_pattern"] == {"value": 2} and cfg["alpha_pattern"] == {"dense": 16}


@pytest.mark.slow
def test_export_llama_gqa_scanned_delta_with_rslora(tmp_path, llama_dir):
    """A scanned (stacked) delta on a GQA Llama with q, v and down_proj, rsLoRA and a rank
    override: LlamaForCausalLM + PEFT gives our logits within 1e-4."""
    config, params = hf.load_decoder(llama_dir)
    stacked = paths.stack_layers(params)
    spec = lora.make_spec("q,v,mlp_out", rank=4, alpha=8, rank_pattern={"mlp_out": 2}, rslora=True)
    _, cfg = _export_and_compare(tmp_path, llama_dir, config, stacked, spec, scan=True)
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert cfg["rank_pattern"] == {"down_proj": 2} and cfg["use_rslora"] is True


@pytest.mark.slow
def test_export_gpt2_q_v_is_one_block_c_attn_adapter_and_reimports(tmp_path, gpt2_dir):
    """GPT-2 q (r=4) + v (r=2): one c_attn adapter of rank 6 whose B has zero k rows and zero
    off-diagonal blocks; PEFT matches our logits; re-import gives back q and v only."""
    config, params = hf.load_decoder(gpt2_dir)
    spec = lora.make_spec("q,v", rank=4, alpha=16, rank_pattern={"v": 2})
    delta, cfg = _export_and_compare(tmp_path, gpt2_dir, config, params, spec)
    assert cfg["target_modules"] == ["c_attn"] and cfg["fan_in_fan_out"] is True
    assert (cfg["r"], cfg["rank_pattern"]) == (6, {})
    assert cfg["lora_alpha"] == 6  # PEFT's scaling is 1: each B block carries its own scale
    tensors = hf.read_safetensors_file(tmp_path / "adapter" / lpeft.WEIGHTS_NAME)
    assert len(tensors) == 2 * config.num_layers
    d, key = config.hidden_size, "base_model.model.transformer.h.1.attn.c_attn.lora_{}.weight"
    a, b = tensors[key.format("A")], tensors[key.format("B")]
    assert a.shape == (6, d) and b.shape == (3 * d, 6)
    q, v = (delta["layers_1"]["attn"][n]["kernel"] for n in "qv")
    np.testing.assert_allclose(a, np.concatenate([q["a"].T, v["a"].T]), rtol=1e-6)
    np.testing.assert_allclose(b[:d, :4], 16 / 4 * np.asarray(q["b"]).T, rtol=1e-6)
    np.testing.assert_allclose(b[2 * d :, 4:], 16 / 2 * np.asarray(v["b"]).T, rtol=1e-6)
    assert not b[d : 2 * d].any() and not b[:d, 4:].any() and not b[2 * d :, :4].any()

    spec2, delta2 = lpeft.import_peft(tmp_path / "adapter", params, config)
    sites = lora.resolve(params, spec2)
    assert sorted(sites) == [f"layers_{i}/attn/{n}/kernel" for i in (0, 1) for n in "qv"]
    assert all(s.rank == 6 for s in sites.values())
    ids = _ids()
    before = _ours(config, lora.wrap(params, delta, spec), ids)
    after = _ours(config, lora.wrap(params, delta2, spec2), ids)
    assert _max_diff(before, after) <= 1e-5


def test_export_gpt2_mlp_c_proj_is_told_apart_from_attn_c_proj(tmp_path, gpt2_dir):
    """GPT-2 has attn.c_proj and mlp.c_proj: adapting only the MLP's writes 'mlp.c_proj'."""
    config, params = hf.load_decoder(gpt2_dir)
    spec = lora.make_spec("q,mlp_out", rank=2, alpha=4)
    _, cfg = _export_and_compare(tmp_path, gpt2_dir, config, params, spec)
    assert cfg["target_modules"] == ["c_attn", "mlp.c_proj"]
    # c_attn carries its scale in B (alpha = r = 2); mlp.c_proj keeps alpha 4. Only the MLP's
    # c_proj is adapted, so the bare "c_proj" is a precise alpha_pattern key.
    assert (cfg["r"], cfg["lora_alpha"]) == (2, 2)
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {"c_proj": 4}


# --- import ----------------------------------------------------------------------------------


IMPORT_CASES = {
    "gpt2-c_attn": dict(target_modules=["c_attn"], fan_in_fan_out=True),
    "llama-rank-pattern": dict(
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 8},
        alpha_pattern={"v_proj": 4},
    ),
    "minilm-rslora": dict(target_modules=["query", "value"], use_rslora=True),
}


@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_import_adapter_made_by_peft(tmp_path, case, request):
    """An adapter made with peft.get_peft_model (B set non-zero) and save_pretrained imports
    into a spec + delta whose wrapped model gives PEFT's outputs within 1e-4."""
    family = case.split("-")[0]
    if family == "minilm":
        directory, config, params = request.getfixturevalue("minilm")
    else:
        directory = request.getfixturevalue(f"{family}_dir")
        config, params = hf.load_decoder(directory)
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, **IMPORT_CASES[case])
    model = peft.get_peft_model(_torch_model(directory, config), cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero
                p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(tmp_path))
    ids = _ids(vocab=config.vocab_size)
    theirs = _theirs(model, ids)

    spec, delta = lpeft.import_peft(tmp_path, params, config)
    ours = _ours(config, lora.wrap(params, delta, spec), ids)
    assert _max_diff(ours, _ours(config, params, ids)) > 1e-2
    assert _max_diff(ours, theirs) <= TOL
    sites = lora.resolve(params, spec)
    if family == "gpt2":  # every c_attn block is non-zero here, so q, k and v all come back
        assert {p.split("/")[2] for p in sites} == {"q", "k", "v"}
    if family == "llama":
        assert sites["layers_1/attn/q/kernel"].rank == 8
        assert sites["layers_0/attn/v/kernel"].scale == 4 / 2
    if family == "minilm":
        assert spec.rslora and sites["layers_0/attn/q/kernel"].scale == 8 / 2


def test_import_reads_keys_with_the_adapter_name(tmp_path, llama_dir):
    """Keys saved as '...lora_A.default.weight' (older PEFT, raw state dicts) read the same."""
    from safetensors.numpy import save_file

    config, params = hf.load_decoder(llama_dir)
    spec = lora.make_spec("q,v", rank=2, alpha=4)
    out = lpeft.export_peft(random_delta(params, spec), spec, config, tmp_path / "plain")
    named = tmp_path / "named"
    named.mkdir()
    (named / lpeft.CONFIG_NAME).write_text((out / lpeft.CONFIG_NAME).read_text())
    tensors = hf.read_safetensors_file(out / lpeft.WEIGHTS_NAME)
    save_file(
        {k.replace(".weight", ".default.weight"): np.array(v) for k, v in tensors.items()},
        str(named / lpeft.WEIGHTS_NAME),
    )
    (_, d1), (_, d2) = (
        lpeft.import_peft(out, params, config),
        lpeft.import_peft(named, params, config),
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, d1, d2)


# --- errors ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_adapter(llama_dir, tmp_path_factory):
    """A small exported q,v adapter on the tiny Llama, to corrupt."""
    config, params = hf.load_decoder(llama_dir)
    spec = lora.make_spec("q,v", rank=2, alpha=4)
    out = lpeft.export_peft(
        random_delta(params, spec), spec, config, tmp_path_factory.mktemp("adapter")
    )
    return config, params, out


def _rewrite(src, dst, config_changes=None, tensor_changes=None):
    """A copy of adapter ``src`` in ``dst`` with config fields and tensors replaced."""
    from safetensors.numpy import save_file

    dst.mkdir()
    cfg = json.loads((src / lpeft.CONFIG_NAME).read_text())
    cfg.update(config_changes or {})
    (dst / lpeft.CONFIG_NAME).write_text(json.dumps(cfg))
    tensors = {
        k: np.array(v) for k, v in hf.read_safetensors_file(src / lpeft.WEIGHTS_NAME).items()
    }
    tensors.update(tensor_changes or {})
    save_file(tensors, str(dst / lpeft.WEIGHTS_NAME))
    return dst


def test_import_refuses_an_adapter_for_another_width(tmp_path, llama_adapter):
    """lora_A for a 48-wide model on a 64-wide base: the error names the key and both shapes."""
    config, params, src = llama_adapter
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    bad = _rewrite(src, tmp_path / "bad", tensor_changes={key: np.ones((2, 48), np.float32)})
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight.*\(2, 48\).*\(2, 64\)"):
        lpeft.import_peft(bad, params, config)


def test_import_refuses_a_module_the_base_lacks(tmp_path, llama_adapter):
    """A layer-9 key on a 2-layer base: the error names the key and what keys look like."""
    config, params, src = llama_adapter
    key = "base_model.model.model.layers.9.self_attn.q_proj.lora_{}.weight"
    extra = {key.format("A"): np.ones((2, 64), np.float32), key.format("B"): np.ones((64, 2))}
    bad = _rewrite(src, tmp_path / "bad", tensor_changes=extra)
    with pytest.raises(ValueError, match=r"layers\.9\.self_attn.*keys look like"):
        lpeft.import_peft(bad, params, config)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_dora": True}, "use_dora"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"bias": "lora_only"}, "bias"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"use_qalora": True}, "option use_qalora"),
    ],
)
def test_import_refuses_unsupported_options(tmp_path, llama_adapter, changes, message):
    config, params, src = llama_adapter
    bad = _rewrite(src, tmp_path / "bad", config_changes=changes)
    with pytest.raises(ValueError, match=message):
        lpeft.import_peft(bad, params, config)


def test_import_refuses_tensors_it_would_drop(tmp_path, llama_adapter):
    """A DoRA magnitude vector in an adapter whose config says plain LoRA is not silently
    ignored, nor is a tensor that is no adapter factor at all."""
    config, params, src = llama_adapter
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    bad = _rewrite(src, tmp_path / "bad", tensor_changes={key: np.ones(64, np.float32)})
    with pytest.raises(ValueError, match="DoRA magnitude, but not use_dora=true"):
        lpeft.import_peft(bad, params, config)
    key = "base_model.model.model.layers.0.self_attn.q_proj.bias"
    bad = _rewrite(src, tmp_path / "bad2", tensor_changes={key: np.ones(64, np.float32)})
    with pytest.raises(ValueError, match="q_proj.bias.*not a LoRA factor"):
        lpeft.import_peft(bad, params, config)


Q_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"r": "four"}, r"r is 'four'; it must be a positive integer"),
        ({"r": 0}, r"r is 0; it must be a positive integer"),
        ({"r": None}, r"r is None"),
        ({"lora_alpha": "big"}, r"lora_alpha is 'big'; it must be a finite number"),
        ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern\['q_proj'\] is 2.5"),
        ({"alpha_pattern": [1]}, r"alpha_pattern is \[1\]; expected an object"),
    ],
)
def test_import_names_a_bad_rank_or_alpha(tmp_path, llama_adapter, changes, message):
    config, params, src = llama_adapter
    bad = _rewrite(src, tmp_path / "bad", config_changes=changes)
    with pytest.raises(ValueError, match=r"adapter_config\.json: " + message):
        lpeft.import_peft(bad, params, config)


def test_import_names_a_missing_rank_and_a_config_that_is_not_json(tmp_path, llama_adapter):
    config, params, src = llama_adapter
    bad = _rewrite(src, tmp_path / "bad")
    cfg = json.loads((bad / lpeft.CONFIG_NAME).read_text())
    del cfg["r"]
    (bad / lpeft.CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"adapter_config\.json: no 'r'"):
        lpeft.import_peft(bad, params, config)
    (bad / lpeft.CONFIG_NAME).write_text('{"peft_type": "LORA", r: 4}')
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON: .*line 1"):
        lpeft.import_peft(bad, params, config)
    (bad / lpeft.CONFIG_NAME).write_text("[4]")
    with pytest.raises(ValueError, match="holds list; expected a JSON object"):
        lpeft.import_peft(bad, params, config)


@pytest.mark.parametrize("missing", ["A", "B"])
def test_import_names_the_factor_that_is_missing(tmp_path, llama_adapter, missing):
    config, params, src = llama_adapter
    bad = _rewrite(src, tmp_path / "bad")
    tensors = {
        k: np.array(v) for k, v in hf.read_safetensors_file(bad / lpeft.WEIGHTS_NAME).items()
    }
    present = "B" if missing == "A" else "A"
    del tensors[Q_KEY.format(missing)]
    from safetensors.numpy import save_file

    save_file(tensors, str(bad / lpeft.WEIGHTS_NAME))
    pattern = rf"q_proj\.lora_{present}\.weight' has no matching lora_{missing} factor"
    with pytest.raises(ValueError, match=pattern):
        lpeft.import_peft(bad, params, config)


def test_import_refuses_non_finite_factors(tmp_path, llama_adapter):
    config, params, src = llama_adapter
    b = np.zeros((64, 2), np.float32)
    b[3, 1], b[5, 0] = np.nan, np.inf
    bad = _rewrite(src, tmp_path / "bad", tensor_changes={Q_KEY.format("B"): b})
    with pytest.raises(ValueError, match=r"q_proj\.lora_B\.weight' holds 2 NaN or infinite"):
        lpeft.import_peft(bad, params, config)


def test_damaged_safetensors_files_are_named_not_crashed_on(tmp_path, llama_adapter):
    """A header length of 2^40, a truncated file, offsets that lie, a short file: each a
    ValueError naming the file (never a MemoryError or a reshape error)."""
    _, _, src = llama_adapter
    good = (src / lpeft.WEIGHTS_NAME).read_bytes()
    n = int(np.frombuffer(good[:8], "<u8")[0])
    header = json.loads(good[8 : 8 + n])
    key = sorted(k for k in header if k != "__metadata__")[0]

    def damaged(name, data):
        path = tmp_path / name
        path.write_bytes(data)
        return path

    def with_header(h):
        raw = json.dumps(h).encode()
        return np.uint64(len(raw)).tobytes() + raw + good[8 + n :]

    lying = dict(header, **{key: dict(header[key], shape=[3, 3])})
    cases = {
        "huge.safetensors": (np.uint64(2**40).tobytes() + good[8:], "claims 1099511627776 bytes"),
        "truncated.safetensors": (good[: len(good) - 40], "truncated"),
        "short.safetensors": (good[:5], "too short"),
        "badjson.safetensors": (good[:8] + b"x" * n + good[8 + n :], "not valid JSON"),
        "lying.safetensors": (with_header(lying), rf"{key!s}.*do not hold its 36 bytes"),
    }
    for name, (data, message) in cases.items():
        path = damaged(name, data)
        with pytest.raises(ValueError, match=rf"{name}: .*{message}"):
            hf.read_safetensors_file(path)
    assert hf.read_safetensors_file(damaged("ok.safetensors", good)).keys() == {
        k for k in header if k != "__metadata__"
    }


# --- size ------------------------------------------------------------------------------------


def test_adapter_size_report_on_minilm(tmp_path, minilm):
    """q,v r=4 on MiniLM: 36864 params, 147456 bytes in fp32, against a ~90 MB base."""
    _, config, params = minilm
    spec = lora.make_spec("q,v", rank=4, alpha=8)
    delta = lora.init(params, spec, jax.random.key(0))
    out = lpeft.export_peft(delta, spec, config, tmp_path)
    report = lpeft.adapter_size_report(delta, params, out)
    assert report["adapter_params"] == 36864 and report["adapter_bytes"] == 36864 * 4
    n = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
    assert report["base_params"] == n and report["base_bytes"] == 4 * n
    assert report["base_over_adapter"] == pytest.approx(4 * n / (36864 * 4))
    assert 36864 * 4 < report["file_bytes"] < 36864 * 4 + 16_384  # header + config
