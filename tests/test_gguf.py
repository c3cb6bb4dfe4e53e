"""GGUF loading: the real SmolLM2 Q4_1 file against transformers' own GGUF loader, the RoPE row
permutation, the rebuilt tokenizer, and clear errors on bad files (tiny GGUFs written here)."""

import gguf
import numpy as np
import pytest

from lorax import assets
from lorax.checkpoints import gguf as lg

# --- the real file -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_gguf():
    """The packaged SmolLM2-135M-Instruct Q4_1 GGUF (cached under LORAX_CACHE)."""
    path = lg.find_gguf(assets.resolve("smollm2-135m"))
    assert path is not None, "the smollm2-135m asset should hold a .gguf file"
    return path


@pytest.fixture(scope="module")
def smollm2_raw(smollm2_gguf):
    """``(metadata, tensors)``: the file as read, dequantized but not renamed or unpermuted."""
    return lg.read_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2(smollm2_raw):
    """``(config, flat params)`` as lorax loads them (the steps of ``load_llama``)."""
    metadata, tensors = smollm2_raw
    config = lg.llama_config(metadata, tensors)
    return config, lg.llama_to_canonical(tensors, config)


@pytest.fixture(scope="module")
def reference_state(smollm2_gguf, smollm2):
    """transformers' own dequantized, unpermuted weights for the same file, as numpy.

    ``LlamaForCausalLM.from_pretrained(..., gguf_file=...)`` also needs ``accelerate``, which
    is not a dependency; this calls the GGUF loader it uses, with the model built on the meta
    device only so that loader can name the tensors.
    """
    torch = pytest.importorskip("torch")
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # The model only tells the loader which names to use; the config it returns is its own.
    config = transformers.LlamaConfig(**{k: v for k, v in smollm2[0].items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    loaded = load_gguf_checkpoint(
        str(smollm2_gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )
    return loaded["config"], {k: v.numpy() for k, v in loaded["tensors"].items()}


@pytest.mark.slow
def test_smollm2_config_and_shapes(smollm2):
    """The config read from metadata is SmolLM2-135M's, and every param has its shape."""
    config, flat = smollm2
    want = {
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {k: config[k] for k in want} == want
    assert config["model_type"] == "llama"
    assert "lm_head/kernel" not in flat  # tied: the output matrix is the embedding
    assert len(flat) == 2 + 30 * 9
    assert flat["embed/token/embedding"].shape == (49152, 576)
    assert flat["layers_29/attn/q/kernel"].shape == (576, 576)
    assert flat["layers_0/attn/k/kernel"].shape == (576, 192)
    assert flat["layers_0/attn/o/kernel"].shape == (576, 576)
    assert flat["layers_0/mlp/mlp_gate/kernel"].shape == (576, 1536)
    assert flat["layers_0/mlp/mlp_out/kernel"].shape == (1536, 576)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in flat.values())


@pytest.mark.slow
def test_config_agrees_with_transformers(smollm2, reference_state):
    """Our metadata -> config translation gives the values transformers derives."""
    config, _ = smollm2
    ref, _ = reference_state
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert config[key] == ref[key], key
    assert config["rms_norm_eps"] == pytest.approx(ref["rms_norm_eps"])


_HF_NAMES = {
    "embed/token/embedding": ("model.embed_tokens.weight", False),
    "final_norm/scale": ("model.norm.weight", False),
    "attn_norm/scale": ("input_layernorm.weight", False),
    "attn/q/kernel": ("self_attn.q_proj.weight", True),
    "attn/k/kernel": ("self_attn.k_proj.weight", True),
    "attn/v/kernel": ("self_attn.v_proj.weight", True),
    "attn/o/kernel": ("self_attn.o_proj.weight", True),
    "mlp_norm/scale": ("post_attention_layernorm.weight", False),
    "mlp/mlp_gate/kernel": ("mlp.gate_proj.weight", True),
    "mlp/mlp_in/kernel": ("mlp.up_proj.weight", True),
    "mlp/mlp_out/kernel": ("mlp.down_proj.weight", True),
}


@pytest.mark.slow
def test_weights_match_transformers_gguf_loader(smollm2, reference_state):
    """Every dequantized, unpermuted weight equals transformers' (which undoes llama.cpp's Q/K
    permutation itself), after our transpose to [in, out]; no tensor is left over."""
    _, flat = smollm2
    _, ref = reference_state
    seen = set()
    for path, ours in flat.items():
        layer, _, rest = path.partition("/")
        if layer.startswith("layers_"):
            name, transpose = _HF_NAMES[rest]
            name = f"model.layers.{layer.removeprefix('layers_')}.{name}"
        else:
            name, transpose = _HF_NAMES[path]
        theirs = ref[name].T if transpose else ref[name]
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6, err_msg=path)
        seen.add(name)
    assert seen == set(ref)


def _rope(x_THE, inv_freq, interleaved):
    """RoPE on [T, H, E]: rotate-half pairs (j, j + E/2), or interleaved pairs (2j, 2j + 1)."""
    angles = np.arange(x_THE.shape[0])[:, None] * inv_freq[None, :]  # [T, E/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    if interleaved:
        a, b = x_THE[..., 0::2], x_THE[..., 1::2]
        out = np.empty_like(x_THE)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out
    a, b = np.split(x_THE, 2, axis=-1)
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


@pytest.mark.slow
def test_unpermuted_qk_with_rotate_half_equals_gguf_with_interleaved_rope(smollm2, smollm2_raw):
    """Independent of transformers: attention scores from our Q/K (rotate-half RoPE, Hugging
    Face style) equal those from the raw GGUF Q/K with llama.cpp's interleaved RoPE."""
    config, flat = smollm2
    raw = smollm2_raw[1]
    H, K, E = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, E, 2) / E)
    x_TD = np.random.default_rng(0).normal(size=(7, config["hidden_size"]))

    def scores(wq_DHE, wk_DKE, interleaved):
        q = _rope((x_TD @ wq_DHE).reshape(-1, H, E), inv_freq, interleaved)
        k = _rope((x_TD @ wk_DKE).reshape(-1, K, E), inv_freq, interleaved)
        k = np.repeat(k, H // K, axis=1)  # grouped-query: query head h reads kv head h // (H/K)
        return np.einsum("thd,shd->hts", q, k)

    ours = scores(flat["layers_3/attn/q/kernel"], flat["layers_3/attn/k/kernel"], False)
    gguf_way = scores(raw["blk.3.attn_q.weight"].T, raw["blk.3.attn_k.weight"].T, True)
    np.testing.assert_allclose(ours, gguf_way, rtol=1e-6, atol=1e-4)
    wrong = scores(raw["blk.3.attn_q.weight"].T, raw["blk.3.attn_k.weight"].T, False)
    assert not np.allclose(wrong, gguf_way, atol=1e-2)  # the permutation matters here


# --- the permutation -----------------------------------------------------------------------


@pytest.mark.parametrize("n_heads", [9, 3])  # SmolLM2's query heads, and its key/value heads
def test_rope_row_permutation_inverse(n_heads):
    """gguf_to_hf_rows undoes hf_to_gguf_rows (and vice versa), and neither is the identity."""
    rng = np.random.default_rng(n_heads)
    w = rng.normal(size=(n_heads * 64, 576)).astype(np.float32)
    there = lg.hf_to_gguf_rows(w, n_heads)
    assert not np.array_equal(there, w)
    np.testing.assert_array_equal(lg.gguf_to_hf_rows(there, n_heads), w)
    np.testing.assert_array_equal(lg.hf_to_gguf_rows(lg.gguf_to_hf_rows(w, n_heads), n_heads), w)


def test_rope_row_permutation_order():
    """One head of 8 rows: rotate-half rows (0..3 | 4..7) interleave as 0, 4, 1, 5, 2, 6, 3, 7."""
    rows = np.arange(16)[:, None]  # two heads
    interleaved = [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert lg.hf_to_gguf_rows(rows, 2)[:, 0].tolist() == interleaved
    with pytest.raises(ValueError, match="12 rows do not split into 5 heads"):
        lg.gguf_to_hf_rows(np.zeros((12, 3)), 5)


# --- the tokenizer -------------------------------------------------------------------------

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It wasn't the dog's fault!",
    "In 2024, 3.14159 * 1,000,000 = 3141590 (approx.) and 0x1F is 31.",
    "naïve café, Straße, 東京, Привет мир, 😀👍🏽, x²①",
    "   leading spaces, two  spaces, trailing   ",
    "line one\nline two\n\n\ttabbed\r\nwindows",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square\n",
]


@pytest.fixture(scope="module")
def tokenizers_pair(smollm2_gguf):
    """(ours, transformers' AutoTokenizer built from the same GGUF's metadata)."""
    import transformers

    ours = lg.tokenizer_from_gguf(smollm2_gguf)
    reference = transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name
    )
    return ours, reference


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers_and_round_trips(tokenizers_pair, text):
    """Same ids as transformers' GGUF tokenizer; decoding gives the text back exactly."""
    ours, reference = tokenizers_pair
    ids = ours(text)["input_ids"]
    assert ids == reference(text)["input_ids"]
    assert ours.decode(ids) == text


