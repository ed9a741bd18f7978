"""`chatrlhf kto` on tiny random-weight models: unpaired feedback from every kind of record, the KL partners, the class
weights, micro-batch × accumulation = one big batch (z₀ per optimizer step), KTO raising the held-out AUC of the
implicit reward on a learnable preference, refused flags, SIGKILL → --resume."""

import json
import random

import pytest
import torch

from chatrlhf.config import KTOConfig
from chatrlhf.data.pairs import unpaired_feedback
from chatrlhf.data.records import Correction, Preference, Rating
from chatrlhf.logger import read_metrics
from chatrlhf.models import load_model
from chatrlhf.preference import all_logps
from chatrlhf.trainers import kto
from chatrlhf.trainers.run import Run
from conftest import EXAMPLES, LEARNABLE_PROMPTS, LEARNABLE_REPLIES, assert_sigkill_resume_matches, run_cli

P = [{"role": "user", "content": "Where is my order?"}]


def test_unpaired_feedback_from_ratings_thumbs_corrections_and_preferences():
    records = [Rating(P, "five", 5, weight=0.5), Rating(P, "four", 4), Rating(P, "three", 3), Rating(P, "one", 1),
               Rating(P, "up", 1.0, "thumbs"), Rating(P, "down", -1.0, "thumbs"),
               Correction(P, "bad", "good"), Preference(P, "c", "r", weight=2.0),
               Preference(P, "t1", "t2", tie=True), Preference(P, "b1", "b2", tie=True, both_bad=True)]
    rows, counts = unpaired_feedback(records)
    marked = {r.response: (r.score, r.weight) for r in rows}
    assert marked == {"five": (1, 0.5), "four": (1, 1), "one": (-1, 1), "up": (1, 1), "down": (-1, 1), "good": (1, 1),
                      "bad": (-1, 1), "c": (1, 2), "r": (-1, 2), "b1": (-1, 1), "b2": (-1, 1)}
    assert counts["dropped_neutral_rating"] == 1 and counts["dropped_ties"] == 1
    assert counts["preference_undesirable"] == 3 and counts["rating_desirable"] == 3


def test_kl_partners_are_a_derangement():
    for n in (2, 3, 10):
        partner = kto.kl_partners(n, seed=4)
        assert sorted(partner) == list(range(n)) and all(partner[i] != i for i in range(n))


def test_class_weights_follow_the_paper_unless_given(capsys):
    data = kto.Examples([None] * 4, [], [], torch.tensor([True, False, False, False]), torch.ones(4))
    assert kto.class_weights(KTOConfig(), data) == (3.0, 1.0)             # λ_D·1 / λ_U·3 = 1
    assert kto.class_weights(KTOConfig(desirable_weight=1.0, undesirable_weight=1.0), data) == (1.0, 1.0)
    assert "recommends [1, 4/3]" in capsys.readouterr().out                # 1·1 / 1·3 is out of range: warned


def test_micro_batches_times_accumulation_equal_one_big_batch(tmp_path):
    cfg = KTOConfig(model="tiny-random-llama", output_dir=str(tmp_path), dtype="float32", quiet=True, tensorboard=False)
    run = Run("kto", cfg, log=lambda *a: None)
    model, tok = load_model(cfg, trainable=True)
    rows = [Rating(P, "It has shipped." + " Thank you!" * i, 1.0 if i % 2 else -1.0, "thumbs", weight=1.0 + i)
            for i in range(4)]
    data = kto.encode_examples(tok, rows, 128, seed=0)
    # a reference near the policy, so that the sigmoids are not saturated and z₀ ≈ 0.3 > 0
    logps = all_logps(model, data.items, 8, tok.pad_token_id, "cpu", "float32")
    kl = all_logps(model, data.kl_items, 8, tok.pad_token_id, "cpu", "float32")
    ref = {"main": logps + torch.tensor([0.5, -0.3, 0.2, -0.6]), "kl": kl - 0.3}

    def grads(chunks):
        model.zero_grad()
        stats = kto.train_step(model, run, tok.pad_token_id, chunks, data, ref, (1.5, 1.0))
        return stats, [p.grad.clone() for p in model.parameters()]

    whole, g1 = grads([[0, 1, 2, 3]])
    parts, g2 = grads([[0, 3], [1, 2]])
    assert whole["loss/kto"] == pytest.approx(parts["loss/kto"], abs=1e-5)
    assert whole["kto/kl"] == pytest.approx(parts["kto/kl"]) == pytest.approx(0.3, abs=1e-4)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


