"""The run-book's steps (benchmarks.runbook), in priority order, and the A/B registry.

A step is a key, a title, an estimated cost in seconds and ``run(ctx) -> result``; it runs
its work as subprocesses through ``ctx.call`` (each framework gets the device to itself) and
returns a small JSON-ready result that goes into ``records.jsonl``. It raises
:class:`Unavailable` when it cannot apply here (no speed path registered, no asset bundle).

Estimates are for one H100/H200 (the ``gpu`` profile) or this repository's 2-core CPU with
XLA's cheapest code generation (``smoke``); they are first guesses that a window replaces
with measurements only where an attempt fails or runs out of time (benchmarks.runbook).
Nothing here imports JAX or PyTorch: the steps' own processes do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any


class Unavailable(Exception):
    """The step does not apply here (recorded as 'not available', tried again next time)."""


class StepFailed(Exception):
    """A step's command exited nonzero."""


class StepTimeout(Exception):
    """A step's command outlived the budget."""


@dataclasses.dataclass(frozen=True)
class ABPair:
    """A speed path and its fallback, timed as two ``benchmarks.step`` runs of the LoRA step.

    Attributes:
      name: what the path is, e.g. "cudnn attention".
      on: ``benchmarks.step`` arguments that turn the path on.
      off: the arguments of its fallback (() = the script's defaults).
      modes: the ``--modes`` both runs time.
      gpu_only: the pair is measured on a GPU only (a CPU profile records it 'not
        available'): cuDNN runs nowhere else, and the chunked loss's CPU equality is a unit
        test (``tests/test_step_paths.py``) while ``--smoke`` keeps to its 3 minutes.
    """

    name: str
    on: tuple[str, ...]
    off: tuple[str, ...] = ()
    modes: str = "lora"
    gpu_only: bool = False


# The speed paths to A/B (step 4). To add one: give benchmarks.step a flag that selects it
# and add ABPair(name, (flags turning it on...), (its fallback's flags...)). Each side names
# both kernels explicitly, so the pair measures the same thing whatever the defaults become.
CUDNN = ABPair("cudnn attention", ("--attention=cudnn",), ("--attention=xla",), gpu_only=True)
CHUNKED = ABPair("chunked lm loss", ("--loss-chunk=64", "--loss-grad=forward"),
                 ("--loss-chunk=0",), gpu_only=True)  # fmt: skip
LOSS_GRAD = ABPair("lm loss gradient in forward", ("--loss-chunk=64", "--loss-grad=forward"),
                   ("--loss-chunk=64", "--loss-grad=recompute"), gpu_only=True)  # fmt: skip
AB_PAIRS: tuple[ABPair, ...] = (
    CUDNN,
    CHUNKED,
    LOSS_GRAD,
    ABPair("scan over layers", ("--scan",)),
    ABPair("remat each layer", ("--remat",)),
)
# The run's arguments an A/B record keeps beside its argv: the step as it ran, "auto" resolved.
RESOLVED_ARGS = ("batch", "seq", "scan", "remat", "attention_kernel", "loss_chunk_positions",
                 "loss_grad")  # fmt: skip
PROFILE = "profile"  # step 4's profile of the LoRA step with the default kernels
PROFILE_STEPS = 5  # traced steps
# Step 4's order: the speed paths' A/B, the profile (where the time goes) once the two that
# move the most are measured, then the rest.
STEP4: tuple[ABPair | str, ...] = (CUDNN, CHUNKED, PROFILE, *AB_PAIRS[2:])


@dataclasses.dataclass(frozen=True)
class Profile:
    """What a run-book run measures: full-size models on a GPU, or tiny ones on a CPU."""

    name: str
    models: tuple[str, str]  # the GPT-2 and the Llama of steps 2 and 3
    bench_args: tuple[str, ...]  # benchmarks.step / peer_torch arguments both share
    multi: int  # K of the multi-adapter mode
    ab_models: tuple[str, ...]  # the models each A/B pair runs on
    grid_args: tuple[str, ...]  # benchmarks.grid arguments
    table5: tuple[int, int]  # (seeds, steps) of step 6
    estimates: Mapping[str, float]  # seconds per kind of step
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    gpu: bool = True  # the steps run on a GPU (else the GPU-only A/B pairs are not available)


