"""`chatrlhf dpo` on tiny random-weight models: sequence log-probs against a plain forward, the reference log-probs
cached (and adapters off with LoRA), micro-batch × accumulation = one big batch, a smoke run in which every parameter
moves and the output loads with plain transformers, every feedback format read, DPO raising the margin accuracy on
held-out pairs of a learnable preference, refused flags, and SIGKILL → --resume reproducing the uninterrupted run."""

import json
import random

import pytest
import torch

from chatrlhf import preference
from chatrlhf.config import DPOConfig
from chatrlhf.data.records import Preference
from chatrlhf.logger import read_metrics
from chatrlhf.models import load_model
from chatrlhf.trainers import dpo
from chatrlhf.trainers.run import Run
from conftest import EXAMPLES, LEARNABLE_PROMPTS, LEARNABLE_REPLIES, assert_sigkill_resume_matches, run_cli

PREFS = EXAMPLES / "preferences.jsonl"


def tiny(**kw):
    return DPOConfig(model="tiny-random-llama", quiet=True, tensorboard=False, **kw)


def encoded_pairs(tok, n=4):
    rows = [Preference([{"role": "user", "content": f"Where is my order {i}?"}], "It has shipped." + " Thank you!" * i,
                       "Don't know.", weight=1.0 + i) for i in range(n)]
    return dpo.encode_pairs(tok, rows, 128)


def test_sequence_logps_equal_a_plain_forward_over_the_reply_tokens():
    model, tok = load_model(tiny())
    _, enc = encoded_pairs(tok)
    items = dpo.sides(enc)
    batch = preference.collate(items, tok.pad_token_id, "cpu")
    with torch.no_grad():
        logps, tokens = preference.sequence_logps(model, batch)
    for i, x in enumerate(items):  # one sequence at a time, no padding, the full log-softmax
        ids = torch.tensor([x.input_ids])
        lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        on_reply = torch.tensor(x.labels[1:]) != -100
        assert float(logps[i]) == pytest.approx(float(lp[on_reply].sum().detach()), abs=1e-4)
        assert int(tokens[i]) == x.n_targets == int(on_reply.sum()) > 0


def test_reference_logps_are_cached_and_recomputed_only_for_other_data(tmp_path, monkeypatch):
    model, tok = load_model(tiny())
    _, enc = encoded_pairs(tok)
    groups = {"train": dpo.sides(enc[:3]), "eval": dpo.sides(enc[3:])}
    args = (tmp_path, "tiny-random-llama", "float32", 4, tok.pad_token_id, "cpu")
    first = preference.reference_logps(model, groups, *args, log=lambda *a: None)
    assert (tmp_path / preference.REF_CACHE).is_file() and first["train"].shape == (6,)

    def no_pass(*a, **k):
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr(preference, "all_logps", no_pass)
    again = preference.reference_logps(model, groups, *args, log=lambda *a: None)
    assert all(torch.equal(first[k], again[k]) for k in groups)
    with pytest.raises(AssertionError, match="cache should"):  # other data: computed again
        preference.reference_logps(model, {"train": groups["train"][:2], "eval": []}, *args, log=lambda *a: None)
    with pytest.raises(AssertionError, match="cache should"):  # a fresh run (not --resume): computed again
        preference.reference_logps(model, groups, *args, log=lambda *a: None, reuse=False)


def test_with_lora_the_reference_is_the_base_with_adapters_off(tmp_path):
    base, tok = load_model(tiny())
    policy, _ = load_model(tiny(lora_r=2), trainable=True, lora=tiny(lora_r=2))
    with torch.no_grad():  # the adapters have moved: the policy is no longer the base
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    _, enc = encoded_pairs(tok)
    items = dpo.sides(enc)
    want = preference.all_logps(base, items, 4, tok.pad_token_id, "cpu", "float32")
    moved = preference.all_logps(policy, items, 4, tok.pad_token_id, "cpu", "float32")
    ref = preference.reference_logps(policy, {"all": items}, tmp_path, "x", "float32", 4, tok.pad_token_id, "cpu")
    assert not torch.allclose(moved, want, atol=1e-3)
    assert torch.allclose(ref["all"], want, atol=1e-5)
    assert policy.training is True  # put back as it was


