"""The user simulator of DialogueEnv (QLEARN.md §2.6): its prompt (roles swapped, the goal), the stop marker,
data turns while the agent follows the data and simulated ones after, human replies and similarity only for the
data's exact history, termination at the marker and truncation at max_turns, and on a tiny random model:
check_env, determinism under a seed, reactivity to the reply."""

import json
import warnings

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

from chatrlhf.data import load_records
from chatrlhf.engine import SamplingParams
from chatrlhf.env import STOP_MARKER, USER_OPENER, DialogueEnv, UserSimulator, merge_prefixes, reference_key, \
    simulator_messages, split_stop, turn_references, user_turns_key
from chatrlhf.errors import UsageError
from chatrlhf.rewards import SimilarityReward, rouge_l

from conftest import EXAMPLES

DIALOGUES = merge_prefixes(load_records(EXAMPLES / "dialogue_history.csv").records)
U1, A1, U2, A2, U3, A3 = (m["content"] for m in DIALOGUES[0])  # "My order hasn't arrived yet…", …, "Great, thanks."
SIMILARITY = SimilarityReward(turn_references(DIALOGUES, reference_key(True)), key=reference_key(True))


class ScriptedUser:
    """A fake simulator: returns its script in order (then keeps saying "ok"), records what it was shown."""

    def __init__(self, *script: tuple[str, bool]):
        self.script, self.calls = list(script), []

    def __call__(self, messages, seed):
        self.calls.append(([dict(m) for m in messages], seed))
        return self.script.pop(0) if self.script else ("ok", False)


def make(user, reward=SIMILARITY, **kwargs):
    return DialogueEnv(DIALOGUES, reward, **{"max_turns": 4, **kwargs}, user=user)


# ----------------------------------------------------------------------------- pure pieces


def test_the_simulator_sees_the_conversation_with_roles_swapped_and_the_opening_turn_as_its_goal():
    conversation = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi, my tap leaks."},
                    {"role": "assistant", "content": "Where?"}]
    got = simulator_messages(conversation, instruction="Goal: {goal}.")
    assert got == [{"role": "system", "content": "Goal: Hi, my tap leaks.."},
                   {"role": "user", "content": USER_OPENER},
                   {"role": "assistant", "content": "Hi, my tap leaks."},
                   {"role": "user", "content": "Where?"}]  # the agent's system prompt is not the user's business


def test_the_stop_marker_ends_the_conversation_and_the_text_before_it_stays():
    assert STOP_MARKER == "[done]"
    assert split_stop(" Thanks, that works! [done] and more") == ("Thanks, that works!", True)
    assert split_stop("[DONE]") == ("", True)
    assert split_stop(" Where is it? ") == ("Where is it?", False)


def test_reference_key_is_the_whole_history_with_a_simulator():
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": "Bye"}]
    assert reference_key(False)(history) == user_turns_key(history) == "user:hi\nuser:bye"
    assert reference_key(True)(history) == "user:hi\nassistant:hello\nuser:bye"


# ----------------------------------------------------------------------------- the environment with a fake user


def test_a_simulator_needs_max_turns():
    with pytest.raises(UsageError, match=r"needs max_turns.*--max-turns"):
        DialogueEnv(DIALOGUES, SIMILARITY, user=ScriptedUser())


def test_data_turns_while_the_agent_gives_the_data_replies_then_simulated_ones():
    user = ScriptedUser(("Why so slow?", False))
    env = make(user, max_turns=6)
    obs, info = env.reset(seed=0, options={"dialogue_index": 0})
    assert obs == f"User: {U1}" and info["human_reply"] == A1
    _, r, terminated, truncated, info = env.step("  " + A1.upper() + " ")  # the data's reply, case and spaces aside
    assert info["messages"][-1] == {"role": "user", "content": U2} and info["human_reply"] == A2 and not user.calls
    assert r == pytest.approx(1.0) and (terminated, truncated) == (False, False)
    _, r, _, _, info = env.step("Please hold on.")  # the agent leaves the data
    assert r == pytest.approx(rouge_l(A2, "Please hold on."))  # against A2: the human reply for this exact history
    assert info["messages"][-1] == {"role": "user", "content": "Why so slow?"} and info["human_reply"] is None
    shown, seed = user.calls[0]
    assert shown == info["messages"][:-1] and shown[-1] == {"role": "assistant", "content": "Please hold on."}
    assert isinstance(seed, int)
    _, r, _, _, info = env.step(A3)  # back to the data's words, but not the data's conversation any more
    assert info["reward_raw"] is None and r == 0.0 and info["human_reply"] is None and len(user.calls) == 2


