"""Evaluation: a jitted step that returns metric sums and counts, divided once on the host."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorax import runfiles, sharding

Forward = Callable[..., jax.Array]  # (trainable, frozen, batch, rng, train) -> logits


def classification_sums(
    logits_BC: jax.Array, batch: Mapping[str, jax.Array], class_weights_C=None
) -> dict:
    """Loss and accuracy as sums over real rows (weight 1), with the row count.

    With ``class_weights_C`` (``task.class_weights``) also ``weighted_loss_sum`` (each row's
    cross-entropy times its gold class's weight) and ``loss_weight`` (the weights' sum): the
    train loss is then their ratio (:func:`train_loss`), PyTorch's weighted
    ``CrossEntropyLoss``; ``loss_sum`` stays the plain one that is logged.
    """
    w_B = batch["weights"].astype(jnp.float32)
    ce_B = optax.softmax_cross_entropy_with_integer_labels(
        logits_BC.astype(jnp.float32), batch["labels"]
    )
    correct_B = (jnp.argmax(logits_BC, -1) == batch["labels"]).astype(jnp.float32)
    sums = {
        "loss_sum": jnp.sum(ce_B * w_B),
        "correct": jnp.sum(correct_B * w_B),
        "count": jnp.sum(w_B),
        "confusion": _confusion(logits_BC, batch["labels"], w_B),
    }
    if class_weights_C is not None:
        cw_B = jnp.asarray(class_weights_C, jnp.float32)[batch["labels"]] * w_B
        sums["weighted_loss_sum"] = jnp.sum(ce_B * cw_B)
        sums["loss_weight"] = jnp.sum(cw_B)
    return sums


def train_loss(sums: Mapping[str, jax.Array]) -> jax.Array:
    """The loss a train step differentiates: the class-weighted mean when the sums carry one
    (:func:`classification_sums` with class weights), else ``loss_sum / count``."""
    if "weighted_loss_sum" in sums:
        return sums["weighted_loss_sum"] / jnp.maximum(sums["loss_weight"], 1e-12)
    return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)


def _confusion(scores_BC: jax.Array, labels_B: jax.Array, w_B: jax.Array) -> jax.Array:
    """[C, C] weighted counts: row = true class, column = predicted class."""
    c = scores_BC.shape[-1]
    true_BC = jax.nn.one_hot(labels_B, c, dtype=jnp.float32) * w_B[:, None]
    pred_BC = jax.nn.one_hot(jnp.argmax(scores_BC, -1), c, dtype=jnp.float32)
    return true_BC.T @ pred_BC


def class_metrics(confusion_CC: np.ndarray) -> dict:
    """Macro-F1 and per-class precision, recall, F1 and support from a confusion matrix
    (rows true, columns predicted); a class never predicted (or absent) has precision (recall)
    0, as scikit-learn's ``zero_division=0`` gives."""
    conf = np.asarray(confusion_CC, np.float64)
    tp, predicted, support = np.diag(conf), conf.sum(0), conf.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "macro_f1": float(f1.mean()),
        "per_class": [
            {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
            for p, r, f, n in zip(precision, recall, f1, support, strict=True)
        ],
        "confusion": conf.round().astype(int).tolist(),
    }


@dataclasses.dataclass(frozen=True)
class Hidden:
    """A causal LM's final hidden states and its output layer, in place of [B, T, V] logits.

    :func:`lm_sums` and :func:`choice_sums` take it wherever they take logits. From it they
    compute each position's target log-probability and argmax ``chunk`` positions at a time:
    no pass holds more than [B, chunk, V] logits, where the dense path writes fp32 [B, T, V]
    logits (3.3 GB for GPT-2 at 16×1024) and reads them again for the log-softmax, the
    gather, the argmax and the backward pass. How the hidden states get their gradient:

    - ``grad="forward"``: while a chunk's logits are at hand, its forward pass also computes
      d log p(target) / d hidden (``(onehot − softmax)`` through the output layer's VJP) and
      keeps that [B, chunk, D]; the backward pass only scales it by each position's
      cotangent. Output-layer matmuls: as many as dense logits (forward, input gradient).
      A trained output layer (full fine-tuning, a LoRA on the head) gets its gradient from
      each chunk's logits recomputed in the backward pass; where nothing is trained there,
      XLA drops that work.
    - ``grad="recompute"``: each chunk under ``jax.checkpoint``; the backward pass recomputes
      its logits, one more output-layer matmul than dense logits.

    Attributes:
      hidden_BTD: the final hidden states (after the final norm).
      project: ``(x_BCD, i) -> logits_BCV`` for chunk ``i`` (``i`` keys its dropout); it must
        act on each position alone (a dense output layer, dropout), as the forward-grad path
        scales each position's gradient by its own cotangent.
      chunk: positions per chunk.
      grad: "forward" or "recompute" (:data:`LOSS_GRADS`).
    """

    hidden_BTD: jax.Array
    project: Callable[[jax.Array, jax.Array], jax.Array]
    chunk: int
    grad: str = "forward"


