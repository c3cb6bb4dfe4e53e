"""Reward models: a score head on a decoder's last non-pad token, trained on preference pairs
with the Bradley–Terry loss, exported for PEFT's AutoPeftModelForSequenceClassification."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax import evaluate, lora
from lorax.checkpoints import hf
from lorax.checkpoints import peft as lpeft
from lorax.models import decoder, reward
from tests.helpers import random_delta, save_random_decoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 101
PAD = 0


TINY = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=1,
        eos_token_id=1,
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny_dir(request, tmp_path_factory):
    return save_random_decoder(TINY[request.param](), tmp_path_factory.mktemp(request.param))


def _rows():
    """Right-padded rows of different lengths; row 2 holds the pad id inside its text (a
    separator), which must not end it: the score is read at the rightmost non-pad token."""
    rng = np.random.default_rng(0)
    lengths = [12, 7, 10, 3]
    ids = np.full((len(lengths), 12), PAD, np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, VOCAB, n)
    ids[2, 4] = PAD
    return ids, np.array(lengths)


def _lorax_rewards(config, params, ids, lengths):
    """Rewards of the rows through reward.rewards, with the masks a lorax batch has."""
    b, t = ids.shape
    segments = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    positions = np.broadcast_to(np.arange(t), (b, t))
    model = decoder.Decoder(config)
    return np.asarray(
        model.apply(
            {"params": params}, ids, positions, decoder.causal_mask(segments), PAD,
            method=reward.rewards,
        )
    )  # fmt: skip


def test_last_token_index_is_transformers_rule():
    """The rightmost token that is not the pad id, with padding on either side."""
    ids = jnp.array([[5, 6, 0, 0], [0, 0, 5, 6], [5, 0, 6, 0], [0, 0, 0, 0]])
    assert reward.last_token_index(ids, 0).tolist() == [1, 3, 2, 0]


def test_reward_sums_are_bradley_terry_with_margin():
    """loss = −log σ(r_c − r_r − margin) summed over real pairs; accuracy and margin count
    real pairs only, by hand."""
    chosen, rejected = np.array([2.0, -1.0, 0.5]), np.array([1.0, 0.5, 3.0])
    margin, weights = np.array([0.5, 0.0, 1.0]), np.array([1.0, 1.0, 0.0])
    rewards = jnp.asarray(np.stack([chosen, rejected], 1).reshape(-1))  # interleaved rows
    batch = {"weights": jnp.asarray(weights), "margin": jnp.asarray(margin)}
    sums = jax.device_get(evaluate.reward_sums(rewards, batch))
    diff = chosen - rejected
    want = -np.log(1 / (1 + np.exp(-(diff - margin))))
    np.testing.assert_allclose(sums["loss_sum"], (want * weights).sum(), rtol=1e-6)
    assert sums["correct"] == 1.0 and sums["count"] == 2.0
    np.testing.assert_allclose(sums["margin_sum"], diff[:2].sum(), rtol=1e-6)
    no_margin = jax.device_get(evaluate.reward_sums(rewards, {"weights": batch["weights"]}))
    np.testing.assert_allclose(no_margin["loss_sum"], (np.log1p(np.exp(-diff)) * weights).sum(),
                               rtol=1e-6)  # fmt: skip


def test_reward_export_loads_in_auto_peft_seq_cls_with_our_rewards(tiny_dir, tmp_path):
    """LoRA (q, v, mlp_out) + score head, exported as a SEQ_CLS adapter with the head in
    modules_to_save: AutoPeftModelForSequenceClassification(num_labels=1) gives our rewards
    within 1e-4 on right-padded rows (Llama and GPT-2's fused c_attn), where reading each
    row's last position instead would be far off."""
    config, base = hf.load_decoder(tiny_dir)
    spec = lora.make_spec("q,v,mlp_out", rank=4, alpha=8)
    delta = random_delta(base, spec)
    kernel = np.asarray(reward.init_score(config, jax.random.key(3))["kernel"]) * 50
    params = {**lora.wrap(base, delta, spec), "score": {"kernel": jnp.asarray(kernel)}}
    ids, lengths = _rows()
    ours = _lorax_rewards(config, params, ids, lengths)
    out = lpeft.export_peft(
        delta, spec, config, tmp_path / "rm", base_model_name_or_path=str(tiny_dir),
        task_type="SEQ_CLS", modules_to_save={"score": {"weight": kernel.T}},
    )  # fmt: skip
    model = peft.AutoPeftModelForSequenceClassification.from_pretrained(
        str(out), num_labels=1, pad_token_id=PAD
    ).eval()
    mask = torch.tensor(np.arange(ids.shape[1])[None] < lengths[:, None], dtype=torch.long)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=mask)
    theirs = theirs.logits.numpy()
    assert theirs.shape == (4, 1)
    np.testing.assert_allclose(ours, theirs[:, 0], atol=1e-4)
    plain = _lorax_rewards(config, {**base, "score": {"kernel": jnp.asarray(kernel)}}, ids,
                           lengths)  # fmt: skip
    assert np.abs(ours - plain).max() > 1e-2, "the adapter should change the rewards"
    # what a last-position read would give on the padded rows: not what either model does
    b, t = ids.shape
    segments = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    hidden, _ = decoder.Decoder(config).apply(
        {"params": params}, ids, np.broadcast_to(np.arange(t), (b, t)),
        decoder.causal_mask(segments), logits=False,
    )  # fmt: skip
    naive = np.asarray(hidden[:, -1] @ kernel)[:, 0]
    assert np.abs(naive[1:] - ours[1:]).min() > 1e-3


