"""Behavioural transfer: each trainer learns a learnable target, and the *saved* folder, scored in a fresh process
by the independent evaluator (`chatrlhf eval`: plain transformers generation, the prompt format recorded in the
folder) on held-out prompts, shows the gain — matching the trainer's own final held-out evaluation. And a folder
evaluated with another prompt format than it was trained with is refused, or the match breaks (tested too)."""

import json

import numpy as np
import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow

REPLY = "Thank you for your message, we will help you today."
SHOP = ["Where is my order?", "Can I return these shoes?", "Do you ship to Canada?", "How do I reset my password?",
        "My parcel arrived damaged.", "Is this jacket waterproof?", "Can I change my delivery address?",
        "Why was I charged twice?", "Do you have this in blue?", "How long does shipping take?",
        "Can I cancel my order?", "Where do I enter a discount code?", "Is the store open on Sunday?",
        "My package never came.", "Do you price match?", "Can I pay with PayPal?"]
SHORT = "def short(prompts, responses):\n    return [-len(r.split()) / 4 for r in responses]\n"


def conversations(write, name, prompts):
    return write(name, "".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                        {"role": "assistant", "content": REPLY}]}) + "\n"
                               for p in prompts))


def evaluate(out, model, data, *extra):
    """`chatrlhf eval` in a fresh process; its eval.json."""
    r = run_cli("eval", "--model", model, "--data", data, "--output-dir", out, "--dtype", "float32", *extra,
                process=True)
    assert r.returncode == 0, r.stderr
    return json.loads((out / "eval.json").read_text())


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """SFT on one fixed reply, with the chat template and with --no-chat-template, held-out prompts apart."""
    t = tmp_path_factory.mktemp("sft")

    def write(name, text):
        (t / name).write_text(text)
        return t / name

    train, held = conversations(write, "train.jsonl", SHOP[:12]), conversations(write, "held.jsonl", SHOP[12:])
    runs = {}
    for name, flags in (("chat", []), ("plain", ["--no-chat-template"])):
        out = t / name
        r = run_cli("sft", "--model", "tiny-random-llama", "--data", train, "--eval-data", held, "--output-dir", out,
                    "--quiet", "--no-tensorboard", "--max-steps", "60", "--lr", "3e-3", "--batch-size", "4",
                    "--dtype", "float32", *flags)
        assert r.returncode == 0, r.stderr
        runs[name] = out
    return t, held, runs


@pytest.mark.parametrize("fmt", ["chat", "plain"])
def test_sft_gain_shows_in_the_saved_folder_and_matches_the_trainer(sft_runs, fmt):
    t, held, runs = sft_runs
    summary = json.loads((runs[fmt] / "chatrlhf.json").read_text())
    rep = evaluate(t / f"eval-{fmt}", runs[fmt], held, "--baseline", "tiny-random-llama", "--max-new-tokens", "16",
                   "--samples-per-prompt", "2", "--temperature", "0.7")
    assert rep["prompt_format"]["template"] == fmt == summary["prompt_format"]["template"]
    m, b = rep["metrics"]["model"], rep["metrics"]["baseline"]
    # the evaluator's likelihood of the held-out human replies is the trainer's held-out loss, from the folder alone
    assert m["human_reply_nll"] == pytest.approx(summary["eval_loss_end"], rel=0.02)
    assert m["human_reply_nll"] < summary["eval_loss_start"] / 2 and b["human_reply_nll"] > 2 * m["human_reply_nll"]
    sim = rep["rewards"]["similarity"]
    assert sim["gain"]["ci95"][0] > 0.1 and rep["win_rate"]["ci95"][0] > 0.5  # it says the learned reply


def test_the_match_breaks_when_the_format_differs_so_the_test_can_fail(sft_runs):
    """Scored with the other prompt format, the same folder's likelihood no longer matches the trainer's loss."""
    from chatrlhf.config import ModelArgs
    from chatrlhf.data import load_records
    from chatrlhf.data.template import PLAIN_TEMPLATE
    from chatrlhf.evaluate.evaluator import reference_nll
    from chatrlhf.models import load_model

    _, held, runs = sft_runs
    model, tok = load_model(ModelArgs(model=str(runs["chat"]), dtype="float32"))
    pairs = [(r.messages[:-1], r.messages[-1]["content"]) for r in load_records(held).records]
    trained = json.loads((runs["chat"] / "chatrlhf.json").read_text())["eval_loss_end"]
    assert reference_nll(model, tok, pairs, 256, "float32") == pytest.approx(trained, rel=0.02)
    tok.chat_template = PLAIN_TEMPLATE
    assert reference_nll(model, tok, pairs, 256, "float32") > 1.5 * trained


