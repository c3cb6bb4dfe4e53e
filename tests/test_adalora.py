"""AdaLoRA (method = "adalora"): the SVD-form delta, the regulariser and the rank allocator
against PEFT's own code, scan, a run end to end (ranks, plot, resume), PEFT interop both ways
on MiniLM and a tiny Llama."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax import adalora, export, lora, multi, paths, runs
from lorax import train as train_lib
from lorax.checkpoints import hf
from lorax.checkpoints import peft as lpeft
from lorax.checkpoints.state import Checkpointer
from tests.helpers import tiny_config, train_until_interrupted
from tests.test_peft import (
    TOL,
    _ids,
    _max_diff,
    _ours,
    _theirs,
    _torch_model,
    llama_dir,  # noqa: F401 -- fixture
    minilm,  # noqa: F401 -- fixture
)

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def _spec(targets="q,v", rank=4, alpha=8.0, **kw):
    kw = {"target_r": 2, "total_step": 12, **kw}
    return adalora.AdaSpec(lora.make_spec(targets, rank=rank, alpha=alpha), **kw)


def _toy_base(layers=2, d=8, f=6):
    k = jax.random.split(jax.random.key(0), 2 * layers)
    base = {}
    for i in range(layers):
        base[f"layers_{i}/attn/q/kernel"] = jax.random.normal(k[2 * i], (d, d))
        base[f"layers_{i}/attn/v/kernel"] = jax.random.normal(k[2 * i + 1], (d, f))
    return paths.unflatten(base)


def _random_factors(delta, seed, zero_some=False):
    """Random a, e, b in delta's shapes (a few e exactly zero: pruned triplets)."""
    keys = iter(jax.random.split(jax.random.key(seed), 1000))

    def draw(path, x):
        v = 0.3 * jax.random.normal(next(keys), x.shape)
        if zero_some and path[-1].key == "e":
            v = v.at[..., ::3].set(0.0)
        return v

    return jax.tree_util.tree_map_with_path(draw, delta)


