import math

import torch

from chatrlhf import losses


def test_sft_loss_hand_computed():
    # two positions, vocab 3. Row 0 logits (0, 0, 0): -log softmax = log 3 for any target.
    # Row 1 logits (ln 1, ln 2, ln 1) = probabilities (1/4, 2/4, 1/4); target 1 -> -log(1/2) = log 2.
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0]])
    targets = torch.tensor([2, 1])
    loss, m = losses.sft_loss(logits, targets, n_targets=2)
    assert math.isclose(float(loss), (math.log(3) + math.log(2)) / 2, rel_tol=1e-6)
    assert math.isclose(float(m["loss/nll_sum"]), math.log(3) + math.log(2), rel_tol=1e-6)
    assert int(m["loss/tokens"]) == 2


def test_sft_loss_divides_by_step_tokens_not_batch_tokens():
    # With 5 target tokens in the whole optimizer step, a micro-batch of 2 contributes nll/5.
    logits = torch.zeros(2, 4)
    loss, _ = losses.sft_loss(logits, torch.tensor([0, 3]), n_targets=5)
    assert math.isclose(float(loss), 2 * math.log(4) / 5, rel_tol=1e-6)
