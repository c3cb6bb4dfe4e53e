"""Exports a trained run: ``python -m lorax.export --workdir=DIR --out=OUT [--merged]``.

Without ``--merged`` the adapter is written in PEFT's format (``adapter_config.json`` +
``adapter_model.safetensors``), for ``peft.PeftModel.from_pretrained``. With ``--merged`` the
delta is folded into the base (W0 + s·A@B) and the whole model is written as a Hugging Face
checkpoint (``config.json`` + ``model.safetensors`` + tokenizer) that ``transformers`` loads
as a plain model, with zero added inference latency.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from lorax import assets, cli, methods, paths, runfiles, runs
from lorax import data as data_lib


def merged_params(setup, trainable) -> dict[str, Any]:
    """The run's full params with the delta merged in, per-layer layout, fp32 numpy.

    Raises ValueError for a method whose delta cannot be merged (adapters, prefixes, prompts).
    """
    params = setup.method.merge(paths.overlay(setup.frozen, trainable["head"]), trainable["delta"])
    params = paths.unstack_layers(params)
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)


def export_merged(config, setup, trainable, out: str | os.PathLike) -> pathlib.Path:
    """Writes the merged model as a Hugging Face directory; returns it.

    Decoders become ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``GPT2LMHeadModel``
    checkpoints (GPT-2's q, k, v re-fused into ``c_attn``). An encoder becomes a
    ``BertModel`` checkpoint (its pooler taken from the original checkpoint, which the
    classifier does not use); the classifier head, which has no ``BertModel`` name, is written
    beside it as ``lorax_head.safetensors`` (``kernel`` [D, C], ``bias`` [C]).
    """
    from lorax import checkpoints
    from lorax.checkpoints import hf

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = merged_params(setup, trainable)
    model_dir = assets.resolve(config.model.name)
    if setup.kind == "lm":
        model_config = setup.model.config
        tensors = hf.decoder_to_hf(params, model_config)
        (out / "config.json").write_text(json.dumps(model_config.to_hf(), indent=2))
    else:
        tensors = hf.encoder_to_hf(params["encoder"])
        _, original = checkpoints.load_pretrained(model_dir)
        if "pooler" in original and "pooler" not in params["encoder"]:
            tensors.update(hf.encoder_to_hf({"pooler": original["pooler"]}))
        model_config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
        model_config.update(label_maps(config))
        (out / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
        runfiles.save_safetensors(
            {k: np.ascontiguousarray(v) for k, v in paths.flatten(params["head"]).items()},
            out / "lorax_head.safetensors",
        )
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    runfiles.save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    setup.tokenizer.save_pretrained(out)
    return out


def label_maps(config) -> dict[str, dict]:
    """``id2label`` / ``label2id`` of a classification run, as Hugging Face configs hold them
    ({} for a causal-LM run)."""
    names = data_lib.label_names(config.task)
    if not names:
        return {}
    return {
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
    }


def write_label_maps(config, out: pathlib.Path) -> None:
    """``lorax_labels.json`` beside an export of a classification run: its class names as
    ``id2label`` / ``label2id`` and its task."""
    maps = label_maps(config)
    if maps:
        runfiles.write_json_atomic(out / "lorax_labels.json", {"task": config.task.name, **maps})


def export_adapter(config, setup, trainable, out: str | os.PathLike) -> pathlib.Path:
    """Writes the run's delta as a PEFT LoRA adapter directory; returns it."""
    from lorax.checkpoints import peft

    if not isinstance(setup.method, methods.LoRA):
        raise ValueError(
            f"the run used method = {config.method!r}: there is no adapter to export; "
            "use --merged to write the whole fine-tuned model"
        )
    model_config = setup.model.config
    return peft.export_peft(
        trainable["delta"],
        setup.method.spec,
        model_config,
        out,
        base_model_name_or_path=config.model.name,
    )


def check_out_dir(out: str | os.PathLike, overwrite: bool) -> pathlib.Path:
    """``out`` as a path, refused before any work if it is a file, or a directory that is not
    empty and ``overwrite`` is false (an export over an older one would leave its stale files
    beside the new ones)."""
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out={out} is a file; name a directory to create")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        names = sorted(p.name for p in out.iterdir())
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ValueError(
            f"--out={out} is not empty ({shown}); pass --overwrite to replace it, or name a "
            "new directory"
        )
    return out


def write_replacing(out: pathlib.Path, write) -> pathlib.Path:
    """Calls ``write(tmp)`` on a fresh sibling directory, then puts it in ``out``'s place, so
    ``out`` ends holding exactly what was written (no stale files) and a failed export leaves
    the old ``out`` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if out.exists():  # else the old export is still at ``old``: leave it for the user
            shutil.rmtree(old, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- command line


def define_flags() -> None:
    """Defines the command line's flags (only when run as a program, so importing this module
    from another program defines none)."""
    flags.DEFINE_string("workdir", None, "A lorax.train run directory.")
    flags.DEFINE_string("out", None, "Directory to write.")
    flags.DEFINE_bool(
        "merged", False, "Write the merged model (Hugging Face checkpoint) instead of the adapter."
    )
    flags.DEFINE_bool(
        "overwrite", False, "Replace --out if it is a non-empty directory (its old files go)."
    )
    flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    f = flags.FLAGS
    out = check_out_dir(f.out, f.overwrite)
    config, setup, trainable = runs.load_run(f.workdir)
    export = export_merged if f.merged else export_adapter

    def write(tmp):
        export(config, setup, trainable, tmp)
        write_label_maps(config, tmp)

    write_replacing(out, write)
    files = sorted(p for p in out.iterdir() if p.is_file())
    written = sum(p.stat().st_size for p in files)
    print(f"wrote {out}: {', '.join(p.name for p in files)} ({written / 1e6:.2f} MB)")
    adapter, base = paths.nbytes(trainable["delta"]), paths.nbytes(setup.frozen)
    print(
        f"adapter {adapter / 1e6:.3f} MB (fp32) beside a frozen base of {base / 1e6:.1f} MB: "
        f"{base / max(adapter, 1):,.0f}x smaller"
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main, "lorax.export")
