# ruff: noqa: E501 -- the HLO lines below are kept whole, as XLA prints them
"""lorax.roofline on small handwritten HLO modules: the FLOPs, bytes, trip counts and link
bytes it reads, each worked out by hand in the test, and the roofline's max(compute, memory)."""

import json

import pytest

from lorax import roofline

# A GPU with round numbers, so times can be checked by hand.
SPEC = roofline.Spec("test GPU", peak_flops=1e12, hbm_bytes_per_s=1e9, link_bytes_per_s=1e8,
                     tf32_flops=5e11, vector_flops=1e11)  # fmt: skip


def _only(hlo: str, kind: str | None = None) -> roofline.Op:
    ops, notes = roofline.kernels(roofline.parse(hlo), SPEC)
    ops = [op for op in ops if kind is None or op.kind == kind]
    assert len(ops) == 1 and not notes, (ops, notes)
    return ops[0]


DOT = """HloModule dot, entry_computation_layout={(bf16[64,128]{1,0}, bf16[128,256]{1,0})->bf16[64,256]{1,0}}

ENTRY %main (a: bf16[64,128], b: bf16[128,256]) -> bf16[64,256] {
  %a = bf16[64,128]{1,0} parameter(0)
  %b = bf16[128,256]{1,0} parameter(1)
  ROOT %d = bf16[64,256]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/dot_general"}
}
"""


def test_dot_flops_bytes_and_the_roofline_max():
    op = _only(DOT)
    assert op.kind == "gemm" and op.op_name == "jit(f)/dot_general"
    assert op.cost.matmul16 == 2 * 64 * 256 * 128  # 2 · result elements · contracted length
    assert op.cost.bytes == 2 * (64 * 128 + 128 * 256 + 64 * 256)
    # memory-bound on this GPU: 114,688 B / 1e9 B/s beats 4.19 MFLOP / 1e12 FLOP/s
    assert op.seconds == pytest.approx(max(op.cost.matmul16 / 1e12, op.cost.bytes / 1e9))
    assert op.seconds == pytest.approx(114_688 / 1e9)
    fast_memory = roofline.Spec("fast memory", 1e12, 1e15, 1e8, 5e11, 1e11)
    # compute-bound when memory is fast: FLOPs / peak
    ops, _ = roofline.kernels(roofline.parse(DOT), fast_memory)
    assert ops[0].seconds == pytest.approx(2 * 64 * 256 * 128 / 1e12)


FUSION = """HloModule fusion

%fused_mul_add (p0: f32[12,1024,256], p1: f32[1024,256], i: s32[]) -> f32[1024,256] {
  %p0 = f32[12,1024,256]{2,1,0} parameter(0)
  %i = s32[] parameter(2)
  %z = s32[] constant(0)
  %ds = f32[1,1024,256]{2,1,0} dynamic-slice(%p0, %i, %z, %z), dynamic_slice_sizes={1,1024,256}
  %sl = f32[1024,256]{1,0} bitcast(%ds)
  %p1 = f32[1024,256]{1,0} parameter(1)
  %m = f32[1024,256]{1,0} multiply(%sl, %p1)
  ROOT %s = f32[1024,256]{1,0} add(%m, %p1)
}

ENTRY %main (w: f32[12,1024,256], x: f32[1024,256], i: s32[]) -> f32[1024,256] {
  %w = f32[12,1024,256]{2,1,0} parameter(0)
  %x = f32[1024,256]{1,0} parameter(1)
  %i = s32[] parameter(2)
  ROOT %f = f32[1024,256]{1,0} fusion(%w, %x, %i), kind=kLoop, calls=%fused_mul_add
}
"""


def test_fusion_counts_its_element_wise_flops_and_reads_only_the_slice_it_takes():
    op = _only(FUSION)
    assert op.kind == "fusion"
    n = 1024 * 256
    assert op.cost.vector == 2 * n  # a multiply and an add per element
    # one [1024,256] slice of the [12,1024,256] operand, the other operand, the index, the result
    assert op.cost.bytes == 4 * n + 4 * n + 4 + 4 * n
    assert op.seconds == pytest.approx(op.cost.bytes / 1e9)


LOOP = """HloModule loop

%body (t: (s32[], bf16[32,64])) -> (s32[], bf16[32,64]) {
  %t = (s32[], bf16[32,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = bf16[32,64]{1,0} get-tuple-element(%t), index=1
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  %w = bf16[64,64]{1,0} constant({...})
  %y = bf16[32,64]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %r = (s32[], bf16[32,64]{1,0}) tuple(%j, %y)
}

%cond (t: (s32[], bf16[32,64])) -> pred[] {
  %t = (s32[], bf16[32,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: bf16[32,64]) -> (s32[], bf16[32,64]) {
  %x = bf16[32,64]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[32,64]{1,0}) tuple(%zero, %x)
  ROOT %loop = (s32[], bf16[32,64]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
}
"""


