"""Reward-model recipes for small data (issue 21): read-out layer and pooling, frozen trunk, label smoothing,
early stopping and checkpoint averaging, bootstrap ensembles with a spread, temperature calibration. Hand-computed
pieces first, then tiny models trained through the real CLI and loaded back by every loader."""
import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chatrlhf import losses
from chatrlhf.config import ModelArgs, RewardTrainConfig
from chatrlhf.data.records import Preference
from chatrlhf.errors import UsageError
from chatrlhf.evaluate.metrics import confident_half, fit_temperature, pairwise_ece
from chatrlhf.reward_model import DEFAULT_HEAD, HEAD_KEY, classic_head, encode_reply, ensemble_scores, head_scores, \
    load_reward_model, pad_right, pair_metrics, pool, raw_head_scores, reward_head, reward_scores, \
    reward_scores_with_spread
from chatrlhf.trainers.reward import EpochKeeper, bootstrap_counts, encode_pairs, resolve_recipe
from conftest import EXAMPLES, LEARNABLE_PROMPTS, LEARNABLE_REPLIES, run_cli

Q = [{"role": "user", "content": "Where is my order?"}]
sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


# --------------------------------------------------------------------------- hand-computed pieces


def test_label_smoothing_hand_computed():
    c, r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    loss, _ = losses.bradley_terry_loss(c, r, label_smoothing=0.1)
    # x = 1 and x = −2: −0.9 log σ(x) − 0.1 log σ(−x), averaged
    want = (-0.9 * math.log(sig(1)) - 0.1 * math.log(sig(-1)) - 0.9 * math.log(sig(-2)) - 0.1 * math.log(sig(2))) / 2
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(losses.bradley_terry_loss(c, r, label_smoothing=0.0)[0]) == pytest.approx(
        (-math.log(sig(1)) - math.log(sig(-2))) / 2, rel=1e-6)
    # the smoothed loss is smallest where σ(x) = 1 − ε, i.e. x = ln 9 for ε = 0.1: no push to an infinite margin
    x = torch.tensor([math.log(9)], requires_grad=True)
    losses.bradley_terry_loss(x, torch.zeros(1), label_smoothing=0.1)[0].backward()
    assert abs(float(x.grad)) < 1e-6


def test_pooling_hand_computed_for_both_padding_sides():
    # two sequences of width 4, hidden size 1 (values = position + 10·row); row 0 right-padded (3 tokens, reply =
    # tokens 1–2), row 1 left-padded (2 real tokens at positions 2–3, reply = token 3 only)
    hidden = torch.tensor([[0.0, 1, 2, 3], [10, 11, 12, 13]]).unsqueeze(-1)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    reply = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])  # the pad position of row 0 is masked out by `mask`
    assert pool(hidden, mask, None, "last").squeeze(-1).tolist() == [2.0, 13.0]
    assert pool(hidden, mask, reply, "mean").squeeze(-1).tolist() == [1.5, 13.0]
    assert pool(hidden, mask, reply, "both").tolist() == [[2.0, 1.5], [13.0, 13.0]]
    with pytest.raises(ValueError, match="reply_mask"):
        pool(hidden, mask, None, "mean")


def test_both_pooling_heads_are_two_rows_each_and_ensemble_mean_and_spread():
    # K = 2 heads, hidden 2: score rows 0–1 read the last token's state [a, b], rows 2–3 the mean [c, d]
    score = torch.nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        score.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1], [2, 0]]))
    model = SimpleNamespace(config=SimpleNamespace(chatrlhf_reward_head={"layer": -1, "pooling": "both", "heads": 2}),
                            score=score)
    feats = torch.tensor([[3.0, 5, 7, 11]])  # last = [3, 5], mean = [7, 11]
    # head 0: 1·3 + 0·5 + 1·7 + 1·11 = 21; head 1: 0·3 + 1·5 + 2·7 + 0·11 = 19
    assert head_scores(model, feats).tolist() == [[21.0, 19.0]]
    # the ensemble: gain · mean + bias and |gain| · std over heads (population std)
    scores, spreads = ensemble_scores(np.array([[21.0, 19.0], [2.0, 2.0]]), gain=-2.0, bias=1.0)
    assert scores.tolist() == [-39.0, -3.0] and spreads.tolist() == [2.0, 0.0]


