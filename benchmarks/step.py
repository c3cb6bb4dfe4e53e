"""Times lorax's train steps: ``python -m benchmarks.step --model=gpt2-124m --batch=16 --seq=1024``.

Modes, all in one process, each with lorax's own step functions (``lorax.train``,
``lorax.multi``) on random-init weights of the named architecture:

  lora    the adapter unmerged (``x@W0 + s·(x@A)@B``): what lorax trains with.
  multi   ``--multi=K`` adapters at once over one base (``lorax.multi``), each on B/K rows,
          so a step trains on as many tokens as the single-adapter step.
  merged  LoRA merged inside every step (``W0 + s·A@B``, then the plain forward); the
          gradient reaches A and B through the merge, so each targeted kernel gets a dense
          gradient: the naive way, for comparison.
  full    full fine-tuning: every weight trained, fp32 master weights.

Compute is in ``--dtype`` (bf16), the frozen base is stored in it, the adapters and Adam
moments are fp32. Each mode is compiled ahead of time (compile time), warmed up, then timed
step by step with ``block_until_ready`` on the outputs; the median is reported. Modes run in
order of expected memory (lora, multi, merged, full) because the device's peak-memory counter
cannot be reset: the LoRA figure is its own, later ones are the process's peak so far (the
``XLA GiB`` column is each compiled step's own footprint: arguments + outputs − donated
+ temporaries).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import models, records, xprof
from configs import base as base_config
from lorax import attention, evaluate, lora, methods, multi, sharding
from lorax import setup as setup_lib
from lorax import step as step_lib
from lorax.models import decoder

MODES = ("lora", "multi", "merged", "full")  # the order they run in (see the module doc)
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def optimizer_config(learning_rate: float = 1e-4):
    """configs/base.py's optimiser (AdamW, clip 1.0 over the trainable tree), constant rate."""
    config = base_config.get_config()
    config.train.schedule = "constant"
    config.train.warmup_fraction = 0.0
    config.train.learning_rate = learning_rate
    return config


def one_device_mesh():
    """A mesh over the first device alone: these are single-device benchmarks."""
    return sharding.make_mesh(1, devices=jax.devices()[:1])


def random_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A causal-LM batch of random tokens, every row one whole sequence (no packing, no
    padding), so it carries no ``segment_ids``: the step attends causally with no mask array,
    as PEFT's SDPA does with no attention mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((batch, seq), np.float32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
    }


def init_params(model: decoder.Decoder, key: jax.Array, dtype, mesh) -> dict:
    """Random-init params in ``dtype``, made on the device by a jitted init.

    ``jax.eval_shape`` gives the tree's shapes without allocating; the jitted init then writes
    each leaf straight into its sharding, so no full-size array is built on the host.
    """
    return _jitted_init(model, jnp.dtype(dtype), mesh)(key)


@functools.cache
def _jitted_init(model: decoder.Decoder, dtype, mesh) -> Callable:
    """One compiled init per (model, dtype, mesh), shared by the modes that need it."""

    def init(key):
        ids = jnp.zeros((1, 2), jnp.int32)
        params = model.init(key, ids, ids, decoder.causal_mask(jnp.ones_like(ids)))["params"]
        return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)

    shapes = jax.eval_shape(init, jax.random.key(0))
    shardings = jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), shapes)
    return jax.jit(init, out_shardings=shardings)


@dataclasses.dataclass
class Step:
    """One mode's jitted step and what it is timed on.

    ``fn(*args) -> (state, sums)``; ``args[0]`` is the state, donated, and replaced by the
    returned state before the next call.
    """

    fn: Callable
    args: tuple
    n_lora: int | None  # Σ r·(d_in + d_out) of one adapter; None for full fine-tuning


def lora_spec(bench: models.BenchModel) -> lora.LoraSpec:
    """The benchmark's adapter: the model's targets at its rank, alpha = 2r."""
    return lora.make_spec(bench.targets, rank=bench.rank, alpha=2.0 * bench.rank)


