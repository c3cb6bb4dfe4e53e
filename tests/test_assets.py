"""Tests of asset resolution (lorax/assets.py): path, cache, packaged copy, hub, errors."""

import hashlib
import io
import pathlib
import subprocess
import zipfile

import pytest

from lorax import assets


def _fake_asset(tmp_path, payload=b"weights"):
    """A tiny 'package' (a zip) and an Asset pinned to its sha256, served by a fake pip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pkg/model/config.json", "{}")
        z.writestr("pkg/model/model.bin", payload)
    data = buf.getvalue()
    asset = assets.Asset(package="fake-pkg==1.0", sha256=hashlib.sha256(data).hexdigest(),
                         members={"pkg/model/config.json": "config.json",
                                  "pkg/model/model.bin": "model.bin"})
    return asset, data


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Registers asset 'fake' whose download is a local zip; counts pip calls."""
    asset, data = _fake_asset(tmp_path)
    monkeypatch.setitem(assets.KNOWN, "fake", asset)
    calls = []

    def fake_download(a, into):
        calls.append(a.package)
        out = pathlib.Path(into) / "fake_pkg-1.0-py3-none-any.whl"
        out.write_bytes(data)
        return out

    monkeypatch.setattr(assets, "_download_package", fake_download)
    return calls


def test_packaged_copy_is_unpacked_then_cache_hits_without_network(fake, tmp_path):
    """First resolve fetches the package once and unpacks the members; the second is a cache
    hit that never calls pip."""
    d = assets.resolve("fake", cache_dir=tmp_path)
    assert (d / "model.bin").read_bytes() == b"weights"
    assert (d / assets.COMPLETE).exists()
    assert fake == ["fake-pkg==1.0"]
    assert assets.resolve("fake", cache_dir=tmp_path) == d
    assert fake == ["fake-pkg==1.0"]


def test_sha256_mismatch_is_refused_and_leaves_no_cache(fake, tmp_path, monkeypatch):
    """A downloaded file whose digest differs from the pinned one is refused, nothing is left in
    the cache, and the hub is not tried when offline."""
    def hub(dest):
        raise AssertionError("the hub must not be reached offline")

    monkeypatch.setitem(assets.KNOWN, "fake", assets.Asset(
        package="fake-pkg==1.0", sha256="0" * 64, members={"pkg/model/config.json": "c"},
        hub_fetch=hub))
    monkeypatch.setenv("LORAX_OFFLINE", "1")
    with pytest.raises(RuntimeError,
                       match=r"(?s)sha256 \w+, expected 0{64}.*Hub: not tried \(offline\)"):
        assets.resolve("fake", cache_dir=tmp_path)
    assert not (tmp_path / "fake").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fake-")]


def test_incomplete_cache_directory_is_rebuilt(fake, tmp_path):
    """A cache directory without the completion marker (a crashed fetch) is not trusted."""
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "model.bin").write_bytes(b"half")
    d = assets.resolve("fake", cache_dir=tmp_path)
    assert (d / "model.bin").read_bytes() == b"weights"


def test_hub_is_used_only_when_online(tmp_path, monkeypatch):
    """When the packaged copy fails, the hub step runs if allowed and is skipped offline."""
    fetched = []
    asset = assets.Asset(package="nope==0", sha256="0" * 64, members={},
                         hub_fetch=lambda dest: (fetched.append(dest),
                                                 (dest / "config.json").write_text("{}")))
    monkeypatch.setitem(assets.KNOWN, "hubonly", asset)

    def failing(a, into):
        raise RuntimeError("no such package")

    monkeypatch.setattr(assets, "_download_package", failing)
    with pytest.raises(RuntimeError, match="(?s)no such package.*not tried"):
        assets.resolve("hubonly", cache_dir=tmp_path, allow_hub=False)
    assert not fetched
    d = assets.resolve("hubonly", cache_dir=tmp_path, allow_hub=True)
    assert (d / "config.json").exists() and len(fetched) == 1


def test_local_path_passes_through_and_unknown_name_lists_known(tmp_path):
    """An existing path is returned as is; an unknown name lists the known assets."""
    assert assets.resolve(tmp_path) == tmp_path
    with pytest.raises(ValueError, match=r"known assets: \['minilm-l6', 'snli'"):
        assets.resolve("gpt-17")


def test_real_assets_are_complete(minilm_dir, snli_dir):
    """The packaged MiniLM and SNLI resolved into the cache with the files the code needs."""
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert (minilm_dir / name).is_file(), name
    for name in ("train.jsonl", "test.jsonl"):
        assert (snli_dir / name).is_file(), name


def test_command_line_fetch_reports_paths(minilm_dir):
    """`python -m lorax.assets minilm-l6` prints where the asset lives (a cache hit here)."""
    import sys

    out = subprocess.run([sys.executable, "-m", "lorax.assets", "minilm-l6"],
                         capture_output=True, text=True, check=True)
    assert str(minilm_dir) in out.stdout