@pytest.mark.slow
def test_tokenizer_special_tokens(tokenizers_pair):
    """Special tokens come from the file's ids, stay whole, and no BOS/EOS is added."""
    ours, reference = tokenizers_pair
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.bos_token == reference.bos_token and ours.eos_token == reference.eos_token
    assert len(ours) == len(reference) == 49152
    assert ours("<|im_end|>hi")["input_ids"][0] == 2  # a control token is one id
    assert ours("hi")["input_ids"] == reference("hi")["input_ids"]  # no BOS added
    assert ours.decode(ours("a<|im_end|>")["input_ids"], skip_special_tokens=True) == "a"


@pytest.mark.slow
def test_tokenizer_splits_digits_one_by_one(tokenizers_pair):
    """SmolLM's pre-tokenizer ("smollm") puts each digit in its own token."""
    ours, _ = tokenizers_pair
    tokens = ours.convert_ids_to_tokens(ours("x 12345")["input_ids"])
    assert tokens == ["x", "Ġ", "1", "2", "3", "4", "5"]


@pytest.mark.slow
def test_tokenizer_follows_llama_cpp_where_transformers_ignores_pre_type(tokenizers_pair):
    """The one known difference: transformers ignores tokenizer.ggml.pre = "smollm", so a space
    before a non-ASCII numeral joins it there. llama.cpp (and SmolLM's own tokenizer.json) split
    each numeral off first, as we do. ASCII digits never merge in this vocabulary, so they agree."""
    ours, reference = tokenizers_pair
    text = "a ½ b"
    assert ours.convert_ids_to_tokens(ours(text)["input_ids"]) == ["a", "Ġ", "Â½", "Ġb"]
    assert reference.convert_ids_to_tokens(reference(text)["input_ids"]) == ["a", "ĠÂ", "½", "Ġb"]
    assert ours.decode(ours(text)["input_ids"]) == text


