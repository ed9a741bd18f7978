"""`chatrlhf qlearn` (trainers/qlearn.py): the CLI run and its outputs, the TD loss, learning a learnable reward,
exact resume after SIGKILL, bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file

from chatrlhf.config import ModelArgs, QLearnConfig
from chatrlhf.engine import Engine, SamplingParams
from chatrlhf.env import CandidateWrapper, DialogueEnv
from chatrlhf.logger import read_metrics
from chatrlhf.models import load_model
from chatrlhf.qnet import QHeads, ReplayBuffer, load_qheads, q_update, reply_logprobs
from chatrlhf.rerank import load_reranker
from chatrlhf.trainers.qlearn import behavior_logprobs, dialogue_index, epsilon, resolve_features
from conftest import EXAMPLES, assert_sigkill_resume_matches, run_cli

DIALOGUES = EXAMPLES / "dialogue_history.csv"
SHORT = "def short(prompts, responses):\n    return [-len(r) / 50 for r in responses]\n"


def qlearn_args(out, *extra):
    return ["qlearn", "--model", "tiny-random-llama", "--data", DIALOGUES, "--output-dir", out, "--quiet",
            "--no-tensorboard", "--max-new-tokens", "8", *extra]


def test_a_short_run_saves_heads_and_qlearn_json_and_logs_q_and_eval_metrics(tmp_path):
    out = tmp_path / "q"
    r = run_cli(*qlearn_args(out, "--references", DIALOGUES, "--max-steps", "4", "--learning-starts", "2", "--solver", "dqn",
                             "--batch-size", "4", "--eval-steps", "2", "--hidden", "16", "--eval-dialogues", "2",
                             "--pooling", "last", "--features", "phi"))
    assert r.returncode == 0, r.stderr
    assert "held-out reward per state: Q-argmax" in r.stdout and "saved to" in r.stdout
    meta = json.loads((out / "qlearn.json").read_text())
    assert meta == {"q_model": "tiny-random-llama", "pooling": "last", "heads": 2, "hidden": 16, "dims": 64}
    heads, got = load_qheads(out)
    assert got == meta and not heads.training
    saved = load_file(out / "qheads.safetensors")
    assert any(k.startswith("targets.") for k in saved)  # the target copies are saved too
    fresh = QHeads(64, 2, 16)
    assert not torch.equal(saved["online.0.0.weight"], fresh.state_dict()["online.0.0.weight"])
    phi = torch.randn(3, 64)
    assert heads(phi).shape == (2, 3)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "eval/q" in m] == [0, 2, 4]
    last = metrics[-1]
    for key in ("loss/td", "q/grad_norm", "train/return", "train/epsilon", "eval/random", "eval/oracle", "eval/human"):
        assert key in last, key
    assert last["eval/oracle"] >= last["eval/q"] >= last["eval/oracle"] - 10 and last["eval/human"] == pytest.approx(1.0)
    summary = json.loads((out / "chatrlhf.json").read_text())
    assert summary["command"] == "qlearn" and summary["steps"] == 4 and summary["updates"] > 0


@pytest.mark.parametrize("flags, features", [
    ({"references": ["d.csv"]}, "text"),                                # similarity alone: ψ's consensus estimates it
    ({"reward_model": "rm"}, "phi"), ({"reward_fn": "f.py:f"}, "phi"), ({"human_feedback": ["r.jsonl"]}, "phi"),
    ({"references": ["d.csv"], "reward_model": "rm"}, "phi"),           # mixed: the trunk's states
    ({"references": ["d.csv"], "features": "both"}, "both"),            # a given --features is kept
    ({"reward_model": "rm", "features": "text"}, "text")])
def test_features_auto_reads_the_reward_sources(flags, features):
    said = []
    got = resolve_features(QLearnConfig(data=["d.csv"], **flags), said.append)
    assert got.features == features
    assert bool(said) == ("features" not in flags)  # one log line, only when it chose


def test_the_td_loss_goes_down_on_a_fixed_batch():
    torch.manual_seed(0)
    buffer = ReplayBuffer(32, 8, 3)
    for _ in range(32):
        buffer.add(torch.randn(8), float(torch.rand(1)), bool(torch.rand(1) < 0.5), torch.randn(3, 8))
    batch = buffer.sample(32, torch.Generator().manual_seed(0))
    heads = QHeads(8, 2, 32)
    opt = torch.optim.AdamW(heads.online.parameters(), lr=1e-2)
    losses = [q_update(heads, opt, batch, gamma=0.9)["loss/td"] for _ in range(60)]
    assert losses[-1] < 0.2 * losses[0]


def test_the_dialogue_order_is_a_pure_function_of_the_episode_and_epsilon_decays():
    seen = [dialogue_index(e, 7, 3) for e in range(7)]
    assert sorted(seen) == list(range(7)) and dialogue_index(9, 7, 3) == dialogue_index(9, 7, 3)
    cfg = QLearnConfig(epsilon_start=1.0, epsilon_end=0.1, epsilon_fraction=0.1)
    assert epsilon(cfg, 0, 100) == 1.0 and epsilon(cfg, 5, 100) == pytest.approx(0.55)
    assert epsilon(cfg, 10, 100) == pytest.approx(0.1) and epsilon(cfg, 90, 100) == pytest.approx(0.1)


def test_q_learns_a_reward_that_prefers_short_replies(tmp_path, write):
    """γ = 0 (replayed user turns), reward −len/50: after 40 episodes the Q-argmax pick of the held-out policy
    candidates beats a random one. (Seeded: on this tiny random trunk the margin depends on the seed.)"""
    fn = write("short.py", SHORT)
    out = tmp_path / "q"
    r = run_cli(*qlearn_args(out, "--reward-fn", f"{fn}:short", "--max-steps", "40", "--learning-starts", "16", "--solver", "dqn",
                             "--no-all-candidates", "--human-candidate",
                             "--batch-size", "32", "--updates-per-step", "4", "--lr", "1e-3", "--gamma", "0", "--tau",
                             "0.05", "--pooling", "mean", "--eval-steps", "40", "--max-new-tokens", "16", "--hidden", "64",
                             "--dtype", "float32"))  # bf16 (auto, where the CPU has it) moves the tiny trunk's
    # features enough to change which seed's margin shows. --features auto: a reward function → phi, recorded resolved
    assert r.returncode == 0, r.stderr
    assert "--features auto → phi (the reward has fn sources)" in r.stdout
    assert json.loads((out / "run_config.json").read_text())["features"] == "phi"
    assert json.loads((out / "qlearn.json").read_text())["dims"] == 64
    start = next(m for m in read_metrics(out) if m["step"] == 0)
    end = json.loads((out / "chatrlhf.json").read_text())["eval_end"]
    assert end["eval/q"] > end["eval/random"] and end["eval/capture"] > start["eval/capture"]


@pytest.mark.slow
@pytest.mark.parametrize("solver", [["--solver", "dqn", "--hidden", "16", "--cql-alpha", "0.1", "--human-candidate",
                                     "--features", "phi"],
                                    ["--solver", "fqi", "--all-candidates", "--features", "text"]], ids=["dqn", "fqi"])
def test_sigkill_then_resume_gives_the_uninterrupted_metrics_and_heads(tmp_path, solver):
    args = ["--references", DIALOGUES, "--max-steps", "8", "--save-steps", "2", "--learning-starts", "2",
            "--batch-size", "4", "--eval-steps", "4", "--eval-dialogues", "2", *solver]
    assert_sigkill_resume_matches(lambda out, *resume: qlearn_args(out, *args, *resume), tmp_path, 8)


def test_bad_input_is_a_clear_usage_error(tmp_path):
    r = run_cli(*qlearn_args(tmp_path / "a", "--max-steps", "1"))
    assert r.returncode == 2 and "needs at least one reward source" in r.stderr and "--reward-fn" in r.stderr
    r = run_cli(*qlearn_args(tmp_path / "b", "--data", "", "--references", DIALOGUES))
    assert r.returncode == 2 and "qlearn needs dialogues" in r.stderr
    r = run_cli(*qlearn_args(tmp_path / "c", "--references", DIALOGUES, "--gamma", "1"))
    assert r.returncode == 2 and "--gamma" in r.stderr
    r = run_cli(*qlearn_args(tmp_path / "d", "--references", tmp_path / "missing.csv"))
    assert r.returncode == 2 and "missing.csv" in r.stderr


def test_cql_behaviour_logprobs_are_the_engines_for_samples_and_the_policys_for_the_human_reply():
    model, tok = load_model(ModelArgs(model="tiny-random-llama", dtype="float32"))
    dialogues = [[{"role": "user", "content": "Where is my order?"}, {"role": "assistant", "content": "Let me check."}]]
    env = CandidateWrapper(DialogueEnv(dialogues, lambda p, r: [0.0] * len(r)), Engine(model, tok, "float32"), n=3,
                           params=SamplingParams(max_tokens=6, temperature=1.0, top_k=0, top_p=1.0))
    _, info = env.reset(seed=0, options={"dialogue_index": 0})
    cfg = QLearnConfig(max_new_tokens=6, max_prompt_length=64)
    got = behavior_logprobs(env, info, cfg)
    assert got.shape == (len(info["candidates"]),)
    human = info["candidates"].index("Let me check.")
    for i, lp in enumerate(info["candidate_logprobs"]):
        if i != human:
            assert got[i].item() == pytest.approx(lp)
    want = reply_logprobs(model, tok, [info["messages"]], ["Let me check."], 64, 7)[0]
    assert info["candidate_logprobs"][human] is None
    assert got[human].item() == pytest.approx(want.item()) and got[human].item() < 0


def test_all_candidates_stores_every_scored_candidate_and_phi_norm_saves_the_moments(tmp_path, write):
    """--all-candidates: each state gives one transition per candidate (the taken one + the others, all scored by
    the reward function) instead of one; --phi-norm: the standardiser saw the training candidates and is saved."""
    fn = write("short.py", SHORT)
    got = {}
    for flag in ("--no-all-candidates", "--all-candidates"):
        out = tmp_path / flag
        r = run_cli(*qlearn_args(out, "--reward-fn", f"{fn}:short", "--max-steps", "3", "--learning-starts", "4",
                                 "--batch-size", "4", "--eval-steps", "3", "--eval-dialogues", "1", "--hidden", "8",
                                 "--candidates", "3", "--phi-norm", "--solver", "dqn", "--human-candidate", flag,
                                 "--features", "phi"))
        assert r.returncode == 0, r.stderr
        metrics = [m for m in read_metrics(out) if "train/turns" in m]
        got[flag] = (sum(m["train/turns"] for m in metrics), metrics[-1]["train/transitions"])
        heads, _ = load_qheads(out)
        assert float(heads.phi_count) >= 4  # at least the first state's candidates were observed
    turns, transitions = got["--no-all-candidates"]
    assert transitions == turns
    turns, transitions = got["--all-candidates"]  # 3 samples + the human reply, fewer where two are equal
    assert 2 * turns <= transitions <= 4 * turns


def test_fqi_learns_the_short_reply_reward_with_linear_heads_and_no_human_candidate(tmp_path, write):
    """--solver fqi: one ridge fit of the TD targets over the whole buffer per episode (γ = 0: the reward); on the
    reward −len/50 the held-out Q-argmax pick beats a random candidate; the heads are linear (hidden 0 in
    qlearn.json), the metrics carry the CV's λ, and --no-human-candidate keeps the data's reply out of the sets.
    tiny-random-gpt2: its absolute position embeddings make length linear in φ (the tiny Llama's rotary ones do not)."""
    fn = write("short.py", SHORT)
    out = tmp_path / "q"
    r = run_cli(*qlearn_args(out, "--model", "tiny-random-gpt2", "--reward-fn", f"{fn}:short", "--max-steps", "20",
                             "--learning-starts", "8", "--gamma", "0", "--eval-steps", "20", "--max-new-tokens", "16",
                             "--solver", "fqi", "--features", "phi",
                             "--all-candidates", "--no-human-candidate", "--candidates", "4"))
    assert r.returncode == 0, r.stderr
    assert "4 candidates per state" in r.stdout and "solver fqi" in r.stdout
    metrics = read_metrics(out)
    fits = [m for m in metrics if "fqi/lambda" in m]
    assert fits and all(m["fqi/lambda"] in (1.0, 10.0, 100.0, 1000.0, 10000.0) for m in fits)
    assert max(m["train/transitions"] for m in metrics if "train/turns" in m) <= 4 * sum(
        m["train/turns"] for m in metrics if "train/turns" in m)  # no fifth (human) candidate
    end = json.loads((out / "chatrlhf.json").read_text())["eval_end"]
    assert end["eval/q"] > end["eval/random"] and end["eval/capture"] > 0.2
    assert json.loads((out / "qlearn.json").read_text())["hidden"] == 0
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["solver"] == "fqi" and saved["human_candidate"] is False


def test_fqi_on_text_features_learns_the_short_reply_reward_and_reranks_without_a_trunk(tmp_path, write):
    """--features text: the heads read the 9 text features (length among them), so on the reward −len/50 the fqi
    heads pick the shorter replies of held-out states, qlearn.json records the feature set, and `--rerank q:DIR`
    loads no trunk and scores a candidate set with the same features. --features both with dqn needs --phi-norm."""
    fn = write("short.py", SHORT)
    out = tmp_path / "q"
    r = run_cli(*qlearn_args(out, "--reward-fn", f"{fn}:short", "--max-steps", "6", "--learning-starts", "4",
                             "--gamma", "0", "--eval-steps", "6", "--candidates", "3", "--features", "text"))
    assert r.returncode == 0, r.stderr
    assert "features text (9 columns)" in r.stdout
    meta = json.loads((out / "qlearn.json").read_text())
    assert meta["features"] == "text" and meta["dims"] == 9 and meta["hidden"] == 0
    end = json.loads((out / "chatrlhf.json").read_text())["eval_end"]
    assert end["eval/q"] > end["eval/random"] and end["eval/capture"] > 0.3  # (the tiny model's replies: few letters)
    reranker = load_reranker(f"q:{out}", device="cpu")
    assert reranker.trunk is None and "text features" in reranker.describe
    history = [{"role": "user", "content": "where is my order?"}]
    index, _ = reranker.pick(history, ["it is on its way to you now and will arrive soon", "on its way", "it is"])
    assert index == 2
    r = run_cli(*qlearn_args(tmp_path / "b", "--references", DIALOGUES, "--solver", "dqn", "--features", "both"))
    assert r.returncode == 2 and "--features both" in r.stderr and "--phi-norm" in r.stderr


def test_fqi_refuses_flags_it_would_ignore(tmp_path):
    for flag in (["--cql-alpha", "0.1"], ["--phi-norm"], ["--no-all-candidates"]):
        r = run_cli(*qlearn_args(tmp_path / flag[0], "--references", DIALOGUES, "--solver", "fqi", *flag))
        assert r.returncode == 2 and "--solver fqi" in r.stderr and flag[0] in r.stderr
    r = run_cli(*qlearn_args(tmp_path / "h", "--references", DIALOGUES, "--no-human-candidate", "--candidates", "0"))
    assert r.returncode == 2 and "--no-human-candidate" in r.stderr
