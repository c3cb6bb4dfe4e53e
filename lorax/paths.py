"""Parameter selection by regexes over "/"-joined paths, for LoRA targets and trained leaves."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

SEP = "/"


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Flattens a nested dict of params into ``{"a/b/kernel": leaf}``.

    Only dict nesting is flattened: pytree nodes such as ``LoraWeight`` stay whole leaves.
    """
    return traverse_util.flatten_dict(dict(tree), sep=SEP)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def key_str(key_path: Sequence[Any]) -> str:
    """A ``jax.tree_util`` key path as a :func:`flatten`-style path, ``"opt_state/0/mu/a"``:
    dict keys, sequence indices and attribute names alike (so dicts, tuples and named tuples
    give the same string, and a checkpoint restored as dicts keeps its paths)."""
    return jax.tree_util.keystr(tuple(key_path), simple=True, separator=SEP)


def overlay(base: Mapping[str, Any], *trees: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with every leaf of ``trees`` put in at its path (later trees win); a tree may
    be nested or already flat (``{"a/b/kernel": leaf}``)."""
    flat = flatten(base)
    for tree in trees:
        flat.update(flatten(tree))
    return unflatten(flat)


def compile_patterns(patterns: Iterable[str]) -> list[re.Pattern[str]]:
    """Compiles regexes, naming the pattern that fails to parse."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"invalid path regex {pattern!r}: {e}") from None
    return compiled


def first_match(path: str, patterns: Sequence[re.Pattern[str]]) -> int | None:
    """Index of the first pattern that ``re.search``-matches ``path``, or None."""
    for i, pattern in enumerate(patterns):
        if pattern.search(path):
            return i
    return None


def select(
    flat: Mapping[str, Any], patterns: Sequence[str], *, what: str = "pattern"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits ``flat`` into (matched, rest) by regexes; every pattern must match something.

    Args:
      flat: a flattened param dict (see :func:`flatten`).
      patterns: regexes searched in each path; a path belongs to ``matched`` if any matches.
      what: what the patterns select, used in the error message (e.g. "trainable pattern").

    Returns:
      ``(matched, rest)``, two flat dicts that partition ``flat``.

    Raises:
      ValueError: a pattern matches no path; the message lists some paths that exist.
    """
    compiled = compile_patterns(patterns)
    hits = [0] * len(compiled)
    matched, rest = {}, {}
    for path, leaf in flat.items():
        i = first_match(path, compiled)
        if i is None:
            rest[path] = leaf
        else:
            hits[i] += 1
            matched[path] = leaf
    for pattern, n in zip(patterns, hits, strict=True):
        if n == 0:
            raise ValueError(
                f"{what} {pattern!r} matches no parameter path; paths look like: "
                f"{describe_paths(flat)}"
            )
    return matched, rest


def describe_paths(flat: Mapping[str, Any], limit: int = 12) -> str:
    """A short, readable sample of the paths in ``flat`` for error messages."""
    paths = sorted(flat)
    shown = ", ".join(paths[:limit])
    return shown + (f", … ({len(paths)} in all)" if len(paths) > limit else "")


Message = str | Callable[..., str]


def check_tree(
    got: Mapping[str, Any],
    want: Mapping[str, Any],
    *,
    where: str = "",
    missing: Message = "{where}: lacks {path} {want}, which the model needs",
    unexpected: Message = (
        "{where}: has {path}, which the model does not have (model params look like: {sample})"
    ),
    mismatch: Message = "{where}: {path} has shape {got}; the model needs {want}",
    error: type[Exception] = ValueError,
) -> None:
    """Raises ``error`` naming the first path (sorted) at which two flat trees disagree.

    A path of ``want`` absent from ``got`` is *missing*, a path of ``got`` absent from ``want``
    is *unexpected*, and a path in both whose leaves differ is a *mismatch*. Leaves with a
    ``shape`` (arrays, ``jax.ShapeDtypeStruct``) are compared by ``tuple(shape)``, any other
    leaf (a shape tuple, a ``"float32[4, 3]"`` string) as it is.

    Args:
      got: what was found, flat ``{path: leaf}`` (see :func:`flatten`).
      want: what is needed, in the same form.
      where: what ``got`` came from (a file, a directory), for the message.
      missing, unexpected, mismatch: the message of each case: a ``str.format`` template, or
        a callable given the same fields as keywords. The fields: ``where``, ``path``, ``got``
        and ``want`` (the two leaves, by shape, None where absent) and ``sample`` (a few of
        ``want``'s paths, see :func:`describe_paths`).
      error: the exception type raised.
    """

    def spec(leaf: Any) -> Any:
        return tuple(leaf.shape) if hasattr(leaf, "shape") else leaf

    for path in sorted(set(got) | set(want)):
        g = spec(got[path]) if path in got else None
        w = spec(want[path]) if path in want else None
        if path not in got:
            message = missing
        elif path not in want:
            message = unexpected
        elif g == w:
            continue
        else:
            message = mismatch
        fields = {"where": where, "path": path, "got": g, "want": w}
        fields["sample"] = describe_paths(want, limit=4)
        raise error(message(**fields) if callable(message) else message.format(**fields))


_LAYER_RE = re.compile(r"(?:^|/)layers_(\d+)(?:/|$)")


def layer_index(path: str) -> int | None:
    """The transformer layer a path belongs to (``layers_3/...`` -> 3), or None."""
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


_LAYER_PREFIX_RE = re.compile(r"^layers_(\d+)/(.*)$")
STACKED_PREFIX = "layers/"


def stack_layers(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``layers_i/X`` leaves -> one ``layers/X`` leaf stacked on a new leading axis.

    The layout of a model whose layers run under ``nn.scan``. Every layer must hold the same
    paths with the same shapes (and LoRA nodes with the same rank). Leaves outside
    ``layers_i`` are kept as they are.
    """
    flat = flatten(tree)
    per_layer: dict[int, dict[str, Any]] = {}
    out = {}
    for path, leaf in flat.items():
        m = _LAYER_PREFIX_RE.match(path)
        if m:
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = leaf
        else:
            out[path] = leaf
    if not per_layer:
        return unflatten(out)
    n = max(per_layer) + 1
    if sorted(per_layer) != list(range(n)):
        raise ValueError(f"layers {sorted(set(range(n)) - set(per_layer))} are missing")
    first = per_layer[0]
    for i in range(n):
        if set(per_layer[i]) != set(first):
            diff = sorted(set(per_layer[i]) ^ set(first))
            raise ValueError(
                f"layers_{i} and layers_0 differ at {diff[0]}: stacked (scanned) layers must "
                "all hold the same params (a LoRA layer filter needs model.scan=False)"
            )
    for rest in first:
        leaves = [per_layer[i][rest] for i in range(n)]
        out[STACKED_PREFIX + rest] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *leaves)
    return unflatten(out)


def unstack_layers(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`stack_layers`: ``layers/X`` [L, ...] -> ``layers_i/X``."""
    out = {}
    for path, leaf in flatten(tree).items():
        if not path.startswith(STACKED_PREFIX):
            out[path] = leaf
            continue
        rest = path[len(STACKED_PREFIX) :]
        n = jax.tree_util.tree_leaves(leaf)[0].shape[0]
        for i in range(n):
            out[f"layers_{i}/{rest}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], leaf)
    return unflatten(out)


def is_stacked(path: str) -> bool:
    """Whether a path lies in a scanned stack of layers (its leaves have a leading [L] axis)."""
    return path.startswith(STACKED_PREFIX) or f"/{STACKED_PREFIX}" in path


def layer_path(stacked_path: str, i: int) -> str:
    """The per-layer path of layer ``i`` of a stacked path: ``layers/X`` -> ``layers_i/X``."""
    if stacked_path.startswith(STACKED_PREFIX):
        return f"layers_{i}/" + stacked_path[len(STACKED_PREFIX) :]
    return stacked_path.replace(f"/{STACKED_PREFIX}", f"/layers_{i}/", 1)


def nbytes(tree: Any) -> int:
    """Bytes held by a tree's array leaves (a quantized kernel counts its codes and scales)."""
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree)))
