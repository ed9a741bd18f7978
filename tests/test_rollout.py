"""Rollout sampling: left padding, EOS per row, cache compaction, log-probs at the sampling temperature."""

import copy

import pytest
import torch

from chatrlhf import losses
from chatrlhf.config import ModelArgs
from chatrlhf.engine import Engine, SamplingParams, draw, shared_prompts
from chatrlhf.models import load_model
from chatrlhf.rollout import Rollout, encode_prompts, policy_forward, reply_hidden, reply_mask, trunk_and_head

PROMPTS = [[{"role": "user", "content": c}] for c in
           ("Hi", "Where is my order? It was due on Monday and nothing came.", "Reset my password please",
            "Can I change the delivery address?", "Thanks!", "What time do you open tomorrow?")]


def eos_happy(name):
    """A tiny random model whose EOS logit is large in many contexts, so rows end at varied lengths."""
    model, tok = load_model(ModelArgs(model=name, dtype="float32"))
    with torch.no_grad():
        model.get_output_embeddings().weight[tok.eos_token_id] *= 25
    return model.eval(), tok


def sample(model, tok, q, qm, max_new_tokens, temperature, dtype, compact_fraction=0.25):
    """The rollout through the engine (rollout.sample before the engine)."""
    engine = Engine(model, tok, dtype, compact_fraction=compact_fraction)
    return engine.sample_tensors(q, qm, SamplingParams(max_new_tokens, temperature))


