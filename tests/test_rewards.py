"""Reward sources, weight schedules, running normalisation and the EOS penalty."""

import math

import numpy as np
import pytest

from chatrlhf.config import parse_map
from chatrlhf.errors import UsageError
from chatrlhf.rewards import HumanReward, RewardMix, RunningMoments, Schedule, SimilarityReward, load_callable, \
    parse_schedules, reference_replies


def test_schedule_values_hand_computed():
    assert Schedule("constant", 0.3, 0.3)(50) == 0.3
    lin = Schedule("linear", 1.0, 0.2, 4)
    assert [round(lin(s), 6) for s in (0, 1, 2, 4, 9)] == [1.0, 0.8, 0.6, 0.2, 0.2]
    cos = Schedule("cosine", 1.0, 0.0, 4)  # 0.5 (1 + cos(π s/4))
    assert [round(cos(s), 6) for s in (0, 1, 2, 4)] == [1.0, round(0.5 * (1 + math.cos(math.pi / 4)), 6), 0.5, 0.0]
    step = Schedule("step", 1.0, 0.1, 3)
    assert [step(s) for s in (0, 2, 3, 10)] == [1.0, 1.0, 0.1, 0.1]


def test_parse_schedules_and_errors():
    s = parse_schedules(parse_map("rm=1, human=cosine:1:0.1:20"))
    assert s["rm"] == Schedule("constant", 1.0, 1.0) and s["human"] == Schedule("cosine", 1.0, 0.1, 20)
    assert parse_schedules({"rm": 0.5}) == {"rm": Schedule("constant", 0.5, 0.5)}   # a YAML mapping
    for bad in ("rm=x", "human=cosine:1:0.1", "human=wobble:1:0:3"):
        with pytest.raises(UsageError, match="--reward-weights"):
            parse_schedules(parse_map(bad))
    with pytest.raises(UsageError, match="cannot read 'rm'"):
        parse_map("rm", where="--reward-weights: ")


def test_running_moments_equal_numpy_over_batches():
    rng = np.random.default_rng(0)
    batches = [list(rng.normal(3, 2, n)) for n in (5, 1, 17, 8)]
    m = RunningMoments()
    for b in batches:
        m.update(b)
    allv = np.concatenate(batches)
    assert math.isclose(m.mean, allv.mean(), rel_tol=1e-9) and math.isclose(m.std, allv.std(), rel_tol=1e-9)
    assert m.count == len(allv)


def test_mix_weights_normalises_and_penalises_missing_eos():
    # source a: raw (1, 3) → running mean 2, std 1 → normalised (−1, 1); weight 2 at step 0
    # source b: (None, 5) → only one value: mean 5, std 0 → normalised 0 where present
    mix = RewardMix({"a": lambda p, r: [1.0, 3.0], "b": lambda p, r: [None, 5.0]},
                    {"a": Schedule("linear", 2.0, 0.0, 10)}, missing_eos_penalty=0.5)
    total, m = mix([[]] * 2, ["x", "y"], ended=[True, False], step=0)
    assert total == [-2.0, 2.0 - 0.5]
    assert m["reward/b_coverage"] == 0.5 and m["reward/a_weight"] == 2.0 and m["reward/eos_rate"] == 0.5
    total, _ = mix([[]] * 2, ["x", "y"], ended=[True, True], step=5)  # weight of a is now 1.0
    assert math.isclose(total[1] - total[0], 2 / 1.0, rel_tol=1e-9)  # stats still mean 2, std 1
    raw = RewardMix({"a": lambda p, r: [1.0, 3.0]}, {}, normalise=False)
    assert raw([[]] * 2, ["x", "y"], [True, True], 0)[0] == [1.0, 3.0]
    with pytest.raises(UsageError, match="not configured"):
        RewardMix({"a": lambda p, r: []}, {"rm": Schedule()})


def user(text):
    return [{"role": "user", "content": text}]


def test_human_feedback_exact_and_nearest_reply(write):
    path = write("ratings.jsonl", '{"prompt": "Where is my order?", "response": "It ships tomorrow from our warehouse.", "score": 5}\n'
                                  '{"prompt": "Where is my order?", "response": "It ships tomorrow from our warehouse.", "score": 4}\n'
                                  '{"prompt": "Where is my order?", "response": "No idea.", "score": 1}\n')
    corr = write("corr.jsonl", '{"prompt": "Hi", "response": "What.", "corrected": "Hello! How can I help?"}\n')
    h = HumanReward([str(path), str(corr)], threshold=0.5)
    out = h([user("Where is my order?")] * 3 + [user("Hi"), user("Hi"), user("Unrated prompt")],
            ["It ships tomorrow from our warehouse.", "It ships tomorrow from the warehouse.", "Bananas are yellow fruit.",
             "Hello! How can I help?", "What.", "anything"])
    assert out[0] == pytest.approx(0.75)  # stars (5, 4) → (1, 0.5), averaged
    assert out[1] == pytest.approx(0.75)  # nearest rated reply, ROUGE-L ≥ 0.5
    assert out[2] is None and out[5] is None
    assert out[3:5] == [1.0, -1.0]


def test_similarity_to_references_rouge(write):
    refs = reference_replies([str(write("c.jsonl", '{"messages": [{"role": "user", "content": "Hi"}, '
                                                      '{"role": "assistant", "content": "Hello, how can I help you '
                                                      'today?"}]}\n'))])
    sim = SimilarityReward(refs, "rouge")
    a, b, c = sim([user("Hi")] * 2 + [user("other")], ["Hello, how can I help you today?", "Go away.", "x"])
    assert a == pytest.approx(1.0) and b == 0.0 and c is None


def test_similarity_embedding_ranks_paraphrase_above_unrelated():
    sim = SimilarityReward({"user:hi": ["Hello, how can I help you today?"]}, "embedding")
    para, unrelated = sim([user("Hi")] * 2, ["Hi! What can I do for you?", "The tax code changed in 1986."])
    assert para > unrelated + 0.3


def test_callable_reward_from_file(write):
    path = write("myrew.py", "def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    fn = load_callable(f"{path}:length")
    assert fn([[]], ["abc"]) == [3.0]
    with pytest.raises(UsageError, match="module:function"):
        load_callable("nocolon")
    with pytest.raises(UsageError, match="cannot load"):
        load_callable(f"{path}:missing")


def test_a_source_that_has_not_varied_is_only_centred():
    m = RunningMoments()
    m.update([0.0, 0.0, 0.0])
    assert m.normalise(0.25) == 0.25  # not 0.25 / 1e-4
    m.update([1.0])
    assert math.isclose(m.normalise(1.0), (1 - 0.25) / math.sqrt(3 / 16), rel_tol=1e-9)
