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
