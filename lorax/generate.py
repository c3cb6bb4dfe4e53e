"""Text generation from a causal LM with a KV cache: ``python -m lorax.generate --config=...``.

Greedy decoding (``temperature=0``) or temperature / top-p sampling, jitted as one prefill
plus a ``lax.fori_loop`` of single-token steps. Works with the base alone, a wrapped adapter
(LoraWeight nodes: unmerged) or a merged adapter: they are all just params trees.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lorax import cli, paths
from lorax.models import decoder

PROMPT_MULTIPLE = 16  # prompts are left-padded to a multiple of this: few distinct compiles


def sample_token(logits_BV: jax.Array, key: jax.Array, temperature: float, top_p: float):
    """The next token per row: argmax when ``temperature == 0``, else a draw from the
    temperature-scaled distribution cut to its top-p nucleus (at least one token kept)."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep a token while the probability mass before it is below top_p.
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        kept_BV = before_BV < top_p
        cutoff_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_p", "eos_id")
)
def _generate(
    model: decoder.Decoder,
    params: Any,
    ids_BP: jax.Array,
    valid_BP: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int,
):
    b, p = ids_BP.shape
    total = p + max_new_tokens
    cache = decoder.init_cache(model.config, b, total, model.dtype)
    valid_BS = jnp.concatenate([valid_BP, jnp.ones((b, max_new_tokens), bool)], axis=1)
    positions_BP = jnp.maximum(jnp.cumsum(valid_BP, axis=1) - 1, 0)
    logits_BPV, cache = model.apply(
        {"params": params}, ids_BP, positions_BP, decoder.cache_mask(valid_BS, 0, p), cache
    )
    first_B = sample_token(logits_BPV[:, -1], jax.random.fold_in(key, 0), temperature, top_p)
    out_BN = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first_B)
    done_B = first_B == eos_id
    position_B = positions_BP[:, -1] + 1

    def step(i, carry):
        out_BN, cache, done_B, position_B = carry
        token_B1 = jax.lax.dynamic_slice_in_dim(out_BN, i - 1, 1, axis=1)
        logits_B1V, cache = model.apply(
            {"params": params},
            token_B1,
            position_B[:, None],
            decoder.cache_mask(valid_BS, cache["index"], 1),
            cache,
        )
        token_B = sample_token(logits_B1V[:, 0], jax.random.fold_in(key, i), temperature, top_p)
        token_B = jnp.where(done_B, eos_id, token_B)  # a finished row repeats eos
        out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, token_B[:, None], i, axis=1)
        return out_BN, cache, done_B | (token_B == eos_id), position_B + 1

    out_BN, *_ = jax.lax.fori_loop(1, max_new_tokens, step, (out_BN, cache, done_B, position_B))
    return out_BN


