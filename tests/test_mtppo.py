"""Multi-turn PPO (`chatrlhf ppo --env dialogue`): the turn-level bootstrap and GAE worked by hand, one row per
assistant turn that trains the policy's tokens only (the user's turns are context), truncation, the CLI end to end,
refused flags, SIGKILL + --resume."""

import json

import pytest
import torch

from chatrlhf import losses
from chatrlhf.episodes import episode_sums, make_envs, play, to_rollout
from chatrlhf.engine import SamplingParams
from chatrlhf.logger import read_metrics
from chatrlhf.rollout import encode_prompts, generator
from chatrlhf.trainers.run import checkpoints
from conftest import EXAMPLES, kill_at_first_checkpoint, run_cli

REWARD_FN = "def polite(prompts, responses):\n    return [float(sum(w in r.lower() for w in ('thank', 'please', 'sorry', 'a'))) for r in responses]\n"

DIALOGUES = [
    [{"role": "user", "content": "ZEBRA one"}, {"role": "assistant", "content": "first reply"},
     {"role": "user", "content": "ZEBRA two"}, {"role": "assistant", "content": "second reply"},
     {"role": "user", "content": "ZEBRA three"}, {"role": "assistant", "content": "third reply"}],
    [{"role": "user", "content": "OKAPI alone"}, {"role": "assistant", "content": "only reply"}],
]


def test_turn_bootstrap_and_gae_worked_by_hand():
    # rows: episode A turn 0, episode A turn 1 (terminal), episode B turn 0 (cut at --max-turns, V(cut state) = 10)
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    values = values * mask
    boot = losses.turn_bootstrap(values[:, 0], torch.tensor([1, -1, -1]), torch.tensor([0.0, 0.0, 10.0]), 0.5)
    assert boot.tolist() == [1.5, 0.0, 5.0]                     # γ·V(start of A's turn 1), 0 at the end, γ·V(cut)
    rewards = losses.token_rewards(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, 2), mask, beta=0.0)
    rewards = losses.at_last_token(rewards, mask, boot)
    assert rewards.tolist() == [[0.0, 2.5], [2.0, 0.0], [0.0, 8.0]]
    adv, ret = losses.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # A: δ1 = 2.5 − 2 = 0.5, A0 = (0 + 2 − 1) + 0.5 = 1.5; turn 1: 2 − 3 = −1; B: 8 − 6 = 2, (0 + 6 − 5) + 2 = 3
    assert adv.tolist() == [[1.5, 0.5], [-1.0, 0.0], [3.0, 2.0]]
    # the return at the start of A's first turn is r_0 + γ·V(s_1) = 1 + 0.5·3
    assert ret.tolist() == [[2.5, 2.5], [2.0, 0.0], [8.0, 8.0]]


def test_at_last_token_leaves_its_input_alone():
    x = torch.zeros(2, 3)
    out = losses.at_last_token(x, torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.tensor([2.0, 3.0]))
    assert out.tolist() == [[0.0, 2.0, 0.0], [0.0, 0.0, 3.0]] and x.abs().sum() == 0


def test_episode_sums_discount_by_turn():
    from chatrlhf.episodes import Episodes

    links = Episodes(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, -1, -1]),
                     torch.zeros(4, dtype=torch.bool), [])
    scores = torch.tensor([1.0, 2.0, 4.0, 8.0])
    assert episode_sums(scores, links).tolist() == [7.0, 8.0]
    assert episode_sums(scores, links, 0.5).tolist() == [1.0 + 1.0 + 1.0, 8.0]


@pytest.fixture(scope="module")
def tiny():
    from chatrlhf.config import ModelArgs
    from chatrlhf.models import load_model

    return load_model(ModelArgs(model="tiny-random-llama", dtype="float32"))


def played(tiny, max_turns=None):
    policy, tok = tiny
    envs = make_envs(DIALOGUES, 3, max_turns)
    turns = play(policy, tok, envs, [(0, 0), (1, 1), (0, 2)], SamplingParams(6, 1.0), 256, "float32", generator(0))
    return turns, *to_rollout(turns, tok, 256, "cpu")