PROFILES = {
    "gpu": Profile(
        "gpu", ("gpt2-124m", "llama-1b"), ("--steps=20", "--warmup=3"), 8,
        ("gpt2-124m", "llama-1b"), (),
        table5=(3, 2000),
        # Measured on an H200 (2026-11-27): step 3's three modes 214 s, GPT-2's scan A/B 97 s;
        # a Llama A/B is two one-mode runs (process, compile, 23 steps, the matmul peak each).
        estimates={"device": 45, "lorax:gpt2-124m": 110, "peer:gpt2-124m": 150,
                   "lorax:llama-1b": 170, "peer:llama-1b": 200, "ab:gpt2-124m": 120,
                   "ab:llama-1b": 150, "grid": 330, "table5": 300},
    ),
    "smoke": Profile(
        "smoke", ("tiny-gpt2", "tiny"), ("--steps=2", "--warmup=1", "--peak-size=128"), 2,
        ("tiny",), ("--smoke",), table5=(1, 2),
        estimates={"device": 15, "lorax:tiny-gpt2": 30, "peer:tiny-gpt2": 20, "lorax:tiny": 30,
                   "peer:tiny": 20, "ab:tiny": 30, "grid": 60,
                   "table5": 300},
        # XLA's cheapest CPU code generation: the smoke run tests the sequence, not speed.
        env={"XLA_FLAGS": "--xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true",
             "JAX_PLATFORMS": "cpu"},
        gpu=False,
    ),
}  # fmt: skip


@dataclasses.dataclass
class Context:
    """What a step runs with: DIR, a scratch directory, the profile, and ``call(argv, env)``
    (runs a command against the budget's deadline, returns its output's tail)."""

    out: str
    scratch: str
    profile: Profile
    call: Callable[..., str]
    env: Mapping[str, str]

    def python(self, module: str, *argv: str, env: Mapping[str, str] | None = None) -> str:
        return self.call([sys.executable, "-m", module, *argv], env=dict(env or {}))


@dataclasses.dataclass(frozen=True)
class Step:
    """One step: ``check()`` raises :class:`Unavailable` where it cannot apply (asked before
    the budget, at no cost); ``run(ctx)`` does it and returns its result."""

    key: str
    title: str
    estimate_s: float
    run: Callable[[Context], dict[str, Any]]
    check: Callable[[], Any] = lambda: None


def plan(profile: Profile) -> list[Step]:
    """Every step of the run-book for ``profile``, highest priority first."""
    est = profile.estimates
    gpt2, llama = profile.models
    steps = [Step("1/device", "device, versions, measured bf16 matmul peak", est["device"],
                  device_step)]  # fmt: skip
    for number, model in (("2", gpt2), ("3", llama)):
        steps.append(Step(f"{number}/{model}/lorax", f"{model}: lorax LoRA, full FT, "
                          f"K={profile.multi} adapters", est[f"lorax:{model}"],
                          _bound(lorax_step, model)))  # fmt: skip
        steps.append(Step(f"{number}/{model}/peer", f"{model}: PEFT eager and torch.compile",
                          est[f"peer:{model}"], _bound(peer_step, model)))  # fmt: skip
    if not AB_PAIRS:
        steps.append(Step("4/ab", "A/B of the speed paths", 0, None, ab_unavailable))
    for pair in STEP4:
        if pair == PROFILE:
            steps.extend(Step(f"4/profile/{model}", f"profile of the LoRA step on {model}",
                              est[f"ab:{model}"] * 0.6, _bound(profile_step, model))
                         for model in profile.ab_models)  # fmt: skip
            continue
        for model in profile.ab_models:
            key = f"4/ab/{_slug(pair.name)}/{model}"
            check = _gpu_only if pair.gpu_only and not profile.gpu else (lambda: None)
            steps.append(Step(key, f"A/B {pair.name} on {model}", est[f"ab:{model}"],
                              _bound(ab_step, pair, model), check))  # fmt: skip
    steps.append(Step("5/grid", "Table-5 grid: multi-adapter jobs vs one by one", est["grid"],
                      grid_step))  # fmt: skip
    for task in ("rotten_tomatoes", "snli"):
        steps.append(Step(f"6/table5/{task}", f"experiments.table5 minilm-l6 {task}",
                          est["table5"], _bound(table5_step, task), bundle_root))  # fmt: skip
    return steps


