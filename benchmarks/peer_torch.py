"""The peer: the same LoRA step in PyTorch + transformers + PEFT.

``python -m benchmarks.peer_torch --model=gpt2-124m --batch=16 --seq=1024``

The model is built from the same Hugging Face config dict as lorax's (benchmarks.models),
random-init, with SDPA attention (no attention mask is passed, so it runs causal flash
attention); its base weights are stored in bf16 and PEFT keeps the adapters in fp32
(``autocast_adapter_dtype``). A step is: forward under bf16 autocast with the loss
computed by the model (logits upcast to fp32), backward, global-norm clip 1.0 over the
adapters, AdamW (``fused=True`` on CUDA), ``zero_grad``. Modes: ``eager`` and ``compile``
(``torch.compile`` of the model), each on a freshly built model. Timing matches
benchmarks.step: ``--warmup`` untimed steps, then ``--steps`` steps, each ended by
``torch.cuda.synchronize()``, median reported; a compiled mode's compile time is its first
step's time less the median. On a CPU, ``compile`` is skipped (with a note) unless named
in ``--modes``, and the default ``--dtype`` is float32 (bf16 matmuls are slow on CPUs).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

# benchmarks.models imports lorax (hence JAX), only for configs and the formula: keep JAX off
# the GPU, which it would otherwise claim most of when first used.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from benchmarks import models, records  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def build_model(bench: models.BenchModel, device: torch.device, dtype: torch.dtype):
    """The PEFT-wrapped model: its base in ``dtype`` made on ``device``, fp32 LoRA factors."""
    import peft
    import transformers

    hf = dict(bench.hf_config)
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with device:
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", dtype=dtype
        )
    lora_config = peft.LoraConfig(
        r=bench.rank,
        lora_alpha=2 * bench.rank,
        target_modules=list(bench.peft_targets),
        lora_dropout=0.0,
        fan_in_fan_out=bench.hf_config["model_type"] == "gpt2",  # GPT-2's Conv1D is [in, out]
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora_config)


def matmul_tflops(n: int, device: torch.device, dtype, chain: int = 8, reps: int = 5) -> float:
    """The measured matmul peak, as benchmarks.step measures it: ``chain`` dependent n×n×n
    products in ``dtype``, timed ``reps`` times after a warm-up, median TFLOP/s."""
    x = torch.randn(n, n, device=device).to(dtype)
    w = (torch.randn(n, n, device=device) / n**0.5).to(dtype)

    def chained():
        y = x
        for _ in range(chain):
            y = y @ w
        return y

    chained()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        chained()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 * chain / statistics.median(times) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_mode(
    mode: str, bench: models.BenchModel, shape: tuple[int, int], device, dtype, warmup, steps
) -> dict[str, Any]:
    """Builds a fresh model, runs ``warmup + steps`` steps of ``shape`` = (rows, tokens),
    returns the step times, the last loss, parameter counts and peak memory."""
    batch, seq = shape
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(bench, device, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in params)
    n_base = sum(p.numel() for p in model.parameters()) - n_lora  # tied weights counted once
    # Autocast to the compute dtype; with fp32 there is nothing to cast.
    autocast = (
        (lambda: torch.autocast(device.type, dtype=dtype))
        if dtype != torch.float32
        else contextlib.nullcontext
    )
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=cuda)
    forward = torch.compile(model) if mode == "compile" else model
    gen = torch.Generator(device="cpu").manual_seed(0)
    vocab = bench.hf_config["vocab_size"]
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)

    def step():
        with autocast():
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    times, loss = [], None
    for _ in range(warmup + steps):
        start = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {
        "first_step_s": times[0],
        "times": times[warmup:],
        "loss": float(loss),
        "n_lora": n_lora,
        "n_base": n_base,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }


def _release(device: torch.device) -> None:
    """Frees what the last mode left: its model, optimizer and compiled graphs."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Benchmarks each mode; returns the JSON record."""
    bench = models.get(args.model)
    b, t = args.batch or bench.batch, args.seq or bench.seq
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = args.modes.split(",") if args.modes else ["eager", "compile"]
    if set(modes) - {"eager", "compile"}:
        raise ValueError(f"--modes={args.modes}: valid modes are eager and compile")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = DTYPES[dtype_name]
    if device.type != "cuda":
        print(
            f"note: no CUDA device: fused AdamW off, {dtype_name} compute"
            + ("" if args.modes else ", torch.compile skipped (--modes=eager,compile forces it)")
        )
        modes = modes if args.modes else ["eager"]
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_n = args.peak_size or (8192 if device.type == "cuda" else 512)
    config = bench.decoder_config()
    timed = {}
    for mode in modes:
        timed[mode] = time_mode(mode, bench, (b, t), device, dtype, args.warmup, args.steps)
        _release(device)
    peaks = {
        "datasheet_tflops": records.datasheet_tflops(kind),
        "measured_tflops": matmul_tflops(peak_n, device, dtype),
        "measured_size": peak_n,
        "measured_dtype": dtype_name,
    }
    modes_out = {}
    for mode, r in timed.items():
        median = statistics.median(r["times"])
        modes_out[mode] = records.mode_figures(
            r["times"],
            tokens_per_step=b * t,
            flops_per_token=models.flops_per_token(config, t, r["n_lora"]),
            peaks=peaks,
            compile_seconds=r["first_step_s"] - median if mode == "compile" else None,
            peak_bytes=r["peak_bytes"],
            loss=r["loss"],
            n_lora=r["n_lora"],
            first_step_s=r["first_step_s"],
        )
    return {
        "date": records.now().isoformat(timespec="seconds"),
        "framework": "peft",
        "peer": True,
        "device": {"kind": kind, "platform": device.type},
        "versions": records.versions("torch", "transformers", "peft"),
        "args": {**vars(args), "batch": b, "seq": t, "dtype": dtype_name},
        "model": {
            "params": next(iter(timed.values()))["n_base"],
            "n_mm": models.matmul_params(config),
            "layers": config.num_layers,
            "width": config.hidden_size,
            "targets": list(bench.peft_targets),
            "rank": bench.rank,
        },
        "peaks": peaks,
        "modes": modes_out,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer_torch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="gpt2-124m", choices=sorted(models.MODELS))
    p.add_argument("--batch", type=int, default=0, help="rows per step (0: the model's default)")
    p.add_argument("--seq", type=int, default=0, help="tokens per row (0: the model's default)")
    p.add_argument("--modes", default="", help="eager,compile (default: both; eager on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument(
        "--dtype",
        default="",
        choices=["", *DTYPES],
        help="compute and base dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--peak-size", type=int, default=0,
                   help="n of the n×n×n matmul peak (0: 8192 on CUDA, 512 elsewhere)")  # fmt: skip
    p.add_argument("--results-dir", default=records.RESULTS_DIR)
    p.add_argument("--record", default="", help="also write this run's record alone here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    record = run(args)
    records.publish(record, args.results_dir, args.record)
    return record


if __name__ == "__main__":
    main()
