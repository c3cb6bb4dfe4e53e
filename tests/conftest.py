"""Shared fixtures: the real assets, resolved once per session through lorax.assets.

They resolve into the real cache (``cache_root()``: $LORAX_CACHE or ~/.cache/lorax), so the
first run on a fresh machine downloads each packaged copy once (pip, a few seconds) and every
later run and test module is a cache hit.
"""

import pytest

from lorax import assets


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
