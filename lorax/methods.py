"""The fine-tuning methods as transforms of a frozen base: LoRA, partial, adapters, prompts.

Every method speaks LoRA's vocabulary (see :mod:`lorax.lora`): a frozen *base* tree, a small
trainable *delta* tree, and pure verbs

=================== ======================================================================
``init(base, key)`` a new delta for this base
``apply(base, d)``  the params tree the model runs on (for LoRA: kernels wrapped, unmerged)
``merge(base, d)``  plain arrays of the base's own shapes (LoRA and the partial methods only)
``count(d)``        trainable parameters
=================== ======================================================================

and the optimizer is handed the delta (and the task head) alone. How each delta reaches the
model:

- **adalora**: LoRA's wrapped kernels with A = P·diag(λ); its regulariser and rank allocator
  run in the train step through the ``penalty`` / ``init_state`` / ``after_update`` hooks.
- **full / top_k_layers / bitfit** (*partial* methods): the delta holds fp32 copies of the
  chosen base leaves, which the base then drops (``replaces_base``); ``apply`` puts them back.
- **adapter_houlsby / adapter_lin**: a :class:`Bottleneck` node replaces the kernel of the
  attention output (Houlsby) and of the MLP output (both); :class:`lorax.nn.Dense` adds
  ``up(act(down(y)))`` to that layer's output ``y`` (Houlsby et al. 2019; Lin et al. 2020 put
  a LayerNorm before the down-projection and adapt the MLP only). ``up`` starts at zero.
- **prefix**: ``<layer>/attn/prefix/{k, v}`` [P, K·E] leaves, which :class:`lorax.nn.Attention`
  prepends to every layer's keys and values (Li & Liang 2021), produced from a [P, D] table
  by a tanh MLP while training when ``reparam``.
- **prompt / ptuning**: a ``prompt`` [P, D] leaf beside the model's ``embed`` scope, which the
  encoder and decoder prepend to the token embeddings (Lester et al. 2021); P-tuning computes it
  from its own table by a small MLP encoder (Liu et al. 2021).
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lorax import adalora, lora, paths, quant
from lorax.kernels import ACTIVATIONS, Bottleneck

METHODS = (
    "lora",
    "adalora",
    "full",
    "top_k_layers",
    "bitfit",
    "adapter_houlsby",
    "adapter_lin",
    "prefix",
    "prompt",
    "ptuning",
)


# --------------------------------------------------------------------------- the interface


class Method:
    """A fine-tuning method: which delta it trains and how the model sees it."""

    name: str
    replaces_base: ClassVar[bool] = False  # the delta holds base leaves, which the base drops

    def init(self, base: Mapping[str, Any], key: jax.Array) -> dict[str, Any]:
        raise NotImplementedError

    def apply(self, base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def merge(self, base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
        raise ValueError(
            f"method {self.name!r} adds modules or inputs the base model does not have, so it "
            "cannot be merged into the base's weights; methods that can: lora, full, "
            "top_k_layers, bitfit"
        )

    @staticmethod
    def count(delta: Any) -> int:
        """Trainable parameters in a delta."""
        return lora.count(delta)

    # A method that steers its own training (AdaLoRA) overrides these three.
    def penalty(self, delta: Mapping[str, Any]) -> jax.Array | float:
        """A term added to the training loss (a regulariser of the delta)."""
        return 0.0

    def init_state(self, delta: Mapping[str, Any]) -> dict[str, Any] | None:
        """The method's own state in the train state (``state["method"]``), or None."""
        return None

    def after_update(self, state, delta, grads, steps_taken) -> tuple[dict, dict]:
        """``(delta, state)`` after each optimizer update (given the step's delta gradient
        and the optimizer steps taken, this one included)."""
        return delta, state

    def summary(self, state) -> dict[str, Any]:
        """What a run's summary.json records of the method's final state."""
        return {}


def _key(key: jax.Array, path: str) -> jax.Array:
    """A key per path, so adding one site does not change the others' init."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()))


def _uniform_in(key, shape, fan_in: int) -> jax.Array:
    """``torch.nn.Linear``'s default (Kaiming-uniform) init of a [fan_in, out] kernel."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _no_quantized(base: Mapping[str, Any], name: str) -> None:
    for path, leaf in paths.flatten(base).items():
        if quant.is_quantized(leaf):
            raise ValueError(
                f"method {name!r} cannot run over a quantized base ({path} is "
                f"{leaf.kind}); set model.quantize = '' or use method = 'lora' (QLoRA)"
            )


