"""The GPU speed paths against their fallbacks, where a CPU can run them: the chunked LM loss
against dense logits, the causal hint the fused attention kernel gets against the masks the
models build, the attention and loss-chunk choices, and the non-finite guard's cost."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import models as bench_models
from benchmarks import step as bench_step
from lorax import attention, evaluate, lora
from lorax import step as step_lib
from lorax.models import decoder, encoder

VOCAB = 61


def _decoder(tied: bool) -> decoder.DecoderConfig:
    return decoder.DecoderConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, intermediate_size=48, tie_embeddings=tied,
    )  # fmt: skip


def _packed_batch(b=3, t=13, seed=0) -> dict:
    """Rows holding two packed segments and right padding, a partial loss mask."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    seg[:, :5], seg[:, 5:10] = 1, 2
    seg[0, 10:] = 3  # one row packed full
    positions = np.zeros((b, t), np.int32)
    for s in (1, 2, 3):
        for r in range(b):
            idx = np.flatnonzero(seg[r] == s)
            positions[r, idx] = np.arange(len(idx))
    return {
        "input_ids": jnp.asarray(rng.integers(0, VOCAB, (b, t)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, VOCAB, (b, t)), jnp.int32),
        "loss_mask": jnp.asarray((seg > 0) & (rng.random((b, t)) > 0.3), jnp.float32),
        "segment_ids": jnp.asarray(seg),
        "positions": jnp.asarray(positions),
    }


def _forward(model, chunk, grad="forward"):
    def forward(params, batch):
        mask = decoder.causal_mask(batch["segment_ids"])
        args = ({"params": params}, batch["input_ids"], batch["positions"], mask)
        out, _ = model.apply(*args, logits=not chunk)
        if not chunk:
            return out

        def project(x, i):
            return model.apply({"params": params}, x, method="project")

        return evaluate.Hidden(out, project, chunk, grad)

    return forward


def _lora_lm(t: int, b: int = 3, tied: bool = True):
    """A tiny decoder (tied or not), a packed batch of ``b`` rows of T = ``t``, its base and a
    LoRA (q, v) on it."""
    model = decoder.Decoder(_decoder(tied))
    batch = _packed_batch(b=b, t=t)
    mask = decoder.causal_mask(batch["segment_ids"])
    base = model.init(jax.random.key(0), batch["input_ids"], batch["positions"], mask)["params"]
    spec = lora.make_spec(("q", "v"), rank=2, alpha=4.0)
    return model, batch, base, spec, lora.init(base, spec, jax.random.key(1))


@pytest.mark.parametrize("grad", evaluate.LOSS_GRADS)
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [4, 13])
def test_chunked_lm_loss_equals_dense_logits_with_gradients(tied, chunk, grad):
    """Loss, accuracy and the gradient of every parameter (output layer, tied table, LoRA
    factors) are the dense path's, for chunks that do and do not divide T, with the hidden
    states' gradient taken in the forward pass or recomputed."""
    model, batch, base, spec, delta = _lora_lm(t=13, tied=tied)
    base = jax.tree_util.tree_map(lambda x: x * 3, base)  # sharper logits, varied argmax
    delta = jax.tree_util.tree_map(lambda x: x + 0.1, delta)  # B != 0: the branch counts

    def loss(base, delta, chunk):
        forward = _forward(model, chunk, grad)
        sums = evaluate.lm_sums(forward(lora.wrap(base, delta, spec), batch), batch)
        return sums["loss_sum"] / sums["count"], sums

    (want, want_sums), want_grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(base, delta, 0)
    (got, got_sums), got_grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(base, delta, chunk)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(got_sums["correct"]) == float(want_sums["correct"])
    assert float(want_sums["correct"]) > 0 or not tied  # the tied model predicts some targets
    assert float(got_sums["count"]) == float(want_sums["count"])
    leaves = jax.tree_util.tree_leaves
    for g, w in zip(leaves(got_grads), leaves(want_grads), strict=True):
        # fp32 sums in another order: equal to ~1e-6 of the leaf's largest entry
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))


