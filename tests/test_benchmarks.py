"""The benchmark harness (benchmarks/): the commands run end to end on a CPU and write their
records; the FLOP formula that MFU is computed with matches what XLA compiles; and the LoRA
step computes no weight gradient of the frozen base."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import compare, hlo, models, records, step, xprof
from lorax import evaluate, methods
from lorax import setup as setup_lib
from lorax.models import decoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small but not trivial: 4 Llama layers with grouped-query attention, fp32 on the CPU. 3 × 256
# = 768 tokens per step, a number no width equals, so a weight gradient (a product summed
# over the tokens) cannot be confused with a forward product (summed over a width).
SMALL = models.BenchModel(
    "small",
    {"model_type": "llama", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 1024,
     "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
     "max_position_embeddings": 512, "tie_word_embeddings": False},
    targets=("q", "v"),
    peft_targets=("q_proj", "v_proj"),
    batch=3,
    seq=256,
)  # fmt: skip
TOKENS = SMALL.batch * SMALL.seq


class _Command:
    """A benchmark command run in the background (a subprocess), so that its compiles overlap
    the in-process ones of the tests below; :meth:`wait` returns its stdout."""

    def __init__(self, workdir, module: str, *argv: str):
        # XLA's cheapest CPU code generation: these runs test the harness, not the CPU's
        # speed, and compiling is most of their time.
        fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {fast}".strip()}
        self.results = workdir / "results"
        self.out, self.err = workdir / "stdout", workdir / "stderr"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *argv, f"--results-dir={self.results}"],
                cwd=REPO, stdout=out, stderr=err, env=env,
            )  # fmt: skip

    def wait(self) -> str:
        rc = self.proc.wait(timeout=600)
        assert rc == 0, self.err.read_text()[-3000:]
        return self.out.read_text()


E2E_TESTS = {
    "test_step_command_prints_a_table_and_appends_its_record": "step",
    "test_compare_renders_ratios_and_goals": "step",
    "test_peer_command_runs_on_cpu": "peer",
}


@pytest.fixture(scope="module", autouse=True)
def commands(request, tmp_path_factory):
    """Starts, at once, the commands that this run's selected tests read: ``benchmarks.step
    --model=tiny`` with every mode for 2 timed steps, and ``benchmarks.peer_torch``."""
    selected = {
        E2E_TESTS.get(item.originalname)
        for item in request.session.items
        if item.module is request.module
    }
    started = {}
    if "step" in selected:
        started["step"] = _Command(
            tmp_path_factory.mktemp("step"), "benchmarks.step", "--model=tiny", "--steps=2",
            "--warmup=1", "--multi=2", "--peak-size=128", "--loss-chunk=16", "--profile=2",
        )  # fmt: skip
    if "peer" in selected and all(_importable(n) for n in ("torch", "transformers", "peft")):
        started["peer"] = _Command(
            tmp_path_factory.mktemp("peer"), "benchmarks.peer_torch", "--model=tiny",
            "--steps=2", "--warmup=1", "--peak-size=128",
        )  # fmt: skip
    yield started
    for command in started.values():
        if command.proc.poll() is None:
            command.proc.kill()
            command.proc.wait()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _one_record(results_dir, model: str) -> dict:
    files = os.listdir(results_dir)
    assert files == [os.path.basename(records.results_path(str(results_dir), model))], files
    lines = (results_dir / files[0]).read_text().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


# --------------------------------------------------------------------------- the formula


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_matmul_params_are_the_models_kernels(name):
    """N_mm is exactly the Decoder's 2-D kernels (+ the tied table, which is the LM head)."""
    c = models.get(name).decoder_config()
    shapes = decoder.param_shapes(c)
    kernels = sum(math.prod(s) for p, s in shapes.items() if p.endswith("/kernel"))
    tied = c.vocab_size * c.hidden_size if c.tie_embeddings else 0
    assert models.matmul_params(c) == kernels + tied
    if name == "gpt2-124m":
        assert c.num_params() == 124_439_808  # Hugging Face's count for GPT-2 small


