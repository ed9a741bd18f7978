"""DialogueEnv (QLEARN.md §2.1): the Gymnasium checks, an episode on the seed CSV with a similarity reward,
determinism, max_turns, and errors on bad dialogues."""

import warnings

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

from chatrlhf.data import load_records
from chatrlhf.env import CandidateWrapper, DialogueEnv, dedupe, merge_prefixes, mixed_reward, turn_references, \
    user_turns_key
from chatrlhf.errors import UsageError
from chatrlhf.rewards import RewardMix, Schedule, SimilarityReward

from conftest import EXAMPLES

SEED_CSV = EXAMPLES / "dialogue_history.csv"
DIALOGUES = merge_prefixes(load_records(SEED_CSV).records)
SIMILARITY = SimilarityReward(turn_references(DIALOGUES), key=user_turns_key)  # ROUGE-L to the human reply


def make(**kwargs):
    return DialogueEnv(DIALOGUES, SIMILARITY, **kwargs)


def test_seed_csv_rows_merge_into_whole_dialogues():
    # the seed CSV has one row per turn, each repeating the turns before it: 63 rows, 36 dialogues
    assert len(load_records(SEED_CSV).records) == 63 and len(DIALOGUES) == 36
    assert [m["role"] for m in DIALOGUES[0]] == ["user", "assistant"] * 3
    keys = [tuple((m["role"], m["content"]) for m in d) for d in DIALOGUES]
    assert not any(a != b and b[:len(a)] == a for a in keys for b in keys)  # no dialogue is a prefix of another


def test_check_env_passes():
    env = gym.make("chatrlhf/Dialogue-v0", dialogues=DIALOGUES, reward=SIMILARITY, max_turns=8, render_mode="ansi")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker reports problems as warnings: none allowed
        check_env(env.unwrapped)
    env.close()


def test_an_episode_runs_to_terminated_with_similarity_rewards():
    env = make(max_turns=8)
    obs, info = env.reset(options={"dialogue_index": 0})
    assert obs == "User: My order hasn't arrived yet. It was supposed to come on Monday." and info["turn"] == 0
    assert info["human_reply"].startswith("I'm sorry your order is late")
    rewards, steps = [], 0
    terminated = truncated = False
    while not (terminated or truncated):
        reply = info["human_reply"] if steps != 1 else "Please hold on while I check."
        obs, reward, terminated, truncated, info = env.step(reply)
        rewards.append(reward)
        steps += 1
        assert obs in env.observation_space
    assert terminated and not truncated and steps == 3 and info["turn"] == 3 and info["human_reply"] is None
    # the human reply itself scores 1; a different reply less — and the user's next turn is replayed regardless
    assert rewards[0] == pytest.approx(1.0) and rewards[2] == pytest.approx(1.0) and 0.0 <= rewards[1] < 1.0
    assert info["messages"][3] == {"role": "assistant", "content": "Please hold on while I check."}
    assert info["messages"][4]["content"] == "Great, thanks." and len(info["messages"]) == 6
    assert obs.splitlines()[3] == "Assistant: Please hold on while I check."
    with pytest.raises(RuntimeError, match="reset"):
        env.step("again")


def test_reset_is_deterministic_under_a_seed():
    a, b = make(), make()
    first = [a.reset(seed=7)[1]["dialogue"]] + [a.reset()[1]["dialogue"] for _ in range(5)]
    second = [b.reset(seed=7)[1]["dialogue"]] + [b.reset()[1]["dialogue"] for _ in range(5)]
    assert first == second and len(set(first)) > 1
    assert a.reset(seed=7) == b.reset(seed=7)


def test_max_turns_truncates_and_truncation_is_not_termination():
    env = make(max_turns=2)
    _, info = env.reset(options={"dialogue_index": 0})  # three turns in the data
    _, _, terminated, truncated, info = env.step(info["human_reply"])
    assert (terminated, truncated) == (False, False)
    _, _, terminated, truncated, info = env.step(info["human_reply"])
    assert (terminated, truncated) == (False, True) and info["human_reply"] is not None  # h′ still has a next turn


