"""A Python reward for the example task: a concise, on-topic reply to a customer's message (examples/prompts.txt).

    chatrlhf grpo --data examples/prompts.txt --reward-fn examples/reward.py:concise_on_topic ...

A good reply here is about as long as a helpful customer-service answer (TARGET_WORDS words: long enough to answer,
short enough to read at a glance) and picks up what the customer wrote about (their order, refund, password,
jacket...), so a reply that rambles, a one-word reply and a polite reply about something else all score low.

    reward = LENGTH_WEIGHT · length + TOPIC_WEIGHT · topic,  in [0, 1]

* ``length`` = max(0, 1 − |n − TARGET_WORDS| / TARGET_WORDS), n = the reply's word count: 1 at the target, falling
  linearly to 0 at zero words and at twice the target. A tent rather than a step, so every extra or missing word moves
  the reward a little and a policy gradient feels it (a sparse "right length or not" would not be learnable in minutes).
* ``topic`` = the share of the prompt's content words (lower-cased words of 3+ letters, not in STOPWORDS) that the
  reply reuses, word for word; 0 when the prompt has none. Also smooth: each word taken up adds 1/k.

Pure Python, no download, deterministic: the same function trains (``--reward-fn``) and judges held-out replies
(benchmarks/methods.py).
"""

from __future__ import annotations

import re

TARGET_WORDS = 20
LENGTH_WEIGHT = 0.5
TOPIC_WEIGHT = 0.5

STOPWORDS = frozenset("""
about after again all also and any are because been before but can cannot could did does doing don't down each
for from get got had has have having her here hers him his how i'm into is it's its just let me more most much must
my myself not now off once only other our ours out over own said same she should some such than that the their them
then there these they this those through too under until very was way were what when where which while who whom why
will with would yes you your yours yourself i've can't won't didn't isn't it'll i'd please hello thanks thank
""".split())

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """Lower-cased words (letters, digits, apostrophes); punctuation splits them."""
    return _WORD.findall(text.lower())


def content_words(text: str) -> set[str]:
    """The distinct words of 3+ characters that are not stopwords."""
    return {w for w in words(text) if len(w) >= 3 and w not in STOPWORDS}


def length_score(reply: str) -> float:
    """1 at TARGET_WORDS words, linearly down to 0 at 0 and at 2 × TARGET_WORDS words."""
    return max(0.0, 1.0 - abs(len(words(reply)) - TARGET_WORDS) / TARGET_WORDS)


def prompt_text(prompt) -> str:
    """The customer's words: a plain string, or the user turns of a conversation (the trainers pass
    [{"role", "content"}, …] lists)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m.get("role") == "user")


def topic_score(prompt, reply: str) -> float:
    """The share of the prompt's content words found among the reply's words (0 if the prompt has none)."""
    wanted = content_words(prompt_text(prompt))
    return len(wanted & set(words(reply))) / len(wanted) if wanted else 0.0


def concise_on_topic(prompts: list, responses: list[str]) -> list[float]:
    """chatrlhf's ``--reward-fn`` signature: one reward in [0, 1] per (prompt, reply)."""
    return [LENGTH_WEIGHT * length_score(r) + TOPIC_WEIGHT * topic_score(p, r) for p, r in zip(prompts, responses)]