def test_similarity_never_scores_against_the_reference_of_a_different_history():
    # a user that does not react repeats the data's next turn word for word after the agent deviated
    user = ScriptedUser((U2, False))
    old = SimilarityReward(turn_references(DIALOGUES), key=user_turns_key)  # replayed data's key: user turns only
    env = make(user)
    env.reset(seed=0, options={"dialogue_index": 0})
    _, _, _, _, info = env.step("Please hold on.")
    history = info["messages"]
    assert [m["content"] for m in history] == [U1, "Please hold on.", U2] and info["human_reply"] is None
    assert old([history], [A2]) == [pytest.approx(1.0)]  # the bug: A2 answered U1→A1→U2, not this history
    assert SIMILARITY([history], [A2]) == [None]
    assert env.step(A2)[4]["reward_raw"] is None
    assert SIMILARITY([DIALOGUES[0][:3]], [A2]) == [pytest.approx(1.0)]  # the data's own history keeps its reference


def test_the_episode_ends_at_the_stop_marker_or_at_max_turns():
    env = make(ScriptedUser(("Thanks, bye", True)))
    env.reset(seed=0, options={"dialogue_index": 0})
    obs, _, terminated, truncated, info = env.step("Please hold on.")
    assert (terminated, truncated) == (True, False) and obs.endswith("User: Thanks, bye")
    assert info["human_reply"] is None
    with pytest.raises(RuntimeError, match="reset"):
        env.step("again")
    env = make(ScriptedUser(("", True)))  # the marker alone: no empty user turn
    env.reset(seed=0, options={"dialogue_index": 0})
    _, _, terminated, _, info = env.step("Hm.")
    assert terminated and info["messages"][-1] == {"role": "assistant", "content": "Hm."}
    env = make(ScriptedUser(), max_turns=5)  # never ends: truncated at max_turns, past the data's three turns
    _, info = env.reset(seed=0, options={"dialogue_index": 0})
    flags = []
    for _ in range(5):
        _, _, terminated, truncated, info = env.step(info["human_reply"] or "Sure.")
        flags.append((terminated, truncated))
    assert flags == [(False, False)] * 4 + [(False, True)]
    assert [m["content"] for m in info["messages"]][:6] == [U1, A1, U2, A2, U3, A3]  # the data's whole dialogue …
    ok, sure = {"role": "user", "content": "ok"}, {"role": "assistant", "content": "Sure."}
    assert info["messages"][6:] == [ok, sure, ok, sure, ok]  # … then the simulator; h′ still has a user turn


def test_replayed_data_is_unchanged_without_a_simulator():
    env = DialogueEnv(DIALOGUES, SIMILARITY, max_turns=8)
    env.reset(options={"dialogue_index": 0})
    _, _, _, _, info = env.step("Please hold on.")
    assert info["messages"][-1]["content"] == U2 and info["human_reply"] == A2 and env.reference_key is user_turns_key


# ----------------------------------------------------------------------------- a tiny random model as the user


@pytest.fixture(scope="module")
def engine():
    from chatrlhf.config import ModelArgs
    from chatrlhf.engine import Engine
    from chatrlhf.models import load_model

    model, tok = load_model(ModelArgs(model="tiny-random-llama", dtype="float32"))
    return Engine(model.eval(), tok, "float32")


def simulator(engine):
    return UserSimulator(engine, SamplingParams(max_tokens=8, temperature=0.7))


def test_check_env_passes_with_a_simulator(engine):
    env = gym.make("chatrlhf/Dialogue-v0", dialogues=DIALOGUES, reward=SIMILARITY, max_turns=3, render_mode="ansi",
                   user=simulator(engine))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker reports problems as warnings: none allowed
        check_env(env.unwrapped)
    env.close()


def user_turns(env, seed, replies):
    env.reset(seed=seed, options={"dialogue_index": 0})
    info = {}
    for reply in replies:
        info = env.step(reply)[4]
    return [m["content"] for m in info["messages"] if m["role"] == "user"]


def test_the_same_seed_gives_the_same_user_turns(engine):
    replies = ["Please hold on.", "Let me check."]
    a, b = make(simulator(engine)), make(simulator(engine))
    first = user_turns(a, 5, replies)
    assert first == user_turns(b, 5, replies) == user_turns(a, 5, replies) and len(first) == 3
    assert first[0] == U1 and first[1] != U2
    others = {tuple(user_turns(a, seed, replies)) for seed in range(6, 8)}
    assert len(others | {tuple(first)}) > 1  # the seed is what fixes them