def test_a_while_body_counts_once_per_trip():
    ops, notes = roofline.kernels(roofline.parse(LOOP), SPEC)
    dot = next(op for op in ops if op.kind == "gemm")
    assert dot.count == 12 and not notes  # XLA's known_trip_count
    assert dot.cost.matmul16 == 2 * 32 * 64 * 64
    est = roofline.estimate(LOOP, SPEC, efficiency=1.0)
    assert est.matmul_flops == 12 * 2 * 32 * 64 * 64
    # without known_trip_count: the N of the condition's `i < N`
    ops, notes = roofline.kernels(roofline.parse(LOOP.split(", backend_config")[0]), SPEC)
    assert next(op for op in ops if op.kind == "gemm").count == 5 and not notes


FMHA = """HloModule fmha

ENTRY %main (q: bf16[2,128,4,64], k: bf16[2,128,4,64], v: bf16[2,128,4,64]) -> bf16[2,128,4,64] {
  %q = bf16[2,128,4,64]{3,2,1,0} parameter(0)
  %k = bf16[2,128,4,64]{3,2,1,0} parameter(1)
  %v = bf16[2,128,4,64]{3,2,1,0} parameter(2)
  %fmha = (bf16[2,128,4,64]{3,2,1,0}, f32[2,4,128]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"operation_queue_id":"0","cudnn_fmha_backend_config":{"fmha_scale":0.125,"intermediate_tensor_shape":{"element_type":"BF16","dimensions":["2","4","128","128"]},"is_flash_attention":true,"mask_type":"CAUSAL","bmm1_dot_dimension_numbers":{"lhs_contracting_dimensions":["3"],"rhs_contracting_dimensions":["3"],"lhs_batch_dimensions":["0","2"],"rhs_batch_dimensions":["0","2"]}}}
  ROOT %o = bf16[2,128,4,64]{3,2,1,0} get-tuple-element(%fmha), index=0
}
"""


def test_cudnn_attention_flops_from_its_shapes_causal_halved():
    op = _only(FMHA)
    assert op.kind == "attention"
    scores = 2 * 4 * 128 * 128  # |P| = B·N·T·S
    assert op.cost.matmul16 == 2 * scores * (64 + 64) / 2  # Q·Kᵀ and P·V, causal: half
    q = 2 * 128 * 4 * 64 * 2
    assert op.cost.bytes == 3 * q + q + 2 * 4 * 128 * 4  # Q, K, V in; O and stats out
    backward = FMHA.replace("fmhaSoftmax", "fmhaSoftmaxBackward").replace('"CAUSAL"', '"NO_MASK"')
    op = _only(backward)
    assert op.cost.matmul16 == 2 * scores * (3 * 64 + 2 * 64)  # P again, dV, dP, dQ, dK
    # without intermediate_tensor_shape: |P| from Q's elements / D and K's free dims
    bare = FMHA.replace('"intermediate_tensor_shape":{"element_type":"BF16","dimensions":'
                        '["2","4","128","128"]},', "")  # fmt: skip
    assert _only(bare).cost.matmul16 == 2 * scores * (64 + 64) / 2


CUBLAS = """HloModule cublas

ENTRY %main (a: bf16[16,512,256], b: bf16[16,256,128]) -> bf16[16,512,128] {
  %a = bf16[16,512,256]{2,1,0} parameter(0)
  %b = bf16[16,256,128]{2,1,0} parameter(1)
  %g = (bf16[16,512,128]{2,1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["2"],"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":["0"],"rhs_batch_dimensions":["0"]}}}
  ROOT %o = bf16[16,512,128]{2,1,0} get-tuple-element(%g), index=0
}
"""


def test_cublas_gemm_flops_from_its_dimension_numbers_workspace_not_counted():
    op = _only(CUBLAS)
    assert op.kind == "gemm"
    assert op.cost.matmul16 == 2 * 16 * 512 * 256 * 128
    assert op.cost.bytes == 2 * (16 * 512 * 256 + 16 * 256 * 128 + 16 * 512 * 128)


COLLECTIVES = """HloModule collectives, num_partitions=8

%sum (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

ENTRY %main (g: f32[1024], s: f32[1024]) -> (f32[1024], f32[4096]) {
  %g = f32[1024]{0} parameter(0)
  %s = f32[1024]{0} parameter(1)
  %ar = f32[1024]{0} all-reduce(%g), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%sum
  %ag = f32[4096]{0} all-gather(%s), replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %t = (f32[1024]{0}, f32[4096]{0}) tuple(%ar, %ag)
}
"""


def test_collectives_cost_their_ring_bytes_over_the_link():
    ops, _ = roofline.kernels(roofline.parse(COLLECTIVES), SPEC)
    ar, ag = ops
    assert (ar.kind, ag.kind) == ("collective", "collective")
    assert ar.cost.wire == 2 * 3 / 4 * 4096  # all-reduce over 4: 2(n-1)/n of its buffer
    assert ag.cost.wire == 3 / 4 * 4 * 4096  # all-gather over 4: (n-1)/n of its result
    assert ar.seconds == pytest.approx(ar.cost.bytes / 1e9 + ar.cost.wire / 1e8)
    one_group = COLLECTIVES.replace("replica_groups={{0,1,2,3},{4,5,6,7}}", "replica_groups={}")
    assert roofline.kernels(roofline.parse(one_group), SPEC)[0][0].cost.wire == 2 * 7 / 8 * 4096


