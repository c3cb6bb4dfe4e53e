"""Many adapters over one base (lorax/serving.py): a mixed batch equals each row alone, and
choosing or replacing adapters never recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax import generate, lora, paths, serving
from lorax.models import decoder

CONFIG = decoder.DecoderConfig(
    vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    intermediate_size=48, tie_embeddings=True,
)  # fmt: skip
SPECS = (
    lora.make_spec("q,v", rank=4, alpha=8),
    lora.make_spec("o,mlp_in", rank=2, alpha=4),
    lora.make_spec("v", rank=8, alpha=8, rslora=True),
)


def _inputs(batch=4, length=6):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (batch, length)))
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    return ids, positions, decoder.causal_mask(jnp.ones((batch, length), jnp.int32))


@pytest.fixture(scope="module")
def base_and_adapters():
    ids, positions, mask = _inputs()
    params = decoder.Decoder(CONFIG).init(jax.random.key(0), ids, positions, mask)["params"]
    params = jax.tree_util.tree_map(lambda x: x * 3 if x.ndim == 2 else x, params)
    adapters = []
    for i, spec in enumerate(SPECS):  # non-zero a and b, different targets, ranks, scales
        leaves, tree = jax.tree_util.tree_flatten(lora.init(params, spec, jax.random.key(i)))
        keys = jax.random.split(jax.random.key(10 + i), len(leaves))
        noisy = [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
        adapters.append((jax.tree_util.tree_unflatten(tree, noisy), spec))
    return params, adapters


def _layout(params, adapters, scan):
    if not scan:
        return params, adapters
    return paths.stack_layers(params), [(paths.stack_layers(d), s) for d, s in adapters]


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_mixed_batch_equals_each_row_with_its_own_adapter(base_and_adapters, scan):
    """Rows using slots (2, 0, 3, 1): each row's logits equal that row run alone with
    lora.wrap of its adapter (or the base for slot 0)."""
    params, adapters = _layout(*base_and_adapters, scan)
    bank = serving.make_bank(params, adapters, names=["a", "b", "c"])
    assert bank.names == ["base", "a", "b", "c"] and bank.rank == 8
    slots = [2, 0, 3, 1]
    ids, positions, mask = _inputs()
    model = decoder.Decoder(CONFIG, scan=scan)
    mixed, _ = model.apply(
        {"params": serving.wrap(params, bank, jnp.asarray(slots))}, ids, positions, mask
    )
    for row, slot in enumerate(slots):
        p = params if slot == 0 else lora.wrap(params, *adapters[slot - 1])
        alone, _ = model.apply(
            {"params": p}, ids[row : row + 1], positions[row : row + 1], mask[row : row + 1]
        )
        np.testing.assert_allclose(np.asarray(mixed[row]), np.asarray(alone[0]), atol=1e-5)


@pytest.mark.slow
def test_generation_per_row_adapters_without_recompiling(base_and_adapters):
    """A mixed batch decodes each prompt as its adapter alone would; another mix of slots and
    an adapter swapped into a slot reuse the compiled decoder (compilations counted)."""
    params, adapters = base_and_adapters
    bank = serving.make_bank(params, adapters)
    model = decoder.Decoder(CONFIG)
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12]]
    slots = [2, 0, 3, 1]
    kw = dict(max_new_tokens=6)
    mixed = generate.generate(model, serving.wrap(params, bank, jnp.asarray(slots)), prompts, **kw)
    for prompt, slot, got in zip(prompts, slots, mixed, strict=True):
        p = params if slot == 0 else lora.wrap(params, *adapters[slot - 1])
        assert got == generate.generate(model, p, [prompt], **kw)[0]

    compiled = generate._generate._cache_size()
    generate.generate(model, serving.wrap(params, bank, jnp.asarray([1, 1, 3, 0])), prompts, **kw)
    swapped = serving.set_slot(bank, params, 1, *adapters[2], name="c again")
    out = generate.generate(
        model, serving.wrap(params, swapped, jnp.asarray([1, 0, 0, 0])), prompts, **kw
    )
    assert generate._generate._cache_size() == compiled
    assert out[0] == generate.generate(model, lora.wrap(params, *adapters[2]), prompts[:1], **kw)[0]


def test_bank_refuses_what_it_cannot_serve(base_and_adapters):
    params, adapters = base_and_adapters
    bank = serving.make_bank(params, adapters[:1])  # q, v at rank 4
    with pytest.raises(ValueError, match=r"rank 8 .* bank's rank is 4"):
        serving.set_slot(bank, params, 1, *adapters[2], name="big")
    with pytest.raises(ValueError, match=r"targets layers_0/attn/o/kernel, which the bank"):
        serving.set_slot(bank, params, 1, *adapters[1], name="o")
    with pytest.raises(ValueError, match=r"slot 0 is not in 1..1"):
        serving.set_slot(bank, params, 0, *adapters[0], name="x")
    embed = lora.make_spec("embed", rank=2, alpha=2)
    with pytest.raises(ValueError, match=r"adapts embed/token/embedding; a bank serves kernel"):
        serving.make_bank(params, [(lora.init(params, embed, jax.random.key(0)), embed)])
    dora = lora.make_spec("q,v", rank=4, alpha=8, dora=True)
    with pytest.raises(ValueError, match=r"is a DoRA adapter; a bank serves plain LoRA"):
        serving.make_bank(params, [(lora.init(params, dora, jax.random.key(0)), dora)])
