"""Causal-LM tasks: instruction JSONL and SNLI as text, as tokenized examples with loss masks."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from lorax.data.filetasks import split_files
from lorax.data.tables import read_rows
from lorax.data.tasks import SNLI, TaskData, hold_out

# The instruction prompt (Alpaca/Dolly layout). The response follows the prompt directly and is
# followed by the tokenizer's eos token; only the response and eos are training targets.
INSTRUCTION_FIELDS = ("instruction", "context", "response")  # the default column names
INSTRUCTION_TEMPLATE = "Instruction:\n{instruction}\n\nResponse:\n"
INSTRUCTION_TEMPLATE_WITH_CONTEXT = (
    "Instruction:\n{instruction}\n\nInput:\n{context}\n\nResponse:\n"
)

# SNLI as text, the NLI format of the GPT-3 paper (Brown et al. 2020, appendix G, ANLI/RTE):
# the model scores each choice's continuation after the prompt. Choices are in label order.
SNLI_TEXT_TEMPLATE = "{premise}\nQuestion: {hypothesis} True, False, or Neither?\nAnswer:"
SNLI_TEXT_CHOICES = (" True", " Neither", " False")  # entailment, neutral, contradiction

# The shipped toy instruction set (written by experiments/make_instructions.py).
INSTRUCTIONS_TINY_DIR = pathlib.Path(__file__).parent / "files" / "instructions_tiny"
# Preference pairs over its prompts (written by experiments/make_preferences.py).
PREFERENCES_TINY_DIR = pathlib.Path(__file__).parent / "files" / "preferences_tiny"


@dataclasses.dataclass
class CausalExamples:
    """One split for LM training or loss evaluation.

    ``input_ids[i]`` is example i's whole text (prompt, response, eos); ``loss_mask[i]`` has
    the same length and is 1 where that token is a training target (response tokens, eos),
    0 on prompt tokens.
    """

    input_ids: list[np.ndarray]  # int32 each
    loss_mask: list[np.ndarray]  # int32 each, 0/1, same lengths as input_ids

    def __post_init__(self):
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(
                f"CausalExamples: {len(self.input_ids)} input_ids and {len(self.loss_mask)} "
                "loss_mask; they must be equal"
            )
        for i, (x, m) in enumerate(zip(self.input_ids, self.loss_mask, strict=True)):
            if len(x) != len(m):
                raise ValueError(
                    f"CausalExamples: example {i} has {len(x)} tokens but {len(m)} mask entries"
                )

    def __len__(self) -> int:
        return len(self.input_ids)

    def take(self, indices: Sequence[int]) -> CausalExamples:
        """Returns the examples at ``indices``, in that order."""
        return CausalExamples(
            [self.input_ids[i] for i in indices], [self.loss_mask[i] for i in indices]
        )


@dataclasses.dataclass
class ChoiceExamples:
    """One split scored by comparing the likelihoods of fixed choice continuations.

    Example i is correct when ``choices[labels[i]]`` is the likeliest continuation of
    ``prompts[i]``; the choices are the same for every example, one per class.
    """

    prompts: list[np.ndarray]  # int32 each
    choices: tuple[np.ndarray, ...]  # int32 each: one continuation per class
    labels: np.ndarray  # int32 [N]

    def __post_init__(self):
        if len(self.prompts) != len(self.labels):
            raise ValueError(
                f"ChoiceExamples: {len(self.prompts)} prompts and {len(self.labels)} labels; "
                "they must be equal"
            )
        if any(len(p) == 0 for p in self.prompts):
            raise ValueError("ChoiceExamples: every prompt needs one or more tokens")
        if not self.choices or any(len(c) == 0 for c in self.choices):
            raise ValueError(
                f"ChoiceExamples: choices of {[len(c) for c in self.choices]} tokens; need one "
                "or more choices, each of one or more tokens"
            )
        if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < len(self.choices):
            raise ValueError(
                f"ChoiceExamples: labels must be in 0..{len(self.choices) - 1}, got "
                f"{self.labels.min()}..{self.labels.max()}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: Sequence[int]) -> ChoiceExamples:
        """Returns the examples at ``indices``, in that order (same choices)."""
        return ChoiceExamples(
            [self.prompts[i] for i in indices],
            self.choices,
            self.labels[np.asarray(indices, dtype=np.int64)],
        )


def _suffix_mask(n_prompt: int, n_target: int) -> np.ndarray:
    """int32 [n_prompt + n_target]: 0 on the prompt, 1 on the target tokens."""
    mask = np.zeros(n_prompt + n_target, np.int32)
    mask[n_prompt:] = 1
    return mask


def train_examples(examples: ChoiceExamples) -> CausalExamples:
    """LM training examples: each prompt followed by its correct choice, no eos.

    The loss covers exactly the choice tokens, so training raises the very log-likelihood that
    scoring (:class:`ChoiceBatcher`) compares. No eos is appended: scoring never sees one.
    """
    ids, masks = [], []
    for prompt, label in zip(examples.prompts, examples.labels, strict=True):
        choice = examples.choices[label]
        ids.append(np.concatenate([prompt, choice]).astype(np.int32))
        masks.append(_suffix_mask(len(prompt), len(choice)))
    return CausalExamples(ids, masks)


# Tokenization


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, padding or truncation."""
    if not texts:
        return []
    enc = tokenizer(
        texts,
        add_special_tokens=False,
        padding=False,
        truncation=False,
        return_attention_mask=False,
    )
    return [list(x) for x in enc["input_ids"]]