# --- a whole run: train, summary, export, predict ---------------------------------------------


GOOD = ("a fine answer", "the right reply", "correct, well done", "yes that is it")
BAD = ("nonsense words here", "wrong wrong", "no idea at all", "a bad guess")


def _preference_rows(n, seed):
    rng = np.random.default_rng(seed)
    return [
        {"prompt": f"Question {i}: what is {i} plus {2 * i}?", "chosen": str(GOOD[rng.integers(4)]),
         "rejected": str(BAD[rng.integers(4)]), "margin": float(rng.integers(0, 2))}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_reward_model(request, tmp_path_factory):
    """A tiny random Llama (BOS-adding tokenizer, pad 0 != eos 1) saved with its tokenizer."""
    from tests.test_causal_data import _tokenizer

    tok = _tokenizer(bos=True)
    d = tmp_path_factory.mktemp("rm_llama")
    hf_config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    save_random_decoder(hf_config, d)
    tok.save_pretrained(d)
    return d, tok


def _reward_config(model_dir, data, **overrides):
    from configs import base
    from experiments.sweep import apply_overrides

    c = base.get_config()
    c.model.name = str(model_dir)
    c.model.dropout = 0.0
    c.task.name = "preferences"
    c.task.data = str(data)
    c.task.max_length = 32
    c.task.buckets = (16, 32)
    c.task.validation_size = 8
    c.train.objective = "reward"
    c.train.trainable = ()
    c.train.batch_size = 8
    c.train.num_steps = 12
    c.train.learning_rate = 1e-2
    c.train.warmup_fraction = 0.0
    c.lora.targets = "q,v"
    c.eval_batch_size = 8
    c.eval_every = 0
    c.log_every = 4
    c.checkpoint_every = 6
    return apply_overrides(c, overrides)


def _hf_rows(tok, prompts, responses):
    """The rows lorax scores, built by hand: <bos>, prompt, response (tokenized apart), <eos>;
    right-padded with the pad id, and their attention mask."""
    rows = [[2, *tok(p, add_special_tokens=False)["input_ids"],
             *tok(r, add_special_tokens=False)["input_ids"], 1]
            for p, r in zip(prompts, responses, strict=True)]  # fmt: skip
    t = max(len(r) for r in rows)
    ids = np.array([r + [0] * (t - len(r)) for r in rows])
    mask = np.array([[1] * len(r) + [0] * (t - len(r)) for r in rows])
    return torch.tensor(ids), torch.tensor(mask)


@pytest.fixture(scope="module")
def reward_run(tiny_reward_model, tmp_path_factory):
    """A finished 12-step reward run on 80 pairs with a margin column: (workdir, config,
    summary)."""
    import json

    from lorax import train as train_lib

    model_dir, _ = tiny_reward_model
    d = tmp_path_factory.mktemp("reward_run")
    data = d / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _preference_rows(80, 0)))
    config = _reward_config(model_dir, data, **{"task.margin_field": "margin"})
    summary = train_lib.train_and_evaluate(config, str(d / "run"))
    return d / "run", config, summary


