"""lorax.plan: the run built abstractly is the run lorax.train builds (shapes, dtypes,
shardings, state, batch), the ``auto`` choices follow the target, the HLO reader counts what a
step runs; and, marked ``plan`` (``make plan-test``; they need JAX's CUDA plugin, the
``[plan]`` extra), the GPU gates on the benchmark shapes compiled for a described H100/H200.

The gates (issue 27): GPT-2 124M LoRA r8 q,k,v at 16×1024 bf16 within 5.0 GiB, one cuDNN fused
attention forward and backward per layer, no [B, T, V] fp32 logits and no [B, H, T, T] scores;
full fine-tuning at least 1.5× LoRA's footprint; the ~1B Llama LoRA at 8×1024 the same kernel
facts within 10.5 GiB; 8 adapters at once within 1.1× of one adapter's footprint plus the
other adapters' states; and the H200 run's old setup (XLA attention, dense logits) planned
within 2 % of the footprint XLA reported on that GPU (benchmarks/results/runbook-gpu). The old
setup's plans also show each speed-path gate failing when its path is off.
"""

import importlib.util
import json
import math
import os
import re
import types

import jax
import numpy as np
import pytest
from helpers import REPO, tiny_config
from test_train_lm import lm_config, smol_tokenizer, tiny_llama_dir  # noqa: F401

from lorax import attention, evaluate, hlo, loop, multi, plan, targets
from lorax import data as data_lib
from lorax import setup as setup_lib

# find_spec of a submodule raises when its parent package is absent: without the [plan] extra
# there is no jax_plugins package at all (a clean `make test` venv)
PLUGIN = (
    importlib.util.find_spec("jax_plugins") is not None
    and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
)
needs_plugin = pytest.mark.skipif(
    not PLUGIN, reason=f"JAX's CUDA plugin is not installed ({targets.PLAN_EXTRA})"
)
GIB = 2**30


def _abstract_view(tree):
    """(path, shape, dtype, spec) of every leaf: what a compile sees of a placed tree."""
    return [
        (jax.tree_util.keystr(p), tuple(x.shape), str(x.dtype), x.sharding.spec)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    ]


def _check_same_run(real, abstract):
    assert abstract.kind == real.kind
    assert abstract.base_params == real.base_params
    assert abstract.loss_chunk == real.loss_chunk
    assert abstract.model == real.model  # same module, attention kernel included
    for part in ("frozen", "head", "delta"):
        assert _abstract_view(getattr(abstract, part)) == _abstract_view(getattr(real, part)), part


@pytest.mark.parametrize("method", ["lora", "full", "bitfit", "adapter_houlsby", "prefix"])
def test_abstract_build_is_the_built_run_encoder(tiny_model_dir, tiny_snli_dir, method):
    """setup.build(abstract=True) reads only config.json, yet gives the frozen base, head and
    delta build() loads and places: same paths, shapes, dtypes and shardings, per method."""
    c = tiny_config(tiny_model_dir, tiny_snli_dir, method=method)
    real = setup_lib.build(c, with_task=False)
    abstract = setup_lib.build(c, with_task=False, abstract=True)
    _check_same_run(real, abstract)
    leaves = jax.tree_util.tree_leaves((abstract.frozen, abstract.delta))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"model.scan": True},
        {"model.quantize": "nf4", "model.quant_block": 16},
        {"lora.dora": True},
        {"model.architecture": "tiny"},
    ],  # fmt: skip
    ids=["plain", "scan", "nf4", "dora", "random-weights"],
)
def test_abstract_build_is_the_built_run_decoder(tiny_llama_dir, overrides):  # noqa: F811
    if overrides.get("model.architecture") == "tiny":  # a described shape, random weights
        overrides = {"model.architecture": str(tiny_llama_dir / "config.json")}
    c = lm_config(tiny_llama_dir, **overrides)
    _check_same_run(
        setup_lib.build(c, with_task=False), setup_lib.build(c, with_task=False, abstract=True)
    )


