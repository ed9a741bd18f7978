"""PPO's value function V(s_t), whichever network computes it (cleanrl's ``Agent.get_value``): the PPO loop
asks for values and for a value update without knowing whether the critic is a separate network with its
own optimizer or a head on the policy's trunk trained with the policy.

Both kinds answer the same calls:
  * ``head``: the layer that reads values off the policy's trunk pass (given to ``rollout.policy_forward``),
    or None when the values come from elsewhere;
  * ``reads_trunk``: True when values need the policy's trunk pass (so a critic warm-up step still runs it);
  * ``values(r, trunk_values)``: (B, R) values of a rollout or minibatch;
  * ``trunk_loss(v, mb, cliprange_value, total_tokens)``: the value loss to add to the policy's loss (0 for a
    separate critic); ``total_tokens``: the minibatch's tokens over every process (None: this one's);
  * ``update(mb, ..., total_tokens, step, idle)``: a separate critic's own forward, backward and optimizer step
    through ``step`` (the run's, which sums gradients over processes; ``mb`` None: this process has no row of the
    minibatch and only joins the step; ``idle``: under FSDP it still makes a pass, weighted 0) — nothing for a head;
  * ``parts(make_optimizer, n_steps)`` / ``policy_modules()``: what the run checkpoints and what trains with
    the policy; ``schedule_step()`` advances its own learning-rate schedule; ``networks()``; ``save(tok, out_dir,
    write)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatrlhf import losses
from chatrlhf.models import autocast, save_model
from chatrlhf.rollout import Critic, Rollout
from chatrlhf.trainers.common import optimizer_step


class SharedHead(torch.nn.Module):
    """A zero-initialised linear head on the policy's trunk (``--critic shared``): one trunk pass gives both
    log-probs and values, and the head trains with the policy, its loss weighted by ``vf_coef``."""

    reads_trunk = True

    def __init__(self, hidden_size: int, vf_coef: float):
        super().__init__()
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)  # values start at 0
        torch.nn.init.zeros_(self.head.bias)
        self.vf_coef = vf_coef

    def values(self, r: Rollout, trunk_values: torch.Tensor) -> torch.Tensor:
        return trunk_values

    def trunk_loss(self, v: torch.Tensor, mb: Rollout, cliprange_value: float,
                   total_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
        vl, metrics = losses.value_loss(v, mb.values, mb.returns, mb.response_mask, cliprange_value, total_tokens)
        return self.vf_coef * vl, metrics

    def update(self, mb: Rollout | None, cliprange_value: float, max_grad_norm: float,
               total_tokens: float | None = None, step=optimizer_step, idle: bool = False) -> dict:
        return {}  # trained by the policy's optimizer step

    def policy_modules(self) -> dict[str, torch.nn.Module]:
        return {"value_head": self.head}

    def parts(self, make_optimizer, n_steps: int) -> dict:
        return {}

    def schedule_step(self) -> None:
        pass

    def networks(self) -> list:
        return []

    def save(self, tok, out_dir: Path, write=save_model) -> None:
        pass  # the head belongs to this run's policy only


class SeparateCritic:
    """A separate value network (:class:`rollout.Critic`) with its own AdamW and schedule, trained on its own
    value loss after the policy's step on each minibatch; saved to OUTPUT_DIR/critic."""

    reads_trunk = False
    head = None

    def __init__(self, critic: Critic, lr: float, dtype: str):
        self.critic, self.lr, self.dtype = critic, lr, dtype
        self.optimizer = self.scheduler = None

    def values(self, r: Rollout, trunk_values) -> torch.Tensor:
        return self.critic(r)

    def trunk_loss(self, v, mb: Rollout, cliprange_value: float, total_tokens: float | None = None) -> tuple[float, dict]:
        return 0.0, {}

    def update(self, mb: Rollout | None, cliprange_value: float, max_grad_norm: float,
               total_tokens: float | None = None, step=optimizer_step, idle: bool = False) -> dict:
        """One step of the critic on a minibatch: clipped value loss, backward, clip, AdamW. ``idle``: under FSDP, a
        pass on a stand-in row that only joins the collectives (loss × 0, no metrics: rollout.micro_batches)."""
        metrics = {}
        if mb is not None:
            with autocast(self.dtype, mb.query_ids.device):
                v = self.critic(mb)
            vl, metrics = losses.value_loss(v, mb.values, mb.returns, mb.response_mask, cliprange_value, total_tokens)
            (vl * 0 if idle else vl).backward()
            metrics = {} if idle else metrics
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        metrics["critic/grad_norm"] = step(self.optimizer, None, params, max_grad_norm)
        return metrics

    def policy_modules(self) -> dict[str, torch.nn.Module]:
        return {}

    def parts(self, make_optimizer, n_steps: int) -> dict:
        """{"critic": (critic, AdamW, schedule)}; ``make_optimizer(params, lr, n_steps)``."""
        params = [p for p in self.critic.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(params, self.lr, n_steps)
        return {"critic": (self.critic, self.optimizer, self.scheduler)}

    def schedule_step(self) -> None:
        self.scheduler.step()

    def networks(self) -> list:
        return [self.critic.model]

    def train(self, mode: bool = True):
        self.critic.train(mode)
        return self

    def to(self, device):
        self.critic.to(device)
        return self

    def save(self, tok, out_dir: Path, write=save_model) -> None:
        """OUTPUT_DIR/critic, through ``write(model, tok, folder)`` (the run's save_model: every rank calls it)."""
        self.critic.save(tok, Path(out_dir) / "critic", write)