LOSS_GRADS = ("forward", "recompute")  # model.loss_grad: see Hidden
LOSS_CHUNK_BYTES = 256 << 20  # fp32 logits per chunk that "auto" aims for
# "auto" chunks where a batch's fp32 logits would reach this: half a GiB, so that the 1B Llama
# at 8×1024 (32,000 words: 0.98 GiB of logits) is chunked too (lorax.plan found it dense).
LOSS_CHUNK_FROM = 512 << 20


def choose_loss_chunk(
    requested: int, rows: int, length: int, vocab: int, platform: str | None = None
) -> int:
    """``model.loss_chunk`` resolved: positions per chunk of the LM loss, or 0 for dense logits.

    -1 ("auto") chunks on an accelerator where the fp32 logits [rows, length, vocab] of the
    rows one device holds would take 512 MiB or more, in chunks of the largest power of two
    positions whose logits fit 256 MiB (GPT-2 at 16×1024: 64; the 1B Llama at 8×1024: 256);
    on a CPU, where memory is plentiful and the recomputed output layer costs time, it keeps
    the dense logits. 0 and N > 0 are taken as they are. ``platform`` is the one the step is
    compiled for (default: the host's backend).
    """
    if requested >= 0:
        return requested
    if (platform or jax.default_backend()) == "cpu" or rows * length * vocab * 4 < LOSS_CHUNK_FROM:
        return 0
    chunk = 8
    while chunk * 2 < length and rows * chunk * 2 * vocab * 4 <= LOSS_CHUNK_BYTES:
        chunk *= 2
    return chunk


def _target_stats(out: jax.Array | Hidden, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log p(target) in fp32, the argmax token), both [B, T], from logits or :class:`Hidden`."""
    if isinstance(out, Hidden):
        return _chunked_target_stats(out, targets_BT)
    logp_BTV = jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)
    logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return logp_BT, jnp.argmax(out, -1)


def _chunked_target_stats(out: Hidden, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    if out.grad not in LOSS_GRADS:
        raise ValueError(f"model.loss_grad = {out.grad!r}; choose one of {list(LOSS_GRADS)}")
    b, t, d = out.hidden_BTD.shape
    c = max(1, min(out.chunk, t))
    n = -(-t // c)
    x_BTD = jnp.pad(out.hidden_BTD, ((0, 0), (0, n * c - t), (0, 0)))
    y_BT = jnp.pad(targets_BT, ((0, 0), (0, n * c - t)))
    i_N = jnp.arange(n)
    x_NBCD = x_BTD.reshape(b, n, c, d).swapaxes(0, 1)
    y_NBC = y_BT.reshape(b, n, c).swapaxes(0, 1)
    if out.grad == "forward":
        project, consts = _with_consts_as_arguments(out.project, x_NBCD[0], i_N[0])
        stats = _chunks_grad_in_forward(project, i_N, x_NBCD, y_NBC, *consts)
    else:
        stats = jax.lax.map(jax.checkpoint(lambda a: _chunk_stats(out.project(a[1], a[0]), a[2])),
                            (i_N, x_NBCD, y_NBC))  # fmt: skip
    return tuple(a.swapaxes(0, 1).reshape(b, n * c)[:, :t] for a in stats)


def _with_consts_as_arguments(fn: Callable, *example) -> tuple[Callable, list]:
    """``fn`` taking every value it closes over as trailing arguments, and those values.

    All of them: the output layer's params, which the custom VJP differentiates, and the
    integers and PRNG keys too (a dropout key, quantized codes). ``jax.closure_convert``
    hoists only the floats; a key left inside would be a tracer of whatever transformation
    made it (``vmap`` over adapters, ``scan``, ``cond``, ``checkpoint``), leaked when the
    backward pass calls the layer again after that transformation has ended.
    """
    closed = jax.make_jaxpr(fn)(*example)
    n = len(example)

    def converted(*args):
        return jax.core.eval_jaxpr(closed.jaxpr, args[n:], *args[:n])[0]

    return converted, list(closed.consts)


def _chunk_stats(logits_BCV: jax.Array, y_BC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log p(target) in fp32, argmax) of one chunk's logits."""
    return _log_softmax_stats(logits_BCV, y_BC)[:2]