def test_the_gradient_in_the_forward_pass_saves_one_output_matmul_per_chunk():
    """XLA's cost analysis of loss-and-gradient (as the train step takes them), chunks of 8
    of 32 positions: training LoRA alone, taking the hidden states' gradient in the forward
    pass spares one output-layer matmul per chunk (the recomputed logits; cost analysis
    counts a loop body once); training the tied table too, both paths recompute the logits
    for its gradient and cost the same to within elementwise work."""
    model, batch, base, spec, delta = _lora_lm(t=32)

    def flops(grad, argnums):
        def loss(base, delta):
            params = lora.wrap(base, delta, spec)
            return evaluate.lm_sums(_forward(model, 8, grad)(params, batch), batch)["loss_sum"]

        step = jax.jit(jax.value_and_grad(loss, argnums)).lower(base, delta).compile()
        return bench_step.xla_flops(step)

    matmul = 2 * 3 * 8 * 32 * VOCAB  # one chunk's [3, 8, 32] @ [32, V]
    lora_only = flops("recompute", (1,)) - flops("forward", (1,))
    assert 0.8 * matmul < lora_only < 1.1 * matmul, lora_only / matmul
    with_table = flops("recompute", (0, 1)) - flops("forward", (0, 1))
    assert abs(with_table) < 0.3 * matmul, with_table / matmul


def test_the_gradient_in_the_forward_pass_under_vmap_is_each_adapters():
    """K adapters at once (multi-adapter jobs vmap the step): each adapter's loss and LoRA
    gradient from the forward-gradient chunks equal its own run's with dense logits."""
    model, batch, base, spec, delta = _lora_lm(t=13)
    deltas = [jax.tree_util.tree_map(lambda x, k=k: x + 0.1 * (k + 1), delta) for k in range(2)]

    def loss(delta, chunk):
        out = _forward(model, chunk)(lora.wrap(base, delta, spec), batch)
        return evaluate.lm_sums(out, batch)["loss_sum"]

    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *deltas)
    got, got_grads = jax.vmap(jax.value_and_grad(loss), (0, None))(stacked, 4)
    for k, d in enumerate(deltas):
        want, want_grads = jax.value_and_grad(loss)(d, 0)
        np.testing.assert_allclose(got[k], want, rtol=1e-6)
        for g, w in zip(
            jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads), strict=True
        ):
            np.testing.assert_allclose(g[k], w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))


@pytest.mark.parametrize("around", ["vmap", "scan", "cond", "checkpoint"])
def test_the_gradient_in_the_forward_pass_inside_other_transformations(around):
    """The output layer may close over a dropout key and integer codes made by a
    transformation inside the differentiated function (a vmap over adapters, a scan of
    accumulated batches, a cond, a checkpoint): the forward-gradient chunks take them as
    arguments, so none leaks into the backward pass, and the gradient is the recompute's."""
    v, d, b, t, m = 11, 8, 2, 6, 3
    w = jax.random.normal(jax.random.key(0), (d, v))
    h = jax.random.normal(jax.random.key(1), (m, b, t, d))
    y = jax.random.randint(jax.random.key(2), (m, b, t), 0, v)
    keys = jax.random.split(jax.random.key(3), m)
    codes = jax.random.randint(jax.random.key(4), (m, d, v), -3, 4).astype(jnp.int8)

    def loss(h, y, key, codes, grad):
        def project(x, i):  # dropout keyed per chunk, as lorax.setup builds it, and int codes
            keep = jax.random.bernoulli(jax.random.fold_in(key, i), 0.8, x.shape)
            return jnp.where(keep, x / 0.8, 0) @ (w + codes.astype(jnp.float32))

        batch = {"targets": y, "loss_mask": jnp.ones_like(y, jnp.float32)}
        return evaluate.lm_sums(evaluate.Hidden(h, project, 4, grad), batch)["loss_sum"]

    def total(h, grad):
        args = (h, y, keys, codes)
        if around == "vmap":
            return jnp.sum(jax.vmap(lambda *a: loss(*a, grad))(*args))
        if around == "scan":
            return jax.lax.scan(lambda acc, a: (acc + loss(*a, grad), None), 0.0, args)[0]
        first = tuple(a[0] for a in args)
        if around == "cond":
            return jax.lax.cond(True, lambda f: loss(*f, grad), lambda f: 0.0, first)
        return jax.checkpoint(lambda f: loss(*f, grad))(first)

    want = jax.jit(jax.grad(total), static_argnums=1)(h, "recompute")
    got = jax.jit(jax.grad(total), static_argnums=1)(h, "forward")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    assert float(jnp.abs(want).max()) > 1


