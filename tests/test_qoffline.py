"""`chatrlhf qlearn-offline` (trainers/qoffline.py): logged feedback → transitions and rewards, the IQL loss by hand,
the V head saved and loaded, V learning the expectile, a CLI run, CQL over candidate sets, SIGKILL → resume, bad
input."""
import json

import pytest
import torch
from safetensors.torch import load_file

from chatrlhf.data import Correction, Rating
from chatrlhf.logger import read_metrics
from chatrlhf.losses import iql_loss
from chatrlhf.qnet import QHeads, iql_update, load_qheads, save_qheads
from chatrlhf.trainers.qoffline import Logged, dialogue_transitions, feedback_transitions, held_out_sets, rating_reward
from conftest import EXAMPLES, assert_sigkill_resume_matches, run_cli

RATINGS, CORRECTIONS, DIALOGUES = EXAMPLES / "ratings.jsonl", EXAMPLES / "corrections.jsonl", EXAMPLES / "dialogue_history.csv"
U = [{"role": "user", "content": "hi"}]


def offline_args(out, *extra):
    return ["qlearn-offline", "--model", "tiny-random-llama", "--output-dir", out, "--quiet", "--no-tensorboard",
            "--max-new-tokens", "8", "--hidden", "16", "--batch-size", "16", *extra]


def test_ratings_and_corrections_become_rewards_by_hand():
    assert [rating_reward(s, "stars") for s in (1, 2, 3, 4, 5)] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert rating_reward(1.0, "thumbs") == 1.0 and rating_reward(-1.0, "thumbs") == -1.0
    got = feedback_transitions([Rating(U, "a", 4), Rating(U, "b", -1.0, scale="thumbs"), Correction(U, "bad", "good")])
    assert [(t.reply, t.reward, t.next_history, t.source) for t in got] == [
        ("a", 0.5, None, "rating"), ("b", -1.0, None, "rating"), ("good", 1.0, None, "correction"),
        ("bad", -1.0, None, "correction")]


def test_a_dialogue_gives_one_transition_per_assistant_turn_terminated_after_the_last():
    d = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
         {"role": "assistant", "content": "a2"}]
    first, last = dialogue_transitions([d])
    assert (first.history, first.reply, first.next_history) == (d[:1], "a1", d[:3])
    assert (last.history, last.reply, last.next_history, last.reward) == (d[:3], "a2", None, None)


def test_held_out_sets_average_repeated_ratings_and_keep_states_with_two_replies():
    data = [Logged(U, "a", 1.0, None), Logged(U, " a ", 0.0, None), Logged(U, "b", -1.0, None),
            Logged([{"role": "user", "content": "alone"}], "x", 1.0, None)]
    assert held_out_sets(data) == [(U, ["a", "b"], [0.5, -1.0])]


def test_the_iql_loss_by_hand():
    q = torch.tensor([[0.5, 0.0], [0.3, 0.2]])       # (H = 2, B = 2)
    q_hat = torch.tensor([[0.4, 0.1], [0.6, -0.1]])  # min over heads: (0.4, −0.1)
    v, next_v = torch.tensor([0.2, 0.1]), torch.tensor([0.5, 9.0])
    loss, m = iql_loss(q, q_hat, v, next_v, torch.tensor([1.0, -0.5]), torch.tensor([False, True]), gamma=0.8, tau=0.7)
    # y = (1 + 0.8·0.5, −0.5) = (1.4, −0.5); errors head 1: (−0.9, 0.5) → Huber ½x²: (0.405, 0.125), mean 0.265;
    # head 2: (−1.1, 0.7) → (1.1 − ½, ½·0.49) = (0.6, 0.245), mean 0.4225; L_Q = 0.6875
    # u = min Q̂ − V = (0.2, −0.2); expectile weights (0.7, 0.3): (0.028, 0.012), mean 0.02
    assert m["loss/td"] == pytest.approx(0.6875) and m["loss/expectile"] == pytest.approx(0.02)
    assert float(loss) == pytest.approx(0.7075) and m["q/target_mean"] == pytest.approx(0.45)


def test_v_learns_the_upper_expectile_of_the_logged_replies_q():
    """One state, two logged terminal replies with r = 0 and 1: Q → r, and V → the 0.7-expectile of {0, 1}, which
    solves 0.7·(1 − v) = 0.3·v, v = 0.7 (not the mean 0.5, not the max 1)."""
    torch.manual_seed(0)
    phi_h = torch.randn(1, 8).expand(2, 8)
    batch = {"phi": torch.randn(2, 8), "phi_h": phi_h, "next_phi_h": torch.zeros(2, 8),
             "reward": torch.tensor([0.0, 1.0]), "terminated": torch.tensor([True, True])}
    heads = QHeads(8, 2, 32, value=True)
    opt = torch.optim.AdamW(heads.trainable_parameters(), lr=1e-2)
    for _ in range(600):
        iql_update(heads, opt, batch, gamma=0.9, expectile=0.7)
        heads.soft_update(0.1)
    with torch.no_grad():
        assert heads(batch["phi"]).flatten().tolist() == pytest.approx([0.0, 1.0] * 2, abs=0.02)
        assert float(heads.v(phi_h[:1])) == pytest.approx(0.7, abs=0.02)