def _log_softmax_stats(logits_BCV, y_BC) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log p(target), argmax, log-softmax [B, C, V]) of one chunk's logits, in fp32."""
    logits_BCV = logits_BCV.astype(jnp.float32)
    logp_BCV = logits_BCV - jax.nn.logsumexp(logits_BCV, axis=-1, keepdims=True)
    target_BC = jnp.take_along_axis(logp_BCV, y_BC[..., None], axis=-1)[..., 0]
    return target_BC, jnp.argmax(logits_BCV, -1), logp_BCV


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunks_grad_in_forward(project, i_N, x_NBCD, y_NBC, *consts):
    """Each chunk's (log p(target), argmax): ``project(x_BCD, i, *consts)`` are its logits.
    Undifferentiated (evaluation) it is this plain loop; its VJP is :func:`_grad_fwd` and
    :func:`_grad_bwd`."""
    return jax.lax.map(lambda a: _chunk_stats(project(a[1], a[0], *consts), a[2]),
                       (i_N, x_NBCD, y_NBC))  # fmt: skip


def _grad_fwd(project, i_N, x_NBCD, y_NBC, *consts):
    """The chunks' stats and, per chunk, d log p(target) / d x [B, C, D] (in x's dtype)."""

    def one(args):
        i, x_BCD, y_BC = args
        logits_BCV, vjp = jax.vjp(lambda x: project(x, i, *consts), x_BCD)
        logp_BC, pred_BC, logp_BCV = _log_softmax_stats(logits_BCV, y_BC)
        # d log p(target) / d logits = onehot(target) − softmax
        onehot_BCV = jax.nn.one_hot(y_BC, logp_BCV.shape[-1], dtype=jnp.float32)
        (dx_BCD,) = vjp((onehot_BCV - jnp.exp(logp_BCV)).astype(logits_BCV.dtype))
        return logp_BC, pred_BC, dx_BCD

    logp, pred, dx_NBCD = jax.lax.map(one, (i_N, x_NBCD, y_NBC))
    return (logp, pred), (dx_NBCD, i_N, x_NBCD, y_NBC, consts)


def _grad_bwd(project, residuals, cotangents):
    """x's cotangent: the forward's per-position gradient times that position's cotangent.
    The floating consts' (a trained output layer): each chunk's logits recomputed, their VJP
    summed in fp32 over the chunks (unused, and so dropped by XLA, when nothing there trains)."""
    dx_NBCD, i_N, x_NBCD, y_NBC, consts = residuals
    g_NBC = cotangents[0]
    ct_x = (g_NBC[..., None] * dx_NBCD.astype(jnp.float32)).astype(x_NBCD.dtype)
    trained = [jnp.issubdtype(c.dtype, jnp.inexact) for c in consts]

    def body(acc, args):
        i, x_BCD, y_BC, g_BC = args

        def logp(floats):
            it = iter(floats)
            cs = [next(it) if f else c for c, f in zip(consts, trained, strict=True)]
            return _chunk_stats(project(x_BCD, i, *cs), y_BC)[0]

        _, vjp = jax.vjp(logp, [c for c, f in zip(consts, trained, strict=True) if f])
        (d,) = vjp(g_BC)
        return [a + b.astype(jnp.float32) for a, b in zip(acc, d, strict=True)], None

    zeros = [jnp.zeros(c.shape, jnp.float32) for c, f in zip(consts, trained, strict=True) if f]
    sums, _ = jax.lax.scan(body, zeros, (i_N, x_NBCD, y_NBC, g_NBC))
    it = iter(sums)
    ct_consts = [
        next(it).astype(c.dtype) if f else None for c, f in zip(consts, trained, strict=True)
    ]
    return (None, ct_x, None, *ct_consts)