def first_layer_savings(c: decoder.DecoderConfig, targets, rank: int, seq: int) -> int:
    """FLOPs per token that the LoRA formula counts and reverse-mode autodiff rightly skips.

    Nothing below the first layer's q/k/v projections is trained (embeddings, norms and
    kernels are frozen), so JAX computes no gradient of that layer's input: not through the
    frozen Wq, Wk, Wv (2·d_in·d_out each) nor through the adapters' A (2·d·r each). Of its
    attention backward, dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K and dK = dSᵀ·Q (2·s·H·E each) run
    only where they lead to an adapter: dQ for q, dK for k, dV for v, dP for q or k.
    """
    assert set(targets) <= {"q", "k", "v"}, targets
    d, hq, hkv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    saved = 2 * d * (hq + 2 * hkv) + 2 * d * rank * len(targets)
    needed = ["q" in targets, "k" in targets, "v" in targets, "q" in targets or "k" in targets]
    return saved + 2 * seq * hq * needed.count(False)


@pytest.fixture(scope="module")
def small_steps():
    """The harness's compiled LoRA and full fine-tuning steps of SMALL, fp32 (not run)."""
    config = SMALL.decoder_config()
    model = decoder.Decoder(config, jnp.float32)
    mesh = step.one_device_mesh()
    batch = step.random_batch(config.vocab_size, SMALL.batch, SMALL.seq)
    out = {}
    for mode in ("lora", "full"):
        s = step.build_step(mode, SMALL, model, batch, mesh=mesh, base_dtype=jnp.float32)
        out[mode] = (s, s.fn.lower(*s.args).compile())
    return config, out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_xla_flops_match_the_formula(small_steps, mode):
    """XLA's cost analysis of the compiled step is within ±5% of the formula × tokens, and
    the split is fully accounted for: its matrix products (read from the HLO) are exactly the
    formula's, less the first-layer gradients autodiff skips (LoRA only: full fine-tuning
    trains the embeddings, so it needs them all), and the rest is the elementwise work
    (softmax, norms, RoPE, loss, AdamW) that the formula leaves out, under 3%.
    """
    config, steps = small_steps
    s, compiled = steps[mode]
    formula = models.flops_per_token(config, SMALL.seq, s.n_lora) * TOKENS
    xla = step.xla_flops(compiled)
    matmuls = sum(d.flops for d in hlo.dots(compiled.as_text()))
    skipped = 0
    if mode == "lora":
        skipped = first_layer_savings(config, SMALL.targets, SMALL.rank, SMALL.seq) * TOKENS
    print(
        f"{mode}: XLA {xla:.4e} FLOPs, formula {formula:.4e} (ratio {xla / formula:.4f}); "
        f"matmuls {matmuls:.4e} = formula - first layer {skipped:.3e} "
        f"({matmuls / (formula - skipped):.6f}); elementwise {(xla - matmuls) / formula:.2%}"
    )
    assert xla == pytest.approx(formula, rel=0.05)
    assert matmuls == pytest.approx(formula - skipped, rel=1e-3)
    assert 0 < xla - matmuls < 0.03 * formula


def _kernel_shapes(config) -> set[tuple[int, int]]:
    shapes = decoder.param_shapes(config)
    return {s for p, s in shapes.items() if p.endswith("/kernel")}


