"""Q-learning losses over candidate replies (QLEARN.md §2.4–2.5), worked on paper, plus a plain-loop reference
for the double-DQN selection."""

import math

import torch

from chatrlhf import losses

T = torch.tensor


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_td_target_masks_only_terminated():
    # γ = 0.5, V(h′) = (2, 2, 4). Row 0 goes on: 1 + 0.5·2 = 2. Row 1 terminated: 0.5, no bootstrap.
    # Row 2 goes on: −1 + 0.5·4 = 1.
    y = losses.td_target(T([1.0, 0.5, -1.0]), T([2.0, 2.0, 4.0]), T([0, 1, 0]), gamma=0.5)
    assert close(y, [2.0, 0.5, 1.0])
    # A truncated episode (max_turns) is not terminated: it passes terminated = 0 and still bootstraps.
    truncated_but_not_terminated = T([False, False, False])
    assert close(losses.td_target(T([1.0, 0.5, -1.0]), T([2.0, 2.0, 4.0]), truncated_but_not_terminated, 0.5),
                 [2.0, 1.5, 1.0])
    # γ = 0 (replayed user turns): the target is the reward alone.
    assert close(losses.td_target(T([1.0, 0.5, -1.0]), T([2.0, 2.0, 4.0]), T([0, 0, 0]), 0.0), [1.0, 0.5, -1.0])


def test_td_target_clipped_to_the_return_range():
    # rewards in [−1, 1], γ = 0.5 → returns in [−2, 2]. y = 1 + 0.5·4 = 3 → 2;  1 + 0.5·(−10) = −4 → −2;  0.5 stays.
    y = losses.td_target(T([1.0, 1.0, 0.5]), T([4.0, -10.0, 0.0]), T([0, 0, 0]), 0.5, reward_range=(-1.0, 1.0))
    assert close(y, [2.0, -2.0, 0.5])
    try:
        losses.td_target(T([1.0]), T([1.0]), T([0]), 1.0, reward_range=(-1.0, 1.0))
        raise AssertionError("γ = 1 has no bounded return")
    except ValueError as e:
        assert "gamma" in str(e)


ONLINE = T([[1.0, 5.0, 3.0], [2.0, 0.0, 9.0]])
TARGET = T([[[10.0, 0.5, 7.0], [4.0, 8.0, -3.0]],   # head 0
            [[9.0, 0.7, 1.0], [6.0, 1.0, -5.0]]])   # head 1
VALID = T([[1, 1, 1], [1, 1, 0]])


def test_double_dqn_picks_by_online_and_values_by_target():
    # Row 0: the online net picks c1 (5); the target heads value it 0.5 and 0.7 → min 0.5 — not the target's
    # own best (c0, 10): selection and evaluation are decoupled.
    # Row 1: c2 has the highest online Q (9) but is invalid, so never chosen; c0 (2) wins → min(4, 6) = 4.
    value, best = losses.double_q_next_value(ONLINE, TARGET, VALID)
    assert best.tolist() == [1, 0]
    assert close(value, [0.5, 4.0])


def test_double_dqn_row_without_candidates_is_zero():
    value, best = losses.double_q_next_value(ONLINE, TARGET, T([[0, 0, 0], [1, 1, 1]]))
    assert best.tolist() == [-1, 2] and close(value, [0.0, -5.0])


def double_dqn_plain_loop(online, target, valid):
    values, picks = [], []
    for b in range(online.shape[0]):
        best, best_q = -1, -math.inf
        for k in range(online.shape[1]):
            if valid[b][k] and online[b][k] > best_q:
                best, best_q = k, float(online[b][k])
        picks.append(best)
        values.append(0.0 if best < 0 else min(float(target[h][b][best]) for h in range(target.shape[0])))
    return values, picks


def test_double_dqn_matches_a_plain_loop_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        b, k, h = 5, 7, 2
        online, target = torch.randn(b, k, generator=g), torch.randn(h, b, k, generator=g)
        valid = torch.rand(b, k, generator=g) < 0.6
        value, best = losses.double_q_next_value(online, target, valid)
        ref_values, ref_picks = double_dqn_plain_loop(online, target, valid)
        assert best.tolist() == ref_picks and close(value, ref_values)
        assert all(p < 0 or valid[i, p] for i, p in enumerate(best.tolist()))


