"""Every loss and estimator as a pure tensor function: tensors in, ``(loss, metrics)`` out.
Imports torch alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, n_targets: int | torch.Tensor):
    """Token cross-entropy summed over the given positions and divided by ``n_targets``, the number of
    target tokens in the whole optimizer step (all micro-batches), so that micro-batch × accumulation
    equals one big batch.

    logits (N, V) at the positions that predict a target; targets (N,) the next tokens.
    """
    nll = F.cross_entropy(logits.float(), targets, reduction="sum")
    loss = nll / n_targets
    return loss, {"loss/nll_sum": nll.detach(), "loss/tokens": torch.tensor(targets.numel())}


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       tie: torch.Tensor | None = None, weight: torch.Tensor | None = None):
    """Reward-model loss on (B,) scores of chosen and rejected replies.

    Preferred pairs: −log σ(r_c − r_r − m) (Ouyang et al. 2022 eq. 1; margin m from Llama 2 §3.2.2).
    Ties: the Bradley–Terry likelihood of a 50/50 outcome, −½ log σ(d) − ½ log σ(−d), which is
    minimal at d = 0, so tied replies are pulled toward equal scores. Weighted mean over pairs.
    """
    d = chosen - rejected
    margin = torch.zeros_like(d) if margin is None else margin
    tie = torch.zeros_like(d, dtype=torch.bool) if tie is None else tie
    weight = torch.ones_like(d) if weight is None else weight
    per_pair = torch.where(tie, -0.5 * (F.logsigmoid(d) + F.logsigmoid(-d)), -F.logsigmoid(d - margin))
    loss = (per_pair * weight).sum() / weight.sum()
    decided = ~tie
    acc = ((d > 0) & decided).sum() / decided.sum().clamp(min=1)
    return loss, {"loss/bt": loss.detach(), "reward/accuracy": acc.detach(), "reward/margin": d.detach().mean()}