def test_the_next_user_turn_is_generated_from_the_reply(engine):
    sim = simulator(engine)
    calls = []  # (prompt, completion) of every simulator call

    def spy(prompts, params, generator=None, **kw):
        done = engine.generate(prompts, params, generator=generator, **kw)
        calls.append((prompts[0], done[0]))
        return done

    sim.engine = type("Spy", (), {"generate": staticmethod(spy), "device": engine.device, "tok": engine.tok})()
    env = make(sim)
    replies = ["Please hold on.", "Which city are you in?", "Could you give me the order number?", "No."]
    turns = [user_turns(env, 5, [reply])[-1] for reply in replies]  # the same seed for every reply
    assert len(calls) == len(replies)
    for (prompt, done), reply, turn in zip(calls, replies, turns):
        assert prompt == simulator_messages([{"role": "user", "content": U1}, {"role": "assistant", "content": reply}])
        ids, reply_ids = engine.encode(prompt), engine.tok(reply, add_special_tokens=False)["input_ids"]
        assert any(ids[i:i + len(reply_ids)] == reply_ids for i in range(len(ids)))  # the model reads the reply
        assert turn == split_stop(engine.tok.decode(done.token_ids, skip_special_tokens=True))[0]
    first_token_logps = [done.logprobs[0] for _, done in calls]
    assert len(set(first_token_logps)) == len(replies)  # each reply gives its own next-token distribution


# ----------------------------------------------------------------------------- chatrlhf qlearn --user-model


@pytest.mark.slow  # ~30 s on 2 shared cores
def test_qlearn_trains_and_evaluates_against_the_simulated_user(tmp_path):
    from chatrlhf.logger import read_metrics
    from conftest import run_cli

    out = tmp_path / "q"
    data = EXAMPLES / "dialogue_history.csv"
    r = run_cli("qlearn", "--model", "tiny-random-llama", "--user-model", "tiny-random-gpt2", "--data", data,
                "--references", data, "--output-dir", out, "--quiet", "--no-tensorboard", "--max-new-tokens", "4",
                "--max-steps", "2", "--max-turns", "2", "--candidates", "2", "--learning-starts", "1", "--batch-size",
                "2", "--eval-steps", "2", "--eval-dialogues", "1", "--hidden", "8")
    assert r.returncode == 0, r.stderr
    assert "user turns after the data's by the simulator tiny-random-gpt2" in r.stdout
    assert json.loads((out / "run_config.json").read_text())["user_model"] == "tiny-random-gpt2"
    metrics = read_metrics(out)
    # a random policy leaves the data at once and a random user never writes [done]: every episode runs max_turns,
    # in training and in the held-out walk alike (1 dialogue × 2 turns)
    assert [m["train/turns"] for m in metrics if "train/turns" in m] == [2, 2]
    assert [m["eval/states"] for m in metrics if "eval/states" in m] == [2, 2]
    assert metrics[-1]["eval/human"] == pytest.approx(1.0)  # the first turn is still the data's


def test_qlearn_user_model_settings(tmp_path):
    from chatrlhf.config import QLearnConfig
    from chatrlhf.models import load_model
    from chatrlhf.trainers.qlearn import candidate_env, load_user
    from conftest import run_cli

    r = run_cli("qlearn", "--model", "tiny-random-llama", "--user-model", "tiny-random-llama", "--candidates", "0",
                "--output-dir", tmp_path / "q", "--reward-fn", "x:y")
    assert r.returncode != 0 and "--candidates 0" in r.stderr and "give --candidates 1" in r.stderr
    cfg = QLearnConfig(model="tiny-random-llama", user_model="tiny-random-llama", dtype="float32")
    policy, tok = load_model(cfg)
    user = load_user(cfg, policy, tok, log=lambda *_: None)
    assert user.engine.model is policy and user.name == "tiny-random-llama"  # --user-model = --model: one copy
    env = candidate_env(DIALOGUES, SIMILARITY, user.engine, cfg, user)
    assert env.unwrapped.max_turns == 4 and env.unwrapped.user is user  # --max-turns 0 → 4 with a simulated user
    assert candidate_env(DIALOGUES, SIMILARITY, user.engine, cfg).unwrapped.max_turns is None
    assert load_user(QLearnConfig(), policy, tok, log=lambda *_: None) is None