def _leading_specials(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer itself puts before a text (Llama's BOS; none for
    GPT-2/SmolLM). Prompts start with them; trailing specials are dropped (we add eos)."""
    plain = _tokenize(tokenizer, ["a"])[0]
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) has no eos token; causal tasks end "
            "every response with one"
        )
    return int(eos)


# Instructions


def read_instruction_rows(
    path: str, split: str, counts: dict[str, int], fields: tuple[str, str, str] = None
) -> list[tuple[str, ...]]:
    """Reads (instruction, context, response) rows of a data file, skipping and counting bad ones.

    Any format :func:`lorax.data.tables.read_rows` reads (bad JSON and bad UTF-8 counted);
    ``fields`` names the prompt, context and response columns (default
    :data:`INSTRUCTION_FIELDS`). Skip reasons (``<split>/skipped_<reason>``):
    ``missing_field`` (no instruction or response, or null), ``bad_type`` (a field that is not
    a string), ``empty_text`` (instruction or response blank). A missing, null or empty
    context means none.
    """
    prompt_field, context_field, response_field = fields or INSTRUCTION_FIELDS
    rows = []
    skipped = {"missing_field": 0, "bad_type": 0, "empty_text": 0}
    seen: set[str] = set()
    for _, row in read_rows(path, split, counts):
        seen.update(row)
        instruction, response = row.get(prompt_field), row.get(response_field)
        context = row.get(context_field) if context_field else None
        context = "" if context is None else context
        if instruction is None or response is None:
            skipped["missing_field"] += 1
        elif not all(isinstance(x, str) for x in (instruction, response, context)):
            skipped["bad_type"] += 1
        elif not instruction.strip() or not response.strip():
            skipped["empty_text"] += 1
        else:
            rows.append((instruction, context, response))
    absent = [f for f in (prompt_field, response_field) if f not in seen]
    if absent and counts.get(f"{split}/file_rows"):
        raise ValueError(
            f"{path}: no row has the field(s) {absent}; its fields: {sorted(seen)}. Set "
            "task.prompt_field / task.context_field / task.response_field"
        )
    for reason, n in skipped.items():
        counts[f"{split}/skipped_{reason}"] = n
    return rows


def format_prompt(instruction: str, context: str = "") -> str:
    """The prompt text of one instruction row (see :data:`INSTRUCTION_TEMPLATE`)."""
    if context.strip():
        return INSTRUCTION_TEMPLATE_WITH_CONTEXT.format(instruction=instruction, context=context)
    return INSTRUCTION_TEMPLATE.format(instruction=instruction)


def encode_instructions(
    tokenizer: Any,
    rows: list[tuple[str, ...]],
    *,
    max_length: int,
    counts: dict[str, int],
    split: str,
) -> CausalExamples:
    """Tokenizes (instruction, context, response) rows as prompt + response + eos.

    Prompt and response are tokenized separately and concatenated, so the boundary (and the
    loss mask) is exact. The prompt starts with the tokenizer's leading special tokens (a BOS,
    if it adds one). An example longer than ``max_length`` is cut and counted under
    ``<split>/truncated``: the response loses tokens from the right (eos first, at least one
    response token is kept); if even the prompt and one response token do not fit, the prompt
    loses tokens from its left (after the leading specials).

    Returns:
      The split; ``loss_mask`` is 1 on the response tokens and the eos.
    """
    prefix, eos = _leading_specials(tokenizer), _eos_id(tokenizer)
    if max_length < len(prefix) + 2:
        raise ValueError(
            f"task.max_length = {max_length} leaves no room for a prompt token and a response "
            f"token beside the {len(prefix)} leading special tokens; use a larger max_length"
        )
    prompts = _tokenize(tokenizer, [format_prompt(ins, ctx) for ins, ctx, _ in rows])
    responses = _tokenize(tokenizer, [resp for _, _, resp in rows])
    ids, masks, truncated = [], [], 0
    for prompt, response in zip(prompts, responses, strict=True):
        prompt, response = prefix + prompt, response + [eos]
        if len(prompt) + len(response) > max_length:
            truncated += 1
            keep_prompt = min(len(prompt), max_length - 1)
            if keep_prompt < len(prompt):
                prompt = prefix + prompt[len(prompt) - keep_prompt + len(prefix) :]
            response = response[: max_length - len(prompt)]
        ids.append(np.asarray(prompt + response, np.int32))
        masks.append(_suffix_mask(len(prompt), len(response)))
    counts[f"{split}/truncated"] = truncated
    return CausalExamples(ids, masks)


@dataclasses.dataclass(frozen=True)
class InstructionTask:
    """An instruction-tuning task: rows with an instruction, an optional context and a response.

    Without a task config: ``train.jsonl`` (required) and optionally ``test.jsonl`` in the
    data directory, fields ``instruction`` / ``context`` / ``response``. With one (what a run
    passes): any file or folder :func:`lorax.data.filetasks.split_files` finds (``task.data``,
    or ``task.train_file`` / ``validation_file`` / ``test_file``; csv, tsv, jsonl, json,
    parquet) and the fields ``task.prompt_field`` / ``context_field`` / ``response_field``.
    A split without a file is held out of the training rows, ``validation_size`` rows each
    (fixed seed, the same rows every run; the validation rows do not depend on whether test is
    held out too).
    """

    train_file: str = "train.jsonl"
    test_file: str = "test.jsonl"

    def load(
        self, data_dir, tokenizer, *, max_length: int, validation_size: int, task_config=None
    ) -> TaskData:
        """See :func:`lorax.data.registry.load_task`."""
        files, fields = self._files(data_dir, task_config)
        counts: dict[str, int] = {}
        train = read_instruction_rows(files["train"], "train", counts, fields)
        missing = [s for s in ("validation", "test") if files[s] is None]
        if missing and not 0 <= validation_size * len(missing) < len(train):
            top = (len(train) - 1) // len(missing)
            why = " and no test file, so test is held out too" if files["test"] is None else ""
            raise ValueError(
                f"task.validation_size = {validation_size} must be in 0..{top} "
                f"(the train file has {len(train)} usable rows{why})"
            )
        parts = hold_out(len(train), [validation_size] * len(missing))
        rows = {"train": [train[i] for i in parts[-1]]}
        rows.update({s: [train[i] for i in idx] for s, idx in zip(missing, parts, strict=False)})
        for split in ("validation", "test"):
            if files[split] is not None:
                rows[split] = read_instruction_rows(files[split], split, counts, fields)
        splits = {}
        for split in ("train", "validation", "test"):
            splits[split] = encode_instructions(
                tokenizer, rows[split], max_length=max_length, counts=counts, split=split
            )
            counts[f"{split}/rows"] = len(splits[split])
        return TaskData(splits, (), counts)

    def _files(self, data_dir, task_config) -> tuple[dict[str, str | None], tuple[str, ...]]:
        """The split files (None: held out) and the (prompt, context, response) fields."""
        if task_config is not None:
            names = ("prompt_field", "context_field", "response_field")
            fields = tuple(
                task_config.get(n, d) for n, d in zip(names, INSTRUCTION_FIELDS, strict=True)
            )
            return split_files(task_config), fields
        data_dir = os.fspath(data_dir)
        train = os.path.join(data_dir, self.train_file)
        test = os.path.join(data_dir, self.test_file)
        if not os.path.isfile(train):
            raise FileNotFoundError(
                f"{train} does not exist; the task needs {self.train_file} (and optionally "
                f"{self.test_file}) in its data directory"
            )
        test = test if os.path.isfile(test) else None
        return {"train": train, "validation": None, "test": test}, INSTRUCTION_FIELDS


# SNLI as text


@dataclasses.dataclass(frozen=True)
class ChoiceTask:
    """A pair classification task (read by its :class:`~lorax.data.tasks.PairClassification`)
    turned into text: a prompt template and one continuation per class.

    The train split is LM training on prompt + correct choice (:func:`train_examples`);
    validation (the same rows the classification task holds out) and test are
    :class:`ChoiceExamples`. A prompt longer than ``max_length`` minus the longest choice
    keeps its last tokens (the premise is cut from the left) and is counted as truncated.
    """

    classification: Any  # a lorax.data.tasks.PairClassification
    template: str  # with {premise} and {hypothesis}
    choices: tuple[str, ...]  # one per class, in label order

    def load(self, data_dir, tokenizer, *, max_length: int, validation_size: int) -> TaskData:
        """See :func:`lorax.data.registry.load_task`."""
        task, counts = self.classification, {}
        raw = {
            split: task.read(os.path.join(os.fspath(data_dir), file), split, counts)
            for split, file in task.files.items()
        }
        usable = len(raw["train"][2])
        if not 0 <= validation_size < usable:
            raise ValueError(
                f"task.validation_size = {validation_size} must be in 0..{usable - 1} "
                f"(the train file has {usable} usable rows)"
            )
        held, kept = hold_out(usable, [validation_size])
        pick = lambda rows, idx: tuple([r[i] for i in idx] for r in rows)
        raw = {
            "train": pick(raw["train"], kept),
            "validation": pick(raw["train"], held),
            "test": raw["test"],
        }
        prefix = _leading_specials(tokenizer)
        choices = tuple(np.asarray(c, np.int32) for c in _tokenize(tokenizer, list(self.choices)))
        room = max_length - max(len(c) for c in choices)
        if room < len(prefix) + 1:
            raise ValueError(
                f"task.max_length = {max_length} leaves no room for a prompt beside the "
                f"longest choice ({max(len(c) for c in choices)} tokens); use a larger max_length"
            )
        splits = {}
        for split, (premises, hypotheses, labels) in raw.items():
            texts = [
                self.template.format(premise=p, hypothesis=h)
                for p, h in zip(premises, hypotheses, strict=True)
            ]
            prompts, truncated = [], 0
            for body in _tokenize(tokenizer, texts):
                if len(prefix) + len(body) > room:
                    truncated += 1
                    body = body[len(body) - (room - len(prefix)) :]
                prompts.append(np.asarray(prefix + body, np.int32))
            counts[f"{split}/truncated"] = truncated
            examples = ChoiceExamples(prompts, choices, np.asarray(labels, np.int32))
            splits[split] = train_examples(examples) if split == "train" else examples
            counts[f"{split}/rows"] = len(examples)
        return TaskData(splits, task.label_names, counts)


INSTRUCTIONS = InstructionTask()
SNLI_TEXT = ChoiceTask(SNLI, SNLI_TEXT_TEMPLATE, SNLI_TEXT_CHOICES)

CAUSAL_TASKS: dict[str, InstructionTask | ChoiceTask] = {
    "instructions": INSTRUCTIONS,
    "snli_text": SNLI_TEXT,
}