def _leaky_lora_step(lora_step: step.Step, model):
    """The LoRA step's loss, differentiated in the base too, whose gradient norm is returned
    (as a logged whole-model gradient norm would be): the mistake the check must catch."""
    state, frozen, batch, key = lora_step.args
    delta = state["trainable"]["delta"]
    method = methods.LoRA(step.lora_spec(SMALL))
    setup = setup_lib.Setup(model=model, kind="lm", method=method, frozen=frozen, head={},
                            delta=delta, task=None, mesh=step.one_device_mesh(),
                            base_params=0)  # fmt: skip
    forward = setup_lib.make_forward(setup)

    def leaky(trainable, frozen, batch, key):
        def loss(trainable, frozen):
            sums = evaluate.lm_sums(forward(trainable, frozen, batch, key, True), batch)
            return sums["loss_sum"] / sums["count"]

        grads, base_grads = jax.grad(loss, argnums=(0, 1))(trainable, frozen)
        return grads, optax.tree.norm(base_grads)

    return jax.jit(leaky).lower(state["trainable"], frozen, batch, key).compile()


def test_lora_step_computes_no_weight_gradient_of_the_base(small_steps):
    """The compiled LoRA step has no product of the shape of a frozen kernel summed over the
    batch's tokens (a weight gradient xᵀ·dy), so no base-sized gradient is ever computed.

    The check can fail: it finds one such product per kernel in the full fine-tuning step,
    and in a LoRA step that also reads the base's gradient norm.
    """
    config, steps = small_steps
    shapes = _kernel_shapes(config)
    n_kernels = sum(1 for p in decoder.param_shapes(config) if p.endswith("/kernel"))
    lora_step, lora_compiled = steps["lora"]
    assert hlo.weight_gradients(lora_compiled.as_text(), shapes, TOKENS) == []
    assert [d for d in hlo.dots(lora_compiled.as_text()) if d.contracted == TOKENS]  # dA, dB
    full = hlo.weight_gradients(steps["full"][1].as_text(), shapes, TOKENS)
    assert len(full) == n_kernels, [d.op_name for d in full]
    model = decoder.Decoder(config, jnp.float32)
    leaky = hlo.weight_gradients(_leaky_lora_step(lora_step, model).as_text(), shapes, TOKENS)
    assert len(leaky) == n_kernels, [d.op_name for d in leaky]


def test_datasheet_peaks_by_device_name():
    assert records.datasheet_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert records.datasheet_tflops("NVIDIA H100 PCIe") == 756.0
    assert records.datasheet_tflops("NVIDIA H200") == 989.0
    assert records.datasheet_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert records.datasheet_tflops("cpu") is None
    assert np.isclose(
        records.mode_figures(
            [0.5, 0.1, 0.2],
            tokens_per_step=100,
            flops_per_token=1e10,
            peaks={"measured_tflops": 10.0},
            compile_seconds=None,
            peak_bytes=None,
        )["mfu_measured"],  # fmt: skip
        100 / 0.2 * 1e10 / 1e12 / 10.0,
    )


# --------------------------------------------------------------------------- end to end
# Last in the file: the commands run in the background while the tests above compile.


@pytest.fixture(scope="module")
def tiny_run(commands):
    """The stdout and record of ``python -m benchmarks.step --model=tiny``."""
    stdout = commands["step"].wait()
    return stdout, _one_record(commands["step"].results, "tiny")


def test_step_command_prints_a_table_and_appends_its_record(tiny_run):
    """Every mode ran, was timed and measured, and its row is in the table; the record says
    what ran where, and its FLOPs per token are the formula's."""
    stdout, record = tiny_run
    assert record["framework"] == "lorax" and record["peer"] is False
    assert record["args"]["model"] == "tiny" and record["args"]["batch"] == 4
    # every mode through the chunked LM loss (64 positions in chunks of 16); XLA's attention
    assert record["args"]["loss_chunk_positions"] == 16
    assert record["args"]["attention_kernel"] == "xla"
    assert {"jax", "flax", "optax"} <= set(record["versions"])
    assert record["device"]["platform"] == "cpu" and record["peaks"]["datasheet_tflops"] is None
    assert record["peaks"]["measured_tflops"] > 0
    assert list(record["modes"]) == ["lora", "multi x2", "merged", "full"]
    config = models.get("tiny").decoder_config()
    for name, f in record["modes"].items():
        assert f"\n{name:>14}  " in stdout, name
        assert len(f["step_s_all"]) == 2 and f["step_s"] > 0 and f["compile_s"] > 0
        assert f["tokens_per_step"] == 4 * 64
        assert f["tokens_per_s"] == pytest.approx(256 / f["step_s"])
        assert math.isfinite(f["loss"]) and f["loss"] > 0
        n_lora = None if name == "full" else f["n_lora"]
        assert f["flops_per_token"] == models.flops_per_token(config, 64, n_lora)
        assert f["mfu_measured"] > 0 and f["mfu_datasheet"] is None
        assert f["xla_bytes"] > 0 and f["peak_bytes"] is None  # a CPU has no peak counter
    # q and v of 2 layers at r=8: 2·2·8·(64 + 64) for q, 2·8·(64 + 32) per layer for v (GQA)
    assert record["modes"]["lora"]["n_lora"] == 2 * (8 * (64 + 64) + 8 * (64 + 32))
    _check_profile(record["modes"]["lora"]["profile"])


