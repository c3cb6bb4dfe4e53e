"""``model.name = "hf:org/name"``: any Hugging Face Hub model, downloaded into the cache.

Only what lorax reads is fetched (config, safetensors weights or shards, tokenizer files),
into ``<cache>/hf/<org>--<name>``; a second use touches no network. Offline (no network,
``HF_HUB_OFFLINE`` / ``LORAX_OFFLINE`` set) a model not yet downloaded is a clear error.
"""

from __future__ import annotations

import pathlib
import re

PREFIX = "hf:"
PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "*.model",
]  # fmt: skip
_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")


def download(spec: str, cache_root: pathlib.Path, offline: bool) -> pathlib.Path:
    """The local directory of ``hf:org/name[@revision]``, downloading it unless cached."""
    repo, _, revision = spec[len(PREFIX) :].partition("@")
    if not _REPO.match(repo):
        raise ValueError(f"model.name = {spec!r}: expected hf:org/name (or hf:org/name@revision)")
    dest = cache_root / "hf" / repo.replace("/", "--") / (revision or "main")
    if (dest / "config.json").exists():
        return dest
    if offline:
        raise ValueError(
            f"model.name = {spec!r} is not in the cache ({dest}) and this machine is offline "
            "(HF_HUB_OFFLINE / LORAX_OFFLINE): download it where the Hub is reachable, then "
            "copy the directory here and give its path as model.name"
        )
    import huggingface_hub

    try:
        huggingface_hub.snapshot_download(
            repo, revision=revision or None, local_dir=dest, allow_patterns=PATTERNS
        )
    except Exception as e:  # noqa: BLE001 -- no network, no such repo, gated: all said alike
        raise ValueError(
            f"model.name = {spec!r}: could not download it from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); give a local "
            "model directory instead"
        ) from None
    if not (dest / "config.json").exists():
        raise ValueError(f"model.name = {spec!r}: the repo has no config.json; is it a model?")
    return dest