def test_temperature_calibration_lowers_ece_of_an_overconfident_scorer():
    # a scorer that says σ(4) = 0.982 on every pair and is right on 3 of 4: ECE |0.75 − 0.982| = 0.232. With Platt's
    # target τ = 101/102 for n = 100 pairs, the loss's derivative in 1/T vanishes where
    # ¾·4·(τ − σ(4/T)) − ¼·4·(τ − σ(−4/T)) = 0, i.e. σ(4/T) = τ/2 + ¼ = 0.74510: T = 4 / logit(0.74510) = 3.7047
    # (4 / ln 3 = 3.641 without Platt's target), and then ECE = 0.75 − 0.74510 = 0.0049
    logits = np.array([4.0, 4.0, 4.0, -4.0] * 25)
    assert pairwise_ece(logits) == pytest.approx(sig(4) - 0.75, abs=1e-9)
    t = fit_temperature(logits)
    p = 101 / 102 / 2 + 0.25
    assert t == pytest.approx(4 / math.log(p / (1 - p)), rel=1e-4)
    assert pairwise_ece(logits / t) == pytest.approx(0.75 - p, abs=1e-6)
    # pair_metrics reports the ECE at the model's temperature and at T = 1
    pairs = [Preference(Q, "c", "r")] * 100
    m = pair_metrics(np.where(logits > 0, 4.0, 0.0), np.where(logits > 0, 0.0, 4.0), pairs, [1] * 200, temperature=t)
    assert m["ece_uncalibrated"] == pytest.approx(0.232, abs=1e-3) and m["ece"] < 0.005 and m["accuracy"] == 0.75
    # all right on 2 pairs: target 3/4 keeps σ(z / T) well below 1 instead of T → 0
    t = fit_temperature(np.array([3.0, 2.0]))
    assert 0.5 < np.mean(1 / (1 + np.exp(-np.array([3.0, 2.0]) / t))) < 0.9


def test_confident_half_hand_computed():
    right = np.array([1.0, 0.0, 0.0, 1.0])
    margins = np.array([[2.0, 2.0],    # |mean| 2, heads agree exactly: agreement ∞
                        [0.5, 5.5],    # |mean| 3, std 2.5: agreement 1.2
                        [-1.0, 1.0],   # |mean| 0: agreement 0
                        [0.8, 1.2]])   # |mean| 1, std 0.2: agreement 5
    got = confident_half(right, margins)
    # surest by |mean|: pairs 1 and 0 (right 0 and 1), the rest 3 and 2 (1 and 0)
    assert got["confident_half_accuracy"] == 0.5 and got["other_half_accuracy"] == 0.5
    # by agreement: pairs 0 and 3 (both right), the rest 1 and 2 (both wrong)
    assert got["agreed_half_accuracy"] == 1.0 and got["other_agreed_accuracy"] == 0.0
    assert (got["confident_pairs"], got["other_pairs"]) == (2, 2)
    assert got["mean_margin_spread"] == pytest.approx((0 + 2.5 + 1 + 0.2) / 4)


def test_bootstrap_counts_resample_every_pair_set():
    one = bootstrap_counts(5, 1, seed=0)
    assert one.tolist() == [[1.0]] * 5
    b = bootstrap_counts(50, 4, seed=3)
    assert b.shape == (50, 4) and b.sum(0).tolist() == [50.0] * 4
    assert (b == 0).any(0).all() and not torch.equal(b[:, 0], b[:, 1])   # each head leaves some pairs out
    assert torch.equal(b, bootstrap_counts(50, 4, seed=3))