def _check_profile(p: dict) -> None:
    """--profile=2: the traced steps' time by kind, by (pass, part of the model), top ops."""
    assert p["source"] == "host" and p["steps"] == 2  # a CPU: XLA's op events on the host
    assert p["busy_ms"] > 0 and p["wall_ms"] > 0 and 0 < p["busy_fraction"] <= 1.5
    assert sum(k["share"] for k in p["by_kind"].values()) == pytest.approx(1, abs=0.01)
    # the matmuls are found and timed; their share of the time is not asserted: on a loaded
    # CPU it fell to 1 % (a time measurement, which belongs to benchmarks, not tests)
    assert p["by_kind"]["matmul"]["share"] > 0
    parts = {(g["pass"], g["part"]) for g in p["by_part"]}
    for pass_ in ("forward", "backward"):  # the adapted projections, both passes, layers folded
        assert (pass_, "layers_*/attn/q") in parts, parts
    assert ("update", "optimizer") in parts or len(parts) == 25, parts
    ms = [op["ms"] for op in p["top_ops"]]
    assert ms == sorted(ms, reverse=True) and ms[0] > 0
    assert any(op["op_name"].startswith("jit(train_step)/") for op in p["top_ops"])


def test_op_names_are_inherited_by_the_copies_xla_adds_and_grouped_by_part():
    """An instruction without metadata takes its reader's op_name (through a chain), marked
    inherited; op_names group by pass and part of the model (layers folded, wrappers named),
    and GPU kernel names are sorted into kinds."""
    text = "\n".join([
        "ENTRY %main (p: f32[4]) -> f32[4] {",
        "  %convert.1 = f32[4]{0} convert(%p)",
        "  %copy.2 = f32[4]{0} copy(%convert.1)",
        '  %dot.3 = f32[4]{0} dot(%copy.2, %p), metadata={op_name="jit(train_step)/jvp(Decoder)/'
        'layers_3/mlp/mlp_in/dot_general" source_file="x.py"}',
        '  ROOT %add.4 = f32[4]{0} add(%dot.3, %p), metadata={op_name="jit(train_step)/cond/'
        'branch_1_fun/add"}',
        "}",
    ])  # fmt: skip
    names = hlo.op_names(text)
    mlp = "jit(train_step)/jvp(Decoder)/layers_3/mlp/mlp_in/dot_general"
    assert names["dot.3"] == (mlp, False)
    assert names["copy.2"] == (mlp, True) and names["convert.1"] == (mlp, True)
    assert xprof.part(mlp) == ("forward", "layers_*/mlp/mlp_in")
    assert xprof.part(names["add.4"][0]) == ("update", "optimizer")
    backward = "jit(train_step)/transpose(jvp(Decoder))/layers_0/attn/vmap(BTNH)/reduce_sum"
    assert xprof.part(backward) == ("backward", "layers_*/attn/vmap")
    assert xprof.part("jit(train_step)/jvp()/reduce") == ("forward", "(outside the model)")
    multi = "jit(one)/vmap(transpose(jvp(Decoder)))/layers_1/mlp/mlp_in/dot_general"
    assert xprof.part(multi) == ("backward", "layers_*/mlp/mlp_in")  # K adapters, vmapped
    assert xprof.part("") == ("?", "(no op_name)")
    assert xprof.kind("custom-call.7", "", "sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert xprof.kind("custom-call.9", "", "cudnn_generated_fort_native_sdpa") == (
        "attention kernel"
    )
    assert xprof.kind("copy.2", mlp) == "copy / transpose"
    assert xprof.kind("dot.3", mlp) == "matmul"
    assert xprof.kind("loop_add_fusion", "x/add") == "other (elementwise, reductions)"


