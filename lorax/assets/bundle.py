"""Offline asset bundles: named assets written as a self-contained, checksummed cache directory.

``python -m lorax.assets bundle --out=DIR [--dtype=bfloat16] minilm-l6 snli rotten-tomatoes``
resolves each asset here (cache, packaged copy or Hub) and writes ``DIR/<name>/`` in the
cache's own layout: its files, a manifest of their sizes and sha256 digests, ``lorax-bundle.json``
(how the bundle was made) and, last, the stamp ``bundle:<source>``. Another machine, offline,
sets ``LORAX_CACHE=DIR`` and :func:`lorax.assets.resolve` finds and checks the files there.

What a bundle changes, to stay small: with ``--dtype=bfloat16`` each float32 tensor of a
``.safetensors`` file is rounded to bfloat16 (round to nearest even; the loaders read bf16 and
cast to the run's dtype, so a float32 run sees bf16-rounded weights); the JSONL files of an
asset with ``bundle_fields`` keep only those fields of each row (a line that is not a JSON
object is kept as it is) and are stored xz-compressed, unpacked on first use and checked
against the digest recorded here. Every other file is copied as it is.
"""

from __future__ import annotations

import json
import lzma
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from lorax import assets

DTYPES = ("float32", "bfloat16")
# numpy dtype name <-> safetensors dtype name, for the tensors a cast file may hold
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
              "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
              "bool": "BOOL"}  # fmt: skip


def cast_safetensors(src: pathlib.Path, dest: pathlib.Path, dtype: str) -> None:
    """Writes ``src`` to ``dest`` with every float32 tensor cast to ``dtype`` (others as they
    are), in the safetensors layout: an 8-byte header length, the JSON header padded with
    spaces to a multiple of 8 bytes, then the tensors' bytes in header order."""
    import ml_dtypes
    from safetensors.numpy import load_file

    target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    tensors = {}
    for name, x in load_file(str(src)).items():
        tensors[name] = x.astype(target) if x.dtype == np.float32 else x
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "lorax_bundle_dtype": dtype}}
    offset = 0
    for name, x in tensors.items():
        header[name] = {"dtype": _ST_DTYPES[x.dtype.name], "shape": list(x.shape),
                        "data_offsets": [offset, offset + x.nbytes]}  # fmt: skip
        offset += x.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(dest, "wb") as f:
        f.write(np.uint64(len(text)).astype("<u8").tobytes())
        f.write(text)
        for x in tensors.values():
            f.write(np.ascontiguousarray(x).tobytes())  # native order: little-endian hosts


def pack_jsonl(src: pathlib.Path, dest: pathlib.Path, fields: Sequence[str]) -> dict[str, Any]:
    """``src`` with only ``fields`` of each row, xz-compressed into ``dest``; returns the size
    and sha256 of the uncompressed result (what unpacking must give back)."""
    import hashlib

    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as f, lzma.open(dest, "wb", preset=9) as out:
        for raw in f:
            line = _keep_fields(raw, fields)
            digest.update(line)
            size += len(line)
            out.write(line)
    return {"size": size, "sha256": digest.hexdigest()}


def _keep_fields(raw: bytes, fields: Sequence[str]) -> bytes:
    try:
        row = json.loads(raw)
    except ValueError:  # not JSON, or not UTF-8: the loader counts it, so keep it as it is
        return raw
    if not isinstance(row, dict):
        return raw
    kept = {k: row[k] for k in fields if k in row}
    return (json.dumps(kept) + "\n").encode()


def _files(src: pathlib.Path) -> list[str]:
    """The asset's files: its manifest's, else every file but lorax's bookkeeping."""
    try:
        return sorted(json.loads((src / assets.MANIFEST).read_text())["files"])
    except FileNotFoundError:
        return sorted(assets._manifest_of(src))


def bundle_one(name: str, out: pathlib.Path, dtype: str) -> pathlib.Path:
    """Writes ``out/<name>`` (see the module doc); an existing complete one of the same dtype
    is kept, one of another dtype is an error naming it."""
    asset = assets.KNOWN[name]
    dest = out / name
    if (dest / assets.COMPLETE).exists():
        made = json.loads((dest / assets.BUNDLE).read_text())
        if made["dtype"] != dtype:
            raise ValueError(f"{dest} is a {made['dtype']} bundle; remove it to write {dtype}")
        return dest
    src = assets.resolve(name)
    source = (src / assets.COMPLETE).read_text().strip()

    def fill(tmp: pathlib.Path) -> str:
        made: dict[str, Any] = {"asset": name, "source": source, "dtype": dtype,
                                "files": {}, "packed": {}}  # fmt: skip
        for rel in _files(src):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith(".safetensors") and dtype != "float32":
                cast_safetensors(src / rel, tmp / rel, dtype)
                made["files"][rel] = f"float32 tensors cast to {dtype}"
            elif rel.endswith(".jsonl") and asset.bundle_fields:
                packed = pack_jsonl(src / rel, tmp / f"{rel}.xz", asset.bundle_fields)
                made["packed"][rel] = {"from": f"{rel}.xz", **packed}
                made["files"][f"{rel}.xz"] = f"{rel}, fields {list(asset.bundle_fields)}, xz"
            else:
                shutil.copyfile(src / rel, tmp / rel)
                made["files"][rel] = "copied"
        (tmp / assets.BUNDLE).write_text(json.dumps(made, indent=1) + "\n")
        return f"bundle:{source}"

    assets._install(dest, fill, {assets.BUNDLE})
    return dest


def write(out: str | os.PathLike, names: Sequence[str], dtype: str = "float32") -> dict:
    """Bundles each of ``names`` into ``out``; returns ``{name: bytes}`` and the total, as
    stored (the bundle's files and bookkeeping; unpacked files are not counted)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r} is not valid; choose one of {DTYPES}")
    unknown = sorted(set(names) - set(assets.KNOWN))
    if unknown:
        raise ValueError(f"unknown assets {unknown}; known: {sorted(assets.KNOWN)}")
    out = pathlib.Path(out).expanduser()
    sizes = {}
    for name in names:
        dest = bundle_one(name, out, dtype)
        stored = json.loads((dest / assets.MANIFEST).read_text())["files"]
        bookkeeping = [dest / assets.MANIFEST, dest / assets.COMPLETE]
        sizes[name] = sum(f["size"] for f in stored.values()) + sum(
            p.stat().st_size for p in bookkeeping
        )
    return {"assets": sizes, "total": sum(sizes.values())}