def _bound(fn, *args) -> Callable[[Context], dict[str, Any]]:
    return lambda ctx: fn(ctx, *args)


def _slug(name: str) -> str:
    return "-".join(name.lower().split())


def _read(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- the steps


def device_step(ctx: Context) -> dict[str, Any]:
    """Step 1: what the device and its software are, and its measured bf16 matmul peak."""
    path = os.path.join(ctx.scratch, "device.json")
    ctx.python("benchmarks.probe", f"--record={path}", *(("--smoke",) if _smoke(ctx) else ()))
    return _read(path)


def _smoke(ctx: Context) -> bool:
    return ctx.profile.name == "smoke"


def lorax_step(ctx: Context, model: str) -> dict[str, Any]:
    """Steps 2 and 3, lorax's side: LoRA, full fine-tuning and K adapters at once."""
    record = os.path.join(ctx.out, f"lorax-{model}.json")
    ctx.python("benchmarks.step", f"--model={model}", *ctx.profile.bench_args,
               "--modes=lora,full", f"--multi={ctx.profile.multi}", f"--record={record}",
               f"--results-dir={os.path.join(ctx.scratch, 'results')}")  # fmt: skip
    return {"record": os.path.basename(record), **_headline(_read(record))}


def peer_step(ctx: Context, model: str) -> dict[str, Any]:
    """Steps 2 and 3, the peer's side: PEFT eager and ``torch.compile`` (eager on a CPU)."""
    record = os.path.join(ctx.out, f"peer-{model}.json")
    ctx.python("benchmarks.peer_torch", f"--model={model}", *ctx.profile.bench_args,
               f"--record={record}", f"--results-dir={os.path.join(ctx.scratch, 'results')}",
               env={"JAX_PLATFORMS": "cpu"})  # fmt: skip
    return {"record": os.path.basename(record), **_headline(_read(record))}


def _headline(record: Mapping[str, Any]) -> dict[str, Any]:
    """tokens/s of each mode of a benchmark record (the record itself stays in its file)."""
    return {"tokens_per_s": {m: f["tokens_per_s"] for m, f in record["modes"].items()}}


def ab_unavailable() -> None:
    raise Unavailable("no speed path is registered (benchmarks.runbook_steps.AB_PAIRS is empty)")


def _gpu_only() -> None:
    raise Unavailable("this A/B pair is measured on a GPU only")


def ab_step(ctx: Context, pair: ABPair, model: str) -> dict[str, Any]:
    """Step 4: the path on, then its fallback, each ``benchmarks.step`` in its own process."""
    sides = {}
    for side, argv in (("on", pair.on), ("off", pair.off)):
        record = os.path.join(ctx.scratch, "ab", f"{_slug(pair.name)}-{model}-{side}.json")
        ctx.python("benchmarks.step", f"--model={model}", *ctx.profile.bench_args,
                   f"--modes={pair.modes}", *argv, f"--record={record}",
                   f"--results-dir={os.path.join(ctx.scratch, 'results')}")  # fmt: skip
        r = _read(record)
        sides[side] = {
            "argv": list(argv),
            # what the defaults resolved to on that device (benchmarks.calibrate rebuilds it)
            "args": {k: r["args"].get(k) for k in RESOLVED_ARGS},
            "modes": {m: {k: f.get(k) for k in ("tokens_per_s", "step_s", "compile_s",
                                                 "peak_bytes", "xla_bytes", "mfu_measured")}
                      for m, f in r["modes"].items()},
        }  # fmt: skip
    ratios = {
        m: sides["on"]["modes"][m]["tokens_per_s"] / sides["off"]["modes"][m]["tokens_per_s"]
        for m in sides["on"]["modes"]
    }
    return {"pair": pair.name, "model": model, **sides, "on/off tokens_per_s": ratios}


def profile_step(ctx: Context, model: str) -> dict[str, Any]:
    """Step 4's profile: the LoRA step with the default kernels, timed, then
    :data:`PROFILE_STEPS` steps traced (``benchmarks.step --profile``, :mod:`benchmarks.xprof`):
    where its time goes, by kind of work, part of the model and pass."""
    record = os.path.join(ctx.scratch, "profile", f"{model}.json")
    ctx.python("benchmarks.step", f"--model={model}", *ctx.profile.bench_args, "--modes=lora",
               f"--profile={PROFILE_STEPS}", f"--record={record}",
               f"--results-dir={os.path.join(ctx.scratch, 'results')}")  # fmt: skip
    r = _read(record)
    lora = r["modes"]["lora"]
    keep = ("attention_kernel", "loss_chunk_positions", "loss_grad", "scan", "remat")
    return {"model": model, "args": {k: r["args"].get(k) for k in keep},
            "tokens_per_s": lora["tokens_per_s"], "step_s": lora["step_s"],
            "profile": lora["profile"]}  # fmt: skip


def grid_step(ctx: Context) -> dict[str, Any]:
    """Step 5: the Table-5 grid as multi-adapter jobs against one-by-one runs, wall-clock
    including compile (benchmarks.grid), without the persistent compilation cache."""
    path = os.path.join(ctx.scratch, "grid.json")
    workdir = os.path.join(ctx.scratch, "grid")
    env = {"JAX_ENABLE_COMPILATION_CACHE": "false", "JAX_COMPILATION_CACHE_DIR": ""}
    ctx.python("benchmarks.grid", f"--record={path}", f"--workdir={workdir}",
               *ctx.profile.grid_args, env=env)  # fmt: skip
    return _read(path)


def bundle_root() -> str:
    """The asset bundle step 6 reads: ``$LORAX_CACHE`` when it holds MiniLM-L6 and both data
    sets; raises :class:`Unavailable` naming what is missing otherwise."""
    root = os.environ.get("LORAX_CACHE", "")
    if not root:
        raise Unavailable("no asset bundle: LORAX_CACHE is not set (python -m lorax.assets bundle)")
    missing = [
        name
        for name in ("minilm-l6", "rotten-tomatoes", "snli")
        if not os.path.exists(os.path.join(root, name, ".lorax-complete"))
    ]
    if missing:
        raise Unavailable(f"LORAX_CACHE={root} lacks the assets {missing}")
    return root


def table5_step(ctx: Context, task: str) -> dict[str, Any]:
    """Step 6: experiments.table5 on (MiniLM-L6, task), every seed, at the profile's steps."""
    seeds, steps = ctx.profile.table5
    root = os.path.join(ctx.scratch, "studies")
    ctx.python("experiments.table5", "--model=minilm-l6", f"--task={task}", f"--seeds={seeds}",
               f"--steps={steps}", f"--root={root}", "--verbosity=-1")  # fmt: skip
    study = _read(os.path.join(root, f"table5_minilm-l6_{task}", "results.json"))
    keep = ("name", "validation_accuracy", "test_accuracy", "lora_params", "wall_seconds",
            "train_seconds", "platform")  # fmt: skip
    rows = [{k: row.get(k) for k in keep} for row in study["runs"]]
    return {"task": task, "seeds": seeds, "steps": steps, "runs": rows}
