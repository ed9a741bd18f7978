"""qnet.py: reply features φ(h, y) on a tiny random model (batched = alone, shared history = not shared, the cache
embeds each pair once), the Q heads and their targets, the replay buffer (exact resume, wrap-around) and q_update
learning a bandit and a 3-state chain whose Q-values are worked out by hand."""

import copy

import pytest
import torch

from chatrlhf.qnet import NORM_KEYS, SCALE_KEY, FeatureCache, QHeads, ReplayBuffer, dueling_q, fqi_update, load_qheads, \
    q_update, reply_features, ridge_cv, ridge_solve, save_qheads
from chatrlhf.rollout import generator

H1 = [{"role": "user", "content": "my order never arrived"}]
H2 = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
      {"role": "user", "content": "what is the refund policy for damaged goods?"}]
REPLIES = ["sorry, what is the order number?", "ok", "Refunds take 5 days.", "Please send a photo of the damage."]


@pytest.fixture(scope="module")
def tiny():
    from chatrlhf.config import ModelArgs
    from chatrlhf.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(ModelArgs(model="tiny-random-llama", dtype="float32"))
    return model, tok


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_features_in_a_batch_equal_features_alone(tiny, pooling):
    model, tok = tiny
    hs = [H1, H2, H1, H2]
    together = reply_features(model, tok, hs, REPLIES, pooling=pooling, batch_size=8)
    alone = torch.cat([reply_features(model, tok, [h], [y], pooling=pooling) for h, y in zip(hs, REPLIES)])
    assert together.shape == (4, model.config.hidden_size) and together.dtype == torch.float32
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(together[0], together[2])  # the reply matters
    assert not torch.allclose(reply_features(model, tok, [H2], [REPLIES[0]], pooling=pooling), alone[:1])  # so does h