def build_step(
    mode: str,
    bench: models.BenchModel,
    model: decoder.Decoder,
    batch: dict[str, np.ndarray],
    *,
    mesh,
    base_dtype=jnp.bfloat16,
    adapters: int = 1,
    config=None,
    key: jax.Array | None = None,
    loss_chunk: int = 0,
    loss_grad: str = "forward",
) -> Step:
    """The jitted train step of ``mode`` (see the module doc) and its arguments.

    Args:
      mode: one of :data:`MODES`.
      bench: the model and adapter description.
      model: the Decoder (its ``dtype`` is the compute dtype).
      batch: a host batch from :func:`random_batch`, [B, T] arrays.
      mesh: the device mesh (one device here).
      base_dtype: storage dtype of the frozen base.
      adapters: K, for ``mode="multi"`` (B must divide by K).
      config: the optimiser config (default :func:`optimizer_config`).
      key: PRNG key of the init.
      loss_chunk: positions per chunk of the LM loss (0: dense logits).
      loss_grad: how the chunks give the hidden states' gradient (``evaluate.LOSS_GRADS``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    config = config or optimizer_config()
    key = jax.random.key(0) if key is None else key

    def setup(frozen, method, delta):  # base_params (0) only feeds a run's summary
        return setup_lib.Setup(model=model, kind="lm", method=method, frozen=frozen, head={},
                               delta=delta, task=None, mesh=mesh, base_params=0,
                               loss_chunk=loss_chunk, loss_grad=loss_grad)  # fmt: skip

    def single(s: setup_lib.Setup, forward, n_lora):
        """lorax.train's own step: optimizer, pure step, state and jit with shardings."""
        tx = step_lib.make_optimizer(config.train)
        state = step_lib.initial_state({"delta": s.delta, "head": s.head}, tx, mesh)
        step = step_lib.make_train_step(forward, tx, evaluate.lm_sums)
        fn = step_lib.jit_train_step(step, mesh, state, s.frozen)
        return Step(fn, (state, s.frozen, sharding.put_batch(batch, mesh), key), n_lora)

    if mode == "full":  # method "full": fp32 copies of every leaf, trained; nothing frozen
        full = methods.Partial("full")
        params = init_params(model, key, jnp.float32, mesh)
        s = setup({}, full, full.init(params, key))
        return single(s, setup_lib.make_forward(s), None)

    spec = lora_spec(bench)
    frozen = init_params(model, key, base_dtype, mesh)
    delta = lora.init(frozen, spec, jax.random.fold_in(key, 2))
    s = setup(frozen, methods.LoRA(spec), delta)
    n_lora = lora.count(delta)
    if mode == "lora":
        return single(s, setup_lib.make_forward(s), n_lora)
    if mode == "merged":
        plain = setup_lib.make_forward(s, methods.Partial("full"))  # params as they come

        def merged_forward(trainable, frozen, batch, rng, train):
            merged = lora.merge(frozen, trainable["delta"], spec)  # differentiable in A, B
            return plain({"head": trainable["head"], "delta": {}}, merged, batch, rng, train)

        return single(s, merged_forward, n_lora)
    return _multi_step(s, spec, batch, adapters, config, key, n_lora)