def test_each_assistant_turn_is_a_row_whose_only_trained_tokens_are_the_policys(tiny):
    _, tok = tiny
    turns, r, links, _ = played(tiny)
    assert links.episode.tolist() == [0, 0, 0, 1, 2, 2, 2] and links.turn.tolist() == [0, 1, 2, 0, 0, 1, 2]
    assert links.next_row.tolist() == [1, 2, -1, -1, 5, 6, -1] and not links.truncated.any()
    by_row = sorted(turns, key=lambda t: (t.episode, t.turn))
    # the loss covers exactly the sampled tokens, each once
    assert int(r.response_mask.sum()) == sum(len(t.response) for t in turns)
    for i, t in enumerate(by_row):
        assert r.response_ids[i][r.response_mask[i].bool()].tolist() == t.response
        reply = tok.decode(t.response, skip_special_tokens=True)
        assert "ZEBRA" not in reply and "OKAPI" not in reply     # no user turn is ever a trained token
        assert r.prompts[i][-1]["role"] == "user"                # the row answers the user's latest turn
    # the queries are the conversations so far, as the sampler saw them: user turns and earlier replies as context
    q, qm = encode_prompts(tok, r.prompts, 256, "cpu")
    assert torch.equal(q, r.query_ids) and torch.equal(qm, r.query_mask)
    assert [m["content"] for m in r.prompts[2] if m["role"] == "user"] == ["ZEBRA one", "ZEBRA two", "ZEBRA three"]
    assert [m["content"] for m in r.prompts[2] if m["role"] == "assistant"] == [r.texts[0], r.texts[1]]
    assert "ZEBRA two" in tok.decode(r.query_ids[1][r.query_mask[1].bool()])


def test_max_turns_cuts_episodes_and_keeps_the_state_to_bootstrap(tiny):
    _, r, links, _ = played(tiny, max_turns=1)
    assert len(r) == 3 and links.next_row.tolist() == [-1, -1, -1]
    assert links.truncated.tolist() == [True, False, True]       # dialogue 1 ends after its one turn: terminal
    assert len(links.cut_states) == 2
    for state in links.cut_states:
        assert [m["content"] for m in state if m["role"] == "user"] == ["ZEBRA one", "ZEBRA two"]
        assert state[-1] == {"role": "user", "content": "ZEBRA two"}


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def fn(write):
    return write("rew.py", REWARD_FN)


def mt_args(out, fn, *extra):
    return ["ppo", "--model", "tiny-random-llama", "--env", "dialogue", "--data", EXAMPLES / "dialogue_history.csv",
            "--reward-fn", f"{fn}:polite", "--output-dir", out, "--quiet", "--no-tensorboard", "--batch-size", "2",
            "--samples-per-prompt", "2", "--minibatch-size", "4", "--ppo-epochs", "2", "--max-new-tokens", "8",
            "--lr", "1e-3", "--critic-lr", "1e-3", "--dtype", "float32", *extra]


def test_dialogue_ppo_runs_end_to_end_and_logs_returns(tmp_path, fn):
    out = tmp_path / "mt"
    r = run_cli(*mt_args(out, fn, "--max-steps", "2", "--eval-steps", "2", "--critic", "shared", "--max-turns", "2",
                         "--references", EXAMPLES / "dialogue_history.csv", "--turn-gamma", "0.5"))
    assert r.returncode == 0, r.stderr
    assert "held-out dialogues" in r.stdout and "turn γ 0.5, max turns 2" in r.stdout
    assert "held-out return per episode" in r.stdout
    steps = [m for m in read_metrics(out) if "loss/policy" in m]
    assert len(steps) == 2
    for m in steps:
        assert m["train/episodes"] == 4 and 1 <= m["train/turns"] <= 2
        for k in ("train/return", "train/discounted_return", "reward/fn_mean", "reward/similarity_mean", "loss/value",
                  "objective/kl", "ppo/explained_variance"):
            assert isinstance(m[k], float) and m[k] == m[k], k
    evals = [m for m in read_metrics(out) if "eval/return" in m]
    assert [m["step"] for m in evals] == [0, 2]
    assert evals[0]["eval/return"] == pytest.approx(evals[0]["eval/reward"] * evals[0]["eval/turns"])
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {"prompt", "reply", "reward", "reward_fn"} <= set(samples[0])
    summary = json.loads((out / "chatrlhf.json").read_text())
    assert summary["config"]["env"] == "dialogue" and (out / "model.safetensors").is_file()


