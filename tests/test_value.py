"""PPO's value function (trainers/value.py): a head on the policy's trunk and a separate critic answer the
same calls, so the PPO loop never asks which one it has."""
import pytest
import torch

from chatrlhf import losses
from chatrlhf.config import ModelArgs
from chatrlhf.reward_model import load_reward_model
from chatrlhf.rollout import Critic, Rollout
from chatrlhf.trainers.common import make_optimizer
from chatrlhf.trainers.value import SeparateCritic, SharedHead


def tiny_rollout(B=2, Q=3, R=4) -> Rollout:
    g = torch.Generator().manual_seed(0)
    z = torch.zeros(B, R)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    return Rollout(torch.randint(5, 100, (B, Q), generator=g), torch.ones(B, Q, dtype=torch.long),
                   torch.randint(5, 100, (B, R), generator=g), mask, z, z, torch.rand(B, R, generator=g), z[:, 0], z, z,
                   torch.rand(B, R, generator=g))


def test_shared_head_starts_at_zero_and_its_loss_is_weighted_by_vf_coef():
    vf = SharedHead(hidden_size=8, vf_coef=0.25)
    assert vf.reads_trunk and vf.head is not None and torch.equal(vf.head(torch.ones(3, 8)), torch.zeros(3, 1))
    r = tiny_rollout()
    v = torch.rand(2, 4)
    assert torch.equal(vf.values(r, v), v)                   # read off the policy's trunk pass
    loss, m = vf.trunk_loss(v, r, 0.2)
    want, want_m = losses.value_loss(v, r.values, r.returns, r.response_mask, 0.2)
    assert float(loss) == pytest.approx(0.25 * float(want)) and m.keys() == want_m.keys()
    assert vf.update(r, 0.2, 1.0) == {} and vf.parts(None, 10) == {}          # trained by the policy's step
    assert list(vf.policy_modules()) == ["value_head"] and vf.networks() == []


def test_separate_critic_has_its_own_optimizer_and_adds_nothing_to_the_policy_loss():
    model, _ = load_reward_model(ModelArgs(model="tiny-random-llama", device="cpu"), trainable=True)
    vf = SeparateCritic(Critic(model), lr=1e-2, dtype="float32")
    assert not vf.reads_trunk and vf.head is None and vf.policy_modules() == {}
    parts = vf.parts(lambda params, lr, n: make_optimizer(params, lr, 0.0, total_steps=n), 5)
    assert list(parts) == ["critic"] and parts["critic"][0] is vf.critic and parts["critic"][1].param_groups[0]["lr"] == 1e-2
    r = tiny_rollout()
    assert vf.trunk_loss(None, r, 0.2) == (0.0, {})
    before = vf.values(r, None).detach().clone()
    assert before.shape == (2, 4)
    m = vf.update(r, 0.2, 1.0)                               # its own forward, backward and AdamW step
    assert m["critic/grad_norm"] > 0 and "loss/value" in m
    assert not torch.equal(vf.values(r, None).detach(), before)
    vf.schedule_step()
    assert parts["critic"][2].last_epoch == 1 and vf.networks() == [model]
