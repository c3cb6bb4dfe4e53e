"""Property-based tests (hypothesis) of LoRA's invariants over random trees, specs and adapters.

Each property is checked against an expectation the test computes itself: which kernels a spec
adapts comes from the generator's own record of what it built (not from lorax's regexes), and
merged kernels are ``W + scale·a@b`` in float64 numpy with ``scale = alpha/r`` (``alpha/sqrt(r)``
with rsLoRA).

Shape letters: D = a kernel's input width, F = its output width, R = the LoRA rank, L = stacked
(scanned) layers, B = batch, V = vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from lorax import lora, methods, paths
from lorax import nn as lnn
from lorax.checkpoints import hf
from lorax.checkpoints import peft as lpeft
from lorax.checkpoints.state import Checkpointer
from lorax.runs import load_adapter

PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Widths span 2..24 but come from a few values: each new shape costs JAX a compile of every op
# (~0.1 s on a 2-core CPU), so a small pool keeps the file fast while D != F, D < F, D > F,
# odd and minimal widths all occur.
WIDTHS = st.sampled_from((2, 3, 5, 8, 13, 24))

ATTN = ("q", "k", "v", "o")
MLP = ("mlp_in", "mlp_gate", "mlp_out")
MODULE_PATHS = {n: f"attn/{n}/kernel" for n in ATTN} | {n: f"mlp/{n}/kernel" for n in MLP}


# --- random trees and specs, with the test's own record of what each target adapts ------------


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A 2-D kernel (3-D when stacked) the generator put in the tree."""

    path: str
    module: str  # a canonical target name ("q", "mlp_in", "embed") or "head"
    layer: int | None  # None for stacked kernels and kernels outside layers_i
    shape: tuple[int, ...]

    @property
    def limit(self) -> int:
        """The largest valid rank, min(D, F)."""
        return min(self.shape[-2:])


@dataclasses.dataclass(frozen=True)
class Rule:
    """A target as the generator means it: which modules, and optionally only one layer."""

    name: str  # what make_spec is given: a canonical name or a path regex
    modules: frozenset[str]
    layer: int | None = None

    def claims(self, k: Kernel, layers: tuple[int, ...] | None) -> bool:
        return (
            k.module in self.modules
            and (self.layer is None or k.layer == self.layer)
            and (layers is None or k.layer in layers)
        )


@dataclasses.dataclass
class Case:
    """A random base, a spec, and the sites the spec must resolve to."""

    base: dict  # nested jax arrays
    rules: list[Rule]
    spec: lora.LoraSpec
    spec_args: dict  # the make_spec arguments, to rebuild it with other ranks
    sites: dict[str, tuple[Kernel, int, float]]  # path -> (kernel, rank, scale)
    claims: dict[str, list[Kernel]]  # rule name -> the kernels it adapts
    unstacked: dict | None  # the per-layer tree a stacked base was built from
    seed: int


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def _assign(kernels, rules, layers):
    """First rule that claims a kernel wins it; rules that win nothing are dropped."""
    claims = {r.name: [] for r in rules}
    for k in kernels:
        for r in rules:
            if r.claims(k, layers):
                claims[r.name].append(k)
                break
    kept = [r for r in rules if claims[r.name]]
    return kept, {r.name: claims[r.name] for r in kept}


@st.composite
def _specs(draw, kernels, rules, layers):
    """Ranks (default + rank_pattern), alphas, rsLoRA and init for ``rules`` over ``kernels``."""
    rules, claims = _assign(kernels, rules, layers)
    assume(rules)  # empty only when every rule fell outside the layer filter
    ranks = {r.name: draw(st.integers(1, min(k.limit for k in claims[r.name]))) for r in rules}
    alphas = {r.name: draw(st.floats(0.25, 64.0)) for r in rules}
    rank = draw(st.sampled_from(sorted(set(ranks.values()))))
    alpha = draw(st.sampled_from(sorted(set(alphas.values()))))
    rank_pattern = {n: r for n, r in ranks.items() if r != rank or draw(st.booleans())}
    alpha_pattern = {n: a for n, a in alphas.items() if a != alpha or draw(st.booleans())}
    args = dict(
        targets=[r.name for r in rules],
        rank=rank,
        alpha=alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        layers=layers,
        init=draw(st.sampled_from(lora.INITS)),
        rslora=draw(st.booleans()),
    )
    sites = {
        k.path: (k, ranks[name], _scale(alphas[name], ranks[name], args["rslora"]))
        for name, ks in claims.items()
        for k in ks
    }
    return rules, claims, args, sites