def test_delta_is_p_lambda_q_at_peft_scale_and_starts_at_zero():
    """merge = w + alpha/(r + 1e-5)·(a·diag(e))@b (PEFT's get_delta_weight); wrap's unmerged
    path gives the same outputs; at init (e = 0) the model is the base."""
    base, spec = _toy_base(), _spec()
    delta = adalora.init(base, spec, jax.random.key(1))
    assert lora.count(delta) == 2 * (8 * 4 + 4 + 4 * 8) + 2 * (8 * 4 + 4 + 4 * 6)
    merged = adalora.merge(base, delta, spec)
    for p, w in paths.flatten(base).items():
        np.testing.assert_array_equal(paths.flatten(merged)[p], w)
    delta = _random_factors(delta, 2)
    f = paths.flatten(delta)
    w = paths.flatten(base)["layers_1/attn/v/kernel"]
    a, e, b = (f[f"layers_1/attn/v/kernel/{p}"] for p in "aeb")
    want = w + 8.0 / (4 + 1e-5) * (a * e) @ b
    got = paths.flatten(adalora.merge(base, delta, spec))["layers_1/attn/v/kernel"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    node = paths.flatten(adalora.wrap(base, delta, spec))["layers_1/attn/v/kernel"]
    x = jax.random.normal(jax.random.key(3), (5, 8))
    np.testing.assert_allclose(x @ w + node.scale * (x @ node.a) @ node.b, x @ want, rtol=1e-4)


def test_orthogonality_penalty_is_peft_s():
    """orth_reg_weight · mean of ‖AAᵀ − I‖_F (lora_A) and ‖BᵀB − I‖_F (lora_B), as PEFT's
    AdaLoraModel.forward adds it to the loss; a scanned stack counts each layer's own."""
    base, spec = _toy_base(), _spec()
    delta = _random_factors(adalora.init(base, spec, jax.random.key(0)), 5)
    want, n = 0.0, 0
    for key, x in paths.flatten(delta).items():
        t = torch.tensor(np.asarray(x)).mT if x.ndim == 2 else None  # lora_A [r, D], lora_B [F, r]
        if key.endswith("/a"):
            want += torch.norm(t @ t.T - torch.eye(4), p="fro").item()
        elif key.endswith("/b"):
            want += torch.norm(t.T @ t - torch.eye(4), p="fro").item()
        n += key[-1] in "ab"
    got = adalora.orth_penalty(delta, 0.5)
    np.testing.assert_allclose(got, 0.5 * want / n, rtol=1e-5)
    stacked = adalora.orth_penalty(paths.stack_layers(delta), 0.5)
    np.testing.assert_allclose(stacked, got, rtol=1e-5)


class _Toy(torch.nn.Module):
    """Two layers with q [8 -> 8] and v [8 -> 6], named as lorax's toy base paths."""

    def __init__(self):
        super().__init__()
        block = lambda: torch.nn.ModuleDict(  # noqa: E731
            {"attn": torch.nn.ModuleDict({"q": torch.nn.Linear(8, 8), "v": torch.nn.Linear(8, 6)})}
        )
        self.layers = torch.nn.ModuleList([block(), block()])


def test_rank_allocator_matches_peft_step_by_step():
    """The same factors and gradients, step after step, into PEFT's RankAllocator (through
    AdaLoraModel.update_and_allocate) and into adalora.allocate: the smoothed sensitivity and
    uncertainty, the cubic budget, the pruned λ and the rank pattern agree at every step of
    the warm-up, schedule (every 2nd step) and final phases."""
    t_total, tinit, tfinal = 12, 2, 3
    spec = _spec(total_step=t_total, tinit=tinit, tfinal=tfinal, delta_t=2)
    cfg = peft.AdaLoraConfig(
        init_r=4, target_r=2, tinit=tinit, tfinal=tfinal, deltaT=2, total_step=t_total,
        lora_alpha=8, target_modules=["q", "v"],
    )  # fmt: skip
    model = peft.get_peft_model(_Toy(), cfg)
    params = dict(model.named_parameters())
    base = _toy_base()
    state = adalora.init_state(adalora.init(base, spec, jax.random.key(0)))
    pruned_seen = False
    for t in range(1, t_total + 1):
        delta = _random_factors(adalora.init(base, spec, jax.random.key(0)), 100 + t)
        grads = _random_factors(delta, 200 + t)
        for key, x in paths.flatten(delta).items():
            path, _, part = key.rpartition("/")
            name = path.removesuffix("/kernel").replace("/", ".").replace("layers_", "layers.")
            p = params[f"base_model.model.{name}.lora_{part.upper()}.default"]
            g = np.asarray(paths.flatten(grads)[key])
            to_torch = (lambda v: v[:, None]) if part == "e" else (lambda v: v.T)  # noqa: E731
            with torch.no_grad():
                p.copy_(torch.tensor(to_torch(np.asarray(x))))
            p.grad = torch.tensor(np.ascontiguousarray(to_torch(g)))
        model.base_model.update_and_allocate(t)
        ours, state = adalora.allocate(spec, state, delta, grads, jnp.asarray(t))
        for key, x in paths.flatten(ours).items():
            if not key.endswith("/e"):
                continue
            name = key.removesuffix("/kernel/e").replace("/", ".").replace("layers_", "layers.")
            theirs = params[f"base_model.model.{name}.lora_E.default"].detach().numpy()[:, 0]
            np.testing.assert_allclose(np.asarray(x), theirs, rtol=1e-6, atol=0, err_msg=f"{t}")
            pruned_seen |= bool(np.any(np.asarray(x) == 0))
        if t < t_total - tfinal:  # their scores are reset after the final allocation
            allocator = model.base_model.rankallocator
            for key, x in paths.flatten(state["ipt"]).items():
                path, _, part = key.rpartition("/")
                name = path.removesuffix("/kernel").replace("/", ".").replace("layers_", "layers.")
                want = allocator.exp_avg_ipt[f"{name}.lora_{part.upper()}.default"]
                want = want.numpy()[:, 0] if part == "e" else want.numpy().T
                np.testing.assert_allclose(np.asarray(x), want, rtol=1e-5, err_msg=f"{t} {key}")
    assert pruned_seen
    rank_pattern = model.peft_config["default"].rank_pattern
    pattern = {k.removesuffix(".lora_E.default"): v for k, v in rank_pattern.items()}
    for path, r in adalora.ranks(state).items():
        name = path.removesuffix("/kernel").replace("/", ".").replace("layers_", "layers.")
        assert r == sum(pattern[name]), (path, r, pattern[name])
    assert sum(adalora.ranks(state).values()) <= 2 * 4


def test_allocation_over_a_scanned_stack_is_the_per_layer_one():
    base, spec = _toy_base(), _spec(total_step=6)
    state = adalora.init_state(adalora.init(base, spec, jax.random.key(0)))
    stacked_state = jax.tree_util.tree_map(lambda x: x, paths.stack_layers(state["ipt"]))
    stacked_state = {
        "ipt": stacked_state,
        "unc": paths.stack_layers(state["unc"]),
        "mask": paths.stack_layers(state["mask"]),
    }
    for t in range(1, 7):
        delta = _random_factors(adalora.init(base, spec, jax.random.key(0)), t)
        grads = _random_factors(delta, 50 + t)
        flat_delta, state = adalora.allocate(spec, state, delta, grads, jnp.asarray(t))
        sd, stacked_state = adalora.allocate(
            spec, stacked_state, paths.stack_layers(delta), paths.stack_layers(grads), t
        )
        for key, x in paths.flatten(paths.unstack_layers(sd)).items():
            np.testing.assert_allclose(x, paths.flatten(flat_delta)[key], rtol=1e-6)
    assert adalora.ranks(stacked_state) == adalora.ranks(state)


def test_schedule_fields_are_checked_before_any_compute():
    with pytest.raises(ValueError, match="tinit = 6 and adalora.tfinal = 4 leave no"):
        _spec(total_step=10, tinit=6, tfinal=4)
    with pytest.raises(ValueError, match="adalora.delta_t = 0"):
        _spec(delta_t=0)
    with pytest.raises(ValueError, match="adalora.beta1 = 1.0"):
        _spec(beta1=1.0)
    with pytest.raises(ValueError, match=r"adalora.target_r = 5 .* in \[1, 4\]"):
        _spec(target_r=5)
    with pytest.raises(ValueError, match="rslora"):
        adalora.AdaSpec(lora.make_spec("q", rank=2, alpha=2, rslora=True), 1, 10)


@pytest.mark.slow
def test_a_run_ends_at_the_target_budget_and_resumes_exactly(
    tiny_model_dir, tiny_snli_dir, tmp_path, monkeypatch
):
    """lorax.train with method = "adalora": the summary's ranks add up to target_r per
    kernel, the pruned λ are zero in the final delta, the rank plot is written; a run killed
    after step 4 and resumed ends with the same delta and ranks as one that was not."""
    config = tiny_config(tiny_model_dir, tiny_snli_dir, method="adalora")
    config.train.num_steps, config.checkpoint_every = 8, 2
    config.lora.rank, config.adalora.target_r, config.adalora.tfinal = 4, 2, 2
    whole = train_lib.train_and_evaluate(config, str(tmp_path / "whole"))
    ranks = whole["adalora_ranks"]
    assert len(ranks) == 2 * 2 and sum(ranks.values()) == 2 * len(ranks), ranks
    assert os.path.exists(tmp_path / "whole" / "adalora_ranks.png")
    with Checkpointer(tmp_path / "whole", writable=False) as ckpt:
        state = ckpt.restore(None)
    masks = paths.flatten(state["method"]["mask"])
    for key, e in paths.flatten(state["trainable"]["delta"]).items():
        if key.endswith("/e"):  # pruned exactly where the final mask says
            np.testing.assert_array_equal(np.asarray(e) != 0, np.asarray(masks[key]) > 0)
    run_config, setup, trainable = runs.load_run(tmp_path / "whole")  # what lorax.export does
    out = export.export_adapter(run_config, setup, trainable, tmp_path / "exported")
    base = paths.unflatten(
        {k: v for k, v in paths.flatten(setup.frozen).items() if k.startswith("encoder/")}
    )
    spec, back = lpeft.import_adalora(out, base, setup.model.config)  # pruned triplets dropped
    merged = paths.flatten(adalora.merge(base, back, spec))
    for key, w in paths.flatten(adalora.merge(base, trainable["delta"], setup.method.spec)).items():
        np.testing.assert_allclose(merged[key], w, rtol=1e-6, atol=1e-7)
    train_until_interrupted(config, tmp_path / "cut", 4, monkeypatch)
    resumed = train_lib.train_and_evaluate(config, str(tmp_path / "cut"))
    assert resumed["resumed_from"] == 4 and resumed["adalora_ranks"] == ranks
    with Checkpointer(tmp_path / "cut", writable=False) as ckpt:
        again = ckpt.restore(None)
    for x, y in zip(
        jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(state), strict=True
    ):
        np.testing.assert_array_equal(x, y)
    assert json.load(open(tmp_path / "cut" / "summary.json"))["method"] == "adalora"


def test_multi_adapter_jobs_refuse_adalora(tiny_model_dir, tiny_snli_dir):
    config = tiny_config(tiny_model_dir, tiny_snli_dir, method="adalora")
    with pytest.raises(ValueError, match="'adalora' cannot run in a multi-adapter job"):
        multi.check_compatible([config, config])


@pytest.mark.parametrize("family", ["minilm", "llama"])
def test_export_loads_in_peft_with_our_outputs_and_imports_back(tmp_path, family, request):
    """A delta with some λ pruned, exported as PEFT AdaLoRA (kept ranks + rank_pattern):
    PeftModel's outputs are ours within 1e-4; imported back it is the same delta; merged,
    the outputs stay; over scanned layers too (Llama)."""
    if family == "minilm":
        directory, config, base = request.getfixturevalue("minilm")
        spec = _spec("q,v", rank=4)
    else:
        directory = request.getfixturevalue("llama_dir")
        config, base = hf.load_decoder(directory)
        spec = _spec("q,v,o,mlp_out", rank=4)
    delta = _random_factors(adalora.init(base, spec, jax.random.key(0)), 7, zero_some=True)
    delta = jax.tree_util.tree_map_with_path(
        lambda p, x: x if p[-1].key == "e" else 0.2 * x / 0.3, delta
    )
    ids = _ids(vocab=config.vocab_size)
    ours = _ours(config, adalora.wrap(base, delta, spec), ids)
    assert _max_diff(ours, _ours(config, base, ids)) > 1e-2
    out = lpeft.export_adalora(delta, spec, config, tmp_path / "a", base_model_name_or_path="x")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["init_r"] == 4
    assert all(sum(v) == 2 for v in saved["rank_pattern"].values())  # e[0] and e[3] pruned
    model = peft.PeftModel.from_pretrained(_torch_model(directory, config), str(out)).eval()
    assert _max_diff(ours, _theirs(model, ids)) <= TOL
    spec2, delta2 = lpeft.import_adalora(out, base, config)
    assert (spec2.target_r, spec2.total_step) == (spec.target_r, spec.total_step)
    assert _max_diff(_ours(config, adalora.wrap(base, delta2, spec2), ids), ours) <= TOL
    assert _max_diff(_ours(config, adalora.merge(base, delta, spec), ids), ours) <= TOL
    if family == "llama":
        stacked = adalora.wrap(paths.stack_layers(base), paths.stack_layers(delta), spec)
        assert _max_diff(_ours(config, stacked, ids, scan=True), ours) <= TOL


def test_adapter_trained_by_peft_imports_with_its_outputs(tmp_path, llama_dir):  # noqa: F811
    """peft.get_peft_model(AdaLoraConfig), λ and factors moved, three allocation steps (so
    some ranks are pruned and rank_pattern is set), save_pretrained: imported, lorax's
    wrapped model gives PEFT's outputs within 1e-4."""
    config, params = hf.load_decoder(llama_dir)
    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, tinit=0, tfinal=1, deltaT=1, total_step=4,
                             lora_alpha=8, target_modules=["q_proj", "v_proj"])  # fmt: skip
    model = peft.get_peft_model(_torch_model(llama_dir, config), cfg)
    ids = torch.tensor(_ids(vocab=config.vocab_size), dtype=torch.long)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    for t in range(1, 4):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(t)
        opt.zero_grad()
    model.eval()
    model.save_pretrained(str(tmp_path))
    kept = [sum(v) for v in json.loads((tmp_path / "adapter_config.json").read_text())
            ["rank_pattern"].values()]  # fmt: skip
    assert sum(kept) == 2 * len(kept) and min(kept) < 4
    spec, delta = lpeft.import_adalora(tmp_path, params, config)
    theirs = _theirs(model, ids.numpy())
    assert _max_diff(_ours(config, adalora.wrap(params, delta, spec), ids.numpy()), theirs) <= TOL