def test_epoch_keeper_keeps_the_best_epochs_mean_and_stops():
    model = torch.nn.Linear(1, 1, bias=False)
    keeper = EpochKeeper(model, patience=2, average=2)
    for epoch, (w, loss) in enumerate([(1.0, 3.0), (2.0, 2.0), (3.0, 2.5), (4.0, 2.6)], 1):
        with torch.no_grad():
            model.weight.fill_(w)
        keeper.end_epoch(epoch, loss)
        assert keeper.stopped == (epoch == 4)   # epochs 3 and 4 did not beat epoch 2
    keeper.restore()
    assert keeper.best_epoch == 2 and float(model.weight.detach()) == 1.5   # mean of epochs 1 and 2
    again = EpochKeeper(model, patience=0, average=2)
    again.load_state_dict(keeper.state_dict() | {"kept": None, "best_epoch": 0})
    again.restore()
    assert float(model.weight.detach()) == 3.5                                # no patience: the last two epochs' mean


def test_encode_reply_finds_where_the_reply_starts():
    for name in ("tiny-random-llama", "tiny-random-gpt2"):
        _, tok = load_reward_model(ModelArgs(model=name))
        ids, start = encode_reply(tok, Q, "It ships today", 512)
        assert tok.decode(ids[start:]).strip().startswith("It ships today")
        assert not tok.decode(ids[:start]).rstrip().endswith("It")
        cut, cut_start = encode_reply(tok, Q, "It ships today", len(ids) - 2)   # the prompt loses 2 tokens
        assert cut == ids[2:] and cut_start == start - 2


# --------------------------------------------------------------------------- a model with another head, loaded back


def test_mean_pooling_ignores_padding_and_batching():
    model, tok = load_reward_model(ModelArgs(model="tiny-random-llama"), head={"layer": 1, "pooling": "both", "heads": 3})
    replies = ["Short.", "A much longer reply that needs many more tokens than the other one does."]
    together = raw_head_scores(model, tok, [Q, Q], replies, batch_size=2)
    alone = np.concatenate([raw_head_scores(model, tok, [Q], [r], batch_size=1) for r in replies])
    assert together.shape == (2, 3) and np.allclose(together, alone, atol=1e-5)
    assert model.score.weight.shape == (6, model.config.hidden_size)   # 2 rows per head with both pooling


def test_a_bad_layer_is_refused():
    with pytest.raises(UsageError, match=r"--layer 3: .* has 2 transformer blocks"):
        load_reward_model(ModelArgs(model="tiny-random-llama"), head={"layer": 3})


def learnable(path, n: int = 40, seed: int = 0):
    """Pairs whose chosen reply ends "Thank you!" and whose rejected one "Numbers 0 1 2." after the same text."""
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"prompt": f"{rng.choice(LEARNABLE_PROMPTS)} ({seed}-{i})",
                                        "chosen": b + " Thank you!", "rejected": b + " Numbers 0 1 2."}) + "\n"
                            for i in range(n) for b in [rng.choice(LEARNABLE_REPLIES)]))
    return path


def train_cli(out, *extra):
    data = learnable(out.parent / f"{out.name}-pairs.jsonl")
    return run_cli("reward", "train", "--model", "tiny-random-llama", "--output-dir", out, "--quiet", "--no-tensorboard",
                   "--data", data, "--eval-fraction", "0.25", *extra)


def test_recipe_flags_that_cannot_work_are_refused(tmp_path):
    r = train_cli(tmp_path / "a", "--ensemble", "3", "--recipe", "full")
    assert r.returncode == 2 and "--ensemble 3 needs --freeze-trunk" in r.stderr and "Traceback" not in r.stderr
    r = train_cli(tmp_path / "a", "--pooling", "foo")
    assert r.returncode == 2 and "invalid choice: 'foo'" in r.stderr
    r = train_cli(tmp_path / "a", "--freeze-trunk", "--train-layers", "1")
    assert r.returncode == 2 and "give one of them" in r.stderr
    r = train_cli(tmp_path / "a", "--label-smoothing", "0.5")
    assert r.returncode == 2 and "must be in [0, 0.5)" in r.stderr
    r = train_cli(tmp_path / "a", "--patience", "2", "--eval-fraction", "0")
    assert r.returncode == 2 and "--patience 2 needs held-out pairs" in r.stderr
    assert not (tmp_path / "a" / "model.safetensors").exists()