_chunks_grad_in_forward.defvjp(_grad_fwd, _grad_bwd)


def lm_sums(logits_BTV: jax.Array | Hidden, batch: Mapping[str, jax.Array]) -> dict:
    """Next-token loss and accuracy summed over the target tokens (``loss_mask``), with count.

    ``batch["targets"][b, t]`` is the token logits[b, t] predicts; ``loss_mask`` is 1 where it
    is trained (response tokens), so prompts and padding count nothing. ``logits_BTV`` may be
    a :class:`Hidden` (the chunked path).
    """
    m_BT = batch["loss_mask"].astype(jnp.float32)
    logp_BT, pred_BT = _target_stats(logits_BTV, batch["targets"])
    correct_BT = (pred_BT == batch["targets"]).astype(jnp.float32)
    return {
        "loss_sum": -jnp.sum(logp_BT * m_BT),
        "correct": jnp.sum(correct_BT * m_BT),
        "count": jnp.sum(m_BT),
    }


def perplexity(mean_loss: float) -> float:
    """The perplexity of a mean next-token loss in nats (from :func:`lm_sums`' sums):
    exp(loss_sum / count); inf past float64's range."""
    with np.errstate(over="ignore"):
        return float(np.exp(np.float64(mean_loss)))


def choice_sums(logits_BTV: jax.Array | Hidden, batch: Mapping[str, jax.Array]) -> dict:
    """Accuracy of picking the likeliest of C fixed continuations, summed over examples.

    Rows ``b·C + c`` hold example b's prompt followed by choice c (see
    :class:`lorax.data.ChoiceBatcher`); a choice's score is the summed log-probability of
    its tokens. The loss is the cross-entropy of the scores, renormalised over the choices.
    """
    w_B = batch["weights"].astype(jnp.float32)
    labels_B = batch["labels"]
    rows_R = jnp.sum(
        _target_stats(logits_BTV, batch["targets"])[0] * batch["loss_mask"].astype(jnp.float32),
        axis=-1,
    )
    scores_BC = rows_R.reshape(labels_B.shape[0], -1)
    ce_B = optax.softmax_cross_entropy_with_integer_labels(scores_BC, labels_B)
    correct_B = (jnp.argmax(scores_BC, -1) == labels_B).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(ce_B * w_B),
        "correct": jnp.sum(correct_B * w_B),
        "count": jnp.sum(w_B),
        "confusion": _confusion(scores_BC, labels_B, w_B),
    }


def reward_sums(rewards_R: jax.Array, batch: Mapping[str, jax.Array]) -> dict:
    """A reward model's Bradley–Terry loss over preference pairs, summed over real pairs.

    Row ``2p`` of the batch is pair p's chosen text and row ``2p + 1`` its rejected one
    (:class:`lorax.data.PairBatcher`); ``rewards_R`` [2P] is the model's scalar for each row.
    Pair p's loss is ``−log σ(r_chosen − r_rejected − margin_p)`` (Bradley–Terry; the
    ``margin`` [P] the data may give, 0 without one: a pair marked as more clearly decided
    must be won by more, as in TRL's ``RewardTrainer``). ``correct`` counts pairs whose
    chosen text scores higher (preference accuracy), ``margin_sum`` sums
    ``r_chosen − r_rejected`` (mean margin), both unweighted by the data's margins;
    ``weights`` [P] is 0 on a padding pair.
    """
    w_P = batch["weights"].astype(jnp.float32)
    pairs_P2 = rewards_R.astype(jnp.float32).reshape(-1, 2)
    chosen_P, rejected_P = pairs_P2[:, 0], pairs_P2[:, 1]
    diff_P = chosen_P - rejected_P
    target_P = diff_P - batch["margin"].astype(jnp.float32) if "margin" in batch else diff_P
    return {
        "loss_sum": -jnp.sum(jax.nn.log_sigmoid(target_P) * w_P),
        "correct": jnp.sum((diff_P > 0).astype(jnp.float32) * w_P),
        "count": jnp.sum(w_P),
        "margin_sum": jnp.sum(diff_P * w_P),
    }


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")  # dpo.loss, as TRL's DPOTrainer names them