def test_reward_run_learns_exports_and_predicts_what_peft_predicts(
    tiny_reward_model, reward_run, tmp_path
):
    """A LoRA + score-head reward run on preference pairs (with a margin column): the loss
    falls, the summary reports preference accuracy and mean margin on validation and test;
    its seq_cls export loads in AutoPeftModelForSequenceClassification(num_labels=1) and its
    --merged export in AutoModelForSequenceClassification, both giving lorax.predict's rewards
    within 1e-4; lorax.predict writes a file's rewards as a ``reward`` column."""
    import json

    from lorax import export, generate, runs
    from lorax.predict import Predictor, predict_file

    _, tok = tiny_reward_model
    run, _, summary = reward_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < losses[0]
    for split in ("validation", "test"):
        assert summary[f"{split}_examples"] == 8
        assert summary[f"{split}_accuracy"] >= 0.75  # preference accuracy
        assert summary[f"{split}_margin"] > 0  # mean r_chosen - r_rejected
    assert summary["model_kind"] == "reward" and summary["head_params"] == 32

    config, setup, trainable = runs.load_run(str(run))
    out = export.write_export(config, setup, trainable, tmp_path / "rm")  # what lorax.export does
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS"
    assert adapter_config["modules_to_save"] == ["score"]
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in (200, 201, 202, 203)]
    responses = ["a fine answer", "wrong wrong", "yes that is it", "x"]
    ours = Predictor(str(run)).rewards(prompts, responses)
    ids, mask = _hf_rows(tok, prompts, responses)
    assert mask.sum(1).max() <= 32  # no row cut at task.max_length
    model = peft.AutoPeftModelForSequenceClassification.from_pretrained(
        str(out), num_labels=1, pad_token_id=setup.pad_id
    ).eval()
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits.numpy()[:, 0]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert ours[0] > ours[1]  # it learned which answers are preferred
    merged = export.write_export(config, setup, trainable, tmp_path / "merged", merged=True)
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
    with torch.no_grad():
        np.testing.assert_allclose(plain(input_ids=ids, attention_mask=mask).logits[:, 0], ours,
                                   atol=1e-4)  # fmt: skip

    src = tmp_path / "answers.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n"
                           for p, r in zip(prompts, responses, strict=True))
                   + json.dumps({"prompt": "no response"}) + "\n")  # fmt: skip
    scored, unscored = predict_file(
        Predictor(str(run)), str(src), str(tmp_path / "scored.jsonl"), "prompt", "response"
    )
    assert (scored, unscored) == (4, 1)
    got = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([g["reward"] for g in got[:4]], ours, atol=1e-6)
    assert got[4]["reward"] == ""
    with pytest.raises(ValueError, match=r"is a reward model.*lorax.predict"):
        runs.load_adapter(str(run), setup.frozen)  # lorax.generate --adapter=<a reward run>
    with pytest.raises(ValueError, match=r"reward model.*does not generate"):
        generate.load_for_generation(config, None)