# --------------------------------------------------------------------------- LoRA


@dataclasses.dataclass(frozen=True)
class LoRA(Method):
    """Low-rank updates of the chosen kernels (:mod:`lorax.lora`)."""

    spec: lora.LoraSpec
    name: str = "lora"

    def init(self, base, key):
        return lora.init(base, self.spec, key)

    def apply(self, base, delta):
        return lora.wrap(base, delta, self.spec)

    def merge(self, base, delta):
        return lora.merge(base, delta, self.spec)


@dataclasses.dataclass(frozen=True)
class AdaLoRA(Method):
    """LoRA in SVD form with its rank budget reallocated while training (:mod:`lorax.adalora`)."""

    spec: adalora.AdaSpec
    name: str = "adalora"

    def init(self, base, key):
        return adalora.init(base, self.spec, key)

    def apply(self, base, delta):
        return adalora.wrap(base, delta, self.spec)

    def merge(self, base, delta):
        return adalora.merge(base, delta, self.spec)

    def penalty(self, delta):
        return adalora.orth_penalty(delta, self.spec.orth_reg_weight)

    def init_state(self, delta):
        return adalora.init_state(delta)

    def after_update(self, state, delta, grads, steps_taken):
        return adalora.allocate(self.spec, state, delta, grads, steps_taken)

    def summary(self, state):
        return adalora.summary(state)


# --------------------------------------------------------------------------- partial methods


@dataclasses.dataclass(frozen=True)
class Partial(Method):
    """Trains a subset of the base's own leaves: all (full), the top k layers, or the biases.

    Attributes:
      name: "full", "top_k_layers" or "bitfit".
      top_k: for "top_k_layers", how many of the last layers are trained.
    """

    name: str
    top_k: int = 0
    replaces_base: ClassVar[bool] = True

    def selected(self, base: Mapping[str, Any]) -> list[str]:
        """The base paths this method trains (checked against the base)."""
        _no_quantized(base, self.name)
        flat = paths.flatten(base)
        if self.name == "full":
            return sorted(flat)
        if self.name == "bitfit":
            chosen = [p for p in flat if p.endswith("/bias")]
            if not chosen:
                raise ValueError(
                    "method 'bitfit' trains bias terms, and this model has none (paths look "
                    f"like: {paths.describe_paths(flat)}); choose another method"
                )
            return sorted(chosen)
        if self.name != "top_k_layers":
            raise ValueError(f"unknown partial method {self.name!r}")
        stacked = [p for p in flat if paths.is_stacked(p)]
        if stacked:
            raise ValueError(
                f"method 'top_k_layers' needs one param tree per layer, but {stacked[0]} is a "
                "scanned stack of every layer; set model.scan = False"
            )
        layers = {p: paths.layer_index(p) for p in flat}
        num_layers = 1 + max((i for i in layers.values() if i is not None), default=-1)
        if not 1 <= self.top_k <= num_layers:
            raise ValueError(
                f"top_k_layers.k = {self.top_k} is not valid for a model of {num_layers} "
                f"layers; valid: 1..{num_layers}"
            )
        return sorted(
            p for p, i in layers.items() if i is not None and i >= num_layers - self.top_k
        )

    def init(self, base, key):
        del key  # the trained leaves start at their pretrained values
        flat = paths.flatten(base)
        return paths.unflatten({p: jnp.asarray(flat[p], jnp.float32) for p in self.selected(base)})

    def apply(self, base, delta):
        return paths.overlay(base, delta)

    def merge(self, base, delta):
        return self.apply(base, delta)