# --- bad inputs (tiny GGUFs written here) --------------------------------------------------

TINY = dict(D=8, H=2, K=1, E=4, F=16, V=12, L=2)


def _tiny_params(rng):
    """Canonical params of a tiny untied llama (in Hugging Face RoPE layout)."""
    c = TINY
    D, HE, KE, F, V = c["D"], c["H"] * c["E"], c["K"] * c["E"], c["F"], c["V"]
    shapes = {"embed/token/embedding": (V, D), "final_norm/scale": (D,), "lm_head/kernel": (D, V)}
    for i in range(c["L"]):
        shapes |= {
            f"layers_{i}/attn_norm/scale": (D,),
            f"layers_{i}/attn/q/kernel": (D, HE),
            f"layers_{i}/attn/k/kernel": (D, KE),
            f"layers_{i}/attn/v/kernel": (D, KE),
            f"layers_{i}/attn/o/kernel": (HE, D),
            f"layers_{i}/mlp_norm/scale": (D,),
            f"layers_{i}/mlp/mlp_gate/kernel": (D, F),
            f"layers_{i}/mlp/mlp_in/kernel": (D, F),
            f"layers_{i}/mlp/mlp_out/kernel": (F, D),
        }
    return {p: rng.normal(size=s).astype(np.float32) for p, s in shapes.items()}