def test_huber_inside_and_outside_delta_summed_over_heads():
    # y = 0. Head 0 errors (0.5, −2, ·): ½·0.25 = 0.125 (|x| < 1) and 1·(2 − ½) = 1.5 (|x| > 1); row 2 masked.
    # → masked mean 0.8125. Head 1 errors (0, 0, 3): 0 (row 2 masked). Sum over heads: 0.8125.
    q = T([[0.5, -2.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)
    loss, m = losses.huber_td_loss(q, T([0.0, 0.0, 0.0]), mask=T([1, 1, 0]))
    assert close(loss, 0.8125) and close(m["q/td_abs_error"], (0.25 + 1.0) / 2)
    loss.backward()
    # d/dq: x inside (0.5/2 = 0.25), clipped to ±1 outside (−1/2), masked rows get no gradient
    assert close(q.grad, [[0.25, -0.5, 0.0], [0.0, 0.0, 0.0]])
    # δ = 3: all three errors of head 1 are inside → ½·9 = 4.5 over 3 rows (no mask) = 1.5; head 0 (0.125 + 2) / 3
    loss3, _ = losses.huber_td_loss(q.detach(), T([0.0, 0.0, 0.0]), delta=3.0)
    assert close(loss3, 1.5 + 2.125 / 3)


CQL_Q = T([[[0.0, math.log(3.0), 0.0], [math.log(2.0), 0.0, 100.0]]])  # one head, 2 states, 3 candidates
CQL_VALID = T([[1, 1, 1], [1, 1, 0]])
CQL_TAKEN = T([1, 0])


def test_cql_hand_computed():
    # Row 0: log(1 + 3 + 1) − log 3 = log(5/3). Row 1 (c2 invalid, its Q of 100 ignored): log(2 + 1) − log 2.
    loss, _ = losses.cql_loss(CQL_Q, CQL_VALID, CQL_TAKEN)
    assert close(loss, (math.log(5 / 3) + math.log(3 / 2)) / 2)
    two_heads, _ = losses.cql_loss(torch.cat([CQL_Q, CQL_Q]), CQL_VALID, CQL_TAKEN)
    assert close(two_heads, 2 * float(loss))  # summed over heads


def test_cql_with_behavior_importance_weights():
    # Row 0: π_β = (½, ¼, ¼) → Q − log π_β = (log 2, log 12, log 4); log((2 + 12 + 4) / 3) − log 3 = log 2.
    # Row 1: π_β = (½, ½) on the valid ones → (log 4, log 2); log((4 + 2) / 2) − log 2 = log 1.5.
    log_b = torch.log(T([[[0.5, 0.25, 0.25], [0.5, 0.5, 1.0]]]))[0]
    loss, _ = losses.cql_loss(CQL_Q, CQL_VALID, CQL_TAKEN, log_behavior=log_b)
    assert close(loss, (math.log(2.0) + math.log(1.5)) / 2)


def test_cql_pushes_unseen_down_and_taken_up():
    q = CQL_Q.clone().requires_grad_(True)
    losses.cql_loss(q, CQL_VALID, CQL_TAKEN)[0].backward()
    # gradient = (softmax over valid − onehot(taken)) / B: the taken reply goes up, the others down, invalid 0
    assert close(q.grad[0, 0], T([0.2, 0.6 - 1.0, 0.2]) / 2) and close(q.grad[0, 1], T([2 / 3 - 1.0, 1 / 3, 0.0]) / 2)


def test_expectile_is_asymmetric():
    # τ = 0.7: u = 1 → 0.7·1; u = −1 → 0.3·1; u = 2 → 0.7·4 = 2.8. Mean (0.7 + 0.3 + 2.8) / 3.
    loss, _ = losses.expectile_loss(T([1.0, -1.0, 2.0]), tau=0.7)
    assert close(loss, 3.8 / 3)
    assert close(losses.expectile_loss(T([1.0, -1.0, 2.0]), 0.7, mask=T([1, 1, 0]))[0], 0.5)
    # τ = 0.5 is half the squared error: symmetric
    assert close(losses.expectile_loss(T([1.0, -1.0]), tau=0.5)[0], 0.5)


def test_expectile_minimiser_is_the_upper_expectile():
    # Q̂ over the logged replies = {0, 1}. V minimising τ(1 − V)² + (1 − τ)V² is V = τ = 0.7 (above the mean 0.5).
    grid = torch.linspace(0, 1, 1001)
    q_hat = T([0.0, 1.0])
    values = torch.stack([losses.expectile_loss(q_hat - v, tau=0.7)[0] for v in grid])
    assert close(grid[values.argmin()], 0.7, tol=1e-3)