@st.composite
def cases(draw, dtypes=(np.float32,)):
    """A random tree (1-3 layers, random widths 2..24, random modules, optional prefix, biases,
    embedding, head and scanned layout) with a random target set over it."""
    n_layers = draw(st.integers(1, 3))
    d, f, hq, hkv, vocab = (draw(WIDTHS) for _ in range(5))
    modules = sorted(draw(st.sets(st.sampled_from(ATTN + MLP), min_size=1)))
    shapes = {"q": (d, hq), "k": (d, hkv), "v": (d, hkv), "o": (hq, d)}
    shapes |= {"mlp_in": (d, f), "mlp_gate": (d, f), "mlp_out": (f, d)}
    biases, embed, stacked = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    prefix = draw(st.sampled_from(["", "model/"]))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)

    def normal(shape):
        return rng.normal(size=shape).astype(np.float32)

    per_layer = {}  # layers_i/... -> array
    for i in range(n_layers):
        per_layer[f"layers_{i}/norm/scale"] = normal((d,))
        for m in modules:
            per_layer[f"layers_{i}/{MODULE_PATHS[m]}"] = normal(shapes[m])
            if biases:  # 1-D leaves next to the kernels, which no target may touch
                bias = MODULE_PATHS[m].removesuffix("kernel") + "bias"
                per_layer[f"layers_{i}/{bias}"] = normal(shapes[m][1:])
    top = {"final_norm/scale": normal((d,))}
    if embed:
        top["embed/token/embedding"] = normal((vocab, d))
    unstacked = {prefix + p: v for p, v in (per_layer | top).items()}
    flat = dict(unstacked)
    if stacked:  # the layout of a model run with model.scan=True: layers/X [L, ...]
        inner = paths.flatten(paths.stack_layers(paths.unflatten(per_layer)))
        flat = {prefix + p: np.asarray(v) for p, v in inner.items()}
        flat |= {prefix + p: v for p, v in top.items()}
    flat["head/kernel"] = unstacked["head/kernel"] = normal((d, draw(st.integers(2, 5))))

    kernels = [Kernel("head/kernel", "head", None, flat["head/kernel"].shape)]
    if embed:
        kernels.append(Kernel(prefix + "embed/token/embedding", "embed", None, (vocab, d)))
    for m in modules:
        if stacked:
            path = f"{prefix}layers/{MODULE_PATHS[m]}"
            kernels.append(Kernel(path, m, None, (n_layers, *shapes[m])))
        else:
            for i in range(n_layers):
                kernels.append(Kernel(f"{prefix}layers_{i}/{MODULE_PATHS[m]}", m, i, shapes[m]))
    assert all(flat[k.path].shape == k.shape for k in kernels)

    # Targets: canonical names that exist, plus maybe one path regex, first or last.
    present = sorted({k.module for k in kernels} - {"head"})
    regex = draw(st.sampled_from(["none", "union", "head"] + ([] if stacked else ["layer"])))
    rules = []
    if regex == "union" and len(modules) >= 2:
        names = sorted(draw(st.sets(st.sampled_from(modules), min_size=2)))
        rules.append(Rule(f"/(?:{'|'.join(names)})/kernel$", frozenset(names)))
    elif regex == "head":
        rules.append(Rule("^head/kernel$", frozenset({"head"})))
    elif regex == "layer":
        m, i = draw(st.sampled_from(modules)), draw(st.integers(0, n_layers - 1))
        rules.append(Rule(f"(?:^|/)layers_{i}/{MODULE_PATHS[m]}$", frozenset({m}), i))
    canonical = draw(st.lists(st.sampled_from(present), unique=True, min_size=0 if rules else 1))
    canonical_rules = [Rule(n, frozenset({n})) for n in canonical]
    rules = rules + canonical_rules if draw(st.booleans()) else canonical_rules + rules
    layers = None
    if not stacked and draw(st.booleans()):
        layers = tuple(sorted(draw(st.sets(st.integers(0, n_layers - 1), min_size=1))))
    rules, claims, args, sites = draw(_specs(kernels, rules, layers))

    def tree(flat):  # cast in numpy: a jnp cast would compile once per shape
        return paths.unflatten({p: jnp.asarray(v.astype(dtype)) for p, v in flat.items()})

    return Case(
        base=tree(flat),
        rules=rules,
        spec=lora.make_spec(**args),
        spec_args=args,
        sites=sites,
        claims=claims,
        unstacked=tree(unstacked) if stacked else None,
        seed=seed,
    )