SHARDED = """
import sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path[:0] = [{repo!r}, {tests!r}]
from test_step_paths import _forward, _lora_lm
from lorax import evaluate, lora
model, batch, base, spec, delta = _lora_lm(t=13, b=8)
delta = jax.tree_util.tree_map(lambda x: x + 0.1, delta)
def loss(base, delta, batch, chunk, grad):
    out = _forward(model, chunk, grad)(lora.wrap(base, delta, spec), batch)
    sums = evaluate.lm_sums(out, batch)
    return sums["loss_sum"] / sums["count"]
want = jax.value_and_grad(loss, (0, 1))(base, delta, batch, 0, "forward")
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
def put(x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))
batch = {{k: put(v, P("data")) for k, v in batch.items()}}
def split(x):  # a 2-D leaf over fsdp on its first even axis (the 61-row table on its width)
    return P("fsdp") if x.shape[0] % 2 == 0 else P(None, "fsdp")
base = jax.tree_util.tree_map(lambda x: put(x, split(x) if x.ndim == 2 else P()), base)
for grad in evaluate.LOSS_GRADS:
    step = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=(3, 4))
    got = step(base, delta, batch, 4, grad)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))
print("ok")
"""


@pytest.mark.slow
def test_the_chunked_loss_on_a_data_and_fsdp_mesh_equals_one_device():
    """On 8 fake CPU devices, rows split over data = 4 and every 2-D table and kernel (the
    tied output layer too) over fsdp = 2, both gradient modes give one device's loss and
    gradients (tied table and LoRA factors)."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = SHARDED.format(repo=os.path.dirname(here), tests=here)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_chunked_choice_scores_equal_dense_logits():
    """Scored-choice evaluation (SNLI as text) from hidden states is the dense path's."""
    model = decoder.Decoder(_decoder(True))
    batch = _packed_batch(b=6, t=9, seed=3)
    batch["labels"] = jnp.array([0, 2], jnp.int32)  # 2 examples x 3 choices
    batch["weights"] = jnp.ones((2,), jnp.float32)
    mask = decoder.causal_mask(batch["segment_ids"])
    params = model.init(jax.random.key(2), batch["input_ids"], batch["positions"], mask)["params"]
    want = evaluate.choice_sums(_forward(model, 0)(params, batch), batch)
    got = evaluate.choice_sums(_forward(model, 4)(params, batch), batch)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)


def _without_hint(monkeypatch):
    real = attention.attend

    def attend(q, k, v, mask, *, implementation, causal):
        return real(q, k, v, mask, implementation=implementation, causal=False)

    monkeypatch.setattr(attention, "attend", attend)


def _trained(method: str, base) -> dict:
    """``base`` with a LoRA, soft-prompt or prefix delta of nonzero values applied."""
    from lorax import methods

    method_ = {
        "lora": methods.LoRA(lora.make_spec(("q", "v"), rank=2, alpha=4.0)),
        "prompt": methods.Prompt(length=3),
        "prefix": methods.Prefix(length=3, reparam=False),
    }[method]
    delta = jax.tree_util.tree_map(lambda x: x + 0.3, method_.init(base, jax.random.key(1)))
    return method_.apply(base, delta)


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
def test_the_causal_hint_agrees_with_every_decoder_mask(method, monkeypatch):
    """XLA applies ``is_causal`` as one more mask, so a hint that did not hold for a mask the
    decoder builds (packed segments, padding, a soft prompt, prefix keys) would change the
    output; with and without the hint the logits are equal."""
    model = decoder.Decoder(_decoder(False))
    batch = _packed_batch()
    mask = decoder.causal_mask(batch["segment_ids"])
    base = model.init(jax.random.key(0), batch["input_ids"], batch["positions"], mask)["params"]
    params = _trained(method, base)
    args = ({"params": params}, batch["input_ids"], batch["positions"], mask)
    with_hint = model.apply(*args)[0]
    _without_hint(monkeypatch)
    np.testing.assert_array_equal(model.apply(*args)[0], with_hint)


