"""A run's trees of weights from its base params: the frozen base (quantized for QLoRA, cast
to ``model.base_dtype``), the trained head and the method's new delta, either placed on the
mesh (:func:`placed`) or as ``jax.ShapeDtypeStruct`` s in the shardings they would have
(:func:`abstract`, what ``lorax.plan`` compiles against). Both go through the same selection,
quantization, cast and method init, so a plan sees the trees a run trains.
"""

from __future__ import annotations

import jax
import numpy as np

from lorax import methods, paths, quant, sharding


def _place_frozen(frozen: dict, config, base_dtype, mesh) -> dict:
    """The frozen base quantized (QLoRA) and cast to ``base_dtype`` on the host, then placed on
    the mesh, each device receiving only its slice (random weights are there already)."""
    if config.model.get("quantize"):  # QLoRA: from the fp32 weights, standing for base_dtype ones
        frozen = quant.quantize_tree(
            frozen, config.model.quantize, config.model.quant_block, dtype=base_dtype
        )
    on_host = lambda x: not (quant.is_quantized(x) or isinstance(x, jax.Array))  # noqa: E731
    cast = lambda x: np.asarray(x, base_dtype) if on_host(x) else x  # noqa: E731
    return sharding.put(jax.tree_util.tree_map(cast, frozen, is_leaf=quant.is_quantized), mesh)


def placed(config, params, method, base_dtype, mesh, key, extra_head) -> tuple[dict, dict, dict]:
    """A run's frozen base (quantized, cast), head (with ``extra_head``: a reward run's score
    head) and new delta, placed on ``mesh``."""
    head_flat, frozen_flat = paths.select(
        paths.flatten(params), tuple(config.train.trainable), what="train.trainable pattern"
    )
    frozen = _place_frozen(paths.unflatten(frozen_flat), config, base_dtype, mesh)
    head = {**paths.unflatten(head_flat), **extra_head}
    head = sharding.put(jax.tree_util.tree_map(np.asarray, head), mesh)
    delta = method.init(frozen, jax.random.fold_in(key, 2))
    if method.replaces_base:  # the delta holds those base leaves now (fp32 copies)
        frozen = methods.drop_replaced(frozen, delta)
    return frozen, head, sharding.put(jax.tree_util.tree_map(np.asarray, delta), mesh)


def abstract(config, params, method, base_dtype, mesh, key, extra_head) -> tuple[dict, dict, dict]:
    """:func:`placed`'s trees without arrays: the same selection, cast, quantization and method
    init under ``jax.eval_shape``, each leaf a ``ShapeDtypeStruct`` in the sharding
    :func:`lorax.sharding.put` would give it."""
    head_flat, frozen_flat = paths.select(
        paths.flatten(params), tuple(config.train.trainable), what="train.trainable pattern"
    )

    def frozen_of(frozen):
        if config.model.get("quantize"):
            frozen = quant.quantize_tree(
                frozen, config.model.quantize, config.model.quant_block, dtype=base_dtype
            )
        return jax.tree_util.tree_map(
            lambda x: x if quant.is_quantized(x) else x.astype(base_dtype),
            frozen,
            is_leaf=quant.is_quantized,
        )

    frozen = jax.eval_shape(frozen_of, paths.unflatten(frozen_flat))
    delta = jax.eval_shape(lambda f: method.init(f, jax.random.fold_in(key, 2)), frozen)
    if method.replaces_base:
        frozen = methods.drop_replaced(frozen, delta)
    shaped = lambda tree: sharding.shaped(tree, mesh)
    return shaped(frozen), shaped({**paths.unflatten(head_flat), **extra_head}), shaped(delta)