def test_micro_batches_times_accumulation_equal_one_big_batch(tmp_path):
    cfg = tiny(output_dir=str(tmp_path), rpo_alpha=0.5, dtype="float32")
    run = Run("dpo", cfg, log=lambda *a: None)
    model, tok = load_model(cfg, trainable=True)
    pairs, enc = encoded_pairs(tok)
    ref = torch.randn(4, 2) - 20

    def grads(chunks):
        model.zero_grad()
        stats = dpo.train_step(model, run, tok.pad_token_id, chunks, enc, pairs, ref)
        return stats, [p.grad.clone() for p in model.parameters()]

    whole, g1 = grads([[0, 1, 2, 3]])
    parts, g2 = grads([[0, 2], [1, 3]])
    assert whole["loss/dpo"] == pytest.approx(parts["loss/dpo"], abs=1e-5)
    assert whole["loss/nll"] == pytest.approx(parts["loss/nll"], abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


def test_the_frozen_lower_blocks_output_kept_from_the_reference_pass_gives_the_same_log_probs():
    """--train-layers: the residual stream entering the first trained block, kept from the reference pass, fed to the
    top blocks alone gives what the whole network gives (fp32), and the reference pass itself is unchanged."""
    model, tok = load_model(tiny(dtype="float32"))
    _, enc = encoded_pairs(tok)
    items = dpo.sides(enc)
    depth = preference.frozen_depth(model, 1, items)
    assert depth == len(model.model.layers) - 1 > 0
    states = [None] * len(items)
    kept = preference.all_logps(model, items, 3, tok.pad_token_id, "cpu", "float32", states, depth)
    assert torch.equal(kept, preference.all_logps(model, items, 3, tok.pad_token_id, "cpu", "float32"))
    assert [len(h) for h in states] == [len(x.input_ids) for x in items]
    batch = preference.collate(items, tok.pad_token_id, "cpu")
    with torch.no_grad():
        full, n_full = preference.sequence_logps(model, batch)
        top, n_top = preference.sequence_logps(model, preference.collate_trunk(batch, states, depth))
    assert torch.allclose(full, top, atol=1e-5) and torch.equal(n_full, n_top)
    assert len(model.model.layers) == depth + 1  # the blocks are put back
    assert preference.frozen_depth(model, -1, items) == 0  # everything trained: nothing to keep


def test_dpo_with_train_layers_logs_the_same_figures_with_the_kept_lower_blocks(tmp_path, prefs, monkeypatch):
    def metrics(out):
        dpo.train(tiny(data=[str(prefs)], output_dir=str(out), max_steps=2, batch_size=4, lr=1e-3, train_layers=1,
                       dtype="float32", eval_steps=2), log=lambda *a: None)
        return read_metrics(out)

    kept = metrics(tmp_path / "kept")
    monkeypatch.setattr(dpo, "frozen_depth", lambda *a: 0)  # the whole network at every step, as before
    whole = metrics(tmp_path / "whole")
    for a, b in zip(kept, whole, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            # at step 1 the policy is the reference: its margins are rounding noise (1e-7), their sign says nothing
            if k not in ("train/pairs_per_s", "time/step_s") and (k, a["step"]) != ("rewards/accuracies", 1):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


@pytest.fixture
def prefs(tmp_path):
    """The first 40 example preference pairs: enough for a few steps and a held-out split, quick to encode."""
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(PREFS.read_text().splitlines(keepends=True)[:40]))
    return path


def dpo_args(out, *extra, data=PREFS):
    return ["dpo", "--model", "tiny-random-llama", "--data", data, "--output-dir", out, "--quiet", "--no-tensorboard",
            "--max-length", "96", *extra]


def test_dpo_smoke_every_parameter_moves_and_the_policy_loads_with_transformers(tmp_path, prefs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dpo"
    r = run_cli(*dpo_args(out, "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3", "--loss-type", "robust",
                          "--label-smoothing", "0.1", "--rpo-alpha", "0.5", "--eval-steps", "2", data=prefs))
    assert r.returncode == 0, r.stderr
    assert "held-out margin accuracy 0.500 ->" in r.stdout  # the untrained policy is the reference: margins 0
    m = read_metrics(out)
    assert [x["step"] for x in m] == [0, 1, 2, 3]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "loss/dpo", "loss/nll"):
        assert all(key in x and x[key] == x[key] for x in m[1:]), key
    assert [x["step"] for x in m if "eval/accuracy" in x] == [0, 2, 3]
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["loss_type"] == "robust" and saved["label_smoothing"] == 0.1 and saved["rpo_alpha"] == 0.5
    init, _ = load_model(tiny())
    trained = load_file(out / "model.safetensors")
    for name, p in init.named_parameters():
        assert not torch.equal(p.detach(), trained[name]), f"{name} did not change"
    policy = AutoModelForCausalLM.from_pretrained(out)
    assert policy(torch.tensor([[1, 2, 3]])).logits.shape[-1] == len(init.get_input_embeddings().weight)
    assert (out / preference.REF_CACHE).is_file()


def test_every_feedback_format_is_read_and_ties_and_both_bad_are_counted(tmp_path):
    from safetensors.torch import load_file

    ratings = tmp_path / "ratings.jsonl"  # the first 30 example ratings
    ratings.write_text("".join((EXAMPLES / "ratings.jsonl").read_text().splitlines(keepends=True)[:30]))
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help you today?",
                              "rejected": "\n\nHuman: Hi there\n\nAssistant: What."}) + "\n")
    oasst = tmp_path / "oasst.jsonl"
    oasst.write_text(json.dumps({"context": [{"role": "user", "content": "Do you ship to Canada?"}],
                                 "chosen": "Yes, we do.", "rejected": "No idea."}) + "\n")
    store = tmp_path / "store.jsonl"  # the store's export: weights, annotators, a tie and a both-bad pair
    store.write_text("".join(json.dumps({"prompt": "Where is my order?", "chosen": c, "rejected": "Don't know.",
                                         "annotator": "ann1", "weight": 0.5, **kw}) + "\n"
                             for c, kw in (("Shipped.", {}), ("It left today.", {"tie": True}),
                                           ("No clue.", {"both_bad": True}))))
    data = ",".join(map(str, (hh, oasst, store, ratings, EXAMPLES / "corrections.jsonl")))
    out = tmp_path / "all"
    r = run_cli(*dpo_args(out, "--max-steps", "1", "--eval-fraction", "0", "--train-layers", "1", "--lr", "1e-3",
                          data=data))
    assert r.returncode == 0, r.stderr
    trained, init = load_file(out / "model.safetensors"), dict(load_model(tiny())[0].named_parameters())
    for name, p in init.items():  # --train-layers 1: the tied embeddings and block 0 frozen, the top block and norm not
        assert torch.equal(p.detach(), trained[name]) == ("embed_tokens" in name or "layers.0." in name), name
    pairs = json.loads((out / "chatrlhf.json").read_text())["pairs"]
    assert pairs["preference"] == 5 and pairs["ties"] == 1 and pairs["both_bad"] == 1
    assert pairs["rating"] > 0 and pairs["correction"] == 5
    r = run_cli(*dpo_args(tmp_path / "drop", "--max-steps", "1", "--eval-fraction", "0", "--ties", "drop",
                          "--both-bad", "drop", data=store))
    assert r.returncode == 0, r.stderr
    counts = json.loads((tmp_path / "drop" / "chatrlhf.json").read_text())["pairs"]
    assert counts["dropped_ties"] == 1 and counts["dropped_both_bad"] == 1 and counts["preference"] == 1