def test_recipe_auto_is_frozen_unless_a_flag_trains_the_trunk_and_a_given_flag_wins():
    said = []
    cfg = resolve_recipe(RewardTrainConfig(model="tiny-random-llama"), sharded=False, log=said.append)
    assert (cfg.recipe, cfg.freeze_trunk, cfg.layer, cfg.pooling, cfg.lr, cfg.weight_decay, cfg.epochs, cfg.patience,
            cfg.label_smoothing) == ("frozen", True, 1, "mean", 1e-3, 0.01, 30.0, 3, 0.1)  # 16/30 of 2 blocks: 1
    assert "recipe frozen (auto: no flag trains the trunk" in said[0]
    assert resolve_recipe(RewardTrainConfig(model="smollm2-135m"), False, said.append).layer == 16  # of 30 blocks
    mine = resolve_recipe(RewardTrainConfig(model="tiny-random-llama", lr=5e-4, pooling="last", patience=0), False,
                          said.append)
    assert (mine.recipe, mine.lr, mine.pooling, mine.patience, mine.epochs) == ("frozen", 5e-4, "last", 0, 30.0)
    for given, why in (({"lora_r": 2}, "--lora-r"), ({"train_layers": 1}, "--train-layers"),
                       ({"freeze_trunk": False}, "--no-freeze-trunk"), ({}, "FSDP / DeepSpeed")):
        full = resolve_recipe(RewardTrainConfig(model="tiny-random-llama", **given), why == "FSDP / DeepSpeed",
                              said.append)
        assert (full.recipe, full.freeze_trunk, full.layer, full.pooling, full.lr, full.epochs, full.patience,
                full.label_smoothing, full.weight_decay) == ("full", False, -1, "last", 1e-5, 1.0, 0, 0.0, 0.0)
        assert f"recipe full (auto: {why} trains the trunk)" in said[-1]
    assert resolve_recipe(RewardTrainConfig(model="tiny-random-llama", recipe="full"), False, said.append).lr == 1e-5
    with pytest.raises(UsageError, match="--recipe frozen trains the head alone, --lora-r trains the trunk"):
        resolve_recipe(RewardTrainConfig(model="tiny-random-llama", recipe="frozen", lora_r=2), False, said.append)


def test_the_default_run_records_its_resolved_recipe_and_a_reward_model_keeps_its_reading(tmp_path):
    out = tmp_path / "default"
    r = train_cli(out, "--max-steps", "2", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "run_config.json").read_text())
    assert {k: saved[k] for k in ("recipe", "freeze_trunk", "layer", "pooling", "lr", "epochs", "patience",
                                  "label_smoothing")} == {"recipe": "frozen", "freeze_trunk": True, "layer": 1,
                                                          "pooling": "mean", "lr": 1e-3, "epochs": 30.0, "patience": 3,
                                                          "label_smoothing": 0.1}
    assert json.loads((out / "chatrlhf.json").read_text())["recipe"] == "frozen"
    # continuing from that folder: its own layer and pooling, whatever the recipe would give
    cont = resolve_recipe(RewardTrainConfig(model=str(out), recipe="full"), False, lambda *_: None)
    assert (cont.layer, cont.pooling, cont.freeze_trunk, cont.lr) == (1, "mean", False, 1e-5)
    # no held-out pairs: the recipe's early stopping turns itself off (a --patience given is refused, above)
    r = train_cli(tmp_path / "no-held", "--max-steps", "1", "--eval-fraction", "0")
    assert r.returncode == 0, r.stderr
    assert "no held-out pairs, so no early stopping" in r.stdout
    assert json.loads((tmp_path / "no-held" / "run_config.json").read_text())["patience"] == 0


def test_max_minutes_ends_training_after_the_step_that_passes_it_then_measures_and_saves(tmp_path):
    out = tmp_path / "budget"
    r = train_cli(out, "--recipe", "full", "--epochs", "20", "--batch-size", "4", "--max-minutes", "0.0001")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "chatrlhf.json").read_text())
    assert s["steps"] == 1 and s["stopped_by_time"] is True and s["accuracy"] is not None  # 20 epochs were 160 steps
    assert "--max-minutes 0.0001 reached at step 1 of 160" in r.stdout and (out / "model.safetensors").is_file()
    assert json.loads((out / "run_config.json").read_text())["max_minutes"] == 0.0001
    r = train_cli(tmp_path / "full", "--recipe", "full", "--max-steps", "2", "--batch-size", "4")
    assert json.loads((tmp_path / "full" / "chatrlhf.json").read_text())["stopped_by_time"] is False, r.stderr