def test_estimate_divides_by_the_efficiency_and_says_it_is_an_estimate():
    est = roofline.estimate(DOT, SPEC, tokens_per_step=64, efficiency=0.5)
    assert est.roofline_seconds == pytest.approx(114_688 / 1e9)
    assert est.seconds == pytest.approx(2 * est.roofline_seconds)
    assert est.tokens_per_s == pytest.approx(64 / est.seconds)
    assert "estimate" in est.summary() and est.to_json()["estimate"] is True
    assert json.loads(json.dumps(est.to_json()))["seconds"] == est.seconds  # --json prints it
    assert est.kinds["gemm"]["count"] == 1 and est.top[0]["name"] == "d"
    with pytest.raises(ValueError, match="unknown GPU 'b200'"):
        roofline.estimate(DOT, "b200")
    with pytest.raises(ValueError, match="no ENTRY"):
        roofline.estimate("not hlo", SPEC)


def test_the_calibrated_efficiency_is_the_one_benchmarks_calibrate_fitted():
    """One source of truth: roofline.EFFICIENCY is the factor in the committed calibration
    record (benchmarks/README.md "Step-time estimate"), fitted over every GPU-measured row."""
    import pathlib

    from benchmarks import calibrate

    path = pathlib.Path(calibrate.RUNBOOK).parent / "roofline-calibration.json"
    record = json.loads(path.read_text())
    assert roofline.EFFICIENCY == pytest.approx(record["efficiency"], abs=5e-4)
    assert roofline.CALIBRATION_ERROR == pytest.approx(record["error"]["max_abs"], abs=5e-3)
    assert calibrate.fit(record["rows"]) == pytest.approx(record["efficiency"])
    rows = calibrate.measured_rows()  # every lorax row the H200 timed, no PEFT row
    assert len(rows) == len(record["rows"]) == 8
    assert {(r["model"], r["mode"], r["scan"]) for r in rows} == {
        (m, mode, False) for m in ("gpt2-124m", "llama-1b") for mode in ("lora", "multi", "full")
    } | {("gpt2-124m", "lora", True)}


def test_fit_is_the_geometric_mean_of_roofline_over_measured():
    from benchmarks import calibrate

    rows = [
        {"roofline_s": 1.0, "measured_step_s": 2.0},
        {"roofline_s": 1.0, "measured_step_s": 0.5},
    ]
    assert calibrate.fit(rows) == pytest.approx(1.0)  # 2x low and 2x high cancel
    assert calibrate.fit(rows[:1]) == pytest.approx(0.5)


def test_calibration_rows_are_the_steps_as_they_ran(tmp_path):
    """An A/B side is rebuilt from its argv and what "auto" resolved to on the device (kept by
    the run-book since 2026-12); an older side, from before "auto", ran the only path then
    (XLA attention, dense logits); a side that cannot say what "auto" became is refused."""
    from benchmarks import calibrate

    fig = {"step_s": 0.1, "tokens_per_s": 1000.0}
    new = {"argv": [], "args": {"attention_kernel": "cudnn", "loss_chunk_positions": 64},
           "modes": {"lora": fig}}  # fmt: skip
    old = {"argv": ["--scan"], "modes": {"lora": fig}}
    records = [{"step": "4/ab/x/gpt2-124m", "status": "ok",
                "result": {"model": "gpt2-124m", "on": new, "off": old}}]  # fmt: skip
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    on, off = calibrate.measured_rows(str(tmp_path))
    assert (on["attention"], on["loss_chunk"], on["scan"]) == ("cudnn", 64, False)
    assert (off["attention"], off["loss_chunk"], off["scan"]) == ("xla", 0, True)
    assert on["batch"] == 16 and on["measured_step_s"] == 0.1
    new["args"] = {"attention_kernel": None}  # kept, but not what "auto" became
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match="does not say what 'auto' resolved to"):
        calibrate.measured_rows(str(tmp_path))


def test_every_card_lorax_plan_compiles_for_has_datasheet_figures_that_agree_with_it():
    """lorax.targets describes a GPU to XLA's compiler, roofline.SPECS to the roofline: the same
    names, and the HBM bandwidth both state within 1 %."""
    import re

    from lorax import targets

    assert set(targets.CARDS) <= set(roofline.SPECS)
    for name in targets.CARDS:
        text = targets.target_config(name)
        bandwidth = float(re.search(r"memory_bandwidth: (\d+)", text).group(1))
        assert roofline.SPECS[name].hbm_bytes_per_s == pytest.approx(bandwidth, rel=0.01), name