def test_dialogue_flags_are_refused_where_they_would_do_nothing(tmp_path, fn):
    prompts = ["ppo", "--model", "tiny-random-llama", "--reward-fn", f"{fn}:polite", "--output-dir", tmp_path / "p",
               "--quiet"]
    r = run_cli(*prompts, "--turn-gamma", "0.5")
    assert r.returncode == 2 and "--turn-gamma only works with --env dialogue" in r.stderr
    r = run_cli(*prompts, "--max-turns", "2", "--turn-gamma", "0")
    assert r.returncode == 2 and "--turn-gamma and --max-turns only work with --env dialogue" in r.stderr
    r = run_cli(*prompts, "--env", "dialogue")   # the default --data is a .txt of prompts
    assert r.returncode == 2 and "--env dialogue plays whole dialogues" in r.stderr
    r = run_cli(*mt_args(tmp_path / "d", fn, "--turn-gamma", "1.5"))
    assert r.returncode == 2 and "--turn-gamma 1.5: must be in [0, 1]" in r.stderr
    r = run_cli(*mt_args(tmp_path / "d", fn, "--max-turns", "0"))
    assert r.returncode == 2 and "--max-turns 0: must be at least 1" in r.stderr
    assert "Traceback" not in r.stderr


def by_step(out):
    return {m["step"]: (m["train/return"], m["loss/policy"], m["loss/value"]) for m in read_metrics(out)
            if "loss/policy" in m}


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_metrics(tmp_path, fn):
    args = ["--max-steps", "4", "--save-steps", "1", "--eval-steps", "2", "--seed", "3", "--max-turns", "2",
            "--critic", "policy"]
    ref = tmp_path / "ref"
    r = run_cli(*mt_args(ref, fn, *args))
    assert r.returncode == 0, r.stderr
    want = by_step(ref)
    assert sorted(want) == [1, 2, 3, 4]
    out = tmp_path / "killed"
    killed_at = kill_at_first_checkpoint(mt_args(out, fn, *args), out)
    assert killed_at < 4
    r = run_cli(*mt_args(out, fn, *args, "--resume"))
    assert r.returncode == 0, r.stderr
    assert f"(step {killed_at})" in r.stdout
    got = by_step(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    for n, path in checkpoints(out):
        assert json.loads((path / "trainer_state.json").read_text())["step"] == n


@pytest.mark.slow
def test_a_learnable_turn_reward_raises_the_episode_return(tmp_path, write):
    fn = write("letters.py", "def letters(prompts, responses):\n    return [r.lower().count('e') / 4 for r in responses]\n")
    out = tmp_path / "learn"
    r = run_cli(*mt_args(out, fn, "--reward-fn", f"{fn}:letters", "--no-reward-norm", "--samples-per-prompt", "4",
                         "--batch-size", "4", "--minibatch-size", "8", "--ppo-epochs", "4", "--max-steps", "6",
                         "--max-turns", "2", "--eval-steps", "100", "--lr", "1e-2", "--critic", "shared",
                         "--missing-eos-penalty", "0", "--kl-coef", "0.01"))
    assert r.returncode == 0, r.stderr
    returns = [m["train/return"] for m in read_metrics(out) if "train/return" in m]
    assert len(returns) == 6 and (returns[-1] + returns[-2]) / 2 > 2 * returns[0], returns
    evals = [m for m in read_metrics(out) if "eval/fn_mean" in m]
    assert evals[-1]["eval/fn_mean"] > evals[0]["eval/fn_mean"] + 0.3, evals
    assert evals[-1]["eval/return"] > evals[0]["eval/return"]
