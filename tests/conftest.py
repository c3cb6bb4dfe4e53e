"""Shared fixtures: the real assets, resolved once per session through lorax.assets.

They resolve into the real cache (``cache_root()``: $LORAX_CACHE or ~/.cache/lorax), so the
first run on a fresh machine downloads each packaged copy once (pip, a few seconds) and every
later run and test module is a cache hit.

Compiled XLA executables are shared too: every test and every command a test starts in a
subprocess (which inherits the environment) reads and writes one persistent compilation
cache, ``.jax-cache/`` in the repository (``LORAX_TEST_JAX_CACHE`` to move it), so a step the
suite has compiled once (the tiny model's, the kill tests' reruns of one command) is not
compiled again. The cache is keyed by the program, the jax version and the flags, so a hit
runs the very executable a fresh compile would build.
"""

import json
import os
import shutil

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.environ.get("LORAX_TEST_JAX_CACHE", os.path.join(_REPO, ".jax-cache")),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The suite runs on the CPU. Pinning it lets JAX's CUDA plugin (the [plan] extra), where
# installed, load without a CUDA runtime and describe GPUs for tests/test_plan.py.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # after the cache settings, which jax reads when it is imported
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from lorax import assets
from lorax.checkpoints import hf
from lorax.models import encoder


@pytest.fixture(scope="session")
def minilm_dir():
    """all-MiniLM-L6-v2 in Hugging Face layout (packaged copy, cached under LORAX_CACHE)."""
    return assets.resolve("minilm-l6")


@pytest.fixture(scope="session")
def snli_dir():
    """SNLI train subset + official test set as train.jsonl / test.jsonl."""
    return assets.resolve("snli")


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    """MiniLM's real (fast) tokenizer."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(minilm_dir))


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A Hugging Face-layout BERT directory: random tiny weights, MiniLM's real tokenizer."""
    d = tmp_path_factory.mktemp("tiny_bert")
    cfg = {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 256,
        "max_position_embeddings": 128,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "pad_token_id": 0,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    model = encoder.Encoder(encoder.EncoderConfig.from_hf(cfg), with_pooler=True)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), ids, ids, jnp.ones_like(ids))["params"]
    params = jax.tree_util.tree_map(np.asarray, params)
    save_file(hf.encoder_to_hf(params), str(d / "model.safetensors"))
    minilm = assets.resolve("minilm-l6")
    for name in TOKENIZER_FILES:
        shutil.copy(minilm / name, d / name)
    return d


@pytest.fixture(scope="module")
def tiny_snli_dir(tmp_path_factory):
    """The first 600 train and 200 test rows of real SNLI (including '-' rows to skip)."""
    d = tmp_path_factory.mktemp("tiny_snli")
    src = assets.resolve("snli")
    for name, n in (("train.jsonl", 600), ("test.jsonl", 200)):
        with open(src / name) as f, open(d / name, "w") as out:
            out.writelines(line for _, line in zip(range(n), f, strict=False))
    return d
