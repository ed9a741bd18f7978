"""The pieces that let several processes train as one, in one process: a batch cut in two parts gives, part by part,
what the whole batch gives — whitening with the whole batch's moments, token means as shares of the whole, each
reply drawn from a stream of its own."""

from types import SimpleNamespace

import pytest
import torch

from chatrlhf import losses
from chatrlhf.config import ModelArgs
from chatrlhf.models import load_model
from chatrlhf.rollout import generate, row_seeds
from chatrlhf.trainers.run import global_batch

X = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 9.0]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 0]])


def scripted(*answers):
    """A stand-in for Run.total in a process holding one part: returns the whole batch's sums, in call order."""
    queue = list(answers)
    return lambda values: queue.pop(0)


def test_whitening_one_part_with_the_whole_batch_moments_equals_whitening_the_whole():
    # the whole batch: 1, 2, 3, 4 — mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, unbiased var 5/3
    whole = losses.masked_whiten(X, MASK)
    assert whole[0, :2].tolist() == pytest.approx([-1.5 / (5 / 3) ** 0.5, -0.5 / (5 / 3) ** 0.5], rel=1e-5)
    part = losses.masked_whiten(X[:1], MASK[:1], total=scripted([10.0, 4.0], [5.0]))
    assert torch.allclose(part, whole[:1], atol=1e-6)
    kept = losses.masked_whiten(X[1:], MASK[1:], shift_mean=False, total=scripted([10.0, 4.0], [5.0]))
    assert torch.allclose(kept, losses.masked_whiten(X, MASK, shift_mean=False)[1:], atol=1e-6)


def test_token_means_over_the_whole_batch_count_add_up_over_the_parts():
    assert float(losses.masked_mean(X[:1], MASK[:1], total=4)) == pytest.approx(3 / 4)
    parts = [losses.masked_mean(X[i:i + 1], MASK[i:i + 1], total=4) for i in range(2)]
    assert float(sum(parts)) == pytest.approx(float(losses.masked_mean(X, MASK)))  # (1+2+3+4)/4
    lp, old, adv = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    whole, m = losses.ppo_policy_loss(lp, old, adv, MASK, 0.2)
    shares = [losses.ppo_policy_loss(lp[i:i + 1], old[i:i + 1], adv[i:i + 1], MASK[i:i + 1], 0.2, total_tokens=4)
              for i in range(2)]
    assert float(shares[0][0] + shares[1][0]) == pytest.approx(float(whole), rel=1e-6)
    assert float(shares[0][1]["ppo/clipfrac"] + shares[1][1]["ppo/clipfrac"]) == pytest.approx(float(m["ppo/clipfrac"]))
    v, old_v, ret = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    whole_v, _ = losses.value_loss(v, old_v, ret, MASK)
    parts_v = [losses.value_loss(v[i:i + 1], old_v[i:i + 1], ret[i:i + 1], MASK[i:i + 1], total_tokens=4)[0]
               for i in range(2)]
    assert float(sum(parts_v)) == pytest.approx(float(whole_v), rel=1e-6)


def test_a_reply_drawn_from_its_own_stream_does_not_depend_on_the_rest_of_the_batch():
    policy, tok = load_model(ModelArgs(model="tiny-random-llama", dtype="float32"))
    cfg = SimpleNamespace(max_prompt_length=64, dtype="float32", max_new_tokens=10, temperature=1.0)
    prompts = [[{"role": "user", "content": t}] for t in ("Where is my order?", "Hi", "Refund please", "Hi")]
    seeds = row_seeds(0, 0, 3, rows=range(4))
    assert len(set(seeds)) == 4 and seeds == row_seeds(0, 0, 3, rows=range(4)) != row_seeds(0, 0, 4, rows=range(4))
    whole, _, _ = generate(policy, tok, prompts, cfg, None, seeds=seeds)
    halves = [generate(policy, tok, prompts[i::2], cfg, None, seeds=seeds[i::2])[0] for i in range(2)]
    assert [halves[i % 2].texts[i // 2] for i in range(4)] == whole.texts
    assert whole.texts[1] != whole.texts[3]  # the same prompt, its own stream: another reply


def test_the_global_batch_is_spelt_out():
    sft = SimpleNamespace(batch_size=4, grad_accum=2)
    assert global_batch(sft, 2) == "global batch 16 = --batch-size 4 × --grad-accum 2 × 2 process(es)"
    ppo = SimpleNamespace(batch_size=4, samples_per_prompt=2, minibatch_size=8)
    assert global_batch(ppo, 2).startswith("global batch 16 replies per step = --batch-size 4 prompts × 2 process(es)")
    grpo = SimpleNamespace(batch_size=2, num_generations=4, minibatch_size=None)
    assert global_batch(grpo, 2) == ("global batch 16 replies per step = --batch-size 2 prompts × 2 process(es) × "
                                     "--num-generations 4; --minibatch-size: the whole batch over all processes")
