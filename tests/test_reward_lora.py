"""`reward train --lora-r` (issue 21): LoRA adapters on the trunk and the whole head train; the saved folder is a plain
reward model with the adapters merged, scored by every loader as the in-memory model scored it; resume is exact; the
flags that contradict it are refused."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from chatrlhf.config import ModelArgs, RewardTrainConfig
from chatrlhf.data.pairs import split_pairs
from chatrlhf.errors import UsageError
from chatrlhf.logger import read_metrics
from chatrlhf.models import unwrap
from chatrlhf.reward_model import check_gate, encode_reply, evaluate_pairs, load_reward_model, pad_right, raw_scores, \
    reward_scores
from chatrlhf.trainers.reward import check_recipe, trainable_weights
from conftest import run_cli
from test_reward_recipes import learnable

Q = [{"role": "user", "content": "Where is my order?"}]
LORA = ["--lora-r", "2", "--lora-alpha", "4", "--max-steps", "4", "--save-steps", "2", "--batch-size", "4", "--lr",
        "1e-2", "--dtype", "float32", "--eval-fraction", "0.25", "--quiet", "--no-tensorboard"]


def lora_run(out, data, *extra):
    return run_cli("reward", "train", "--model", "tiny-random-llama", "--output-dir", out, "--data", data, *LORA, *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LoRA reward model trained 4 steps (checkpoints at steps 2 and 4) on learnable pairs: (folder, stdout)."""
    root = tmp_path_factory.mktemp("lora")
    r = lora_run(root / "rm", learnable(root / "pairs.jsonl"))
    assert r.returncode == 0, r.stderr
    return root / "rm", r.stdout


def test_lora_trains_only_the_adapters_and_the_whole_head():
    model, _ = load_reward_model(ModelArgs(model="tiny-random-llama"), trainable=True)
    lora = trainable_weights(model, RewardTrainConfig(lora_r=2, lora_alpha=4))
    assert unwrap(lora) is model   # adapters in place: the trainer keeps reading the transformers module
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    head = "score.modules_to_save.default.weight"
    assert all("lora_A" in n or "lora_B" in n for n in set(trainable) - {head}) and trainable[head] == 64
    # tiny llama: d = 64, MLP 192, 4 heads of 16 with 2 KV heads. LoRA r = 2 adds r·(in + out) per linear layer:
    # q 64→64: 256, k 64→32: 192, v 64→32: 192, o 64→64: 256, gate 64→192: 512, up 64→192: 512, down 192→64: 512
    # = 2432 per block, 2 blocks = 4864; plus the head's 64 weights (no bias) = 4928
    assert len(trainable) == 7 * 2 * 2 + 1 and sum(trainable.values()) == 4928
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embed" in n or "norm" in n)


def test_flags_that_contradict_lora_are_refused(tmp_path):
    refusals = [({"freeze_trunk": True}, "--lora-r 2 with --freeze-trunk: .* give one of them"),
                ({"train_layers": 1}, "--lora-r 2 with --train-layers 1: .* give one of them"),
                ({"ensemble": 3}, "--lora-r 2 with --ensemble 3: .* for LoRA drop --ensemble"),
                ({"ensemble": 3, "freeze_trunk": True}, "--lora-r 2 with --ensemble 3")]
    for fields, message in refusals:
        with pytest.raises(UsageError, match=message):
            check_recipe(RewardTrainConfig(lora_r=2, **fields))
    with pytest.raises(UsageError, match="--lora-r -1: the LoRA rank must be at least 1"):
        check_recipe(RewardTrainConfig(lora_r=-1))
    check_recipe(RewardTrainConfig(lora_r=2, train_layers=-1, ensemble=1))   # LoRA alone is a recipe
    r = run_cli("reward", "train", "--model", "tiny-random-llama", "--output-dir", tmp_path / "x", "--lora-r", "4",
                "--freeze-trunk")
    assert r.returncode == 2 and "give one of them" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_the_saved_lora_model_is_a_plain_merged_reward_model(trained):
    out, stdout = trained
    assert "4,928 trainable parameters" in stdout
    init, _ = load_reward_model(ModelArgs(model="tiny-random-llama"))
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == init.state_dict().keys() and not (out / "adapter").exists()   # no LoRA keys, no adapter/
    before = init.state_dict()
    changed = {k for k in saved if not torch.equal(saved[k], before[k])}
    linear = {k for k in saved if k.endswith("proj.weight")}
    assert changed == linear | {"score.weight"}   # the merged adapters moved every linear weight; nothing else moved
    assert json.loads((out / "chatrlhf.json").read_text())["config"]["lora_r"] == 2
    assert isinstance(check_gate(out), list) and "gate" in json.loads((out / "eval.json").read_text())
    # plain transformers reads the same raw scores as chatrlhf's loader
    model, tok = load_reward_model(ModelArgs(model=str(out)))
    plain = AutoModelForSequenceClassification.from_pretrained(out)
    replies = ["It ships today. Thank you!", "It ships today. Numbers 0 1 2."]
    batch = pad_right([encode_reply(tok, Q, x, 512)[0] for x in replies], tok.pad_token_id, "cpu")
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits.squeeze(-1), raw_scores(model, batch), atol=1e-5)
    # `reward score` gives the loader's normalised scores
    rows = out.parent / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": Q[0]["content"], "response": x}) + "\n" for x in replies))
    r = run_cli("reward", "score", "--model", out, "--data", rows, "--out", out.parent / "s.jsonl", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    got = [json.loads(x)["score"] for x in (out.parent / "s.jsonl").read_text().splitlines()]
    assert got == pytest.approx(reward_scores(model, tok, [Q, Q], replies), abs=1e-5)


def test_the_merged_model_scores_the_held_out_pairs_as_the_trained_one_did(trained):
    # eval.json was measured on the in-memory model (adapters not merged); the saved, merged model gives the same
    out, _ = trained
    cfg = RewardTrainConfig(data=[str(out.parent / "pairs.jsonl")], eval_fraction=0.25)
    held = split_pairs(cfg, "reward", lambda *x: None)[1]
    model, tok = load_reward_model(ModelArgs(model=str(out)))
    again = evaluate_pairs(model, tok, held)
    report = json.loads((out / "eval.json").read_text())
    assert report["pairs"] == len(held) > 0
    for key in ("accuracy", "ece", "temperature"):
        assert again[key] == pytest.approx(report[key], abs=1e-5), key
    for key in ("chosen_score", "rejected_score"):
        assert again[key] == pytest.approx(report[key], abs=1e-5), key


def test_a_lora_run_resumed_from_its_checkpoint_ends_as_the_uninterrupted_one(trained, tmp_path):
    # the checkpoint holds the adapters and the head (the trainable weights): resuming at step 2 gives step 4's
    ref, _ = trained
    out = tmp_path / "resumed"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "checkpoints" / "step-4")
    (out / "model.safetensors").unlink()
    state = load_file(out / "checkpoints" / "step-2" / "model.safetensors")
    assert {k for k in state if "lora_" not in k} == {"score.modules_to_save.default.weight"}
    r = lora_run(out, ref.parent / "pairs.jsonl", "--resume")
    assert r.returncode == 0, r.stderr
    assert "(step 2)" in r.stdout
    want = {m["step"]: m["train/bt"] for m in read_metrics(ref) if "train/bt" in m}
    got = {m["step"]: m["train/bt"] for m in read_metrics(out) if "train/bt" in m}
    assert sorted(got) == [1, 2, 3, 4] and all(got[s] == pytest.approx(want[s], abs=1e-6) for s in want)
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