def test_compare_renders_ratios_and_goals(tiny_run):
    """The comparison table divides the right figures: a peer twice as slow reads 2.00."""
    _, lorax = tiny_run
    lora = lorax["modes"]["lora"]
    slower = {**lora, "tokens_per_s": lora["tokens_per_s"] / 2, "peak_bytes": None}
    peer = {**lorax, "framework": "peft", "peer": True,
            "modes": {"eager": slower, "compile": slower}}  # fmt: skip
    r = compare.ratios(lorax, peer)
    assert r["lora/peft_compile"] == pytest.approx(2.0) == r["lora/peft_eager"]
    full = lorax["modes"]["full"]
    assert r["lora/full"] == pytest.approx(lora["tokens_per_s"] / full["tokens_per_s"])
    assert r["mem lora/full"] == pytest.approx(lora["xla_bytes"] / full["xla_bytes"])
    report = compare.markdown({"gpt2-124m": (lorax, peer)})
    assert "| 1. LoRA tokens/s vs PEFT eager | gpt2-124m | 2.00 | >= 3.0 | **no** |" in report
    assert "| 1. LoRA tokens/s vs PEFT + torch.compile | gpt2-124m | 2.00 | >= 1.5 | yes |" in (
        report
    )


def test_peer_command_runs_on_cpu(commands):
    """``python -m benchmarks.peer_torch --model=tiny`` runs PEFT eager for 2 steps on a CPU
    and appends a peer record of the same shape as lorax's."""
    if "peer" not in commands:
        pytest.skip("torch, transformers or peft is not installed")
    stdout = commands["peer"].wait()
    assert "torch.compile skipped" in stdout
    record = _one_record(commands["peer"].results, "tiny")
    assert record["framework"] == "peft" and record["peer"] is True
    assert list(record["modes"]) == ["eager"]
    f = record["modes"]["eager"]
    assert len(f["step_s_all"]) == 2 and f["tokens_per_s"] > 0 and math.isfinite(f["loss"])
    assert f["n_lora"] == 2 * (8 * (64 + 64) + 8 * (64 + 32))  # the same adapter as lorax's
    assert record["model"]["params"] == models.get("tiny").decoder_config().num_params()


@pytest.mark.slow
def test_methods_benchmark_times_each_method_in_rounds(tmp_path):
    """benchmarks.methods on the real MiniLM-L6 and SNLI: each method's trainer step, set up
    as experiments.methods trains it, timed over interleaved rounds, with its XLA memory;
    the command appends its record and prints the table with the ratios."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.methods", "--methods=lora,adalora", "--steps=2",
         "--rounds=2", "--batch=4", f"--results_dir={tmp_path}"],
        check=True, capture_output=True, text=True, cwd=REPO,
    ).stdout  # fmt: skip
    assert "| adalora |" in out and "× lora" in out
    (path,) = tmp_path.glob("*-methods-minilm-l6-snli.jsonl")
    record = json.loads(path.read_text().splitlines()[-1])
    for label in ("lora", "adalora"):
        figures = record["methods"][label]
        assert figures["steps_timed"] == 4 and figures["step_ms"] > 0
        assert figures["step_memory_mib"] > 100  # the frozen MiniLM alone is 86 MiB