def _random_delta(sites, seed):
    """A delta built in numpy with fp32 normal a [.., D, R] and b [.., R, F] at each site (init
    would leave b at zero)."""
    rng = np.random.default_rng(seed + 1)
    flat = {}
    for path, (kernel, rank, _) in sorted(sites.items()):
        *stack, d_in, d_out = kernel.shape
        flat[path + "/a"] = rng.normal(size=(*stack, d_in, rank)).astype(np.float32)
        flat[path + "/b"] = rng.normal(size=(*stack, rank, d_out)).astype(np.float32)
    return paths.unflatten(flat)


def _expected_merge(w, a, b, scale):
    """``w + scale·a@b`` in float64 numpy (batched over a leading L when stacked)."""
    w, a, b = (np.asarray(x, np.float64) for x in (w, a, b))
    return w + scale * np.matmul(a, b)


def _close(actual, expected, rtol=1e-5):
    """fp32 agreement: relative ``rtol`` per element, with the array's magnitude as the floor."""
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(float(np.abs(expected).max(initial=0.0)), 1.0)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# --- 1a. init is a zero update -----------------------------------------------------------------


@pytest.mark.slow
@PROPERTY
@given(case=cases(dtypes=(np.float32, jnp.bfloat16)))
def test_init_adapts_exactly_the_claimed_kernels_with_a_zero_update(case):
    """lora.init puts a [.., D, R] and an all-zero b [.., R, F] at exactly the kernels the
    targets claim (first target wins, layer filter respected, each target's own rank), so
    merge returns the base bit for bit (fp32 and bf16) and every wrapped kernel materializes to
    its base; with a scanned base, layer i's a equals the unscanned init of layers_i."""
    delta = lora.init(case.base, case.spec, jax.random.key(case.seed))
    flat = paths.flatten(delta)
    assert sorted(flat) == sorted(f"{p}/{x}" for p in case.sites for x in "ab")
    for path, (kernel, rank, _) in case.sites.items():
        *stack, d_in, d_out = kernel.shape
        a, b = np.asarray(flat[path + "/a"]), np.asarray(flat[path + "/b"])
        assert a.shape == (*stack, d_in, rank) and b.shape == (*stack, rank, d_out)
        assert a.dtype == np.float32 and b.dtype == np.float32
        np.testing.assert_array_equal(b, np.zeros_like(b))
        assert np.all(np.any(a != 0, axis=(-2, -1))), f"{path}: some layer's a is all zero"
        if case.spec.init == "kaiming":
            assert np.abs(a).max() <= 1 / math.sqrt(d_in) + 1e-7

    base_flat = paths.flatten(case.base)
    merged = paths.flatten(lora.merge(case.base, delta, case.spec))
    wrapped = paths.flatten(lora.wrap(case.base, delta, case.spec))
    assert sorted(merged) == sorted(base_flat) == sorted(wrapped)
    for path, w in base_flat.items():
        assert merged[path].dtype == w.dtype
        w32 = np.asarray(w, np.float32)
        np.testing.assert_array_equal(np.asarray(merged[path], np.float32), w32)
        if path in case.sites:
            assert isinstance(wrapped[path], lora.LoraWeight)
            np.testing.assert_array_equal(np.asarray(wrapped[path].materialize(), np.float32), w32)
        else:
            np.testing.assert_array_equal(np.asarray(wrapped[path], np.float32), w32)

    if case.unstacked is not None:
        per_layer = paths.flatten(lora.init(case.unstacked, case.spec, jax.random.key(case.seed)))
        for path in filter(paths.is_stacked, case.sites):
            for i, a_i in enumerate(np.asarray(flat[path + "/a"])):
                np.testing.assert_array_equal(a_i, per_layer[paths.layer_path(path, i) + "/a"])


# --- 1b. merge == wrapped compute, unmerge inverts merge ---------------------------------------