def _write_tiny(path, params, arch="llama", drop=(), extra=None):
    """Writes ``params`` as llama.cpp would: PyTorch orientation, Q/K rows permuted."""
    c = TINY
    heads = {"q": c["H"], "k": c["K"]}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", c["L"])
    w.add_uint32(f"{arch}.context_length", 64)
    w.add_uint32(f"{arch}.embedding_length", c["D"])
    w.add_uint32(f"{arch}.feed_forward_length", c["F"])
    w.add_uint32(f"{arch}.attention.head_count", c["H"])
    w.add_uint32(f"{arch}.attention.head_count_kv", c["K"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_uint32(f"{arch}.vocab_size", c["V"])
    for gname, ours, how in lg.LLAMA_NAMES:
        for i in range(c["L"]) if "{i}" in gname else [None]:
            name = gname.replace("{i}", str(i))
            if name in drop:
                continue
            a = params[ours.replace("{i}", str(i))]
            if how:
                a = a.T
            if how in heads:
                a = lg.hf_to_gguf_rows(a, heads[how])
            w.add_tensor(name, np.ascontiguousarray(a))
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_round_trip(tmp_path):
    """Params written the llama.cpp way (transposed, Q/K permuted) load back exactly."""
    params = _tiny_params(np.random.default_rng(0))
    path = _write_tiny(tmp_path / "tiny.gguf", params)
    config, flat = lg.load_llama(tmp_path)  # a directory with one .gguf works too
    assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == 1
    assert config["rms_norm_eps"] == 1e-6 and config["bos_token_id"] is None
    assert sorted(flat) == sorted(params)
    for p in params:
        np.testing.assert_array_equal(flat[p], params[p], err_msg=p)
    _, flat16 = lg.load_llama(path, dtype=np.float16)
    assert flat16["lm_head/kernel"].dtype == np.float16


def test_non_llama_architecture_is_refused(tmp_path):
    """A GGUF of another architecture fails naming it and the valid one."""
    path = _write_tiny(tmp_path / "g.gguf", _tiny_params(np.random.default_rng(0)), arch="gpt2")
    with pytest.raises(ValueError, match=r"architecture is 'gpt2'.*\['llama'\]"):
        lg.load_llama(path)
    with pytest.raises(ValueError, match=r"architecture is None"):
        lg.llama_config({}, [])


def test_missing_tensor_is_named(tmp_path):
    """A file without a needed tensor fails naming the canonical path and its shape."""
    params = _tiny_params(np.random.default_rng(0))
    path = _write_tiny(tmp_path / "m.gguf", params, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(
        ValueError, match=r"lacks the weight for layers_1/mlp/mlp_in/kernel \(8, 16\)"
    ):
        lg.load_llama(path)


def test_unknown_tensor_is_named(tmp_path):
    """A tensor outside the llama table fails naming it."""
    params = _tiny_params(np.random.default_rng(0))
    extra = {"blk.0.attn_q.bias": np.zeros(8, np.float32)}
    path = _write_tiny(tmp_path / "u.gguf", params, extra=extra)
    with pytest.raises(ValueError, match=r"tensor 'blk.0.attn_q.bias' is not a llama tensor"):
        lg.load_llama(path)


def test_missing_metadata_key_is_named():
    """Metadata without a needed key fails naming the key."""
    with pytest.raises(ValueError, match=r"lacks 'llama.embedding_length'"):
        lg.llama_config({"general.architecture": "llama"}, [])


def test_find_gguf(tmp_path):
    """None for a directory without GGUF; an error naming the files when there are several."""
    assert lg.find_gguf(tmp_path) is None
    (tmp_path / "a.gguf").write_bytes(b"")
    assert lg.find_gguf(tmp_path) == tmp_path / "a.gguf"
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"2 GGUF files \['a.gguf', 'b.gguf'\]"):
        lg.find_gguf(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a .gguf file"):
        lg.load_llama(tmp_path / "nope")


def test_smollm2_hub_fallback_is_the_hugging_face_layout(tmp_path, monkeypatch):
    """Without the package, smollm2-135m comes from the Hub in safetensors layout (no GGUF);
    the Hub call is faked here, and only the registered Hub files are asked for."""
    import huggingface_hub

    asked = []

    def no_package(asset, into):
        raise RuntimeError("no index")

    def fake_snapshot(repo_id, local_dir, allow_patterns):
        asked.append((repo_id, allow_patterns))
        for name in allow_patterns:
            (local_dir / name).write_text("{}")

    monkeypatch.setattr(assets, "_download_package", no_package)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    d = assets.resolve("smollm2-135m", cache_dir=tmp_path / "cache", allow_hub=True)
    hub_files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert asked == [("HuggingFaceTB/SmolLM2-135M-Instruct", hub_files)]
    assert lg.find_gguf(d) is None and (d / "model.safetensors").is_file()
    assert (d / assets.COMPLETE).read_text().strip() == "hub:HuggingFaceTB/SmolLM2-135M-Instruct"


def test_the_chat_template_is_kept_and_survives_save_pretrained(smollm2_gguf, tmp_path):
    """The GGUF's tokenizer.chat_template is the tokenizer's (so a merged export's tokenizer
    files carry it), and lorax.generate --chat wraps a prompt as the model's own user turn."""
    import transformers

    from lorax import generate

    ours = lg.tokenizer_from_gguf(smollm2_gguf)
    assert ours.chat_template == lg.read_gguf_metadata(smollm2_gguf)["tokenizer.chat_template"]
    (prompt,) = generate.chat_prompts(ours, ["What is 2+2?"])
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")
    ours.save_pretrained(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded.chat_template == ours.chat_template
    ours.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        generate.chat_prompts(ours, ["hi"])
