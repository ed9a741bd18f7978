"""Each failure sign fires on a history that shows it and stays quiet on a healthy one."""

from chatrlhf.evaluate.watch import failure_signs

HEALTHY = [{"objective/kl": 0.1 * i, "policy/entropy": 2.0 - 0.05 * i, "rollout/cross_prompt_duplicates": 0.0,
            "rollout/length": 20 + i % 3, "reward/total_mean": 0.1 * i, "reward/similarity_mean": 0.3}
           for i in range(8)]


def with_last(**kv):
    return HEALTHY[:-1] + [{**HEALTHY[-1], **kv}]


def test_healthy_run_raises_nothing():
    assert failure_signs(HEALTHY, kl_bound=5.0) == {}


def test_each_sign():
    accel = HEALTHY[:4] + [{**HEALTHY[4], "objective/kl": k} for k in (0.5, 1.0, 2.0, 4.0)]
    assert "kl_accelerating" in failure_signs(accel)
    assert "entropy_collapse" in failure_signs(with_last(**{"policy/entropy": 0.3}))
    assert "identical_replies" in failure_signs(with_last(**{"rollout/cross_prompt_duplicates": 0.75}))
    assert "identical_replies" not in failure_signs(with_last(**{"rollout/cross_prompt_duplicates": 0.5}))
    assert "length_spike" in failure_signs(with_last(**{"rollout/length": 60}))
    assert "negative_kl" in failure_signs(with_last(**{"objective/kl": -0.5}))
    assert "kl_over_bound" in failure_signs(with_last(**{"objective/kl": 9.0}), kl_bound=5.0)
    hacking = [{**h, "reward/similarity_mean": 0.4 - 0.03 * i} for i, h in enumerate(HEALTHY)]
    signs = failure_signs(hacking)
    assert list(signs) == ["reward_up_similarity_down"] and "over-optimising" in signs["reward_up_similarity_down"]


def test_shared_reply_fraction_counts_only_replies_given_to_other_prompts():
    from chatrlhf.evaluate.metrics import shared_reply_fraction

    # two samples per prompt: "ok" repeated for prompt a is not a cross-prompt duplicate; "hi" is given to b and c
    keys = ["a", "a", "b", "b", "c", "c"]
    texts = ["ok", "ok", "hi", "yo", "hi", "hi"]
    # distinct (prompt, reply) pairs: (a,ok) (b,hi) (b,yo) (c,hi) → shared: (b,hi) (c,hi) → 2 / 4
    assert shared_reply_fraction(keys, texts) == 0.5
    assert shared_reply_fraction(["a", "a", "b", "b"], ["x", "x", "y", "y"]) == 0.0