def generate(
    model: decoder.Decoder,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Continues each prompt; returns the new tokens of each, cut after the first eos.

    Args:
      model: the decoder (its ``scan`` setting must match the params' layout).
      params: base params, ``lora.wrap(base, delta, spec)`` or ``lora.merge(...)``.
      prompts: token ids, one list per prompt (left-padded together into one batch).
      max_new_tokens: tokens generated per prompt.
      temperature: 0 for greedy decoding; > 0 samples.
      top_p: nucleus size for sampling (1 = the whole distribution).
      seed: PRNG seed for sampling.
      eos_id: generation of a row stops at this token (kept in the output); None never stops.
      pad_id: token used for left padding (masked out, its value does not matter).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    longest = max(len(p) for p in prompts)
    width = -(-longest // PROMPT_MULTIPLE) * PROMPT_MULTIPLE
    limit = model.config.max_position_embeddings
    if model.config.positions == "learned" and longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's {limit} positions"
        )
    ids = np.full((len(prompts), width), pad_id, np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        valid[row, width - len(prompt) :] = True
    never = -1 if eos_id is None else int(eos_id)
    out = _generate(
        model,
        params,
        jnp.asarray(ids),
        jnp.asarray(valid),
        jax.random.key(seed),
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        eos_id=never,
    )
    result = []
    for row in np.asarray(out).tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        result.append(row)
    return result


# --------------------------------------------------------------------------- adapters


def load_for_generation(config, adapter: str | None, merge: bool = False):
    """``(setup, params)`` for decoding: the config's base, with the run's adapter if given
    (wrapped, or merged when ``merge``)."""
    from lorax import lora, runs
    from lorax import setup as setup_lib

    setup = setup_lib.build(config, with_task=False)
    if setup.kind == "reward":
        raise ValueError(
            "the config trains a reward model (train.objective = 'reward'): it scores texts "
            "and does not generate; score with lorax.predict, or generate with a config of "
            "train.objective = 'lm'"
        )
    if setup.kind != "lm":
        raise ValueError(f"model.name = {config.model.name!r} is not a causal LM")
    params = paths.overlay(setup.frozen, setup.head)
    if adapter is None:
        return setup, params
    delta, spec = runs.load_adapter(adapter, params)
    return setup, (lora.merge if merge else lora.wrap)(params, delta, spec)


# --------------------------------------------------------------------------- command line


def define_flags() -> None:
    """Defines the command line's flags (only when run as a program)."""
    config_flags.DEFINE_config_file("config", None, "The training config of the model.")
    flags.DEFINE_multi_string(
        "adapter", [], "Workdir of a training run whose adapter to load; repeat for several."
    )
    flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for several.")
    flags.DEFINE_multi_integer(
        "prompt_adapter",
        [],
        "Per prompt, which adapter decodes it: 0 = the base, i = the i-th --adapter. Default: "
        "every prompt with the base and with each adapter, side by side.",
    )
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with temperature > 0).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_bool("merge", False, "With one --adapter: merge it into the base before decoding.")
    flags.DEFINE_bool(
        "raw", False, "Use the prompt as is, not wrapped in the task's prompt template."
    )
    flags.DEFINE_bool(
        "chat", False, "Wrap each prompt as a user turn in the model's chat template."
    )
    flags.mark_flag_as_required("config")


def chat_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as one user turn in the tokenizer's chat template, ending where the
    assistant's reply begins; an error if the model has no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "--chat: this model's tokenizer has no chat template (a GGUF file's "
            "tokenizer.chat_template, or tokenizer_config.json's chat_template); drop --chat"
        )
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def _rows(n_prompts: int, n_adapters: int, chosen: list[int]) -> list[tuple[int, int]]:
    """(prompt, adapter slot) per batch row."""
    if not chosen:
        return [(p, a) for p in range(n_prompts) for a in range(n_adapters + 1)]
    if len(chosen) != n_prompts:
        raise app.UsageError(
            f"{len(chosen)} --prompt_adapter values for {n_prompts} prompts; give one per prompt"
        )
    bad = [a for a in chosen if not 0 <= a <= n_adapters]
    if bad:
        raise app.UsageError(
            f"--prompt_adapter={bad[0]} is not in 0..{n_adapters} (0 = base, i = i-th --adapter)"
        )
    return list(enumerate(chosen))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS.prompt:
        raise app.UsageError("give at least one --prompt")
    absl_logging.set_verbosity(absl_logging.WARNING)
    from lorax import lora, runs, serving

    f = flags.FLAGS
    config, workdirs = f.config, list(f.adapter)
    setup, base = load_for_generation(config, None)
    tok = setup.tokenizer
    texts = list(f.prompt)
    if f.chat:
        texts = chat_prompts(tok, texts)
    elif not f.raw and config.task.name == "instructions":
        from lorax import data as data_lib

        texts = [data_lib.format_prompt(t) for t in texts]
    adapters = [runs.load_adapter(w, base) for w in workdirs]
    labels = ["base model", *(f"adapter {os.path.abspath(w)}" for w in workdirs)]
    if f.merge:
        if len(adapters) != 1:
            raise app.UsageError("--merge needs exactly one --adapter")
        rows = [(p, 1) for p in range(len(texts))]
        params = lora.merge(base, *adapters[0])
    else:
        rows = _rows(len(texts), len(adapters), list(f.prompt_adapter))
        params = base
        if adapters:
            bank = serving.make_bank(base, adapters)
            params = serving.wrap(base, bank, jnp.asarray([a for _, a in rows]))
    # a chat template writes its own special tokens
    prompts = [tok(texts[p], add_special_tokens=not f.chat)["input_ids"] for p, _ in rows]
    outs = generate(
        setup.model,
        params,
        prompts,
        max_new_tokens=f.max_new_tokens,
        temperature=f.temperature,
        top_p=f.top_p,
        seed=f.seed,
        eos_id=tok.eos_token_id,
        pad_id=setup.pad_id,
    )
    for (p, a), out in zip(rows, outs, strict=True):
        print(f"--- {labels[a]}\n{texts[p]}", end="")
        print(tok.decode(out, skip_special_tokens=True))


if __name__ == "__main__":
    define_flags()
    cli.run(main, "lorax.generate")