def test_state_shapes_are_the_initial_state(tiny_llama_dir):  # noqa: F811
    """Stepper.state_shapes (and a multi-adapter job's) is what init_state builds."""
    c = lm_config(tiny_llama_dir)
    s = setup_lib.build(c, with_task=False)
    stepper = loop.Stepper(s, c, "x")
    assert _abstract_view(stepper.state_shapes()) == _abstract_view(stepper.init_state())
    configs = [c, lm_config(tiny_llama_dir, seed=1, **{"lora.rank": 4})]
    job = multi.MultiStepper(configs, ["a", "b"], setup=s)
    assert _abstract_view(job.state_shapes()) == _abstract_view(job.init_state())


def test_train_batch_shapes_are_the_batchers(tiny_model_dir, tiny_snli_dir, tiny_llama_dir):  # noqa: F811
    """The plan's batch is the largest a run's batchers make: packed LM rows; a classifier's
    batch in its longest bucket."""
    for c in (tiny_config(tiny_model_dir, tiny_snli_dir), lm_config(tiny_llama_dir)):
        s = setup_lib.build(c)
        batcher = setup_lib.make_batcher(s, s.task.splits["train"], c.train.batch_size, c)
        batches = [batcher.train_batch(i) for i in range(batcher.steps_per_epoch)]
        widest = max(batches, key=lambda b: b["input_ids"].shape[1])
        want = {k: (v.shape, v.dtype) for k, v in widest.items()}
        got = data_lib.train_batch_shapes(s.kind, c.train.batch_size, c.task)
        assert {k: (v.shape, v.dtype) for k, v in got.items()} == want


def test_auto_choices_follow_the_target_platform(monkeypatch):
    """A GPU target on this CPU host: "auto" attention takes cuDNN unprobed (fp32 still XLA),
    the LM loss is chunked; a CPU or TPU target keeps XLA and, on a CPU, dense logits."""
    assert attention.choose("auto", "bfloat16", 12, 12, 64, platform="gpu") == "cudnn"
    assert not attention.probed("gpu")
    assert attention.choose("auto", "float32", 12, 12, 64, platform="gpu") == "xla"
    assert attention.choose("auto", "bfloat16", 12, 12, 64, platform="tpu") == "xla"
    assert attention.choose("auto", "bfloat16", 12, 12, 64) == "xla"  # this host
    assert evaluate.choose_loss_chunk(-1, 16, 1024, 50257, platform="gpu") == 64
    assert evaluate.choose_loss_chunk(-1, 16, 1024, 50257) == 0
    probe = []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # a host with a GPU probes
    monkeypatch.setattr(jax, "jit", lambda f: probe.append(f) or (lambda *a: 1 / 0))
    assert attention.choose("auto", "bfloat16", 6, 2, 32, platform="gpu") == "xla"
    assert probe, "the probe ran on a host that has the platform"
    attention._cudnn_unavailable.cache_clear()  # forget the failed probe of the fake GPU


def test_loss_chunk_is_chosen_for_one_devices_rows():
    """ "auto" sizes the LM-loss chunk by the rows one device holds: the global batch over the
    data-parallel devices, and all K adapters' rows of a multi-adapter job (the plan of the
    8B config on 8 GPUs showed 8-position chunks chosen for all 64 rows, 256 loop trips)."""
    from configs import base

    gpu = types.SimpleNamespace(platform="gpu")
    mesh = lambda data, fsdp: types.SimpleNamespace(  # noqa: E731
        shape={"data": data, "fsdp": fsdp, "tensor": 1}, devices=np.array([gpu])
    )
    c = base.get_config()
    c.train.batch_size, c.task.max_length = 64, 2048
    llama3 = types.SimpleNamespace(vocab_size=128256)
    assert setup_lib.loss_chunk(c, "lm", llama3, mesh(1, 8)) == 64  # 8 rows a device
    assert setup_lib.loss_chunk(c, "lm", llama3, mesh(1, 1)) == 8  # all 64 rows on one
    c.train.batch_size, c.task.max_length = 2, 1024
    gpt2 = types.SimpleNamespace(vocab_size=50257)
    assert setup_lib.loss_chunk(c, "lm", gpt2, mesh(1, 1)) == 0  # 2 rows: 0.38 GiB, dense
    assert setup_lib.loss_chunk(c, "lm", gpt2, mesh(1, 1), adapters=8) == 64  # 16 rows
    assert setup_lib.loss_chunk(c, "classify", gpt2, mesh(1, 1)) == 0


HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_mul (p: f32[8,16]) -> f32[8,16] {
  %p = f32[8,16]{1,0} parameter(0)
  ROOT %m = f32[8,16]{1,0} multiply(%p, %p)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (t: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %t = (s32[], bf16[4,8]{1,0}) parameter(0)
  %g = bf16[4,8]{1,0} get-tuple-element(%t), index=1
  %ag = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%g), dimensions={0}
  %agd = bf16[16,8]{1,0} all-gather-done(%ag)
  %att = (bf16[2,64,4,32]{3,2,1,0}, u8[0]{0}) custom-call(%agd), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/layers_0/attn"}
  ROOT %r = (s32[], bf16[4,8]{1,0}) tuple(%i, %g)
}

%cond (t: (s32[], bf16[4,8])) -> pred[] {
  %t = (s32[], bf16[4,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[8,16]) -> f32[] {
  %x = f32[8,16]{1,0} parameter(0)
  %f = f32[8,16]{1,0} fusion(%x), kind=kLoop, calls=%fused_mul, metadata={op_name="j/layers_3/mul"}
  %w = (s32[], bf16[4,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %ar = f32[8,16]{1,0} all-reduce(%f), replica_groups={}, to_apply=%add
  ROOT %out = f32[] reduce(%ar, %z), dimensions={0,1}, to_apply=%add
}
"""


def test_hlo_reading_counts_loops_calls_and_collectives():
    """Fusion bodies and reducers are not read as buffers; a loop body counts its known trip
    count times; an async all-gather's bytes are its result's."""
    insts = hlo.instructions(HLO)
    assert {i.computation for i in insts} == {"main", "body", "cond"}
    assert hlo.custom_calls(insts, "__cudnn$fmha") == {"__cudnn$fmhaSoftmax": 5}
    assert hlo.collectives(insts) == {
        "all-gather": {"count": 5, "bytes": 5 * 16 * 8 * 2},
        "all-reduce": {"count": 1, "bytes": 8 * 16 * 4},
    }
    top = hlo.largest(insts, 10)
    assert top[0] == hlo.Buffers(
        2 * 64 * 4 * 32 * 2, "(bf16[2,64,4,32], u8[0])", "__cudnn$fmhaSoftmax",
        "jit(step)/layers_N/attn", count=1, runs=5,
    )  # fmt: skip
    assert hlo.Buffers(8 * 16 * 4, "f32[8,16]", "fusion", "j/layers_N/mul", 1, 1) in top
    assert not any(r.op in ("parameter", "tuple", "get-tuple-element") for r in top)
    assert hlo.shape_bytes("(bf16[2,64,4,32]{3,2,1,0}, u8[0]{0})") == 2 * 64 * 4 * 32 * 2


def test_unknown_gpu_or_tpu_is_named():
    with pytest.raises(ValueError, match=r"--gpu = 'h300'.*'a100', 'h100', 'h200'"):
        targets.card("h300")
    with pytest.raises(ValueError, match=r"--tpu = 'v4:2x2x1'.*'v5e:4x4'.*'v5e', 'v5p', 'v6e'"):
        targets.tpu_card("v4:2x2x1")


def test_without_the_extra_a_plan_says_what_to_install(monkeypatch):
    from jax.experimental import topologies

    def missing(*args, **kwargs):
        raise NotImplementedError("topology not implemented for cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", missing)
    with pytest.raises(ValueError, match=r"CUDA plugin is missing \(install it with pip install "
                                         r"-e '\.\[plan\]'\)"):  # fmt: skip
        targets.gpu_devices("h100")
    with pytest.raises(ValueError, match=r"TPU plans need libtpu: pip install -e '\.\[plan-tpu\]'"):
        targets.tpu_devices("v5e:2x2")


@pytest.mark.plan
@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason=f"libtpu is not installed ({targets.TPU_EXTRA})",
)
def test_plan_for_a_tpu_slice(tiny_llama_dir):  # noqa: F811
    """A v5e 2x2 slice from libtpu, beside the CUDA plugin in one process: the run's mesh
    over its 4 chips, XLA's attention (no cuDNN there), the chunked loss decided for a TPU."""
    c = lm_config(tiny_llama_dir, **{"model.dtype": "bfloat16", "model.loss_chunk": 32})
    report = plan.plan(c, plan.Target(tpu="v5e:2x2"))
    assert report["target"]["title"] == "TPU v5e" and report["target"]["devices"] == 4
    assert report["mesh"] == "data×fsdp×tensor = 4×1×1"
    assert report["attention"] == {"kernel": "xla", "probed": True, "fused_calls": {}}
    assert report["loss_chunk"] == 32 and report["estimate"] is None
    m = report["memory"]
    assert 0 < m["footprint_bytes"] < m["usable_bytes"] == m["card_bytes"] == 16 * GIB


# --------------------------------------------------------------------------- GPU gates


def bench_config(name: str, model_dir, *, attention="auto", loss_chunk=-1, method="lora"):
    """A config of benchmarks/models.py's model ``name`` and adapter as benchmarks/step.py
    trains it (bf16 compute and base, dropout off, AdamW at a constant rate, clip 1.0), its
    config.json written to ``model_dir``; and its batch, whole rows as benchmarks/step.py's."""
    from benchmarks import models
    from benchmarks import step as bench_step

    bench = models.get(name)
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(dict(bench.hf_config), f)
    c = bench_step.optimizer_config()
    c.model.name = str(model_dir)
    c.model.dtype = c.model.base_dtype = "bfloat16"
    c.model.dropout = 0.0
    c.model.attention, c.model.loss_chunk = attention, loss_chunk
    c.method = method
    c.lora.targets, c.lora.rank = ",".join(bench.targets), bench.rank
    c.lora.alpha = 2.0 * bench.rank
    c.train.trainable = ()
    c.train.batch_size = bench.batch
    c.task.name, c.task.max_length = "instructions", bench.seq
    batch = bench_step.random_batch(bench.hf_config["vocab_size"], bench.batch, bench.seq)
    return c, {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


class Plans:
    """The gates' compiles, each made once per module (a GPT-2 step compiles in ~25 s)."""

    def __init__(self, root):
        self.root, self.done = root, {}

    def get(self, name, gpu="h100", adapters=0, **kw):
        key = (name, gpu, adapters, tuple(sorted(kw.items())))
        if key not in self.done:
            c, batch = bench_config(name, self.root / name, **kw)
            if adapters:  # benchmarks/step.py's multi mode: each adapter on B/K of the rows
                rows = c.train.batch_size // adapters
                batch = {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype)
                         for k, v in batch.items()}  # fmt: skip
                c.train.batch_size = rows
            self.done[key] = plan.plan(c, plan.Target(gpu), adapters=adapters, batch=batch, top=40)
        return self.done[key]


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """The module's plans; with ``LORAX_PLAN_REPORTS=FILE`` their reports are written there
    at the end (the numbers the README quotes)."""
    made = Plans(tmp_path_factory.mktemp("plan_models"))
    yield made
    if os.environ.get("LORAX_PLAN_REPORTS"):
        with open(os.environ["LORAX_PLAN_REPORTS"], "w") as f:
            json.dump({repr(k): v for k, v in made.done.items()}, f, indent=1)


def speed_path_failures(report, name: str, limit_gib: float) -> list[str]:
    """Which of the speed-path gates ``report`` fails (empty: all pass)."""
    from benchmarks import models

    bench = models.get(name)
    c = bench.decoder_config()
    b, t = bench.batch, bench.seq
    out = []
    footprint = report["memory"]["footprint_bytes"]
    if footprint > limit_gib * GIB:
        out.append(f"footprint {footprint / GIB:.2f} GiB > {limit_gib} GiB")
    calls = report["attention"]["fused_calls"]
    want = {"__cudnn$fmhaSoftmax": c.num_layers, "__cudnn$fmhaSoftmaxBackward": c.num_layers}
    if calls != want:
        out.append(f"cuDNN fused attention calls {calls}, want {want}")
    arrays = [a for r in report["largest"] for a in re.findall(r"(\w+)\[([\d,]*)\]", r["shape"])]
    dims = [(dtype, tuple(int(d) for d in shape.split(",") if d)) for dtype, shape in arrays]
    if any(dtype == "f32" and math.prod(d) == b * t * c.vocab_size for dtype, d in dims):
        out.append(f"a [B, T, V] = [{b},{t},{c.vocab_size}] fp32 buffer")
    # [B, H, T, T] scores, however laid out (GQA: [B, K, H/K, T, T]; vmapped: [K, B/K, ...])
    if any(d[-2:] == (t, t) and math.prod(d) == b * c.num_heads * t * t for _, d in dims):
        out.append(f"a [B, H, T, T] = [{b},{c.num_heads},{t},{t}] buffer")
    return out


def _record_bytes(name: str, mode: str = "lora") -> int:
    path = os.path.join(REPO, "benchmarks", "results", "runbook-gpu", f"lorax-{name}.json")
    with open(path) as f:
        return json.load(f)["modes"][mode]["xla_bytes"]


@pytest.mark.plan
@needs_plugin
def test_gate_gpt2_lora(plans):
    report = plans.get("gpt2-124m")
    assert report["attention"]["kernel"] == "cudnn" and report["loss_chunk"] == 64
    assert speed_path_failures(report, "gpt2-124m", 5.0) == []


@pytest.mark.plan
@needs_plugin
def test_gate_full_finetuning_costs_more(plans):
    full = plans.get("gpt2-124m", method="full")["memory"]["footprint_bytes"]
    assert full >= 1.5 * plans.get("gpt2-124m")["memory"]["footprint_bytes"]


@pytest.mark.plan
@needs_plugin
def test_gate_llama_1b_lora(plans):
    assert speed_path_failures(plans.get("llama-1b"), "llama-1b", 10.5) == []


@pytest.mark.plan
@needs_plugin
def test_gate_eight_adapters(plans):
    """K = 8 adapters, each on B/8 rows, within 1.1× of one adapter's footprint plus the
    other seven adapters' train states."""
    one = plans.get("gpt2-124m")
    k8 = plans.get("gpt2-124m", adapters=8)
    state = one["state_bytes"]  # one adapter's delta, Adam moments and counts
    assert k8["memory"]["footprint_bytes"] <= 1.1 * (one["memory"]["footprint_bytes"] + 7 * state)
    assert k8["loss_chunk"] == one["loss_chunk"] == 64  # chosen for all 16 rows, not 2
    assert speed_path_failures(k8, "gpt2-124m", 5.5) == []


@pytest.mark.plan
@needs_plugin
@pytest.mark.parametrize("name", ["gpt2-124m", "llama-1b"])
def test_old_setup_reproduces_the_h200_record_and_fails_the_gates(plans, name):
    """The H200 run's setup (XLA attention, dense logits) planned for an H200 gives the
    footprint XLA reported on that GPU within 2 %; and the speed-path gates catch it."""
    report = plans.get(name, gpu="h200", attention="xla", loss_chunk=0)
    want = _record_bytes(name)
    assert abs(report["memory"]["footprint_bytes"] - want) <= 0.02 * want
    failures = " | ".join(speed_path_failures(report, name, 5.0 if "gpt2" in name else 10.5))
    for gate in ("footprint", "cuDNN fused attention calls", "[B, T, V]", "[B, H, T, T]"):
        assert gate in failures


@pytest.mark.plan
@needs_plugin
def test_two_adapters_on_packed_rows_keep_cudnn(tiny_llama_dir):  # noqa: F811
    """K = 2 adapters on packed rows (segment ids: a mask, the fused kernel's bias), the
    vmapped step planned for an H100: JAX's batching rule of the masked fused kernel could not
    reshape the [K, B, 1, T, S] bias (a TypeError at trace time); lorax folds the adapter axis
    into the batch axis itself, and every layer runs the fused forward twice (the backward pass
    runs it again) and the fused backward once."""
    c = lm_config(tiny_llama_dir, **{"model.dtype": "bfloat16", "train.batch_size": 2})
    report = plan.plan(c, plan.Target("h100"), adapters=2)
    layers = c_layers(tiny_llama_dir)
    assert report["attention"]["kernel"] == "cudnn"
    assert report["attention"]["fused_calls"] == {
        "__cudnn$fmhaScaleBiasSoftmax": 2 * layers,
        "__cudnn$fmhaScaleBiasSoftmaxBackward": layers,
    }


def c_layers(model_dir) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["num_hidden_layers"]