def _through_model(lw: lora.LoraWeight, x, ids, embedding: bool):
    """What lorax.nn computes with a LoraWeight: Dense's x@W', or Embed's lookup and attend."""
    if embedding:
        vocab, d = lw.shape
        module = lnn.Embed(vocab, d)
        params = {"params": {"embedding": lw}}
        return module.apply(params, ids), module.apply(params, x, method=lnn.Embed.attend)
    module = lnn.Dense(lw.shape[1], use_bias=False)
    return module.apply({"params": {"kernel": lw}}, x), None


@pytest.mark.slow
@PROPERTY
@given(case=cases())
def test_merge_equals_wrapped_compute_and_unmerge_inverts_it(case):
    """With random a and b: merge gives W + scale·a@b (numpy, scale alpha/r or alpha/sqrt(r))
    at each adapted kernel and leaves every other leaf untouched; feeding the wrapped
    LoraWeight through lorax.nn's Dense (Embed for the embedding table) gives x@W' (the rows
    W'[ids] and x@W'ᵀ) within fp32 tolerance; unmerge(merge) gives back the base."""
    delta = _random_delta(case.sites, case.seed)
    flat_delta, base_flat = paths.flatten(delta), paths.flatten(case.base)
    merged = paths.flatten(lora.merge(case.base, delta, case.spec))
    wrapped = paths.flatten(lora.wrap(case.base, delta, case.spec))
    rng = np.random.default_rng(case.seed + 2)
    for path, w in base_flat.items():
        if path not in case.sites:
            np.testing.assert_array_equal(merged[path], w)
            continue
        kernel, _, scale = case.sites[path]
        a, b = flat_delta[path + "/a"], flat_delta[path + "/b"]
        want = _expected_merge(w, a, b, scale)
        _close(merged[path], want)
        lw = wrapped[path]
        assert isinstance(lw, lora.LoraWeight)
        np.testing.assert_allclose(lw.scale, scale, rtol=1e-12)
        *stack, d_in, d_out = kernel.shape
        embedding = kernel.module == "embed"
        for i in range(math.prod(stack)):
            lw_i = jax.tree_util.tree_map(lambda t, i=i: t[i], lw) if stack else lw
            want_i = want[i] if stack else want
            x_BD = rng.normal(size=(3, d_out if embedding else d_in)).astype(np.float32)
            ids_B = rng.integers(0, d_in, size=(5,))
            y, y_attend = _through_model(lw_i, x_BD, ids_B, embedding)
            if embedding:
                _close(y, want_i[ids_B])
                _close(y_attend, x_BD @ want_i.T)
            else:
                _close(y, x_BD @ want_i)
                merged_i = np.asarray(merged[path][i] if stack else merged[path], np.float64)
                _close(y, x_BD @ merged_i)

    unmerged = paths.flatten(
        lora.unmerge(lora.merge(case.base, delta, case.spec), delta, case.spec)
    )
    for path, w in base_flat.items():
        if path in case.sites:
            # The round trip loses what fp32 rounding loses at the merged kernel's magnitude.
            magnitude = np.abs(np.asarray(merged[path])).max()
            np.testing.assert_allclose(unmerged[path], w, rtol=0, atol=4e-7 * max(magnitude, 1))
        else:
            np.testing.assert_array_equal(unmerged[path], w)


# --- 1c. count -----------------------------------------------------------------------------------


@pytest.mark.slow
@FEW
@given(case=cases())
def test_count_is_r_times_d_plus_f_per_adapted_kernel(case):
    """lora.count(delta) = Σ over adapted kernels of r·(D + F), times L for a stacked kernel."""
    delta = lora.init(case.base, case.spec, jax.random.key(case.seed))
    want = sum(
        math.prod(k.shape[:-2]) * rank * (k.shape[-2] + k.shape[-1])
        for k, rank, _ in case.sites.values()
    )
    assert lora.count(delta) == want


# --- 1d. invalid ranks --------------------------------------------------------------------------


