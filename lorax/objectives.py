"""``train.objective``: the losses a run can train on, which of them need preference pairs,
and the check of an objective against its task (before any model is loaded)."""

from __future__ import annotations

from lorax import dpo

# train.objective: the loss a run trains on. "lm": the task's own (class cross-entropy, the
# next-token loss, choice scoring). Objectives in PAIR_OBJECTIVES train on preference pairs
# (task.name = "preferences") and only there: "reward" a reward model (a score head on the
# decoder's last token, the Bradley–Terry loss of evaluate.reward_sums), "dpo" (lorax/dpo.py).
OBJECTIVES = ("lm", "reward", "dpo")
PAIR_OBJECTIVES: tuple[str, ...] = ("reward", "dpo")


def check_objective(config) -> str:
    """``train.objective``, checked against the task: an objective that trains on preference
    pairs needs a task that has them, and a task of pairs needs such an objective."""
    objective = config.train.get("objective", "lm")
    if objective not in OBJECTIVES:
        raise ValueError(
            f"train.objective = {objective!r} is not valid; choose one of {sorted(OBJECTIVES)}"
        )
    pairs = config.task.name == "preferences"
    if objective in PAIR_OBJECTIVES and not pairs:
        raise ValueError(
            f"train.objective = {objective!r} trains on preference pairs, which task.name = "
            f"{config.task.name!r} does not have; use task.name = 'preferences' (rows with a "
            "prompt, a chosen and a rejected response)"
        )
    if pairs and objective not in PAIR_OBJECTIVES:
        raise ValueError(
            f"task.name = 'preferences' holds preference pairs, which train.objective = "
            f"{objective!r} cannot train on; choose one of {list(PAIR_OBJECTIVES)}"
        )
    if config.task.get("margin_field") and objective != "reward":
        raise ValueError(
            f"task.margin_field = {config.task.margin_field!r} gives the margins of a reward "
            f"model's loss; train.objective = {objective!r} does not use them (set "
            "train.objective = 'reward', or task.margin_field = '')"
        )
    if objective == "dpo":
        dpo.check(config.dpo)
    return objective