def test_any_reply_is_accepted_and_every_observation_is_in_the_space():
    env = make(max_history_chars=64)
    env.action_space.seed(0)
    env.reset(seed=1)
    for reply in ["ﬁne — ✓ 😀 \x00", env.action_space.sample(), "", env.action_space.sample()]:
        obs, reward, terminated, truncated, _ = env.step(reply)
        assert obs in env.observation_space and len(obs) <= 64 and isinstance(reward, float)
        if terminated or truncated:
            env.reset()
    env.reset(options={"dialogue_index": 0})
    obs = env.step("ﬁne 😀")[0]
    assert "Assistant: fine \ufffd" in obs  # NFKC (ﬁ → fi), then unknown characters → U+FFFD


def test_reward_mix_plugs_in():
    mix = RewardMix({"similarity": SIMILARITY}, {"similarity": Schedule("constant", 2.0, 2.0)}, normalise=False,
                    missing_eos_penalty=1.0)
    env = DialogueEnv(DIALOGUES, mixed_reward(mix))
    _, info = env.reset(options={"dialogue_index": 0})
    assert env.step(info["human_reply"])[1] == pytest.approx(2.0)


def test_a_source_without_an_opinion_gives_zero():
    env = DialogueEnv(DIALOGUES, lambda prompts, responses: [None])
    env.reset(seed=0)
    _, reward, *_, info = env.step("hi")
    assert reward == 0.0 and info["reward_raw"] is None


def test_bad_dialogues_are_named():
    with pytest.raises(UsageError, match="no dialogues given"):
        DialogueEnv([], SIMILARITY)
    no_reply = [{"role": "user", "content": "Hello?"}]
    with pytest.raises(UsageError, match=r"dialogue 1 has no assistant turn.*give conversations"):
        DialogueEnv([DIALOGUES[0], no_reply], SIMILARITY)
    with pytest.raises(UsageError, match="dialogue 0 starts with an assistant turn"):
        DialogueEnv([[{"role": "assistant", "content": "Hi"}]], SIMILARITY)
    with pytest.raises(UsageError, match="max_turns"):
        DialogueEnv(DIALOGUES, SIMILARITY, max_turns=0)
    with pytest.raises(UsageError, match="dialogue_index 99"):
        make().reset(options={"dialogue_index": 99})


# ----------------------------------------------------------------------------- candidate replies (tiny random model)


@pytest.fixture(scope="module")
def engine():
    from chatrlhf.config import ModelArgs
    from chatrlhf.engine import Engine
    from chatrlhf.models import load_model

    model, tok = load_model(ModelArgs(model="tiny-random-llama", dtype="float32"))
    return Engine(model.eval(), tok, "float32")


def test_candidates_are_policy_samples_plus_the_human_reply(engine):
    from chatrlhf.engine import SamplingParams

    env = CandidateWrapper(make(max_turns=8), engine, n=4, params=SamplingParams(max_tokens=6))
    _, info = env.reset(seed=0, options={"dialogue_index": 0})
    cands, logps = info["candidates"], info["candidate_logprobs"]
    assert 2 <= len(cands) <= 5 and len(logps) == len(cands)
    assert cands[-1] == info["human_reply"] and logps[-1] is None  # a random model never writes the human reply
    assert all(isinstance(lp, float) and lp <= 0 for lp in logps[:-1])
    assert len({" ".join(c.split()) for c in cands}) == len(cands)  # de-duplicated
    _, again = env.reset(seed=0, options={"dialogue_index": 0})
    assert again["candidates"] == cands  # the seed fixes the samples too
    terminated = False
    while not terminated:
        _, _, terminated, _, info = env.step(info["candidates"][0])
        assert terminated or info["candidates"][-1] == info["human_reply"]
    assert info["candidates"] == [] and info["candidate_logprobs"] == []


def test_dedupe_keeps_the_first_of_equal_texts():
    assert dedupe(["a b", "c", " a  b ", "c", "d"]) == [0, 1, 4]