@PROPERTY
@given(case=cases(), data=st.data())
def test_ranks_above_min_d_f_or_below_one_are_refused(case, data):
    """A rank above min(D, F) of a kernel its target adapts is refused by init, wrap and merge
    with a ValueError naming the rank, the target, the kernel and the valid range 1..min(D, F);
    a rank <= 0 is refused by make_spec naming the target and the rank."""
    rule = data.draw(st.sampled_from(case.rules))
    claimed = case.claims[rule.name]
    limit = min(k.limit for k in claimed)
    too_big = max(k.limit for k in claimed) + data.draw(st.integers(1, 8))
    if data.draw(st.booleans()):  # just past the smallest kernel's limit
        too_big = limit + 1
    args = case.spec_args | {"rank_pattern": case.spec_args["rank_pattern"] | {rule.name: too_big}}
    spec = lora.make_spec(**args)
    offenders = {k.path: k.limit for k in claimed if k.limit < too_big}
    for call in (
        lambda: lora.init(case.base, spec, jax.random.key(0)),
        lambda: lora.wrap(case.base, {}, spec),
        lambda: lora.merge(case.base, {}, spec),
    ):
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert f"rank {too_big}" in msg and repr(rule.name) in msg, msg
        named = [p for p in offenders if re.search(rf"(?<![\w/]){re.escape(p)} ", msg)]
        assert len(named) == 1, msg
        assert f"1..{offenders[named[0]]}" in msg, msg

    bad = data.draw(st.integers(-4, 0))
    args = case.spec_args | {"rank_pattern": case.spec_args["rank_pattern"] | {rule.name: bad}}
    with pytest.raises(ValueError) as err:
        lora.make_spec(**args)
    msg = str(err.value)
    assert f"{rule.name!r} must be a positive integer" in msg and msg.endswith(f"got {bad}"), msg


# --- 2. PEFT export / import round trip --------------------------------------------------------

# Canonical kernel -> the Llama module PEFT sees (written out here, not taken from lorax).
LLAMA_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "mlp_in": "mlp.up_proj",
    "mlp_gate": "mlp.gate_proj",
    "mlp_out": "mlp.down_proj",
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random transformers Llama (D=16, GQA 4/2 heads, F=24, 2 layers), loaded once:
    ``(config, params, kernels, linear module names)``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    model.save_pretrained(directory)
    linear = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    config, params = hf.load_decoder(directory)
    flat = paths.flatten(params)
    kernels = [
        Kernel(f"layers_{i}/{rel}", m, i, flat[f"layers_{i}/{rel}"].shape)
        for i in range(config.num_layers)
        for m, rel in MODULE_PATHS.items()
    ]
    return config, params, kernels, linear


@st.composite
def peft_cases(draw, kernels, n_layers):
    """Targets from q,k,v,o and the MLP kernels, maybe a per-layer regex with its own rank
    listed first, maybe a layer filter or a scanned delta, random ranks, alphas and rsLoRA."""
    names = draw(st.lists(st.sampled_from(sorted(LLAMA_MODULES)), unique=True, min_size=1))
    rules = [Rule(n, frozenset({n})) for n in names]
    scanned = draw(st.booleans())
    layers = None
    if not scanned:
        if draw(st.booleans()):
            layers = tuple(sorted(draw(st.sets(st.integers(0, n_layers - 1), min_size=1))))
        if draw(st.booleans()):
            m = draw(st.sampled_from(sorted(LLAMA_MODULES)))
            i = draw(st.sampled_from(layers or range(n_layers)))
            rules.insert(0, Rule(f"^layers_{i}/{MODULE_PATHS[m]}$", frozenset({m}), i))
    _, _, args, sites = draw(_specs(kernels, rules, layers))
    return args, sites, scanned, draw(st.integers(0, 2**31 - 1))


def _stack(flat: dict, n_layers: int) -> dict:
    """``layers_i/X`` -> ``layers/X`` [L, ...] in numpy: a delta trained with model.scan=True."""
    return {
        "layers/" + k.removeprefix("layers_0/"): np.stack(
            [flat[k.replace("layers_0/", f"layers_{i}/", 1)] for i in range(n_layers)]
        )
        for k in flat
        if k.startswith("layers_0/")
    }


def _peft_module(path: str) -> str:
    m = re.fullmatch(r"layers_(\d+)/(?:attn|mlp)/(\w+)/kernel", path)
    return f"model.layers.{m[1]}.{LLAMA_MODULES[m[2]]}"