def thumbs(path, n: int, seed: int):
    """Replies ending "Thank you!" are thumbs up (40%), the same text ending "Numbers 0 1 2." thumbs down."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            good = rng.random() < 0.4
            reply = rng.choice(LEARNABLE_REPLIES) + (" Thank you!" if good else " Numbers 0 1 2.")
            f.write(json.dumps({"prompt": f"{rng.choice(LEARNABLE_PROMPTS)} ({seed}-{i})", "response": reply,
                                "score": "up" if good else "down"}) + "\n")
    return path


def kto_args(out, *extra, data=EXAMPLES / "ratings.jsonl"):
    return ["kto", "--model", "tiny-random-llama", "--data", data, "--output-dir", out, "--quiet", "--no-tensorboard",
            "--max-length", "96", *extra]


def test_kto_raises_the_held_out_auc_and_the_policy_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    train, held = thumbs(tmp_path / "train.jsonl", 48, 1), thumbs(tmp_path / "held.jsonl", 16, 2)
    out = tmp_path / "kto"
    r = run_cli(*kto_args(out, "--eval-data", held, "--max-steps", "8", "--batch-size", "8", "--lr", "2e-3",
                          "--eval-steps", "4", data=train))
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "chatrlhf.json").read_text())
    assert s["eval_start"]["eval/auc"] == 0.5 and s["eval_start"]["eval/margin"] == 0.0
    assert s["eval_end"]["eval/auc"] >= 0.9 and s["eval_end"]["eval/margin"] > 0.3
    assert s["desirable_weight"] > 1.0 == s["undesirable_weight"]    # fewer thumbs up: up-weighted
    m = read_metrics(out)
    assert all("loss/kto" in x and "kto/kl" in x and "rewards/desirable" in x for x in m[1:])
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_max_minutes_ends_the_run_after_the_step_that_passes_it_evaluated_and_saved(tmp_path):
    out = tmp_path / "budget"
    r = run_cli(*kto_args(out, "--max-steps", "50", "--batch-size", "4", "--max-minutes", "0.0001", "--eval-steps", "100",
                          data=thumbs(tmp_path / "t.jsonl", 24, 1)))
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "chatrlhf.json").read_text())
    assert s["steps"] == 1 and s["stopped_by_time"] is True and s["eval_end"]["eval/loss"] is not None
    assert (out / "model.safetensors").is_file() and "--max-minutes 0.0001 reached at step 1 of 50" in r.stdout


@pytest.mark.parametrize("flags, message", [(["--beta", "-1"], "must be > 0"),
                                            (["--desirable-weight", "0"], "--desirable-weight 0.0: must be > 0")])
def test_flags_that_cannot_work_are_refused(tmp_path, flags, message):
    r = run_cli(*kto_args(tmp_path / "x", *flags))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_metrics_and_policy(tmp_path):
    data, held = thumbs(tmp_path / "t.jsonl", 40, 3), thumbs(tmp_path / "h.jsonl", 12, 4)
    args = ["--max-steps", "6", "--batch-size", "4", "--grad-accum", "2", "--save-steps", "2", "--eval-steps", "3",
            "--lr", "1e-3", "--seed", "3", "--eval-data", held]
    stdout = assert_sigkill_resume_matches(lambda out, *resume: kto_args(out, *args, *resume, data=data), tmp_path, 6,
                                           "model.safetensors", ignore=("train/replies_per_s",))
    assert "computing the reference" not in stdout
    assert "eval/auc" in read_metrics(tmp_path / "killed")[-1]  # both classes held out: the AUC was compared too