def test_max_minutes_ends_the_run_after_the_step_that_passes_it_evaluated_and_saved(tmp_path, prefs):
    out = tmp_path / "budget"
    r = run_cli(*dpo_args(out, "--max-steps", "50", "--batch-size", "4", "--max-minutes", "0.0001", "--eval-steps", "100",
                          data=prefs))
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "chatrlhf.json").read_text())
    assert s["steps"] == 1 and s["stopped_by_time"] is True and s["eval_end"]["eval/accuracy"] is not None
    assert [x["step"] for x in read_metrics(out) if "eval/accuracy" in x] == [0, 1]  # the last step is evaluated
    assert (out / "model.safetensors").is_file() and "--max-minutes 0.0001 reached at step 1 of 50" in r.stdout


def learnable_pairs(path, n: int, seed: int):
    """Pairs whose chosen reply ends "Thank you!" and whose rejected one ends "Numbers 0 1 2." after the same text."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            b = rng.choice(LEARNABLE_REPLIES)
            f.write(json.dumps({"prompt": f"{rng.choice(LEARNABLE_PROMPTS)} ({seed}-{i})", "chosen": b + " Thank you!",
                                "rejected": b + " Numbers 0 1 2."}) + "\n")
    return path


def test_dpo_raises_the_margin_accuracy_on_held_out_pairs(tmp_path):
    train, held = learnable_pairs(tmp_path / "train.jsonl", 48, 1), learnable_pairs(tmp_path / "held.jsonl", 16, 2)
    out = tmp_path / "dpo"
    r = run_cli(*dpo_args(out, "--eval-data", held, "--max-steps", "8", "--batch-size", "8", "--lr", "2e-3",
                          "--eval-steps", "4", data=train))
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "chatrlhf.json").read_text())
    start, end = s["eval_start"], s["eval_end"]
    assert start["eval/accuracy"] == 0.5 and start["eval/margin"] == 0.0   # the policy is its own reference
    assert end["eval/accuracy"] >= 0.9 and end["eval/margin"] > 0.3
    assert end["eval/rewards_chosen"] > end["eval/rewards_rejected"]


@pytest.mark.parametrize("flags, message", [
    (["--label-smoothing", "0.1", "--loss-type", "hinge"], "would do nothing"),
    (["--label-smoothing", "0.5"], "must be in [0, 0.5)"),
    (["--beta", "0"], "--beta 0.0: must be > 0"),
    (["--rpo-alpha", "-1"], "must be >= 0"),
])
def test_flags_that_cannot_work_are_refused(tmp_path, flags, message):
    r = run_cli(*dpo_args(tmp_path / "x", *flags))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_metrics_and_policy(tmp_path, prefs):
    args = ["--max-steps", "8", "--batch-size", "4", "--grad-accum", "2", "--save-steps", "2", "--eval-steps", "4",
            "--lr", "1e-3", "--seed", "3", "--rpo-alpha", "0.2"]
    stdout = assert_sigkill_resume_matches(lambda out, *resume: dpo_args(out, *args, *resume, data=prefs), tmp_path, 8,
                                           "model.safetensors", ignore=("train/pairs_per_s",))
    assert "computing the reference" not in stdout  # read from the run folder's cache