def test_a_wrong_causal_hint_would_be_caught(monkeypatch):
    """The check above can fail: claiming causality for a bidirectional encoder changes it."""
    config = encoder.EncoderConfig(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2,
                                   intermediate_size=32)  # fmt: skip
    model = encoder.Encoder(config)
    ids = jnp.ones((2, 7), jnp.int32)
    keys = jnp.array([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)
    params = model.init(jax.random.key(0), ids, jnp.zeros_like(ids), keys)
    right = model.apply(params, ids, jnp.zeros_like(ids), keys)[0]
    real = attention.attend

    def attend(q, k, v, mask, *, implementation, causal):
        return real(q, k, v, mask, implementation=implementation, causal=True)

    monkeypatch.setattr(attention, "attend", attend)
    wrong = model.apply(params, ids, jnp.zeros_like(ids), keys)[0]
    assert float(jnp.max(jnp.abs(wrong - right))) > 1e-3


def test_attention_choice_by_backend_and_config():
    """On a CPU "auto" is XLA's path; "cudnn" is refused naming the field and why; a
    misspelt choice names the valid ones."""
    assert attention.choose("auto", jnp.bfloat16, 12, 12, 64) == "xla"
    assert attention.choose("xla", jnp.bfloat16, 12, 12, 64) == "xla"
    with pytest.raises(ValueError, match=r"model.attention = 'cudnn' cannot run here: the "
                                         r"backend is 'cpu'.*'auto'.*'xla'"):  # fmt: skip
        attention.choose("cudnn", jnp.bfloat16, 12, 12, 64)
    with pytest.raises(ValueError, match=r"model.attention = 'flash'.*'auto', 'xla', 'cudnn'"):
        attention.choose("flash", jnp.float32, 12, 12, 64)


@pytest.mark.parametrize("mask_axis", [0, None])  # each adapter's rows (train), shared (eval)
def test_folded_attention_under_vmap_equals_attend(mask_axis):
    """The multi-adapter step's masked fused call (:func:`attention.folded`, its vmap folding
    the adapter axis into the batch axis, its backward pass a batched recompute) gives
    attention's values and gradients exactly, per adapter, under one vmap and under two; on a
    CPU through XLA's kernel (the folding is the same for cuDNN's)."""
    r = np.random.default_rng(0)
    k_, b, t, h, kv, e = 3, 2, 12, 4, 2, 8
    q, w = (jnp.asarray(r.normal(size=(k_, b, t, h, e)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(r.normal(size=(k_, b, t, kv, e)), jnp.float32) for _ in range(2))
    segments = jnp.asarray(r.integers(0, 2, size=(k_, b, t)).cumsum(-1))  # packed rows
    mask = (segments[..., :, None] == segments[..., None, :]) & jnp.tril(jnp.ones((t, t), bool))
    mask = mask[:, :, None] if mask_axis == 0 else mask[0][:, None]

    def grads(fn, vmaps):
        def loss(q, k, v, mask, w):
            return (fn(q, k, v, mask, implementation="xla", causal=True) * w).sum()

        f = jax.value_and_grad(loss, argnums=(0, 1, 2))
        for _ in range(vmaps):
            f = jax.vmap(f, in_axes=(0, 0, 0, mask_axis, 0))
        return f

    want = grads(attention.attend, 1)(q, k, v, mask, w)
    got = grads(attention.folded, 1)(q, k, v, mask, w)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    nested = (q[None], k[None], v[None], mask if mask_axis is None else mask[None], w[None])
    got = jax.tree_util.tree_map(lambda x: x[0], grads(attention.folded, 2)(*nested))
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_loss_chunk_choice(monkeypatch):
    """auto: dense on a CPU and for small logits; on a GPU, GPT-2 at 16×1024 gets chunks of
    64 positions (16·64·50257 fp32 logits = 206 MB <= 256 MiB); explicit values pass."""
    assert evaluate.choose_loss_chunk(-1, 16, 1024, 50257) == 0  # this CPU
    assert evaluate.choose_loss_chunk(32, 16, 1024, 50257) == 32
    assert evaluate.choose_loss_chunk(0, 16, 1024, 50257) == 0
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert evaluate.choose_loss_chunk(-1, 16, 1024, 50257) == 64
    assert evaluate.choose_loss_chunk(-1, 8, 1024, 128256) == 64  # 263 MB
    assert evaluate.choose_loss_chunk(-1, 8, 1024, 32000) == 256  # the 1B Llama: 0.98 GiB
    assert evaluate.choose_loss_chunk(-1, 4, 256, 49152) == 0  # 200 MB of logits: dense


def _bytes(compiled) -> float:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]


def test_the_nonfinite_guard_adds_no_pass_over_full_fine_tuning_state():
    """XLA's cost analysis of a full fine-tuning step: with the guard (a lax.cond) it reads and
    writes what the same step without any guard does; the guard it replaced (jnp.where of new
    and old state) read every parameter and both Adam moments once more (6 copies)."""
    bench = bench_models.get("tiny")
    model = decoder.Decoder(bench.decoder_config())
    batch = bench_step.random_batch(bench.decoder_config().vocab_size, 2, 32)
    guarded = bench_step.build_step("full", bench, model, batch, mesh=bench_step.one_device_mesh())
    state = guarded.args[0]
    n = sum(x.size for x in jax.tree_util.tree_leaves(state["trainable"]))
    tx = step_lib.make_optimizer(bench_step.optimizer_config().train)

    def unguarded(state, frozen, batch, key):  # make_train_step with the update unconditional
        def loss_fn(trainable):
            out = _full_forward(model)(trainable, batch)
            sums = evaluate.lm_sums(out, batch)
            return sums["loss_sum"] / sums["count"], sums

        grads, sums = jax.grad(loss_fn, has_aux=True)(state["trainable"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, sums

    with_guard = _bytes(guarded.fn.lower(*guarded.args).compile())
    without = _bytes(jax.jit(unguarded, donate_argnums=0).lower(*guarded.args).compile())
    assert with_guard - without < 0.5 * 4 * n, (with_guard, without, 4 * n)


def _full_forward(model):
    def forward(trainable, batch):
        params = trainable["delta"]  # a benchmark batch: whole rows, no mask (causal)
        out, _ = model.apply({"params": params}, batch["input_ids"], batch["positions"], None)
        return out

    return forward


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
@pytest.mark.parametrize("scan", [False, True])
def test_no_mask_is_the_causal_mask_of_whole_rows(method, scan):
    """A batch of whole rows passes no mask (the fused kernel's bias-free causal form): the
    decoder's logits equal those with ``causal_mask`` of all-ones segments, with a soft prompt
    or prefix keys too (each makes the causal mask explicit before extending it); the LM
    forward of a run takes that path for a batch without ``segment_ids``; a cached decode
    without its mask is refused."""
    from lorax import setup as setup_lib

    model = decoder.Decoder(_decoder(True), scan=scan)
    b, t = 2, 9
    ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (b, t)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    whole = decoder.causal_mask(jnp.ones_like(ids))
    base = model.init(jax.random.key(0), ids, positions, whole)["params"]
    variables = {"params": _trained(method, base)}
    want = model.apply(variables, ids, positions, whole)[0]
    np.testing.assert_allclose(model.apply(variables, ids, positions, None)[0], want, atol=1e-6)
    # and causal, not bidirectional: a changed last token leaves every earlier position's logits
    changed = model.apply(variables, ids.at[:, -1].set((ids[:, -1] + 1) % VOCAB), positions, None)
    np.testing.assert_allclose(changed[0][:, :-1], want[:, :-1], atol=1e-6)
    assert float(jnp.max(jnp.abs(changed[0][:, -1] - want[:, -1]))) > 1e-3
    assert setup_lib._lm_mask({"input_ids": ids}) is None
    np.testing.assert_array_equal(setup_lib._lm_mask({"segment_ids": jnp.ones_like(ids)}), whole)
    if method == "lora":
        cache = decoder.init_cache(model.config, b, 16, jnp.float32)
        with pytest.raises(ValueError, match="cached decode needs its mask_BTS"):
            model.apply(variables, ids, positions, None, cache=cache)