SHARDED = r"""
import sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import jax
assert jax.device_count() == 8, jax.devices()
from helpers import tiny_config
from lorax import train
c = tiny_config({model!r}, {data!r}, **{{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                **{fields!r}}})
train.train_and_evaluate(c, {out!r})
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adalora", "dora"])
def test_a_sharded_run_follows_the_one_device_run(method, tiny_model_dir, tiny_snli_dir, tmp_path):
    """On 8 fake devices (data × fsdp × tensor = 2 × 2 × 2), AdaLoRA (the allocator's state
    sharded by the same rules as the delta) and DoRA (its magnitudes beside their kernels'
    factors): the loss curve is the one-device curve within 1e-4, and AdaLoRA's final ranks
    are the same."""
    import subprocess
    import sys

    from tests.helpers import REPO
    from tests.test_sharding import fake_devices, train_losses

    fields = {"train.num_steps": 8, "lora.rank": 4}
    if method == "adalora":
        fields.update({"method": "adalora", "adalora.target_r": 2, "adalora.tfinal": 2})
    else:
        fields["lora.dora"] = True
    one = train_lib.train_and_evaluate(
        tiny_config(tiny_model_dir, tiny_snli_dir, **fields), str(tmp_path / "one")
    )
    script = SHARDED.format(
        repo=REPO, tests=os.path.dirname(__file__), model=str(tiny_model_dir),
        data=str(tiny_snli_dir), fields=fields, out=str(tmp_path / "eight"),
    )  # fmt: skip
    subprocess.run([sys.executable, "-c", script], check=True, env=fake_devices(8), cwd=REPO)
    eight = json.loads((tmp_path / "eight" / "summary.json").read_text())
    assert eight["devices"] == 8 and eight.get("adalora_ranks") == one.get("adalora_ranks")
    np.testing.assert_allclose(
        train_losses(tmp_path / "eight"), train_losses(tmp_path / "one"), rtol=1e-4
    )


def test_report_shows_where_the_budget_went(tmp_path):
    """experiments.report's methods section: each AdaLoRA seed's ranks summed by kernel and
    the first seed's rank grid as a PNG."""
    from experiments import report

    ranks = {f"encoder/layers_{i}/attn/{k}/kernel": r for i, (q, v) in enumerate([(6, 2), (3, 5)])
             for k, r in (("q", q), ("v", v))}  # fmt: skip
    rows = [{"name": "lora_s0"}, {"name": "adalora_s0", "adalora_ranks": ranks}]
    lines = report.adalora_ranks("methods_x", rows, str(tmp_path))
    assert "- adalora_s0: attn/q 9, attn/v 7" in lines
    assert (tmp_path / "methods_x_adalora_ranks.png").stat().st_size > 1000
    kernels, layers, grid = adalora.rank_grid(ranks)
    assert kernels == ["attn/q", "attn/v"] and layers == [0, 1]
    np.testing.assert_array_equal(grid, [[6, 3], [2, 5]])