def test_evaluating_with_another_prompt_format_is_refused(sft_runs):
    t, held, runs = sft_runs
    r = run_cli("eval", "--model", runs["chat"], "--data", held, "--output-dir", t / "refused", "--no-chat-template")
    assert r.returncode == 2 and "trained on chat prompts" in r.stderr and "drop --no-chat-template" in r.stderr
    assert not (t / "refused" / "eval.json").exists()
    record = runs["plain"] / "chatrlhf.json"
    saved = record.read_text()
    tampered = json.loads(saved)
    tampered["prompt_format"]["template"] = "chat"  # the folder's tokenizer says plain, its record says chat
    record.write_text(json.dumps(tampered))
    try:
        r = run_cli("eval", "--model", runs["plain"], "--data", held, "--output-dir", t / "refused2")
        assert r.returncode == 2 and "trained on chat prompts" in r.stderr and "evaluated on plain" in r.stderr
    finally:
        record.write_text(saved)


def test_reward_model_ranking_transfers_to_a_fresh_process(tmp_path, write):
    """A reward model learns 'the helpful reply wins'; its saved folder ranks the held-out pairs in a new process as
    its gate said it would."""
    def pairs(name, prompts):
        return write(name, "".join(json.dumps({"prompt": p, "chosen": REPLY, "rejected": "No."}) + "\n"
                                   for p in prompts))

    out = tmp_path / "rm"
    r = run_cli("reward", "train", "--model", "tiny-random-llama", "--data", pairs("train.jsonl", SHOP[:12]),
                "--eval-data", pairs("held.jsonl", SHOP[12:]), "--output-dir", out, "--quiet", "--no-tensorboard",
                "--max-steps", "12", "--lr", "1e-3", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "chatrlhf.json").read_text())
    assert summary["accuracy"] == 1.0 and summary["gate"]["passed"] is not None
    r = run_cli("reward", "eval", "--model", out, "--data", tmp_path / "held.jsonl", "--output-dir", tmp_path / "re",
                "--dtype", "float32", process=True)
    assert r.returncode == 0, r.stderr
    again = json.loads((tmp_path / "re" / "eval.json").read_text())
    assert again["accuracy"] == summary["accuracy"] and again["ece"] == pytest.approx(summary["ece"], abs=1e-6)
    # and as a judge in `chatrlhf eval`: the fixed helpful reply (an SFT model) beats the random model
    assert summary["prompt_format"]["template"] == "chat"


def test_ppo_gain_shows_in_the_saved_folder_and_matches_the_trainer(tmp_path, write):
    """PPO learns 'short replies'; the saved policy's held-out reward, measured by plain generation in a new
    process, shows the gain over the start model and matches the trainer's own final held-out evaluation."""
    fn = write("short.py", SHORT)
    held = write("held.txt", "\n".join(SHOP[12:]) + "\n")
    out = tmp_path / "ppo"
    r = run_cli("ppo", "--model", "tiny-random-llama", "--data", write("train.txt", "\n".join(SHOP[:12]) + "\n"),
                "--eval-data", held, "--reward-fn", f"{fn}:short", "--output-dir", out, "--quiet", "--no-tensorboard",
                "--batch-size", "6", "--samples-per-prompt", "4", "--minibatch-size", "8", "--max-new-tokens", "16",
                "--max-steps", "30", "--lr", "3e-3", "--critic", "shared", "--temperature", "1.0", "--dtype", "float32",
                "--eval-steps", "100")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "chatrlhf.json").read_text())
    start, end = summary["eval_start"]["eval/fn_mean"], summary["eval_end"]["eval/fn_mean"]
    assert end > start + 0.5, (start, end)
    rep = evaluate(tmp_path / "eval", out, held, "--baseline", "tiny-random-llama", "--reward-fn", f"{fn}:short",
                   "--samples-per-prompt", "8", "--max-new-tokens", "16", "--temperature", "1.0")
    fn_rep = rep["rewards"]["fn"]
    assert fn_rep["gain"]["ci95"][0] > 0.3 and rep["win_rate"]["judge"].endswith(":short")
    # the evaluator's numbers are the trainer's, within sampling noise (another sampler, another seed)
    assert fn_rep["model"]["mean"] == pytest.approx(end, abs=max(0.3, 0.25 * abs(end)))
    assert fn_rep["baseline"]["mean"] == pytest.approx(start, abs=max(0.3, 0.25 * abs(start)))
    kl = rep["kl_to_baseline"]
    assert kl["ci95"][0] > 0 and np.isfinite(kl["mean"])
    assert kl["mean"] == pytest.approx(summary["eval_end"]["eval/kl"], rel=0.25)