def test_gpt2_reward_run_exports_for_peft_with_lorax_predicts_rewards(tmp_path):
    """A few steps of a tiny GPT-2 reward model (fused c_attn, learned positions, a tokenizer
    with no BOS): lorax.export's adapter in AutoPeftModelForSequenceClassification gives
    lorax.predict's rewards within 1e-4."""
    import json

    from lorax import export, runs
    from lorax import train as train_lib
    from lorax.predict import Predictor
    from tests.test_causal_data import _tokenizer

    tok = _tokenizer()
    model_dir = tmp_path / "gpt2"
    save_random_decoder(transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
        eos_token_id=1, pad_token_id=0,
    ), model_dir)  # fmt: skip
    tok.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _preference_rows(40, 2)))
    run = tmp_path / "run"
    overrides = {"train.num_steps": 3, "checkpoint_every": 0, "lora.targets": "q,v,o,mlp_in"}
    train_lib.train_and_evaluate(_reward_config(model_dir, data, **overrides), str(run))
    config, setup, trainable = runs.load_run(str(run))
    out = export.write_export(config, setup, trainable, tmp_path / "rm")
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in (300, 301, 302)]
    responses = ["a fine answer", "wrong wrong", "x"]
    ours = Predictor(str(run)).rewards(prompts, responses)
    rows = [tok(p, add_special_tokens=False)["input_ids"]
            + tok(r, add_special_tokens=False)["input_ids"] + [1]
            for p, r in zip(prompts, responses, strict=True)]  # fmt: skip
    t = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (t - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows])
    model = peft.AutoPeftModelForSequenceClassification.from_pretrained(
        str(out), num_labels=1, pad_token_id=0
    ).eval()
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits.numpy()[:, 0]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(np.asarray(trainable["head"]["score"]["kernel"])).max() > 0


def test_margins_are_read_checked_and_batched(tiny_reward_model, tmp_path):
    """task.margin_field: each pair's margin reaches its batch as ``margin`` [B] (0 for a
    padding pair); a row without one, or with one that is not a number, is skipped and
    counted; a CSV's numeric text is read as a number."""
    import json

    from lorax import data
    from lorax.data import preferences

    _, tok = tiny_reward_model
    rows = _preference_rows(12, 1) + [
        {"prompt": "p", "chosen": "a", "rejected": "b"},  # no margin
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "lots"},
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")},
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "0.25"},  # CSV-style text
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = {}
    read = preferences.read_preference_rows(str(path), "train", counts, margin_field="margin")
    assert (counts["train/skipped_missing_field"], counts["train/skipped_bad_type"]) == (1, 2)
    assert [r[3] for r in read] == [r["margin"] for r in rows[:12]] + [0.25]
    examples = preferences.encode_preferences(tok, read, max_length=32, counts={}, split="train")
    np.testing.assert_array_equal(examples.margins, [r[3] for r in read])
    want = {(*p, *c): m for p, c, m in
            zip(examples.prompts, examples.chosen, examples.margins, strict=True)}  # fmt: skip
    got, padding = {}, []
    for batch in data.PairBatcher(examples, 4, (16, 32), seed=0, pad_id=0).eval_batches():
        for b, (w, m) in enumerate(zip(batch["weights"], batch["margin"], strict=True)):
            chosen_row = batch["input_ids"][2 * b][batch["segment_ids"][2 * b] > 0]
            got.update({tuple(chosen_row.tolist()): m} if w else {})
            padding += [] if w else [m]
    assert got == want and padding and not any(padding)  # 13 pairs in batches of 4
    assert "margin" not in data.PairBatcher(
        preferences.encode_preferences(tok, [r[:3] for r in read], max_length=32, counts={},
                                       split="train"), 4, (16, 32), seed=0,
    ).train_batch(0)  # fmt: skip


def test_bad_reward_configs_are_refused_naming_the_field(tiny_model_dir, tiny_reward_model,
                                                         tmp_path):  # fmt: skip
    """An encoder as a reward model, a reward objective without pairs, margins without the
    reward objective, and a seq_cls export of a plain causal-LM run: each one error that
    names what to change."""
    import json

    from lorax import setup as setup_lib

    model_dir, _ = tiny_reward_model
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _preference_rows(40, 0)))
    with pytest.raises(ValueError, match=r"objective = 'reward'.*model.name = .* is an encoder"):
        setup_lib.build(_reward_config(tiny_model_dir, data, **{"task.name": "preferences"}),
                        with_task=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"'reward' trains on preference pairs.*'instructions'"):
        setup_lib.build(_reward_config(model_dir, data, **{"task.name": "instructions"}))
    with pytest.raises(ValueError, match=r"task.margin_field = 'margin'.*train.objective = 'lm'"):
        setup_lib.build(_reward_config(model_dir, data, **{
            "task.name": "instructions", "train.objective": "lm", "task.margin_field": "margin",
        }))  # fmt: skip
    with pytest.raises(ValueError, match=r"train.objective = 'rm' is not valid; choose one of"):
        setup_lib.build(_reward_config(model_dir, data, **{"train.objective": "rm"}))