@FEW
@given(data=st.data())
def test_peft_export_then_import_is_the_same_adapter(llama, data):
    """export_peft writes an adapter that PEFT's own matching rules (check_target_module_exists,
    get_pattern_key) read as exactly our modules, ranks and alpha/r (alpha/sqrt(r)) scales, with
    scaling·B@A = (scale·a@b)ᵀ; import_peft gives back the same factors (1e-6, per-layer even
    from a scanned delta) and a spec with the same sites, ranks and scales, so the merged
    kernels agree within 1e-6 and with numpy's W + scale·a@b."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    config, params, kernels, linear = llama
    args, sites, scanned, seed = data.draw(peft_cases(kernels, config.num_layers))
    spec = lora.make_spec(**args)
    per_layer = paths.flatten(_random_delta(sites, seed))
    delta = paths.unflatten(_stack(per_layer, config.num_layers) if scanned else per_layer)

    with tempfile.TemporaryDirectory() as tmp:
        out = lpeft.export_peft(delta, spec, config, pathlib.Path(tmp) / "adapter")
        peft_config = LoraConfig.from_pretrained(str(out))
        tensors = hf.read_safetensors_file(out / lpeft.WEIGHTS_NAME)
        spec2, delta2 = lpeft.import_peft(out, params, config)

    ours = {_peft_module(p): p for p in sites}
    assert {n for n in linear if check_target_module_exists(peft_config, n)} == set(ours)
    assert len(tensors) == 2 * len(ours)
    for module, path in ours.items():
        kernel, rank, scale = sites[path]
        r_key = get_pattern_key(peft_config.rank_pattern.keys(), module)
        alpha_key = get_pattern_key(peft_config.alpha_pattern.keys(), module)
        r = peft_config.rank_pattern.get(r_key, peft_config.r)
        alpha = peft_config.alpha_pattern.get(alpha_key, peft_config.lora_alpha)
        assert r == rank
        scaling = _scale(alpha, r, peft_config.use_rslora)
        np.testing.assert_allclose(scaling, scale, rtol=1e-12)
        a_RD = tensors[f"{lpeft.KEY_PREFIX}{module}.lora_A.weight"]
        b_FR = tensors[f"{lpeft.KEY_PREFIX}{module}.lora_B.weight"]
        assert a_RD.shape == (rank, kernel.shape[0]) and b_FR.shape == (kernel.shape[1], rank)
        a, b = per_layer[path + "/a"], per_layer[path + "/b"]
        theirs = scaling * (b_FR.astype(np.float64) @ a_RD.astype(np.float64))
        _close(theirs.T, scale * (a.astype(np.float64) @ b.astype(np.float64)), rtol=1e-6)

    flat2 = paths.flatten(delta2)
    assert sorted(flat2) == sorted(per_layer)
    for key, value in per_layer.items():
        np.testing.assert_allclose(flat2[key], value, rtol=0, atol=1e-6)
    resolved = lora.resolve(params, spec2)
    assert sorted(resolved) == sorted(sites)
    for path, site in resolved.items():
        _, rank, scale = sites[path]
        assert site.rank == rank
        np.testing.assert_allclose(site.scale, scale, rtol=1e-6)
    merged2 = paths.flatten(lora.merge(params, delta2, spec2))
    for path, w in paths.flatten(params).items():
        if path in sites:
            a, b = per_layer[path + "/a"], per_layer[path + "/b"]
            _close(merged2[path], _expected_merge(w, a, b, sites[path][2]), rtol=1e-6)
        else:
            np.testing.assert_array_equal(merged2[path], w)


# --- 3. an adapter only loads onto the base it was trained for ---------------------------------

TRAINED_WIDTH, TRAINED_LAYERS = 16, 2


def _attn_base(width: int, n_layers: int, with_v=None) -> dict:
    """layers_i/attn/{q,k,v,o} with q, o [W, W] and k, v [W, max(4, W // 2)]."""
    rng = np.random.default_rng(width * 10 + n_layers)
    kv = max(4, width // 2)
    shapes = {"q": (width, width), "k": (width, kv), "v": (width, kv), "o": (width, width)}
    flat = {}
    for i in range(n_layers):
        for n, shape in shapes.items():
            if n == "v" and with_v is not None and i not in with_v:
                continue
            flat[f"layers_{i}/attn/{n}/kernel"] = rng.normal(size=shape).astype(np.float32)
    flat["final_norm/scale"] = np.ones(width, np.float32)
    return paths.unflatten(flat)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir as lorax.train leaves it (config.json of configs/wq_wv_r4.py, Orbax checkpoint of
    the trainable tree) for a q,v r=4 adapter on a 2-layer base of width 16."""
    from configs import wq_wv_r4

    workdir = tmp_path_factory.mktemp("run")
    config = wq_wv_r4.get_config()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    spec = methods.lora_spec(config.lora)
    base = _attn_base(TRAINED_WIDTH, TRAINED_LAYERS)
    delta = lora.init(base, spec, jax.random.key(0))
    delta = jax.tree_util.tree_map(lambda x: x + 0.5, delta)  # as if trained: b is not zero
    ckpt = Checkpointer(workdir)
    step = jnp.asarray(6, jnp.int32)  # as lorax.train keeps it
    ckpt.save(6, {"step": step, "trainable": {"delta": delta, "head": {}}, "opt_state": {}})
    ckpt.wait()
    ckpt.close()
    return str(workdir), spec, delta


def _factor_shapes(base_flat: dict, path: str, rank: int, stack: tuple[int, ...]):
    """The (a, b) shapes a rank-``rank`` adapter of ``path`` in ``base_flat`` has."""
    d_in, d_out = base_flat[path].shape[-2:]
    return (*stack, d_in, rank), (*stack, rank, d_out)


@FEW
@given(width=st.integers(4, 24), n_layers=st.integers(1, 3), scanned=st.booleans())
@example(width=TRAINED_WIDTH, n_layers=TRAINED_LAYERS, scanned=False)  # the base it fits
@example(width=TRAINED_WIDTH, n_layers=TRAINED_LAYERS, scanned=True)
@example(width=TRAINED_WIDTH, n_layers=1, scanned=False)  # a layer too few
def test_adapter_is_refused_by_a_base_of_another_shape(trained, width, n_layers, scanned):
    """load_adapter(workdir, base) returns the saved delta (stacked for a scanned base) when the
    base is the one it was trained on; on a base of another width or depth it raises a
    ValueError naming the workdir, the first (sorted) mismatching kernel path and both the
    saved and the needed factor shapes, or the path of a kernel one side lacks."""
    workdir, spec, delta = trained
    base = _attn_base(width, n_layers)
    if scanned:
        base = paths.stack_layers(base)
    if (width, n_layers) == (TRAINED_WIDTH, TRAINED_LAYERS):
        got, got_spec = load_adapter(workdir, base)
        assert got_spec == spec
        want = paths.flatten(paths.stack_layers(delta) if scanned else delta)
        got = paths.flatten(got)
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value)
        return

    with pytest.raises(ValueError) as err:
        load_adapter(workdir, base)
    msg = str(err.value)
    assert workdir in msg and "does not fit" in msg, msg
    rank = spec.targets[0].rank
    base_flat = paths.flatten(base)
    trained_flat = paths.flatten(_attn_base(TRAINED_WIDTH, TRAINED_LAYERS))
    if scanned:
        trained_flat = paths.flatten(paths.stack_layers(paths.unflatten(trained_flat)))
    stack = (n_layers,) if scanned else ()
    trained_stack = (TRAINED_LAYERS,) if scanned else ()
    targeted = sorted(p for p in base_flat if re.search(r"attn/[qv]/kernel$", p))
    saved = sorted(p for p in trained_flat if re.search(r"attn/[qv]/kernel$", p))
    for path in sorted(set(targeted) | set(saved)):
        if path not in saved or path not in targeted:
            assert path in msg, msg
            return
        want = _factor_shapes(base_flat, path, rank, stack)
        got = _factor_shapes(trained_flat, path, rank, trained_stack)
        if want != got:
            assert f"{path} has shapes a{got[0]} b{got[1]}" in msg, msg
            assert f"need a{want[0]} b{want[1]}" in msg, msg
            return
    raise AssertionError("the test's own bases should differ somewhere")


def test_adapter_is_refused_by_a_base_lacking_a_targeted_kernel(trained):
    """A base whose layer 1 has no v kernel refuses the q,v adapter naming
    layers_1/attn/v/kernel; a base with no v kernel at all names the target 'v' and its regex."""
    workdir, _, _ = trained
    base = _attn_base(TRAINED_WIDTH, TRAINED_LAYERS, with_v={0})
    with pytest.raises(ValueError, match=r"adapter for layers_1/attn/v/kernel\b.*base") as err:
        load_adapter(workdir, base)
    assert workdir in str(err.value)
    base = _attn_base(TRAINED_WIDTH, TRAINED_LAYERS, with_v=set())
    with pytest.raises(ValueError, match=r"target 'v' \(regex .*attn/v/kernel.*\) matches no"):
        load_adapter(workdir, base)