def test_reply_mask_hand_computed():
    eos = 9
    ids = torch.tensor([[4, 5, 9, 3, 3], [4, 3, 5, 6, 7], [9, 3, 3, 3, 3]])  # 3 = pad, sampled mid-reply in row 1
    assert reply_mask(ids, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
@pytest.mark.parametrize("compact", [0.25, 2.0])  # 2.0 = never drop finished rows
def test_sampled_logprobs_equal_recomputed_ones(name, compact):
    """Left padding, position ids, the KV cache and dropping finished rows from it must give exactly
    the log-probs that one full forward pass gives (fp32)."""
    torch.manual_seed(0)
    model, tok = eos_happy(name)
    q, qm = encode_prompts(tok, PROMPTS * 3, 64, "cpu")
    assert (qm[:, 0] == 0).any() and (qm[:, -1] == 1).all()  # left-padded
    ids, mask, sample_lp = sample(model, tok, q, qm, 24, 0.7, "float32", compact)
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 3, "rows should end at different lengths"
    ended = (ids == tok.eos_token_id).any(1)
    assert ended.any()
    for i in range(len(ids)):  # after EOS only padding; without EOS the reply fills R
        n = int(lengths[i])
        assert (ids[i, n:] == tok.pad_token_id).all()
        assert bool(ended[i]) == (int(ids[i, n - 1]) == tok.eos_token_id) or n == 24
    r = Rollout(q, qm, ids, mask, *[None] * 7)
    with torch.no_grad():
        lp, _, _ = policy_forward(model, r, 0.7)
    assert torch.allclose(lp * mask, sample_lp * mask, atol=1e-5)


def test_kl_to_reference_is_zero_at_step_zero_with_temperature():
    """The classic temperature bug: log-probs recomputed without dividing by T differ from the
    sampler's, so KL(π‖π_ref) at step 0 is not 0. Here it must be 0 within 1e-5, T = 0.7."""
    torch.manual_seed(1)
    policy, tok = eos_happy("tiny-random-llama")
    ref = copy.deepcopy(policy)
    q, qm = encode_prompts(tok, PROMPTS, 64, "cpu")
    ids, mask, sample_lp = sample(policy, tok, q, qm, 16, 0.7, "float32")
    r = Rollout(q, qm, ids, mask, *[None] * 7)
    with torch.no_grad():
        ref_lp, _, _ = policy_forward(ref, r, 0.7)
        wrong_lp, _, _ = policy_forward(ref, r, 1.0)
    kl = losses.kl_estimates(sample_lp, ref_lp)["k1"]
    assert abs(float(losses.masked_mean(kl, mask))) < 1e-5
    assert float(losses.masked_mean(losses.kl_estimates(sample_lp, wrong_lp)["k3"], mask)) > 1e-3  # 100× the tolerance


def test_select_picks_rows_of_every_field():
    B, R = 4, 3
    t = torch.arange(B * R, dtype=torch.float32).view(B, R)
    r = Rollout(t.long(), t.long(), t.long(), t.long(), t, t, t, t[:, 0], t, t, t, prompts=list("abcd"),
                texts=list("wxyz"), ended=torch.tensor([True, False, True, False]))
    mb = r.select(torch.tensor([2, 0]))
    assert mb.texts == ["y", "w"] and mb.prompts == ["c", "a"] and mb.ended.tolist() == [True, True]
    assert mb.scores.tolist() == [6.0, 0.0] and len(mb) == 2


def test_plain_text_prompts_for_continuation_tasks_skip_the_template():
    _, tok = load_model(ModelArgs(model="tiny-random-llama"), chat_template=False)
    p = [{"role": "user", "content": "The movie was"}]
    q, qm = encode_prompts(tok, [p], 64, "cpu")
    assert tok.decode(q[0][qm[0].bool()]) == "The movie was"
    _, chat_tok = load_model(ModelArgs(model="tiny-random-llama"))
    q, qm = encode_prompts(chat_tok, [p], 64, "cpu")
    text = chat_tok.decode(q[0][qm[0].bool()])
    assert "<|im_start|>" in text and text.rstrip().endswith("assistant")


def test_draw_follows_the_distribution_and_never_picks_impossible_tokens():
    torch.manual_seed(0)
    p = torch.tensor([[0.5, 0.0, 0.2, 0.3], [0.0, 0.0, 1.0, 0.0]])
    logp = p.log().expand(20000, 2, 4).reshape(-1, 4)  # rows alternate between the two distributions
    tokens = draw(logp).view(20000, 2)
    freq = torch.stack([torch.bincount(tokens[:, j], minlength=4) for j in range(2)]).float() / 20000
    assert freq[1].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert freq[0, 1] == 0
    assert torch.allclose(freq[0], p[0], atol=0.015)  # 4.5 standard errors at n = 20000


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_shared_prompt_pass_equals_one_pass_per_row(name):
    """Rows that share a prompt reuse its KV cache: hidden states and gradients equal those of a separate
    full pass per row (fp32)."""
    torch.manual_seed(0)
    model, tok = load_model(ModelArgs(model=name, dtype="float32"))
    q, qm = encode_prompts(tok, [p for p in PROMPTS[:3] for _ in range(3)], 64, "cpu")
    assert shared_prompts(q, qm)[0].shape[0] == 3
    ids = torch.randint(0, len(tok) - 1, (9, 7))
    mask = reply_mask(ids, tok.eos_token_id)
    trunk, _ = trunk_and_head(model)
    shared = reply_hidden(trunk, q, qm, ids, mask)
    shared.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    rows = torch.cat([reply_hidden(trunk, q[i:i + 1], qm[i:i + 1], ids[i:i + 1], mask[i:i + 1]) for i in range(9)])
    rows.pow(2).mean().backward()
    assert torch.allclose(shared, rows, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_bf16_sampling_with_weight_copies_matches_the_autocast_forward(name):
    """The bf16 decoding path (bf16 copies of the matrices, fp32 norms and input embedding, a bf16 copy of a
    tied LM head) samples from the same distribution the training forward computes, up to bf16 noise."""
    from chatrlhf.models import autocast
    from chatrlhf.engine import low_precision_weights

    torch.manual_seed(0)
    model, tok = eos_happy(name)
    weights = low_precision_weights(model, "bfloat16", "cpu")
    emb = model.get_input_embeddings().weight
    assert any(v.dtype == torch.float32 and v.dim() == 2 for v in weights.values())  # the embedding stays fp32
    assert sum(v.dtype == torch.bfloat16 for v in weights.values()) >= 4
    if model.get_output_embeddings().weight is emb:  # tied: the head gets its own bf16 copy
        assert any(k.endswith("lm_head.weight") and v.dtype == torch.bfloat16 for k, v in weights.items())
    q, qm = encode_prompts(tok, PROMPTS * 2, 64, "cpu")
    ids, mask, sample_lp = sample(model, tok, q, qm, 12, 0.7, "bfloat16")
    r = Rollout(q, qm, ids, mask, *([torch.zeros_like(sample_lp)] * 3), torch.zeros(len(q)),
                *([torch.zeros_like(sample_lp)] * 3))
    with torch.no_grad(), autocast("bfloat16", torch.device("cpu")):
        lp, _, _ = policy_forward(model, r, 0.7)
    gap = float(((sample_lp - lp).abs() * mask).sum() / mask.sum())
    assert 0 < gap < 0.05


def peaked_49k(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs (rows, V) float32, probabilities float64): p(0) = 0.99, tokens 1–9 0.001 each, and 49,142 tail
    tokens sharing 0.001 — 2e-8 each, below half a float32 unit near 1 (3e-8)."""
    V = 49152
    p = torch.full((V,), 0.001 / (V - 10), dtype=torch.float64)
    p[0], p[1:10] = 0.99, 0.001
    return p.log().float()[None].expand(rows, V), p


def test_every_token_of_a_peaked_49k_vocabulary_gets_its_own_probability():
    from chatrlhf.engine import sampling_cdf

    logp, p = peaked_49k(1)
    cdf = sampling_cdf(logp)[0]
    width = torch.diff(cdf, prepend=cdf.new_zeros(1)) / cdf[-1]
    assert bool(((width - p).abs() <= 1e-6 * p).all())
    float32 = torch.diff(logp[0].exp().cumsum(0), prepend=torch.zeros(1)).double()
    assert int((float32 == 0).sum()) > 30000                        # what a float32 CDF did: 32,365 never drawn


@pytest.mark.slow
def test_draw_on_a_peaked_49k_vocabulary_follows_the_distribution():
    n, rows = 24000, 400
    logp, _ = peaked_49k(rows)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.cat([draw(logp, gen) for _ in range(n // rows)])
    counts = torch.tensor([(tokens == 0).sum(), ((tokens >= 1) & (tokens < 10)).sum(), (tokens >= 10).sum()],
                          dtype=torch.float64)
    expected = n * torch.tensor([0.99, 0.009, 0.001], dtype=torch.float64)   # 24 tail draws expected
    assert float(((counts - expected) ** 2 / expected).sum()) < 13.8, (counts, expected)   # χ²(2) at p = 0.001
    singles = torch.bincount(tokens[(tokens >= 1) & (tokens < 10)], minlength=10)[1:].double()
    assert float(((singles - n * 0.001) ** 2 / (n * 0.001)).sum()) < 27.9                 # χ²(8) at p = 0.001