def test_features_are_the_trunk_state_at_the_reply_end_of_one_plain_forward_pass(tiny):
    """By hand: history rendered with the generation prompt, reply tokens + EOS appended, one trunk pass; φ_last
    is the state at EOS, φ_mean the mean over the reply's tokens (EOS included)."""
    from chatrlhf.data.template import render

    model, tok = tiny
    prompt = tok(render(tok, H2, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    reply = tok(REPLIES[3], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        hidden = model.base_model(input_ids=torch.tensor([prompt + reply])).last_hidden_state[0]
    phi = reply_features(model, tok, [H2, H1], [REPLIES[3], REPLIES[0]])
    torch.testing.assert_close(phi[0], hidden[-1], atol=1e-4, rtol=1e-4)
    mean = reply_features(model, tok, [H2], [REPLIES[3]], pooling="mean")
    torch.testing.assert_close(mean[0], hidden[len(prompt):].mean(0), atol=1e-4, rtol=1e-4)


def test_a_shared_history_is_prefilled_once_and_gives_the_same_features(tiny, monkeypatch):
    import chatrlhf.rollout as rollout

    model, tok = tiny
    calls = []
    real = rollout.prefill
    monkeypatch.setattr(rollout, "prefill", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    shared = reply_features(model, tok, [H2] * 4, REPLIES)  # one history, four candidates
    assert len(calls) == 1 and calls[0] is not None and len(calls[0][0]) == 1  # one distinct prompt row
    not_shared = torch.cat([reply_features(model, tok, [H2], [y]) for y in REPLIES])
    torch.testing.assert_close(shared, not_shared, atol=1e-4, rtol=1e-4)


def test_features_leave_the_model_as_they_found_it(tiny):
    model, tok = tiny
    model.train()
    phi = reply_features(model, tok, [H1], ["x"])
    assert model.training and not phi.requires_grad
    model.eval()
    with pytest.raises(ValueError, match="pooling"):
        reply_features(model, tok, [H1], ["x"], pooling="max")


def test_the_cache_embeds_each_pair_once(tiny):
    model, tok = tiny
    trunk_calls = []
    hook = model.base_model.register_forward_hook(lambda *a: trunk_calls.append(1))
    try:
        cache = FeatureCache("tiny-random-llama")
        first = cache.features(model, tok, [H1, H2, H1], [REPLIES[0], REPLIES[1], REPLIES[0]])
        n_first = len(trunk_calls)
        assert n_first >= 1 and len(cache) == 2
        again = cache.features(model, tok, [H2, H1], [REPLIES[1], REPLIES[0]])
        assert len(trunk_calls) == n_first  # nothing embedded the second time
        torch.testing.assert_close(again, first[[1, 0]])
        restored = FeatureCache("tiny-random-llama")
        restored.load_state_dict(cache.state_dict())
        torch.testing.assert_close(restored.features(model, tok, [H1], [REPLIES[0]]), first[:1])
        assert len(trunk_calls) == n_first
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="re-embed"):
        FeatureCache("another-model").load_state_dict(cache.state_dict())


# ----------------------------------------------------------------------------- heads


def test_soft_update_moves_the_targets_by_tau_and_hard_update_copies():
    torch.manual_seed(0)
    heads = QHeads(3, n_heads=2, hidden=4)
    for p in heads.online.parameters():
        torch.nn.init.constant_(p, 1.0)
    for p in heads.targets.parameters():
        torch.nn.init.constant_(p, 3.0)
    heads.soft_update(0.5)  # (1 − ½)·3 + ½·1 = 2
    assert all(torch.equal(p, torch.full_like(p, 2.0)) for p in heads.targets.parameters())
    heads.soft_update(0.25)  # ¾·2 + ¼·1 = 1.75
    assert all(torch.equal(p, torch.full_like(p, 1.75)) for p in heads.targets.parameters())
    heads.hard_update()
    phi = torch.randn(5, 3)
    assert torch.equal(heads.target(phi), heads(phi).detach())
    with pytest.raises(ValueError):
        heads.soft_update(1.5)


def test_targets_have_no_grad_and_heads_start_apart():
    torch.manual_seed(0)
    heads = QHeads(6)
    phi = torch.randn(7, 6)
    q, qt = heads(phi), heads.target(phi)
    assert q.shape == qt.shape == (2, 7)
    assert q.requires_grad and not qt.requires_grad
    assert not any(p.requires_grad for p in heads.targets.parameters())
    assert not torch.allclose(q[0], q[1])  # two heads initialised apart (clipped double Q needs two opinions)
    torch.testing.assert_close(qt, q.detach())  # targets start as copies
    # a checkpoint holds both, the φ standardiser's moments and the column scale (ones but for --features both)
    assert {k.split(".")[0] for k in heads.state_dict()} == {"online", "targets", *NORM_KEYS, SCALE_KEY}
    assert heads.feature_scale.tolist() == [1.0] * 6


def test_the_phi_standardiser_uses_the_running_moments_of_what_it_observed():
    heads = QHeads(2, hidden=4)
    phi = torch.tensor([[5.0, 10.0]])
    torch.testing.assert_close(heads.standardise(phi), phi)  # identity before anything is observed
    heads.observe(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    heads.observe(torch.tensor([[5.0, 10.0]]))  # all rows: 1, 3, 5 → mean 3, std 2; 2, 6, 10 → mean 6, std 4
    torch.testing.assert_close(heads.phi_mean, torch.tensor([3.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(heads.standardise(phi), torch.tensor([[1.0, 1.0]]))
    heads.observe(torch.zeros(0, 2))  # nothing to fold in
    assert float(heads.phi_count) == 3
    # the heads read standardised φ: a head that is the identity on dim 0 returns (φ_0 − 3) / 2
    with torch.no_grad():
        for h in heads.online:
            h[0].weight.zero_(), h[0].bias.zero_(), h[2].weight.fill_(1.0), h[2].bias.zero_()
            h[0].weight[0, 0] = 1.0
    torch.testing.assert_close(heads(torch.tensor([[9.0, 0.0]])), torch.tensor([[3.0], [3.0]]))


def test_saved_heads_keep_their_standardiser_and_older_files_load_as_identity(tmp_path):
    torch.manual_seed(0)
    heads = QHeads(3, hidden=4)
    heads.observe(torch.randn(10, 3) * 50 + 7)
    save_qheads(heads, tmp_path / "a", "tiny", "last")
    back, meta = load_qheads(tmp_path / "a")
    phi = torch.randn(4, 3)
    torch.testing.assert_close(back(phi), heads(phi).detach())
    from safetensors.torch import load_file, save_file  # an older file: no standardiser, no scale

    old = {k: v for k, v in load_file(tmp_path / "a" / "qheads.safetensors").items() if k not in (*NORM_KEYS, SCALE_KEY)}
    save_file(old, tmp_path / "a" / "qheads.safetensors")
    back, _ = load_qheads(tmp_path / "a")
    torch.testing.assert_close(back.standardise(phi), phi)


# ----------------------------------------------------------------------------- replay buffer


def fill(buffer, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        k = int(torch.randint(0, buffer.k + 1, (1,), generator=g))
        buffer.add(torch.randn(buffer.d, generator=g), reward=float(i), terminated=k == 0,
                   next_phi=torch.randn(k, buffer.d, generator=g), truncated=i % 5 == 4)


def test_a_restored_buffer_and_generator_sample_the_same_batches():
    buffer = ReplayBuffer(50, d=3, k=4)
    fill(buffer, 30)
    g = generator(7)
    state, g_state = buffer.state_dict(), g.get_state()
    before = [buffer.sample(8, g) for _ in range(3)]
    fresh = ReplayBuffer(50, d=3, k=4)
    fresh.load_state_dict(state)
    g2 = torch.Generator()
    g2.set_state(g_state)
    after = [fresh.sample(8, g2) for _ in range(3)]
    for a, b in zip(before, after):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    # and the restored buffer keeps filling where the old one would
    fill(buffer, 3, seed=1)
    fill(fresh, 3, seed=1)
    assert all(torch.equal(buffer.data[n], fresh.data[n]) for n in buffer.data)


def test_the_ring_overwrites_the_oldest_transition():
    buffer = ReplayBuffer(4, d=2, k=2)
    for i in range(6):
        buffer.add(torch.full((2,), float(i)), reward=float(i), terminated=True)
    assert len(buffer) == 4 and buffer.pos == 2
    assert sorted(buffer.data["reward"].tolist()) == [2.0, 3.0, 4.0, 5.0]  # 0 and 1 overwritten
    batch = buffer.sample(64, generator(0))
    assert set(batch["reward"].tolist()) <= {2.0, 3.0, 4.0, 5.0}
    assert batch["next_phi"].shape == (64, 2, 2) and not batch["next_valid"].any()


def test_next_candidates_are_padded_with_a_mask_and_bad_input_is_named():
    buffer = ReplayBuffer(3, d=2, k=3, candidates=True)
    buffer.add(torch.ones(2), 1.0, False, next_phi=torch.ones(2, 2), cand_phi=torch.ones(3, 2), taken=2,
               log_behavior=torch.tensor([-1.0, -2.0, -3.0]))
    b = buffer.sample(1, generator(0))
    assert b["next_valid"].tolist() == [[True, True, False]] and b["next_phi"][0, 2].abs().sum() == 0
    assert b["cand_valid"].tolist() == [[True, True, True]] and b["taken"].tolist() == [2]
    with pytest.raises(ValueError, match="at most k"):
        buffer.add(torch.ones(2), 1.0, False, next_phi=torch.ones(4, 2), cand_phi=torch.ones(1, 2), taken=0)
    with pytest.raises(ValueError, match="cand_phi"):
        buffer.add(torch.ones(2), 1.0, False)
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(2, 2, 2).sample(1, generator(0))
    with pytest.raises(ValueError, match="checkpoint"):
        ReplayBuffer(5, 2, 3, candidates=True).load_state_dict(buffer.state_dict())


# ----------------------------------------------------------------------------- learning


def test_a_bandit_is_learned_q_matches_the_rewards_and_argmax_is_the_best_reply():
    """γ = 0, four candidate replies with one-hot features and fixed rewards: Q → r, argmax → the best."""
    torch.manual_seed(0)
    rewards = torch.tensor([0.2, -0.5, 0.9, 0.4])
    eye = torch.eye(4)
    buffer = ReplayBuffer(256, d=4, k=4, candidates=True)
    g = generator(0)
    for _ in range(256):
        a = int(torch.randint(4, (1,), generator=g))
        buffer.add(eye[a], float(rewards[a]), terminated=True, cand_phi=eye, taken=a)
    heads = QHeads(4, hidden=32)
    opt = torch.optim.Adam(heads.online.parameters(), lr=1e-2)
    first = q_update(heads, opt, buffer.sample(64, g), gamma=0.0)
    for _ in range(200):
        last = q_update(heads, opt, buffer.sample(64, g), gamma=0.0, cql_alpha=0.0)
        heads.soft_update(0.05)
    q = heads(eye).detach()
    assert int(q[0].argmax()) == 2 and int(q[1].argmax()) == 2
    torch.testing.assert_close(q, rewards.expand(2, 4), atol=0.05, rtol=0)
    assert last["loss/td"] < first["loss/td"] / 10
    assert {"loss/td", "loss/total", "q/grad_norm", "q/taken_mean", "q/target_mean"} <= set(last)


def test_cql_pushes_unseen_candidates_down():
    """Only candidate 0 is ever taken (r = 1); with α > 0 the untaken candidates end below it."""
    torch.manual_seed(0)
    eye = torch.eye(3)
    buffer = ReplayBuffer(8, d=3, k=3, candidates=True)
    for _ in range(8):
        buffer.add(eye[0], 1.0, True, cand_phi=eye, taken=0)
    heads = QHeads(3, hidden=16)
    opt = torch.optim.Adam(heads.online.parameters(), lr=1e-2)
    for _ in range(100):
        m = q_update(heads, opt, buffer.sample(8, generator(1)), gamma=0.0, cql_alpha=1.0)
    q = heads(eye).detach()
    assert "loss/cql" in m and (q[:, 1:] < q[:, :1] - 0.5).all()


def test_a_three_state_chain_learns_r_plus_gamma_r_next():
    """s0 --A (r = 1)--> s1 --C (r = 2)--> s2 (terminal); s0 --B (r = 0)--> end; s1 --D (r = 0.5)--> end.
    By hand, γ = 0.9: Q(s1, C) = 2, Q(s1, D) = 0.5, Q(s0, A) = 1 + 0.9·max(2, 0.5) = 2.8, Q(s0, B) = 0."""
    torch.manual_seed(0)
    A, B, C, D = torch.eye(4)
    s1 = torch.stack([C, D])
    buffer = ReplayBuffer(16, d=4, k=2)
    buffer.add(A, 1.0, terminated=False, next_phi=s1)
    buffer.add(B, 0.0, terminated=True)
    buffer.add(C, 2.0, terminated=True)
    buffer.add(D, 0.5, terminated=True)
    heads = QHeads(4, hidden=32)
    opt = torch.optim.Adam(heads.online.parameters(), lr=1e-2)
    g = generator(0)
    for _ in range(400):
        q_update(heads, opt, buffer.sample(32, g), gamma=0.9, reward_range=(0.0, 2.0))
        heads.soft_update(0.05)
    q = heads(torch.stack([A, B, C, D])).detach()
    torch.testing.assert_close(q, torch.tensor([2.8, 0.0, 2.0, 0.5]).expand(2, 4), atol=0.1, rtol=0)


def test_truncation_still_bootstraps_and_termination_does_not():
    heads = QHeads(2, hidden=4)
    for p in heads.targets.parameters():
        torch.nn.init.zeros_(p)
    with torch.no_grad():
        heads.targets[0][2].bias.fill_(5.0)
        heads.targets[1][2].bias.fill_(3.0)
    opt = torch.optim.SGD(heads.online.parameters(), lr=0.0)
    batch = {"phi": torch.zeros(2, 2), "reward": torch.tensor([1.0, 1.0]), "terminated": torch.tensor([False, True]),
             "truncated": torch.tensor([True, False]), "next_phi": torch.zeros(2, 1, 2),
             "next_valid": torch.tensor([[True], [True]])}
    m = q_update(heads, opt, batch, gamma=0.5)
    # y = [1 + 0.5·min(5, 3), 1] = [2.5, 1]
    assert m["q/target_mean"] == pytest.approx(1.75)


def test_q_learning_resumes_exactly_from_state_dicts():
    """Heads (targets included), optimizer, buffer and sampling stream saved mid-run and restored into fresh
    objects: the next updates give bit-identical weights — what the qlearn trainer's --resume rests on."""
    def make():
        torch.manual_seed(0)
        heads = QHeads(4, hidden=8)
        return heads, torch.optim.Adam(heads.online.parameters(), lr=1e-2), ReplayBuffer(32, d=4, k=3)

    def steps(heads, opt, buffer, g, n):
        for _ in range(n):
            q_update(heads, opt, buffer.sample(8, g), gamma=0.9)
            heads.soft_update(0.1)

    heads, opt, buffer = make()
    fill(buffer, 20)
    g = generator(3)
    steps(heads, opt, buffer, g, 5)
    saved = {"heads": copy.deepcopy(heads.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
             "buffer": buffer.state_dict(), "g": g.get_state()}
    steps(heads, opt, buffer, g, 5)

    heads2, opt2, buffer2 = make()
    heads2.load_state_dict(saved["heads"])
    opt2.load_state_dict(saved["opt"])
    buffer2.load_state_dict(saved["buffer"])
    g2 = torch.Generator()
    g2.set_state(saved["g"])
    steps(heads2, opt2, buffer2, g2, 5)
    for (name, a), b in zip(heads.state_dict().items(), heads2.state_dict().values()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- fitted Q iteration


def test_ridge_solve_matches_the_hand_computed_line():
    """x = 0, 1, 2 and y = 1, 3, 5. Centred: x − 1 = (−1, 0, 1), y − 3 = (−2, 0, 2), so w = Σxy / (Σx² + λ) = 4 / (2 + λ):
    λ = 0 → w = 2, b = 3 − 2·1 = 1;  λ = 2 → w = 1, b = 3 − 1·1 = 2 (the bias is not shrunk)."""
    x, y = torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([1.0, 3.0, 5.0])
    for lam, (w_hand, b_hand) in ((0.0, (2.0, 1.0)), (2.0, (1.0, 2.0))):
        w, b = ridge_solve(x, y, lam)
        assert float(w[0]) == pytest.approx(w_hand) and b == pytest.approx(b_hand)


def test_ridge_cv_shrinks_little_on_a_clean_signal_and_much_on_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 8, generator=g)
    clean = x @ torch.arange(1.0, 9.0)
    lam, errors = ridge_cv(x, clean, (0.01, 100.0, 1e4))
    assert lam == 0.01 and errors[0.01] < errors[100.0] < errors[1e4]
    lam, _ = ridge_cv(x, torch.randn(120, generator=g), (0.01, 100.0, 1e4))
    assert lam == 1e4  # y independent of x: predicting the mean is best
    assert ridge_cv(x[:2], clean[:2], (5.0, 7.0)) == (5.0, {})  # too few rows to hold any out


def test_fqi_solves_the_three_state_chain_in_two_iterations():
    """The chain of test_a_three_state_chain_learns_r_plus_gamma_r_next (state 0 offers A, B; state 1 offers C, D),
    by fitted Q iteration with (almost) no shrinkage: iteration 1 fits Q = r + γ·Q_0(s1, ·) with Q_0 the random
    initial heads, so only the terminal rewards are right; iteration 2 reads Q_1(s1, C) = 2, so Q(s0, A) =
    1 + 0.9·2 = 2.8 exactly, Q(s0, B) = 0. Q of a set is V(its mean φ) + A − mean A (dueling_q); A alone ranks."""
    torch.manual_seed(0)
    A, B, C, D = torch.eye(4)
    buffer = ReplayBuffer(16, d=4, k=2)
    buffer.add(A, 1.0, terminated=False, next_phi=torch.stack([C, D]), state=0)
    buffer.add(B, 0.0, terminated=True, state=0)
    buffer.add(C, 2.0, terminated=True, state=1)
    buffer.add(D, 0.5, terminated=True, state=1)
    sets, valid = torch.stack([torch.stack([A, B]), torch.stack([C, D])]), torch.ones(2, 2, dtype=torch.bool)
    heads = QHeads(4, n_heads=2, hidden=0, value=True)
    m = fqi_update(heads, buffer, gamma=0.9, lambdas=(1e-9,))
    torch.testing.assert_close(dueling_q(heads, sets, valid)[:, 1:], torch.tensor([[0.0], [0.5]]), atol=1e-4, rtol=0)
    assert float(dueling_q(heads, sets, valid)[1, 0]) == pytest.approx(2.0, abs=1e-4)
    fqi_update(heads, buffer, gamma=0.9, lambdas=(1e-9,))
    q = dueling_q(heads, sets, valid)
    torch.testing.assert_close(q, torch.tensor([[2.8, 0.0], [2.0, 0.5]]), atol=1e-4, rtol=0)
    a = heads(torch.stack([A, B, C, D])).detach()
    assert (a[:, 0] > a[:, 1]).all() and (a[:, 2] > a[:, 3]).all()  # the heads alone rank within a state
    assert m["fqi/rows"] == 4 and m["fqi/states"] == 2 and m["fqi/lambda"] == 1e-9


def test_fqi_needs_linear_heads_and_linear_heads_save_and_load(tmp_path):
    buffer = ReplayBuffer(4, d=3, k=1)
    buffer.add(torch.ones(3), 1.0, terminated=True)
    for bad in (QHeads(3, hidden=4, value=True), QHeads(3, hidden=0)):
        with pytest.raises(ValueError, match="hidden=0, value=True"):
            fqi_update(bad, buffer, gamma=0.0)
    heads = QHeads(3, hidden=0, value=True)
    save_qheads(heads, tmp_path, "m", "mean")
    loaded, meta = load_qheads(tmp_path)
    assert meta["hidden"] == 0 and torch.equal(loaded(torch.ones(2, 3)), heads(torch.ones(2, 3)).detach())
