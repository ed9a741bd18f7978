"""Integration: PPO on the embedded SmolLM2-135M with a programmatic reward (VADER sentiment, a
lexical model, no weights) raises the mean reward on held-out prompts while KL stays bounded."""

import pytest

from chatrlhf.logger import read_metrics
from conftest import EXAMPLES, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SENTIMENT = """from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
_S = SentimentIntensityAnalyzer()
def positive(prompts, responses):
    return [_S.polarity_scores(r)["compound"] for r in responses]
"""
KL_BOUND = 6.0


def test_twenty_ppo_steps_raise_heldout_reward_within_kl_bound(tmp_path, write):
    fn = write("sentiment.py", SENTIMENT)
    out = tmp_path / "ppo"
    r = run_cli("ppo", "--model", "smollm2-135m", "--data", EXAMPLES / "prompts.txt", "--reward-fn", f"{fn}:positive",
                "--output-dir", out, "--quiet", "--no-tensorboard", "--max-steps", "20", "--batch-size", "4",
                "--samples-per-prompt", "2", "--minibatch-size", "8", "--max-new-tokens", "16", "--lr", "1.5e-5",
                "--ppo-epochs", "2", "--kl-coef", "0.1",
                "--critic", "shared", "--eval-steps", "20", "--save-steps", "100", "--kl-bound", KL_BOUND, "--eval-fraction", "0.1",
                "--missing-eos-penalty", "0", timeout=1500)
    assert r.returncode == 0, r.stderr
    evals = {m["step"]: m for m in read_metrics(out) if "eval/fn_mean" in m}
    assert sorted(evals) == [0, 20]
    before, after = evals[0]["eval/fn_mean"], evals[20]["eval/fn_mean"]
    assert after > before + 0.05, (before, after)
    assert 0 <= evals[20]["eval/kl"] < KL_BOUND
    train = [m for m in read_metrics(out) if "objective/kl" in m and "loss/policy" in m]
    assert all(m["objective/kl"] < KL_BOUND for m in train)
    assert sum(m["reward/fn_mean"] for m in train[-5:]) > sum(m["reward/fn_mean"] for m in train[:5])