def _multi_step(s, spec, batch, k: int, config, key, n_lora) -> Step:
    """K adapters (same spec, own inits) over one base, each on B/K of the rows: the
    multi-adapter job's own step (:mod:`lorax.multi`)."""
    rows = next(iter(batch.values())).shape[0]
    if k < 1 or rows % k:
        raise ValueError(f"--multi={k} must divide --batch={rows} (each adapter gets B/K rows)")
    stack = multi.Stack.build(s.frozen, [spec] * k)
    forward = setup_lib.make_forward(s, multi.union_method(stack, s, dropout=0.0))
    tx = step_lib.make_optimizer(config.train, unit_peaks=True)
    states = []
    for i in range(k):
        delta = lora.init(s.frozen, spec, jax.random.fold_in(key, 100 + i))
        states.append(step_lib.fresh_state({"delta": delta, "head": {}}, tx))
    state = sharding.put(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states), s.mesh)
    step = multi.make_multi_train_step(forward, tx, evaluate.lm_sums)
    fn = multi.jit_multi_train_step(step, s.mesh, state, s.frozen)
    masks, scales = stack.masks_and_scales()
    lrs = jnp.full((k,), config.train.learning_rate, jnp.float32)
    batch_k = {name: x.reshape(k, rows // k, *x.shape[1:]) for name, x in batch.items()}
    batch_k = sharding.put_batch(batch_k, s.mesh, leading=1)
    keys = jax.random.split(key, k)
    return Step(fn, (state, s.frozen, batch_k, keys, lrs, lrs, masks, scales, {}), n_lora)


# --------------------------------------------------------------------------- measuring


def xla_flops(compiled) -> float | None:
    """XLA's cost-analysis FLOP count of a compiled executable (a dict, or a list of them in
    older jax), or None where the backend gives none."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def peak_bytes_in_use() -> int | None:
    """The device allocator's peak since the process started (None on CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def time_step(step: Step, warmup: int, steps: int, profile: int = 0) -> dict[str, Any]:
    """Compiles ``step`` ahead of time, runs ``warmup`` steps, then times ``steps`` steps;
    with ``profile`` > 0 it then traces that many more (:mod:`benchmarks.xprof`).

    Every step is synchronised (``block_until_ready`` on the new state and the metrics)
    before its clock stops, so a time is the device's, not the dispatch's.
    """
    start = time.perf_counter()
    compiled = step.fn.lower(*step.args).compile()
    compile_s = time.perf_counter() - start
    args, times = step.args, []
    step.args = ()  # the state in it is donated by the first call

    def one_step():
        """One synchronised step; the next one runs on the state it returns."""
        nonlocal args
        state, sums = compiled(*args)
        jax.block_until_ready((state, sums))
        args = (state, *args[1:])
        return sums

    for i in range(warmup + steps):
        start = time.perf_counter()
        sums = one_step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    sums = jax.device_get(sums)
    loss = float(np.sum(sums["loss_sum"]) / np.sum(sums["count"]))
    summary = None
    if profile:
        try:
            summary = xprof.profile(compiled, one_step, profile)
        except Exception as e:  # noqa: BLE001 -- the timings above stand without it
            summary = {"error": f"{type(e).__name__}: {e}"[:500]}
    return {
        "profile": summary,
        "compile_s": compile_s,
        "times": times,
        "loss": loss,
        "xla_flops": xla_flops(compiled),
        "xla_bytes": step_lib.compiled_memory_bytes(compiled),
    }


def matmul_tflops(n: int, dtype, chain: int = 8, reps: int = 5) -> float:
    """A measured matmul peak: ``chain`` dependent n×n×n products in one jitted loop, timed
    ``reps`` times after a warm-up; returns the median TFLOP/s.

    Each product feeds the next (so XLA cannot hoist it out of the loop); ``w`` is scaled by
    1/√n so values stay O(1).
    """
    ka, kb = jax.random.split(jax.random.key(1))
    x = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    w = (jax.random.normal(kb, (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)

    @jax.jit
    def chained(x, w):
        return jax.lax.fori_loop(0, chain, lambda _, y: y @ w, x)

    chained(x, w).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        chained(x, w).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 * chain / statistics.median(times) / 1e12


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Benchmarks every requested mode; returns the JSON record (also printed as a table)."""
    bench = models.get(args.model)
    b, t = args.batch or bench.batch, args.seq or bench.seq
    config = bench.decoder_config()
    dtype = DTYPES[args.dtype]
    kernel = attention.choose(args.attention, dtype, config.num_heads, config.num_kv_heads,
                              config.head_dim)  # fmt: skip
    model = decoder.Decoder(config, dtype, scan=args.scan, remat=args.remat, attention=kernel)
    loss_chunk = evaluate.choose_loss_chunk(args.loss_chunk, b, t, config.vocab_size)
    mesh = one_device_mesh()
    batch = random_batch(config.vocab_size, b, t)
    wanted = set(filter(None, args.modes.split(","))) | ({"multi"} if args.multi else set())
    if wanted - set(MODES):
        raise ValueError(f"--modes names {sorted(wanted - set(MODES))}; valid: {MODES}")
    if "multi" in wanted and not args.multi:
        raise ValueError("mode 'multi' needs --multi=K (the number of adapters)")
    modes = [m for m in MODES if m in wanted]

    results = {}
    for mode in modes:
        step = build_step(mode, bench, model, batch, mesh=mesh, base_dtype=dtype,
                          adapters=args.multi or 1, loss_chunk=loss_chunk,
                          loss_grad=args.loss_grad)  # fmt: skip
        timed = time_step(step, args.warmup, args.steps, args.profile)
        per_token = models.flops_per_token(config, t, step.n_lora)
        name = f"multi x{args.multi}" if mode == "multi" else mode
        results[name] = dict(
            times=timed["times"],
            per_token=per_token,
            compile_s=timed["compile_s"],
            peak_bytes=peak_bytes_in_use(),
            extra={
                "loss": timed["loss"],
                "n_lora": step.n_lora,
                "xla_bytes": timed["xla_bytes"],
                "xla_flops_per_token": (
                    None if timed["xla_flops"] is None else timed["xla_flops"] / (b * t)
                ),
                **({"profile": timed["profile"]} if timed["profile"] else {}),
            },
        )
        del step  # free this mode's base, state and batch before the next
    device = jax.devices()[0]
    peak_n = args.peak_size or (8192 if device.platform == "gpu" else 512)
    peaks = {
        "datasheet_tflops": records.datasheet_tflops(device.device_kind),
        "measured_tflops": matmul_tflops(peak_n, dtype),
        "measured_size": peak_n,
        "measured_dtype": args.dtype,
    }
    modes_out = {
        name: records.mode_figures(
            r["times"], tokens_per_step=b * t, flops_per_token=r["per_token"], peaks=peaks,
            compile_seconds=r["compile_s"], peak_bytes=r["peak_bytes"], **r["extra"],
        )
        for name, r in results.items()
    }  # fmt: skip
    return {
        "date": records.now().isoformat(timespec="seconds"),
        "framework": "lorax",
        "peer": False,
        "device": {"kind": device.device_kind, "platform": device.platform},
        "versions": records.versions("jax", "jaxlib", "flax", "optax"),
        "args": {
            **vars(args),
            "batch": b,
            "seq": t,
            "attention_kernel": kernel,
            "loss_chunk_positions": loss_chunk,
        },  # fmt: skip
        "model": {
            "params": config.num_params(),
            "n_mm": models.matmul_params(config),
            "layers": config.num_layers,
            "width": config.hidden_size,
            "targets": list(bench.targets),
            "rank": bench.rank,
        },
        "peaks": peaks,
        "modes": modes_out,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="gpt2-124m", choices=sorted(models.MODELS))
    p.add_argument("--batch", type=int, default=0, help="rows per step (0: the model's default)")
    p.add_argument("--seq", type=int, default=0, help="tokens per row (0: the model's default)")
    p.add_argument("--multi", type=int, default=0, help="K adapters at once (0: no multi mode)")
    p.add_argument("--modes", default="lora,merged,full",
                   help="comma-separated, of lora,merged,full (--multi adds multi)")  # fmt: skip
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                   help="compute dtype, and storage dtype of the frozen base")  # fmt: skip
    p.add_argument("--scan", action="store_true", help="layers under nn.scan")
    p.add_argument("--remat", action="store_true", help="rematerialise each layer")
    p.add_argument(
        "--attention",
        default="auto",
        choices=attention.CHOICES,
        help="attention kernel, as model.attention (auto: cuDNN on a GPU)",
    )
    p.add_argument(
        "--loss-chunk",
        type=int,
        default=-1,
        help="positions per chunk of the LM loss, as model.loss_chunk (-1 auto, 0 dense logits)",
    )
    p.add_argument("--loss-grad", default="forward", choices=evaluate.LOSS_GRADS,
                   help="the chunks' hidden-state gradient, as model.loss_grad")  # fmt: skip
    p.add_argument("--profile", type=int, default=0,
                   help="trace this many more steps of each mode: where the time goes")  # fmt: skip
    p.add_argument("--peak-size", type=int, default=0,
                   help="n of the n×n×n matmul peak (0: 8192 on GPU, 512 elsewhere)")  # fmt: skip
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