def drop_replaced(base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` without the leaves ``delta`` holds (a partial method's frozen part)."""
    taken = set(paths.flatten(delta))
    return paths.unflatten({p: v for p, v in paths.flatten(base).items() if p not in taken})


# --------------------------------------------------------------------------- adapters


ADAPTER_SITES = {
    "adapter_houlsby": r"(?:^|/)(?:attn/o|mlp/mlp_out)/kernel$",
    "adapter_lin": r"(?:^|/)mlp/mlp_out/kernel$",
}


@dataclasses.dataclass(frozen=True)
class Adapter(Method):
    """Bottleneck adapters after attention and MLP (Houlsby) or after the MLP (Lin).

    Attributes:
      name: "adapter_houlsby" or "adapter_lin".
      size: the bottleneck width M.
      activation: the nonlinearity between down- and up-projection.
    """

    name: str
    size: int
    activation: str = "relu"

    def __post_init__(self):
        if self.name not in ADAPTER_SITES:
            raise ValueError(f"unknown adapter method {self.name!r}; valid: {list(ADAPTER_SITES)}")
        if not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"adapter.size must be a positive integer, got {self.size!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"adapter.activation = {self.activation!r} is not valid; choose one of "
                f"{sorted(ACTIVATIONS)}"
            )

    def sites(self, base) -> dict[str, tuple[int, ...]]:
        """Kernel path -> its shape, for every kernel an adapter follows."""
        _no_quantized(base, self.name)
        pattern = re.compile(ADAPTER_SITES[self.name])
        flat = paths.flatten(base)
        found = {p: tuple(np.shape(v)) for p, v in flat.items() if pattern.search(p)}
        if not found:
            raise ValueError(
                f"method {self.name!r} puts adapters after the kernels matching "
                f"{pattern.pattern!r}, and this model has none; paths look like: "
                f"{paths.describe_paths(flat)}"
            )
        return found

    def init(self, base, key):
        delta = {}
        for path, (*stack, _, f) in self.sites(base).items():
            m = self.size
            parts = {
                "down": _uniform_in(_key(key, path), (*stack, f, m), f),
                "down_bias": jnp.zeros((*stack, m)),
                "up": jnp.zeros((*stack, m, f)),
                "up_bias": jnp.zeros((*stack, f)),
            }
            if self.name == "adapter_lin":
                parts |= {"norm_scale": jnp.ones((*stack, f)), "norm_bias": jnp.zeros((*stack, f))}
            delta[path] = parts
        return paths.unflatten(delta)

    def apply(self, base, delta):
        flat, parts = paths.flatten(base), _grouped(delta)
        for path in self.sites(base):
            if path not in parts:
                raise ValueError(f"delta has no adapter for {path}, which {self.name} adapts")
            flat[path] = Bottleneck(flat[path], **parts.pop(path), activation=self.activation)
        if parts:
            raise ValueError(
                f"delta has adapters for {sorted(parts)}, which {self.name} does not adapt"
            )
        return paths.unflatten(flat)


def _grouped(delta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"<kernel>/down": x, ...}`` flattened -> ``{"<kernel>": {"down": x, ...}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, leaf in paths.flatten(delta).items():
        path, _, part = key.rpartition(paths.SEP)
        out.setdefault(path, {})[part] = leaf
    return out


# --------------------------------------------------------------------------- prefix tuning


def _mlp(params: Mapping[str, Any], x: jax.Array, act) -> jax.Array:
    """``x`` through the dense layers ``w1, b1, w2, b2, …`` with ``act`` between them."""
    n = sum(1 for k in params if k.startswith("w"))
    for i in range(1, n + 1):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < n:
            x = act(x)
    return x


def _mlp_init(key, widths: list[int], zero_last: bool = False) -> dict[str, jax.Array]:
    out = {}
    for i, (d, f) in enumerate(zip(widths[:-1], widths[1:], strict=True), start=1):
        last = i == len(widths) - 1
        w = (
            jnp.zeros((d, f))
            if zero_last and last
            else _uniform_in(jax.random.fold_in(key, i), (d, f), d)
        )
        out |= {f"w{i}": w, f"b{i}": jnp.zeros((f,))}
    return out


@dataclasses.dataclass(frozen=True)
class Prefix(Method):
    """Trainable key/value prefixes in every attention layer (Li & Liang 2021).

    Attributes:
      length: P, the prefix positions per layer.
      reparam: train a [P, D] table and a tanh MLP whose output is every layer's prefixes
        (Li & Liang's reparameterisation, which they found steadier); else train the
        prefixes themselves.
      hidden: the MLP's hidden width.
    """

    length: int
    reparam: bool = True
    hidden: int = 512
    name: str = "prefix"

    def __post_init__(self):
        if not isinstance(self.length, int) or self.length <= 0:
            raise ValueError(f"prefix.length must be a positive integer, got {self.length!r}")

    def sites(self, base) -> tuple[int, dict[str, tuple[int, ...]]]:
        """``(D, {attention scope: [*stack, K·E]})``, from the k kernels' shapes."""
        _no_quantized(base, self.name)
        flat = paths.flatten(base)
        found, width = {}, None
        for path, leaf in flat.items():
            m = re.match(r"^(.*attn)/k/kernel$", path)
            if m:
                *stack, width, ke = np.shape(leaf)
                found[m.group(1)] = (*stack, ke)
        if not found:
            raise ValueError(
                "method 'prefix' needs attention layers with a k kernel (<layer>/attn/k/kernel); "
                f"paths look like: {paths.describe_paths(flat)}"
            )
        return int(width), dict(sorted(found.items()))

    @staticmethod
    def _widths(sites) -> list[int]:
        """Per site, the MLP outputs one prefix row needs: 2 (k, v) × layers × K·E."""
        return [2 * math.prod(s[:-1]) * s[-1] for s in sites.values()]

    def init(self, base, key):
        d, sites = self.sites(base)
        if not self.reparam:
            return paths.unflatten(
                {
                    f"{scope}/prefix/{kv}": 0.02
                    * jax.random.normal(_key(key, f"{scope}/{kv}"), (*s[:-1], self.length, s[-1]))
                    for scope, s in sites.items()
                    for kv in ("k", "v")
                }
            )
        return {
            "prefix_encoder": {
                "embedding": jax.random.normal(_key(key, "embedding"), (self.length, d)),
                # The last layer starts at zero, so every prefix key and value starts at 0:
                # the model starts near the base (a zero key takes a little of each row's
                # attention, a zero value adds nothing), not swamped by random prefixes.
                **_mlp_init(
                    _key(key, "mlp"), [d, self.hidden, sum(self._widths(sites))], zero_last=True
                ),
            }
        }

    def prefixes(self, base, delta) -> dict[str, jax.Array]:
        """``{"<scope>/prefix/k": [*stack, P, K·E], …}``: the arrays the model reads."""
        _, sites = self.sites(base)
        if not self.reparam:
            return paths.flatten(delta)
        enc = delta["prefix_encoder"]
        out_PX = _mlp(
            {k: v for k, v in enc.items() if k != "embedding"}, enc["embedding"], jnp.tanh
        )
        out, start = {}, 0
        for (scope, s), n in zip(sites.items(), self._widths(sites), strict=True):
            # [P, 2·L·KE] -> [2, *stack, P, KE]
            part = out_PX[:, start : start + n].reshape(self.length, 2, *s[:-1], s[-1])
            part = jnp.moveaxis(part, 0, -2)
            out[f"{scope}/prefix/k"], out[f"{scope}/prefix/v"] = part[0], part[1]
            start += n
        return out

    def apply(self, base, delta):
        return paths.overlay(base, self.prefixes(base, delta))


# --------------------------------------------------------------------------- prompt tuning


EMBED_TABLE = re.compile(r"^(?:(.*)/)?embed/token/embedding$")


@dataclasses.dataclass(frozen=True)
class Prompt(Method):
    """Trainable input embeddings prepended to every example (prompt tuning, P-tuning).

    Attributes:
      length: P, the soft-prompt positions.
      name: "prompt" (the [P, D] prompt is trained) or "ptuning" (a [P, D] table is trained
        with an MLP encoder D -> hidden -> hidden -> D, added to the table as a residual
        whose last layer starts at zero, so both methods start from the same prompt).
      init_from: "vocab" (rows of the token table at random ids, Lester et al.'s better choice)
        or "random" (normal, std 0.02).
      hidden: the P-tuning encoder's width.
    """

    length: int
    name: str = "prompt"
    init_from: str = "vocab"
    hidden: int = 256

    def __post_init__(self):
        if not isinstance(self.length, int) or self.length <= 0:
            raise ValueError(f"{self.name}.length must be a positive integer, got {self.length!r}")
        if self.init_from not in ("vocab", "random"):
            raise ValueError(
                f"{self.name}.init = {self.init_from!r} is not valid; choose 'vocab' or 'random'"
            )

    def site(self, base) -> tuple[str, jax.Array]:
        """``(path of the prompt leaf, token table)``."""
        flat = paths.flatten(base)
        for path, leaf in flat.items():
            m = EMBED_TABLE.match(path)
            if m:
                if quant.is_quantized(leaf):
                    leaf = quant.dequantize(leaf, jnp.float32)
                return (f"{m.group(1)}/prompt" if m.group(1) else "prompt"), leaf
        raise ValueError(
            f"method {self.name!r} needs a token table (…embed/token/embedding); paths look "
            f"like: {paths.describe_paths(flat)}"
        )

    def init(self, base, key):
        _, table = self.site(base)
        v, d = table.shape
        if self.init_from == "vocab":
            ids = jax.random.randint(_key(key, "ids"), (self.length,), 0, v)
            prompt = jnp.take(jnp.asarray(table, jnp.float32), ids, axis=0)
        else:
            prompt = 0.02 * jax.random.normal(_key(key, "prompt"), (self.length, d))
        if self.name == "prompt":
            return {"prompt": prompt}
        return {
            "prompt_encoder": {
                "embedding": prompt,
                **_mlp_init(_key(key, "mlp"), [d, self.hidden, self.hidden, d], zero_last=True),
            }
        }

    def prompt(self, delta) -> jax.Array:
        """The [P, D] prompt the model prepends."""
        if self.name == "prompt":
            return delta["prompt"]
        enc = delta["prompt_encoder"]
        mlp = {k: v for k, v in enc.items() if k != "embedding"}
        return enc["embedding"] + _mlp(mlp, enc["embedding"], jax.nn.relu)

    def apply(self, base, delta):
        path, _ = self.site(base)
        return paths.overlay(base, {path: self.prompt(delta)})


# --------------------------------------------------------------------------- from a config


def _parse_overrides(text: str, field: str, cast) -> dict[str, Any]:
    """Parses "v=8,q=2" into {"v": 8, "q": 2}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, eq, value = item.partition("=")
        try:
            out[name.strip()] = cast(value)
        except ValueError:
            eq = ""
        if not eq:
            raise ValueError(f"{field} item {item!r} is not NAME=VALUE (e.g. 'v=8,q=2')")
    return out


def _parse_layers(text: str) -> tuple[int, ...]:
    """Parses "0,2,4-5" into (0, 2, 4, 5)."""
    layers = []
    for item in filter(None, (s.strip() for s in str(text).split(","))):
        lo, dash, hi = item.partition("-")
        try:
            layers.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
        except ValueError:
            raise ValueError(
                f"lora.layers item {item!r} is not a layer index or range (e.g. '0,1,2' or '3-5')"
            ) from None
    return tuple(layers)


def lora_spec(section) -> lora.LoraSpec:
    """The LoRA spec the config's ``lora`` section describes (configs/base.py)."""
    return lora.make_spec(
        section.targets,
        rank=section.rank,
        alpha=section.alpha,
        rank_pattern=_parse_overrides(section.rank_pattern, "lora.rank_pattern", int),
        alpha_pattern=_parse_overrides(section.alpha_pattern, "lora.alpha_pattern", float),
        layers=_parse_layers(section.layers),
        init=section.init,
        dropout=section.dropout,
        rslora=section.rslora,
        dora=section.get("dora", False),
    )


def lr_ratio_b(config) -> float:
    """LoRA+'s ``lora.lr_ratio_b`` (1 = plain LoRA), checked: positive, and only for LoRA."""
    ratio = config.lora.get("lr_ratio_b", 1.0)
    if not isinstance(ratio, int | float) or isinstance(ratio, bool) or not ratio > 0:
        raise ValueError(f"lora.lr_ratio_b = {ratio!r} is not valid; it must be a number > 0")
    if ratio != 1.0 and config.method != "lora":
        raise ValueError(
            f"lora.lr_ratio_b = {ratio} (LoRA+) applies to method = 'lora', not "
            f"{config.method!r}; set it to 1"
        )
    return float(ratio)


def from_config(config) -> Method:
    """The method ``config.method`` names, with its own section's settings (configs/base.py)."""
    name = config.method
    if name not in METHODS:
        raise ValueError(f"method = {name!r} is not valid; choose one of {list(METHODS)}")
    if name == "lora":
        return LoRA(lora_spec(config.lora))
    if name == "adalora":
        return AdaLoRA(adalora.spec(lora_spec(config.lora), config.adalora, config.train))
    if name in ("full", "bitfit"):
        return Partial(name)
    if name == "top_k_layers":
        return Partial(name, top_k=int(config.top_k_layers.k))
    if name in ADAPTER_SITES:
        return Adapter(name, int(config.adapter.size), config.adapter.activation)
    if name == "prefix":
        c = config.prefix
        return Prefix(int(c.length), bool(c.reparam), int(c.hidden))
    c = config[name]
    return Prompt(int(c.length), name, c.init, int(c.get("hidden", 256)))
