"""examples/reward.py, the example task's reward, on replies whose scores are worked out by hand."""

import importlib.util

import pytest

from conftest import EXAMPLES

spec = importlib.util.spec_from_file_location("example_reward", EXAMPLES / "reward.py")
reward = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reward)


def n_words(n: int) -> str:
    return " ".join(["fine"] * n)


@pytest.mark.parametrize("n, want", [(0, 0.0), (10, 0.5), (20, 1.0), (30, 0.5), (40, 0.0), (45, 0.0), (19, 0.95)])
def test_length_is_a_tent_around_the_target(n, want):
    assert reward.TARGET_WORDS == 20
    assert reward.length_score(n_words(n)) == pytest.approx(want)


def test_content_words_drop_stopwords_short_words_and_punctuation():
    assert reward.content_words("Where is my order?") == {"order"}
    assert reward.content_words("How long does a refund take?") == {"long", "refund", "take"}
    assert reward.content_words("How are you?") == set()


def test_topic_is_the_share_of_the_prompts_content_words_reused():
    assert reward.topic_score("Where is my order?", "Your ORDER has shipped.") == 1.0
    # "refunds" is not "refund": word for word; "take" is reused: 1 of 3
    assert reward.topic_score("How long does a refund take?", "Refunds take five days.") == pytest.approx(1 / 3)
    assert reward.topic_score("How are you?", "How are you?") == 0.0   # no content word: no topic credit


def test_the_reward_mixes_both_halves_and_reads_conversations():
    prompt, reply = "How long does a refund take?", "Refunds take five days."
    # 4 words: length 1 − 16/20 = 0.2; topic 1/3 → 0.5 · 0.2 + 0.5 / 3
    assert reward.concise_on_topic([prompt], [reply]) == [pytest.approx(0.1 + 1 / 6)]
    chat = [{"role": "system", "content": "Mention the warranty."}, {"role": "user", "content": prompt}]
    assert reward.concise_on_topic([chat], [reply]) == reward.concise_on_topic([prompt], [reply])
    on_topic = "Your refund should take about five working days to reach your card once we receive the item back."
    ramble = on_topic + " " + n_words(30)
    scores = reward.concise_on_topic([prompt] * 3, [on_topic, ramble, ""])
    assert scores[0] == pytest.approx(0.5 * (1 - 2 / 20) + 0.5 * 2 / 3)   # 18 words; "refund", "take"
    assert scores[0] > scores[1] > scores[2] == 0.0 and all(0 <= s <= 1 for s in scores)
