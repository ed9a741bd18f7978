"""`chatrlhf eval`: invariants on identical models, a real difference on a trained one, the HTML report."""

import json

import pytest

from conftest import EXAMPLES, run_cli, tiny_reward_model


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    return tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm")


def eval_args(out, model, baseline, rm, *extra):
    return ["eval", "--model", model, "--baseline", baseline, "--reward-model", rm, "--data",
            EXAMPLES / "dialogue_history.csv", "--max-prompts", "12", "--max-new-tokens", "10", "--output-dir", out,
            "--dtype", "float32", *extra]


def test_identical_models_tie_with_zero_kl(tmp_path, tiny_rm):
    out = tmp_path / "same"
    r = run_cli(*eval_args(out, "tiny-random-llama", "tiny-random-llama", tiny_rm, "--samples-per-prompt", "3"))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "eval.json").read_text())
    assert rep["prompts"] == 12 and rep["samples_per_prompt"] == 3
    # same seed, same replies: every prompt's 3 × 3 comparisons are symmetric, so each prompt scores exactly ½
    assert rep["win_rate"]["mean"] == 0.5 and rep["win_rate"]["ci95"] == [0.5, 0.5]
    assert abs(rep["kl_to_baseline"]["mean"]) < 1e-5
    assert rep["metrics"]["model"] == rep["metrics"]["baseline"]
    for k in ("rm_score", "rouge_l", "distinct_1", "distinct_2", "length_tokens", "eos_rate"):
        assert k in rep["metrics"]["model"]
    page = (out / "report.html").read_text()
    assert "Win rate" in page and "<img src='data:image/png;base64," in page


@pytest.mark.slow
def test_trained_policy_differs_and_report_has_run_curves(tmp_path, tiny_rm, write):
    fn = write("rew.py", "def short(prompts, responses):\n    return [-len(r) / 10 for r in responses]\n")
    run = tmp_path / "ppo"
    r = run_cli("ppo", "--model", "tiny-random-llama", "--data", EXAMPLES / "dialogue_history.csv", "--reward-fn",
                f"{fn}:short", "--output-dir", run, "--quiet", "--no-tensorboard", "--max-steps", "3", "--lr", "3e-3",
                "--critic", "shared", "--max-new-tokens", "10", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "ev"
    r = run_cli(*eval_args(out, run, "tiny-random-llama", tiny_rm, "--run", run))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "eval.json").read_text())
    assert rep["kl_to_baseline"]["mean"] > 1e-3
    lo, hi = rep["win_rate"]["ci95"]
    assert 0 <= lo <= rep["win_rate"]["mean"] <= hi <= 1
    page = (out / "report.html").read_text()
    assert page.count("<img") == 2 and "report in" in r.stdout


def test_script_in_prompt_renders_inert(tmp_path, tiny_rm, write):
    data = write("xss.jsonl", '{"messages": [{"role": "user", "content": "<script>alert(1)</script>"}, '
                              '{"role": "assistant", "content": "ok"}]}\n')
    out = tmp_path / "x"
    r = run_cli("eval", "--model", "tiny-random-llama", "--data", data, "--output-dir", out, "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    page = (out / "report.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;" in page
