"""SFT: reduction invariance, batching, a smoke run through the real CLI, bad input at the CLI."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatrlhf.config import ModelArgs, SFTConfig
from chatrlhf.data import as_conversations, load_records
from chatrlhf.logger import read_metrics
from chatrlhf.models import load_model
from chatrlhf.trainers.common import plan_batches
from chatrlhf.trainers.sft import collate, n_targets, sft_forward, tokenize_all
from conftest import EXAMPLES, run_cli, tiny_sft_args


def tiny_items(name="tiny-random-llama", n=4):
    model, tok = load_model(ModelArgs(model=name), trainable=True)
    convs = as_conversations(load_records(EXAMPLES / "dialogue_history.csv"))[:n]
    return model, tok, tokenize_all(tok, convs, SFTConfig(max_length=512))


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_micro_batches_times_accumulation_equal_one_big_batch(name):
    model, tok, items = tiny_items(name)
    big = collate(items, tok.pad_token_id, "cpu")
    total = n_targets(big)
    sft_forward(model, big, total)[0].backward()
    g_big = grads(model)
    model.zero_grad()
    halves = [collate(items[:2], tok.pad_token_id, "cpu"), collate(items[2:], tok.pad_token_id, "cpu")]
    assert sum(n_targets(h) for h in halves) == total
    for h in halves:
        sft_forward(model, h, total)[0].backward()
    for a, b in zip(g_big, grads(model)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_loss_matches_plain_transformers_loss_on_the_same_tokens():
    model, tok, items = tiny_items(n=1)
    batch = collate(items, tok.pad_token_id, "cpu")
    ours, _ = sft_forward(model, batch, n_targets(batch))
    ref = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss   # HF shifts and ignores -100
    assert torch.allclose(ours, ref, atol=1e-6)


def test_plan_batches_cover_everything_once_and_bucket_by_length():
    lengths = [5, 100, 7, 98, 6, 99, 8, 97, 50, 51]
    batches = plan_batches(lengths, 2, seed=1)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(10))
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert waste <= 8     # sorted buckets: neighbours differ by a few tokens
    assert plan_batches(lengths, 2, seed=1) == batches and plan_batches(lengths, 2, seed=2) != batches


def test_sft_cli_smoke(tmp_path):
    out = tmp_path / "run"
    r = run_cli(*tiny_sft_args(EXAMPLES / "dialogue_history.csv", out, "--max-steps", "12", "--lr", "3e-3",
                               "--batch-size", "4", "--grad-accum", "2", "--eval-steps", "6", "--save-steps", "6",
                               "--warmup-ratio", "0.25",
                               "--tensorboard"))
    assert r.returncode == 0, r.stderr
    metrics = read_metrics(out)
    evals = [m["eval/loss"] for m in metrics if "eval/loss" in m]
    assert len(evals) == 3 and evals[-1] < evals[0]                    # held-out loss goes down
    train = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in train] == list(range(1, 13))
    assert all(math.isfinite(m["train/loss"]) for m in train)
    assert train[0]["train/lr"] < train[2]["train/lr"]                   # warm-up ...
    assert train[-1]["train/lr"] < train[5]["train/lr"]                  # ... then cosine decay
    assert all(0 <= m["train/pad_fraction"] < 0.5 for m in train)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((out / "chatrlhf.json").read_text())
    assert summary["steps"] == 12 and summary["eval_loss_end"] < summary["eval_loss_start"]
    # the output loads with plain transformers, and every parameter tensor moved
    trained = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    init, _ = load_model(ModelArgs(model="tiny-random-llama"))
    init_params = dict(init.named_parameters())
    for name, p in trained.named_parameters():
        assert not torch.equal(p, init_params[name]), f"{name} did not change"


def test_sft_cli_lora(tmp_path):
    out = tmp_path / "lora"
    r = run_cli(*tiny_sft_args(EXAMPLES / "dialogue_history.csv", out, "--max-steps", "3", "--lora-r", "4",
                               "--lr", "1e-2"))
    assert r.returncode == 0, r.stderr
    assert (out / "adapter" / "adapter_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(out)   # merged weights, loadable without peft


@pytest.mark.parametrize("content,field,line", [
    ('history,reply\n"User: hi",x\n', "responses", 2),
    ('history,responses\n"User: hi",\n', "responses", 2),
    ('history,responses\n"[{""role"": ""robot"", ""content"": ""x""}]",ok\n', "history", 2),
])
def test_sft_cli_bad_input_one_line_exit_2_no_output(tmp_path, content, field, line):
    data = tmp_path / "bad.csv"
    data.write_text(content)
    out = tmp_path / "never"
    r = run_cli(*tiny_sft_args(data, out, "--max-steps", "2", "--format", "dialogue_csv"))
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{data}:{line}: field '{field}'" in err
    assert not out.exists()


def test_sft_cli_bad_json_and_utf8(tmp_path):
    bad_json = tmp_path / "b.jsonl"
    bad_json.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{oops\n')
    r = run_cli(*tiny_sft_args(bad_json, tmp_path / "o1", "--max-steps", "1"))
    assert r.returncode == 2 and f"{bad_json}:2: bad JSON" in r.stderr
    bad_utf8 = tmp_path / "b.csv"
    bad_utf8.write_bytes(b'history,responses\n"User: caf\xe9",ok\n')
    r = run_cli(*tiny_sft_args(bad_utf8, tmp_path / "o2", "--max-steps", "1"))
    assert r.returncode == 2 and f"{bad_utf8}:2: not valid UTF-8" in r.stderr
    ends_on_user = tmp_path / "u.jsonl"
    ends_on_user.write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    r = run_cli(*tiny_sft_args(ends_on_user, tmp_path / "o3", "--max-steps", "1"))
    assert r.returncode == 2 and f"{ends_on_user}:1: field 'messages': conversation ends on a user turn" in r.stderr
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_sft_cli_overlong_records_are_reported(tmp_path):
    out = tmp_path / "o"
    r = run_cli(*tiny_sft_args(EXAMPLES / "dialogue_history.csv", out, "--max-steps", "1", "--max-length", "120",
                               "--overlong", "drop"))
    assert r.returncode == 0, r.stderr
    assert "over-long or empty record(s)" in r.stdout and "dropped" in r.stdout
    assert "dialogue_history.csv:" in r.stdout


def test_bad_flag_and_bad_model(tmp_path):
    r = run_cli("sft", "--max-steps", "many")
    assert r.returncode == 2 and "invalid int value" in r.stderr
    r = run_cli(*tiny_sft_args(EXAMPLES / "dialogue_history.csv", tmp_path / "o", "--model", "nope"))
    assert r.returncode == 2 and "--model nope" in r.stderr and "Traceback" not in r.stderr


def test_step_plan_keeps_the_last_partial_step_of_every_epoch():
    from chatrlhf.trainers.common import StepPlan, total_steps

    plan = StepPlan([5] * 40, batch_size=4, grad_accum=4, seed=0)   # 10 micro-batches per epoch
    assert plan.steps_per_epoch == 3 and total_steps(-1, 1.0, plan.steps_per_epoch) == 3
    assert [len(plan[s]) for s in range(6)] == [4, 4, 2, 4, 4, 2]   # steps of 4, 4 and 2 micro-batches
    for epoch in (0, 1):
        seen = sorted(i for s in range(3 * epoch, 3 * epoch + 3) for b in plan[s] for i in b)
        assert seen == list(range(40))                                 # every example once per epoch
    assert total_steps(7, 1.0, 3) == 7 and total_steps(-1, 2.5, 3) == 8


def test_sft_epoch_with_grad_accum_sees_every_example(tmp_path):
    from chatrlhf.data import split_by_prompt

    out = tmp_path / "ga"
    r = run_cli(*tiny_sft_args(EXAMPLES / "dialogue_history.csv", out, "--epochs", "1", "--batch-size", "4",
                               "--grad-accum", "3", "--eval-fraction", "0", "--save-steps", "1000"))
    assert r.returncode == 0, r.stderr
    _, tok = load_model(ModelArgs(model="tiny-random-llama"))
    convs, _ = split_by_prompt(as_conversations(load_records(EXAMPLES / "dialogue_history.csv")), 0.0)
    items = tokenize_all(tok, convs, SFTConfig(max_length=512))
    train = [m for m in read_metrics(out) if "train/tokens" in m]
    assert len(train) == math.ceil(math.ceil(len(items) / 4) / 3) == 6   # 16 micro-batches: 5 steps of 3, one of 1
    assert sum(m["train/tokens"] for m in train) == sum(len(x.input_ids) for x in items)


def test_no_chat_template_means_plain_text_and_is_saved_with_the_model(tmp_path):
    from chatrlhf.data.template import PLAIN_TEMPLATE, tokenize_conversation

    _, tok = load_model(ModelArgs(model="tiny-random-llama"), chat_template=False)
    conv = [{"role": "user", "content": "The movie was"}, {"role": "assistant", "content": " a delight."}]
    item, _ = tokenize_conversation(tok, conv, 512)
    assert tok.decode(item.input_ids) == "The movie was a delight.<|im_end|>"
    learned = tok.decode([t for t, lab in zip(item.input_ids, item.labels) if lab != -100])
    assert learned == " a delight.<|im_end|>"                       # the reply and its EOS, nothing of the prompt
    out = tmp_path / "plain"
    r = run_cli(*tiny_sft_args(EXAMPLES / "dialogue_history.csv", out, "--max-steps", "1", "--no-chat-template"))
    assert r.returncode == 0, r.stderr
    assert AutoTokenizer.from_pretrained(out).chat_template == PLAIN_TEMPLATE
    summary = json.loads((out / "chatrlhf.json").read_text())
    assert summary["chat_template"] is False and summary["config"]["chat_template"] is False