def test_the_v_head_is_saved_and_loaded_and_folders_without_one_still_load(tmp_path):
    heads = QHeads(8, 2, 4, value=True)
    save_qheads(heads, tmp_path / "v", "tiny-random-llama", "last")
    back, meta = load_qheads(tmp_path / "v")
    assert meta["value"] is True and back.value is not None
    phi = torch.randn(3, 8)
    assert torch.equal(back.v(phi), heads.v(phi)) and torch.equal(back(phi), heads(phi))
    save_qheads(QHeads(8, 2, 4), tmp_path / "q", "tiny-random-llama", "last")
    old, meta = load_qheads(tmp_path / "q")
    assert "value" not in meta and old.value is None
    with pytest.raises(ValueError, match="no V head"):
        old.v(phi)


def test_a_short_run_on_ratings_and_corrections_saves_q_and_v_heads_and_logs_the_eval_statistics(tmp_path):
    out = tmp_path / "o"
    r = run_cli(*offline_args(out, "--data", f"{RATINGS},{CORRECTIONS}", "--max-steps", "6", "--eval-steps", "3"))
    assert r.returncode == 0, r.stderr
    assert "ranked by Q: pairwise accuracy" in r.stdout and "saved to" in r.stdout
    heads, meta = load_qheads(out)
    assert meta == {"q_model": "tiny-random-llama", "pooling": "mean", "heads": 2, "hidden": 16, "dims": 64,
                    "value": True}
    assert heads(torch.randn(2, 64)).shape == (2, 2) and heads.v(torch.randn(2, 64)).shape == (2,)
    assert any(k.startswith("value.") for k in load_file(out / "qheads.safetensors"))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "eval/pair_accuracy" in m] == [0, 3, 6]
    last = metrics[-1]
    for key in ("loss/td", "loss/expectile", "q/value_mean", "eval/capture_lo", "eval/capture_hi", "eval/kendall_tau",
                "eval/length_q", "eval/length_random", "eval/spearman_q_length", "eval/value_mean"):
        assert key in last, key
    assert last["eval/capture_lo"] <= last["eval/capture"] <= last["eval/capture_hi"]
    summary = json.loads((out / "chatrlhf.json").read_text())
    assert summary["command"] == "qlearn-offline" and summary["steps"] == 6 and summary["transitions"] > 200
    assert summary["eval_end"]["eval/pair_accuracy"] == last["eval/pair_accuracy"]


def test_cql_over_candidate_sets_on_conversations_scored_by_a_reward_fn(tmp_path, write):
    fn = write("short.py", "def short(prompts, responses):\n    return [-len(r) / 50 for r in responses]\n")
    out = tmp_path / "c"
    r = run_cli(*offline_args(out, "--data", f"{DIALOGUES},{CORRECTIONS}", "--reward-fn", f"{fn}:short",
                              "--candidates", "2", "--cql-alpha", "0.1", "--max-steps", "3", "--eval-fraction", "0"))
    assert r.returncode == 0, r.stderr
    assert "conversation" in r.stdout and "correction" in r.stdout
    last = read_metrics(out)[-1]
    assert "loss/cql" in last and last["loss/total"] > last["loss/td"]


def write_length_ratings(path, n_prompts=40):
    """Stars that reward short replies: per prompt a 1-word reply rated 5 and a 12-word one rated 1."""
    rows = []
    for i in range(n_prompts):
        prompt = f"Question number {i} about order {i * 7}?"
        rows.append({"prompt": prompt, "response": f"Yes{i % 3}.", "score": 5})
        rows.append({"prompt": prompt, "response": " ".join(["please wait while we check that for you"] * 2), "score": 1})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_q_learns_to_rank_held_out_logged_replies(tmp_path):
    data = write_length_ratings(tmp_path / "ratings.jsonl")
    out = tmp_path / "l"
    r = run_cli(*offline_args(out, "--data", data, "--max-steps", "150", "--eval-steps", "150", "--lr", "3e-3",
                              "--pooling", "mean", "--hidden", "64", "--tau", "0.05", "--eval-fraction", "0.25"))
    assert r.returncode == 0, r.stderr
    end = json.loads((out / "chatrlhf.json").read_text())["eval_end"]
    assert end["eval/states"] == 10 and end["eval/pair_accuracy"] >= 0.9 and end["eval/capture"] >= 0.8
    assert end["eval/length_q"] < end["eval/length_random"] and end["eval/spearman_q_length"] < 0


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_metrics_and_heads(tmp_path):
    args = ["--data", f"{RATINGS},{CORRECTIONS}", "--max-steps", "8", "--save-steps", "2", "--eval-steps", "4"]
    assert_sigkill_resume_matches(lambda out, *resume: offline_args(out, *args, *resume), tmp_path, 8)


def test_bad_input_is_a_clear_usage_error(tmp_path, write):
    r = run_cli(*offline_args(tmp_path / "a", "--data", EXAMPLES / "preferences.jsonl"))
    assert r.returncode == 2 and "preference pairs carry no reward" in r.stderr and "ratings.jsonl" in r.stderr
    r = run_cli(*offline_args(tmp_path / "b", "--data", RATINGS, "--candidates", "3"))
    assert r.returncode == 2 and "--cql-alpha" in r.stderr
    r = run_cli(*offline_args(tmp_path / "c", "--data", RATINGS, "--references", DIALOGUES))
    assert r.returncode == 2 and "--references" in r.stderr and "would do nothing" in r.stderr
    r = run_cli(*offline_args(tmp_path / "d", "--data", DIALOGUES))
    assert r.returncode == 2 and "needs at least one reward source" in r.stderr
    r = run_cli(*offline_args(tmp_path / "e", "--data", RATINGS, "--expectile", "1"))
    assert r.returncode == 2 and "--expectile" in r.stderr
    r = run_cli(*offline_args(tmp_path / "f", "--data", tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "missing.jsonl" in r.stderr