def test_reward_run_resumes_bit_identical_and_a_seed_sweep_job_equals_single_runs(
    reward_run, tmp_path, monkeypatch
):
    """Killed after step 8 (last checkpoint at 6) and rerun, a reward run ends with the
    uninterrupted run's adapter and score head bit for bit; seeds 0 and 1 as one
    multi-adapter job give seed 0's single run (1e-5) and seed 1 its own score head."""
    from lorax import multi, runs
    from lorax import train as train_lib
    from tests.helpers import train_until_interrupted

    run, config, summary = reward_run
    want = runs.restore_trainable(run)
    train_until_interrupted(config, tmp_path / "cut", 8, monkeypatch)
    resumed = train_lib.train_and_evaluate(config, str(tmp_path / "cut"))
    assert resumed["resumed_from"] == 6
    got = runs.restore_trainable(tmp_path / "cut")
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    assert resumed["validation_loss"] == summary["validation_loss"]

    seeds = [config.copy_and_resolve_references() for _ in range(2)]
    seeds[1].seed = 1
    job = multi.train_many(seeds, [str(tmp_path / "s0"), str(tmp_path / "s1")])
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
        runs.restore_trainable(tmp_path / "s0"), want,
    )  # fmt: skip
    np.testing.assert_allclose(job[0]["validation_margin"], summary["validation_margin"],
                               atol=1e-5)  # fmt: skip
    heads = [runs.restore_trainable(tmp_path / s)["head"]["score"]["kernel"] for s in ("s0", "s1")]
    assert np.abs(heads[0] - heads[1]).max() > 1e-3


@pytest.mark.parametrize("chat", [False, True])
def test_predict_rows_are_the_training_rows(tiny_reward_model, chat):
    """lorax.predict's rows for (prompt, answer) are token for token the chosen rows a
    reward run trained on (BOS, the prompt or its chat-template turn, the answer, eos), and a
    whole text alone is BOS + text + eos; scoring batches lay them out as PairBatcher does."""
    import copy

    from lorax import data
    from lorax.data import preferences

    tok = copy.deepcopy(tiny_reward_model[1])  # the fixture's own stays without a template
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}" \
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"  # fmt: skip
    rows = [(r["prompt"], r["chosen"], r["rejected"]) for r in _preference_rows(5, 3)]
    examples = preferences.encode_preferences(
        tok, rows, max_length=64, counts={}, split="test", chat_template=chat
    )
    batch = data.PairBatcher(examples, 5, (64,), seed=0, pad_id=0).eval_batches().__next__()
    trained = [batch["input_ids"][2 * b][batch["segment_ids"][2 * b] > 0] for b in range(5)]
    scored = preferences.encode_scored(
        tok, [r[0] for r in rows], [r[1] for r in rows], max_length=64, chat_template=chat
    )
    assert sorted(map(tuple, scored)) == sorted(tuple(t.tolist()) for t in trained)
    whole = preferences.encode_scored(tok, ["two words"], max_length=64)[0].tolist()
    assert whole == [2, *tok("two words", add_special_tokens=False)["input_ids"], 1]
    ((index, got),) = preferences.scoring_batches(scored, 8, (16, 64), pad_id=0)
    for b, i in enumerate(index):
        n = len(scored[i])
        assert got["input_ids"][b, :n].tolist() == scored[i].tolist()
        assert got["segment_ids"][b].sum() == n and got["positions"][b, n - 1] == n - 1
    assert got["input_ids"].shape == (8, 64) and not got["segment_ids"][5:].any()