@dataclasses.dataclass(frozen=True)
class Preferred:
    """What a DPO forward returns: the policy's output on a batch of interleaved pair rows
    (logits or :class:`Hidden`) and the reference model's summed response log-probs per row,
    [R], computed in the same step under ``stop_gradient`` (:func:`lorax.setup.make_forward`)."""

    policy: jax.Array | Hidden
    reference_logps_R: jax.Array


def response_logps(out: jax.Array | Hidden, batch: Mapping[str, jax.Array]):
    """(each row's log p(response) summed over its ``loss_mask`` tokens, its token count), [R]."""
    m_RT = batch["loss_mask"].astype(jnp.float32)
    logp_RT = _target_stats(out, batch["targets"])[0]
    return jnp.sum(jnp.where(m_RT > 0, logp_RT, 0.0), -1), jnp.sum(m_RT, -1)


def dpo_sums(
    out: Preferred, batch: Mapping[str, jax.Array], *, beta: float, loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> dict:  # fmt: skip
    """DPO's loss and TRL's metrics over preference pairs, summed over real pairs.

    Rows ``2p`` / ``2p + 1`` are pair p's chosen / rejected rows (:class:`lorax.data.PairBatcher`).
    With log-ratios ``c = log π(chosen) − log π_ref(chosen)`` and ``r`` likewise (responses'
    summed token log-probs), ``d = c − r``, pair p's loss is, by ``loss``: "sigmoid"
    ``−log σ(βd)`` (Rafailov et al. 2023); "hinge" ``max(0, 1 − βd)`` (SLiC); "ipo"
    ``(c/n_c − r/n_r − 1/(2β))²`` with n the responses' token counts (Azar et al. 2023, length
    normalised as TRL does); "robust" ``(−(1−ε) log σ(βd) + ε log σ(−βd)) / (1 − 2ε)`` with
    ε = ``label_smoothing`` (Chowdhury et al. 2024). The loss is their mean (``loss_sum`` /
    ``count``), as TRL's ``DPOTrainer`` takes it. Metric sums, under TRL's names (their mean
    over pairs is what TRL logs): ``rewards/chosen`` βc, ``rewards/rejected`` βr,
    ``rewards/accuracies`` (βc > βr; also ``correct``), ``rewards/margins`` β(c − r),
    ``logps/chosen`` and ``logps/rejected`` (the policy's). ``batch["dpo_beta"]``, when
    present, overrides ``beta`` (each adapter's own β in a multi-adapter job).
    """
    beta = batch.get("dpo_beta", beta)
    w_P = batch["weights"].astype(jnp.float32)
    real_P = w_P > 0  # padding pairs are all-padding rows: kept out of every sum
    logps_R, n_R = response_logps(out.policy, batch)
    logps_P2, n_P2 = logps_R.reshape(-1, 2), n_R.reshape(-1, 2)
    ratios_P2 = logps_P2 - out.reference_logps_R.reshape(-1, 2)
    chosen_P, rejected_P = ratios_P2[:, 0], ratios_P2[:, 1]
    d_P = chosen_P - rejected_P
    if loss == "sigmoid":
        loss_P = -jax.nn.log_sigmoid(beta * d_P)
    elif loss == "hinge":
        loss_P = jax.nn.relu(1.0 - beta * d_P)
    elif loss == "ipo":
        n_P2 = jnp.maximum(n_P2, 1.0)
        loss_P = (chosen_P / n_P2[:, 0] - rejected_P / n_P2[:, 1] - 1.0 / (2.0 * beta)) ** 2
    elif loss == "robust":
        eps = label_smoothing
        loss_P = (
            -(1.0 - eps) * jax.nn.log_sigmoid(beta * d_P) + eps * jax.nn.log_sigmoid(-beta * d_P)
        ) / (1.0 - 2.0 * eps)
    else:
        raise ValueError(f"dpo.loss = {loss!r} is not valid; choose one of {list(DPO_LOSSES)}")
    rewards_P2 = beta * jax.lax.stop_gradient(ratios_P2)
    wins_P = (rewards_P2[:, 0] > rewards_P2[:, 1]).astype(jnp.float32)

    def total(x_P):
        return jnp.sum(jnp.where(real_P, x_P * w_P, 0.0))

    return {
        "loss_sum": total(loss_P),
        "correct": total(wins_P),
        "count": jnp.sum(w_P),
        "rewards/chosen_sum": total(rewards_P2[:, 0]),
        "rewards/rejected_sum": total(rewards_P2[:, 1]),
        "rewards/accuracies_sum": total(wins_P),
        "rewards/margins_sum": total(rewards_P2[:, 0] - rewards_P2[:, 1]),
        "logps/chosen_sum": total(jax.lax.stop_gradient(logps_P2[:, 0])),
        "logps/rejected_sum": total(jax.lax.stop_gradient(logps_P2[:, 1])),
    }


def make_eval_step(forward: Forward, mesh, sums_fn: Callable = classification_sums) -> Callable:
    """``eval_step(trainable, frozen, batch) -> sums``, jitted once per batch shape.

    Args:
      forward: ``(trainable, frozen, batch, rng, train) -> logits``.
      mesh: the device mesh (sums come back replicated).
      sums_fn: :func:`classification_sums`, :func:`lm_sums` or :func:`choice_sums`.
    """

    def eval_step(trainable, frozen, batch):
        logits = forward(trainable, frozen, batch, None, False)
        return sums_fn(logits, batch)

    return jax.jit(eval_step, out_shardings=sharding.replicated(mesh))


PROGRESS_EVERY = 4  # batches between two waits for the sums when a progress bar is shown


def evaluate(
    sums_of: Callable, batches: Iterable[Mapping[str, np.ndarray]], mesh, progress=None
) -> list[dict[str, float]]:
    """Sums ``sums_of(batch)`` over ``batches`` (placed on ``mesh``); returns each adapter's
    mean loss, accuracy and row count, the mean of every other ``<name>_sum`` as ``<name>``
    (a reward model's ``margin``), and for classification :func:`class_metrics`: one
    dict for scalar sums (a single run), K for sums with a leading [K] axis (the adapters of a
    multi-adapter job, on the same batches).

    Sums stay on the device until the end, so batches are dispatched back to back.
    ``progress`` (a tqdm bar, or anything with ``update(n)``) counts the batches done: the
    host waits for the running sums every :data:`PROGRESS_EVERY` batches, so the bar follows
    the device, not the dispatch, and a few batches stay in flight.
    """
    total = None
    for i, batch in enumerate(batches):
        sums = sums_of(sharding.put_batch(batch, mesh))
        total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
        if progress is not None and (i + 1) % PROGRESS_EVERY == 0:
            jax.block_until_ready(total)
            progress.update(PROGRESS_EVERY)
    if total is None:
        raise ValueError("evaluation got no batches: the split is empty")
    total = {k: np.asarray(v, np.float64) for k, v in jax.device_get(total).items()}
    if progress is not None:
        progress.update((i + 1) % PROGRESS_EVERY)
    loss, correct, count = (np.atleast_1d(total[k]) for k in ("loss_sum", "correct", "count"))
    results = [
        {"loss": float(lo / n), "accuracy": float(c / n), "count": int(n)}
        for lo, c, n in zip(loss, correct, count, strict=True)
    ]
    for key in sorted(k for k in total if k.endswith("_sum") and k != "loss_sum"):
        for result, value in zip(results, np.atleast_1d(total[key]), strict=True):
            result[key.removesuffix("_sum")] = float(value / max(result["count"], 1))
    if "confusion" in total:  # classification: [C, C], or [K, C, C] for K adapters
        confusion = total["confusion"].reshape(len(results), *total["confusion"].shape[-2:])
        for result, conf in zip(results, confusion, strict=True):
            result.update(class_metrics(conf))
    return results


def plot_confusion(confusion: list[list[int]], names: list[str], path: str, title: str) -> None:
    """A confusion-matrix PNG: counts in each cell, rows true and columns predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = np.asarray(confusion)
    size = min(0.6 * len(names) + 2.5, 14)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    ax.imshow(conf, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 30:
        for (i, j), n in np.ndenumerate(conf):
            color = "white" if n > conf.max() / 2 else "black"
            ax.text(j, i, str(n), ha="center", va="center", color=color, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    runfiles.save_figure(fig, path)