def test_a_frozen_trunks_head_starts_at_zero_and_a_fine_tuned_ones_at_random(tmp_path):
    # logistic regression on the frozen features starts from zero (a random start is systematically wrong on
    # SmolLM2's huge dimensions); a head fine-tuned with its trunk keeps the N(0, 1/sqrt(d+1)) start
    r = train_cli(tmp_path / "frozen", "--freeze-trunk", "--max-steps", "1", "--lr", "1e-12", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    frozen, _ = load_reward_model(ModelArgs(model=str(tmp_path / "frozen")))
    assert frozen.score.weight.abs().max() < 1e-9
    fresh, _ = load_reward_model(ModelArgs(model="tiny-random-llama"))
    w = fresh.score.weight.detach()
    assert abs(float(w.std()) - 1 / (w.shape[1] + 1) ** 0.5) < 0.3 / (w.shape[1] + 1) ** 0.5
    zero, _ = load_reward_model(ModelArgs(model="tiny-random-llama"), head_init="zero")
    assert not zero.score.weight.any()


def test_frozen_normalisation_from_cached_features_is_what_the_loader_scores(tmp_path):
    # with a frozen trunk the gain and bias are fitted on the cached features: the loader's scores of the same
    # reference replies (the sampled training pairs, through the trunk) have mean 0 and std 1
    from chatrlhf.config import RewardTrainConfig
    from chatrlhf.data.pairs import split_pairs
    from chatrlhf.trainers.reward import sample_pairs

    out = tmp_path / "rm"
    r = train_cli(out, "--freeze-trunk", "--layer", "1", "--pooling", "mean", "--epochs", "2", "--lr", "1e-2",
                  "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    cfg = RewardTrainConfig(data=[str(tmp_path / "rm-pairs.jsonl")], eval_fraction=0.25)
    reference = sample_pairs(split_pairs(cfg, "reward", lambda *x: None)[0], 256, cfg.seed)
    model, tok = load_reward_model(ModelArgs(model=str(out)))
    s = np.array(reward_scores(model, tok, [p.prompt for p in reference for _ in (0, 1)],
                               [x for p in reference for x in (p.chosen, p.rejected)]))
    assert abs(s.mean()) < 1e-4 and abs(s.std() - 1) < 1e-4


def test_frozen_ensemble_trains_saves_and_every_loader_scores_it_the_same(tmp_path):
    out = tmp_path / "rm"
    r = train_cli(out, "--freeze-trunk", "--ensemble", "3", "--layer", "1", "--pooling", "both", "--head-dropout", "0.1",
                  "--weight-decay", "0.1", "--label-smoothing", "0.1", "--epochs", "3", "--patience", "1",
                  "--average-checkpoints", "2", "--lr", "1e-2", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    assert "temperature" in r.stdout and "ensemble of 3 heads: accuracy" in r.stdout
    model, tok = load_reward_model(ModelArgs(model=str(out)))
    assert reward_head(model.config) == {"layer": 1, "pooling": "both", "heads": 3} and not classic_head(str(out))
    init, _ = load_reward_model(ModelArgs(model="tiny-random-llama"))
    trained = dict(model.named_parameters())
    for name, p in init.named_parameters():   # the trunk is the untouched tiny model; only the heads moved
        if not name.startswith("score"):
            assert torch.equal(p, trained[name]), name
    report = json.loads((out / "eval.json").read_text())
    assert report["temperature"] != 1.0 and {"ece", "ece_uncalibrated"} <= set(report)
    assert set(report["ensemble"]) >= {"confident_half_accuracy", "other_half_accuracy", "heads"}
    summary = json.loads((out / "chatrlhf.json").read_text())
    assert summary["config"]["ensemble"] == 3 and summary["config"]["pooling"] == "both"
    assert 1 <= len(summary["epochs"]["held_out_bt"]) <= 3
    saved_cfg = json.loads((out / "run_config.json").read_text())
    assert saved_cfg["freeze_trunk"] is True and saved_cfg["layer"] == 1 and saved_cfg["average_checkpoints"] == 2
    # the Python API, `reward score`, and RL's reward source give the same scores; the spread comes back too
    replies = ["It ships today.", "No idea."]
    scores, spreads = reward_scores_with_spread(model, tok, [Q, Q], replies)
    assert scores == pytest.approx(reward_scores(model, tok, [Q, Q], replies)) and all(s > 0 for s in spreads)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": Q[0]["content"], "response": x}) + "\n" for x in replies))
    r = run_cli("reward", "score", "--model", out, "--data", rows, "--out", tmp_path / "s.jsonl", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "spread over the 3 heads" in r.stdout
    got = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [g["score"] for g in got] == pytest.approx(scores, abs=1e-4)
    assert [g["spread"] for g in got] == pytest.approx(spreads, abs=1e-4)
    r = run_cli("reward", "eval", "--model", out, "--data", tmp_path / "rm-pairs.jsonl")   # its held-out prompts only
    assert r.returncode == 0, r.stderr
    assert "calibration: temperature" in r.stdout and "stored with the model" in r.stdout
    assert "ensemble of 3 heads" in r.stdout
    from chatrlhf.rewards import ModelReward

    assert ModelReward(str(out), force=True, dtype="float32")([Q, Q], replies) == pytest.approx(scores, abs=1e-5)
    # PPO scores with it; its critic cannot start from a head that is not one head at the last token
    ppo = ["ppo", "--model", "tiny-random-llama", "--data", EXAMPLES / "dialogue_history.csv", "--reward-model", out,
           "--force", "--output-dir", tmp_path / "ppo", "--quiet", "--no-tensorboard", "--batch-size", "2",
           "--minibatch-size", "2", "--max-new-tokens", "4", "--max-steps", "1"]
    r = run_cli(*ppo, "--critic", "reward-model")
    assert r.returncode == 2 and "not one head at the last token" in r.stderr
    r = run_cli(*ppo)
    assert r.returncode == 0, r.stderr
    assert "critic = separate network from tiny-random-llama" in r.stdout   # auto: the policy, not this model


def test_old_folders_without_the_new_keys_load_and_score_as_before(tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    r = train_cli(out, "--recipe", "full", "--max-steps", "1", "--no-calibrate")
    assert r.returncode == 0, r.stderr
    replies = ["It ships today.", "No idea."]
    model, tok = load_reward_model(ModelArgs(model=str(out)))
    assert reward_head(model.config) == DEFAULT_HEAD and classic_head(str(out))
    before = reward_scores(model, tok, [Q, Q], replies)
    cfg = json.loads((out / "config.json").read_text())
    for key in ("chatrlhf_reward_head", "chatrlhf_reward_calibration"):
        cfg.pop(key, None)
    (out / "config.json").write_text(json.dumps(cfg))
    old, tok = load_reward_model(ModelArgs(model=str(out)))
    assert not hasattr(old.config, "chatrlhf_reward_head") and reward_head(old.config) == DEFAULT_HEAD
    assert reward_scores(old, tok, [Q, Q], replies) == pytest.approx(before, abs=1e-6)
    # and that is plain transformers' score at the last token, normalised
    plain = AutoModelForSequenceClassification.from_pretrained(out)
    batch = pad_right([encode_reply(tok, Q, x, 512)[0] for x in replies], tok.pad_token_id, "cpu")
    with torch.no_grad():
        logits = plain(**batch).logits.squeeze(-1)
    norm = cfg["chatrlhf_reward_norm"]
    assert (norm["gain"] * logits + norm["bias"]).tolist() == pytest.approx(before, abs=1e-5)


def test_frozen_features_match_what_the_loader_scores(tmp_path):
    # the features the trainer caches once are the loader's features: a head trained on them scores the same
    from chatrlhf.config import RewardTrainConfig
    from chatrlhf.trainers.reward import frozen_features

    cfg = RewardTrainConfig(model="tiny-random-llama", output_dir=str(tmp_path / "x"), batch_size=2, dtype="float32")
    model, tok = load_reward_model(cfg, head={"layer": 0, "pooling": "mean", "heads": 2})
    pairs = [Preference(Q, "It ships today.", "No."), Preference(Q, "Yes, in two days.", "Maybe, who knows, not me.")]
    chosen, rejected = frozen_features(model, tok, encode_pairs(tok, pairs, 512), 2, torch.device("cpu"), "float32")
    with torch.no_grad():
        cached = head_scores(model, torch.cat([chosen, rejected])).numpy()
    loaded = raw_head_scores(model, tok, [Q] * 4, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    assert np.allclose(cached, loaded, atol=1e-5)


def test_feature_cache_is_read_back_and_keyed_by_pairs_and_pooling(tmp_path, monkeypatch):
    # the second extraction of the same pairs comes from disk (the trunk is not run); other pairs or another pooling
    # get their own file
    from chatrlhf.trainers import reward

    cpu = torch.device("cpu")
    model, tok = load_reward_model(ModelArgs(model="tiny-random-llama"), head={"layer": 1, "pooling": "mean", "heads": 1})
    pairs = [Preference(Q, "It ships today.", "No."), Preference(Q, "Yes, in two days.", "Maybe.")]
    enc = encode_pairs(tok, pairs, 512)
    first = reward.cached_features(model, tok, enc, 2, cpu, "float32", tmp_path)
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 1
    monkeypatch.setattr(reward, "frozen_features", lambda *a: pytest.fail("the trunk ran again"))
    again = reward.cached_features(model, tok, enc, 2, cpu, "float32", tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    monkeypatch.undo()
    reward.cached_features(model, tok, enc[:1], 2, cpu, "float32", tmp_path)
    setattr(model.config, HEAD_KEY, {**reward_head(model.config), "pooling": "last"})
    last = reward.cached_features(model, tok, enc, 2, cpu, "float32", tmp_path)
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 3 and not torch.equal(last[0], first[0])


def test_ensemble_step_micro_batches_equal_one_big_batch():
    # frozen features of 4 pairs, 2 heads with different bootstrap counts (pair 3 is out of head 0's resample):
    # two micro-batches of 2 give the heads' gradients of one batch of 4, each head's loss its own weighted mean
    import contextlib

    from chatrlhf.trainers.reward import train_step

    torch.manual_seed(0)
    cache = (torch.randn(4, 3), torch.randn(4, 3))
    pairs = [Preference(Q, "c", "r", weight=w) for w in (1.0, 2.0, 0.5, 1.0)]
    boot = torch.tensor([[2.0, 1.0], [1.0, 0.0], [1.0, 2.0], [0.0, 1.0]])
    run = SimpleNamespace(cfg=SimpleNamespace(margin=True, label_smoothing=0.1, head_dropout=0.0), device="cpu",
                          autocast=contextlib.nullcontext, total=lambda v: v,  # one process: sums are its own
                          backward=lambda loss: loss.backward())
    grads, stats = [], []
    for chunks in ([[0, 1], [2, 3]], [[0, 1, 2, 3]]):
        score = torch.nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            score.weight.copy_(torch.tensor([[0.5, -1.0, 0.2], [1.0, 0.3, -0.4]]))
        model = SimpleNamespace(config=SimpleNamespace(chatrlhf_reward_head={"layer": -1, "pooling": "last", "heads": 2}),
                                score=score)
        stats.append(train_step(model, None, run, chunks, [None] * 4, pairs, boot, cache))
        grads.append(score.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert stats[0]["train/bt"] == pytest.approx(stats[1]["train/bt"], abs=1e-6)
    # head 0's loss by hand: weights w·count = (2, 2, 0.5, 0), the smoothed BT loss of each pair's margin
    d = (cache[0] - cache[1]) @ score.weight[0].detach()
    per = -(0.9 * torch.nn.functional.logsigmoid(d) + 0.1 * torch.nn.functional.logsigmoid(-d))
    w = torch.tensor([2.0, 2.0, 0.5, 0.0])
    d1 = (cache[0] - cache[1]) @ score.weight[1].detach()
    per1 = -(0.9 * torch.nn.functional.logsigmoid(d1) + 0.1 * torch.nn.functional.logsigmoid(-d1))
    w1 = torch.tensor([1.0, 0.0, 1.0, 1.0])
    want = ((per * w).sum() / w.sum() + (per1 * w1).sum() / w1.sum()) / 2   # metrics: the heads' mean
    assert stats[1]["train/bt"] == pytest.approx(float(want), abs=1e-6)
    # --head-dropout acts on the features the heads read while training: the same step gives another loss
    run.cfg.head_dropout = 0.5
    torch.manual_seed(1)
    dropped = train_step(model, None, run, [[0, 1, 2, 3]], [None] * 4, pairs, boot, cache)
    assert dropped["train/bt"] != pytest.approx(stats[1]["train/bt"], abs=1e-4)


def test_fine_tuned_trunk_with_a_middle_layer_and_mean_pooling_loads_back(tmp_path):
    out = tmp_path / "rm"
    r = train_cli(out, "--recipe", "full", "--layer", "1", "--pooling", "mean", "--max-steps", "3", "--batch-size", "4",
                  "--lr", "1e-3",
                  "--head-dropout", "0.2", "--average-checkpoints", "2", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    model, tok = load_reward_model(ModelArgs(model=str(out)))
    assert reward_head(model.config) == {"layer": 1, "pooling": "mean", "heads": 1}
    init, _ = load_reward_model(ModelArgs(model="tiny-random-llama"))
    trained = dict(model.named_parameters())
    changed = {n for n, p in init.named_parameters() if not torch.equal(p, trained[n])}
    assert "score.weight" in changed and any(n.startswith("model.layers.0.") for n in changed)
    assert not any(n.startswith(("model.layers.1.", "model.norm")) for n in changed)   # above block 1: never read
    replies = ["It ships today. Thank you!", "It ships today. Numbers 0 1 2."]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": Q[0]["content"], "response": x}) + "\n" for x in replies))
    r = run_cli("reward", "score", "--model", out, "--data", rows, "--out", tmp_path / "s.jsonl", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [g["score"] for g in got] == pytest.approx(reward_scores(model, tok, [Q, Q], replies), abs=1e-5)
    assert "spread" not in got[0]


@pytest.mark.slow
def test_frozen_ensemble_with_early_stopping_resumes_exactly_after_sigkill(tmp_path):
    from safetensors.torch import load_file

    from chatrlhf.logger import read_metrics
    from conftest import kill_at_first_checkpoint

    data = learnable(tmp_path / "pairs.jsonl")
    args = ["reward", "train", "--model", "tiny-random-llama", "--quiet", "--no-tensorboard", "--data", data,
            "--eval-fraction", "0.25", "--freeze-trunk", "--ensemble", "2", "--head-dropout", "0.2", "--epochs", "4",
            "--patience", "1", "--average-checkpoints", "2", "--save-steps", "9", "--batch-size", "4", "--lr", "3e-3"]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    r = run_cli(*args, "--output-dir", ref)
    assert r.returncode == 0, r.stderr
    killed_at = kill_at_first_checkpoint([*args, "--output-dir", out], out)
    assert killed_at >= 9   # after the first epoch (8 steps): the checkpoint holds its weights and held-out loss
    r = run_cli(*args, "--output-dir", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"(step {killed_at})" in r.stdout
    keys = ("train/bt", "eval/bt")
    want = {m["step"]: [m.get(k) for k in keys] for m in read_metrics(ref)}
    got = {m["step"]: [m.get(k) for k in keys] for m in read_metrics(out)}
    assert got.keys() == want.keys() and all(got[s] == pytest.approx(want[s], abs=1e-6) for s in want)
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert torch.allclose(a["score.weight"], b["score.weight"], atol=1e-6)
    epochs = [json.loads((d / "chatrlhf.json").read_text())["epochs"] for d in (ref, out)]
    assert epochs[0]["kept_epoch"] == epochs[1]["kept_epoch"] and epochs[0]["held_out_bt"] == pytest.approx(
        epochs[1]["held_out_bt"], abs=1e-6)
