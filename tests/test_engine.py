"""The generation engine: greedy decoding equals model.generate, sampled log-probs equal a recomputed forward pass,
continuous batching leaves every request's tokens as they are alone, the deployment filters on hand-computed
examples, stop strings and max_tokens, and the training rollout draws exactly what the pre-engine sampler drew."""

import math
import threading

import pytest
import torch

from chatrlhf.config import ModelArgs
from chatrlhf.data.template import render
from chatrlhf.engine import Engine, SamplingParams, draw, position_ids, prefill, repetition_penalty, shared_prompts, \
    top_k_filter, top_p_filter
from chatrlhf.models import load_model
from chatrlhf.rollout import encode_prompts, reply_mask

PROMPTS = [[{"role": "user", "content": c}] for c in
           ("Hi", "Where is my order? It was due on Monday and nothing came.", "Reset my password please",
            "Can I change the delivery address?", "Thanks!", "What time do you open tomorrow?")]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


EOS_SCALE = {"tiny-random-llama": 1.5, "tiny-random-gpt2": 4.0}   # rows then end at varied lengths (measured)


def opinionated(name, varied=False):
    """A tiny random model with large weights, so greedy decoding varies from token to token (a default init
    gives near-uniform logits and repeats one token); ``varied``: a larger EOS logit, so rows end at varied
    lengths."""
    eos_scale = EOS_SCALE[name] if varied else 1.0
    model, tok = load_model(ModelArgs(model=name, dtype="float32"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
        model.get_output_embeddings().weight[tok.eos_token_id] *= eos_scale
    return model.eval(), tok


def hf_greedy(model, tok, prompts, max_new_tokens, **kw):
    """model.generate's greedy tokens per prompt, cut after the first EOS."""
    tok.padding_side = "left"
    enc = tok([render(tok, p, add_generation_prompt=True) for p in prompts], return_tensors="pt", padding=True,
              add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, temperature=None, top_k=None, top_p=None, **kw)
    rows = out[:, enc["input_ids"].shape[1]:].tolist()
    return [r[:r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r for r in rows]


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_greedy_equals_model_generate_batched_and_alone(name):
    model, tok = opinionated(name, varied=True)
    engine = Engine(model, tok, "float32")
    batched = [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]
    assert batched == hf_greedy(model, tok, PROMPTS, 12)
    assert len({tuple(t) for t in batched}) > 3 and any(len(set(t)) > 3 for t in batched)  # not a degenerate model
    for p in PROMPTS[:2]:
        assert [c.token_ids for c in engine.generate([p], GREEDY)] == hf_greedy(model, tok, [p], 12)


def test_greedy_with_a_repetition_penalty_equals_model_generate():
    """The penalty covers prompt and reply tokens, as transformers' (one prompt at a time: transformers would also
    penalise the padding token of a left-padded batch)."""
    model, tok = opinionated("tiny-random-llama")
    params = SamplingParams(max_tokens=12, temperature=0, repetition_penalty=3.0)
    changed = 0
    for p in PROMPTS:
        got = Engine(model, tok, "float32").generate([p], params)[0].token_ids
        assert got == hf_greedy(model, tok, [p], 12, repetition_penalty=3.0)[0]
        changed += got != Engine(model, tok, "float32").generate([p], GREEDY)[0].token_ids
    assert changed >= 2   # the penalty mattered


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_sampled_logprobs_equal_a_recomputed_forward_pass(name):
    """Each token's log-prob is log softmax(logits / T) of one full forward pass over prompt + reply, to 1e-5
    (fp32; the KV cache, left padding and dropped rows change only the rounding)."""
    model, tok = opinionated(name, varied=True)
    T = 0.7
    completions = Engine(model, tok, "float32").generate(PROMPTS, SamplingParams(max_tokens=10, temperature=T, seed=0))
    assert len({c.finish_reason for c in completions}) == 2   # some rows ended at EOS, some at max_tokens
    for c in completions:
        prompt = tok(render(tok, PROMPTS[c.prompt_index], add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / T
        expected = torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None]).squeeze(1)
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-5)


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("late", [0, 1])
def test_a_request_submitted_mid_generation_gets_the_tokens_it_gets_alone(k, late):
    """B joins after k steps of A (its KV cache left-padded to A's, or A's to its own); both decode as alone."""
    model, tok = opinionated("tiny-random-llama")
    a_prompt, b_prompt = PROMPTS[1 - late], PROMPTS[late]  # late = 0: the newcomer has the shorter prompt
    params = SamplingParams(max_tokens=10, temperature=0)
    alone = Engine(model, tok, "float32")
    a_alone, b_alone = (alone.generate([p], params)[0].token_ids for p in (a_prompt, b_prompt))
    engine = Engine(model, tok, "float32")
    a = engine.submit(a_prompt, params)
    for _ in range(k):
        engine.step()
    b = engine.submit(b_prompt, params)
    engine.step()
    assert engine.running == 2 and len(a.token_ids) == k + 1 and len(b.token_ids) == 1
    while not (a.finished and b.finished):
        engine.step()
    assert a.token_ids == a_alone and b.token_ids == b_alone
    assert engine.running == 0


def test_generate_with_fewer_rows_than_prompts_refills_the_batch():
    model, tok = opinionated("tiny-random-llama", varied=True)
    want = [c.token_ids for c in Engine(model, tok, "float32").generate(PROMPTS, GREEDY)]
    got = [c.token_ids for c in Engine(model, tok, "float32", max_batch=2).generate(PROMPTS, GREEDY)]
    assert got == want


def test_background_loop_serves_requests_from_threads():
    model, tok = opinionated("tiny-random-llama")
    want = [c.token_ids for c in Engine(model, tok, "float32").generate(PROMPTS[:3], GREEDY)]
    engine = Engine(model, tok, "float32").start()
    try:
        got = [None] * 3

        def ask(i):
            got[i] = engine.submit(PROMPTS[i], GREEDY).wait(timeout=60).token_ids

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.stop()
    assert got == want


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = repetition_penalty(logits, seen, torch.tensor([[2.0]]))
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]   # 2 / 2, −1 · 2, unseen unchanged


def test_top_k_hand_computed():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    out = top_k_filter(logits, torch.tensor([2, 0]))
    inf = float("-inf")
    assert out.tolist() == [[inf, 4.0, 3.0, inf], [1.0, 4.0, 3.0, 2.0]]   # k = 0 is off


def test_top_p_hand_computed():
    # probabilities 0.1, 0.2, 0.3, 0.4: ascending cumulative 0.1, 0.3, 0.6, 1.0
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log().expand(3, 4)
    out = top_p_filter(logits, torch.tensor([[0.65], [0.75], [1.0]]))
    kept = (out > float("-inf")).tolist()
    assert kept[0] == [False, False, True, True]    # drop cumulative ≤ 0.35: 0.1 and 0.3 → the top two (0.7)
    assert kept[1] == [False, True, True, True]     # drop ≤ 0.25: 0.1 only → 0.9
    assert kept[2] == [True, True, True, True]      # off
    lp = torch.log_softmax(out[0], -1)
    assert math.isclose(float(lp[3].exp()), 0.4 / 0.7, rel_tol=1e-6)


def test_filters_shape_the_distribution_drawn_from():
    """top-k 2 at T = 1 on probabilities (0.1, 0.2, 0.3, 0.4): the draws follow 3/7, 4/7 and the recorded
    log-probs are those of the renormalised distribution."""
    from chatrlhf.engine import RowParams, next_tokens

    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(20000, 4)
    rows = RowParams.of([SamplingParams(top_k=2)] * 20000, "cpu")
    token, lp = next_tokens(logits, rows, None, torch.Generator().manual_seed(0))
    freq = torch.bincount(token, minlength=4).float() / 20000
    assert freq[:2].tolist() == [0.0, 0.0] and abs(float(freq[3]) - 4 / 7) < 0.012   # 3.4 standard errors
    assert torch.allclose(lp[token == 3].exp(), torch.tensor(4 / 7))


def test_stop_strings_cut_the_text_and_max_tokens_gives_length():
    model, tok = opinionated("tiny-random-llama")
    full = Engine(model, tok, "float32").generate(PROMPTS[:1], SamplingParams(max_tokens=12, temperature=0))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip() and len(stop) == 3
    cut = Engine(model, tok, "float32").generate(PROMPTS[:1], SamplingParams(max_tokens=12, temperature=0,
                                                                             stop=["never there", stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < 12


def test_n_completions_share_one_prefill():
    model, tok = opinionated("tiny-random-llama")
    engine = Engine(model, tok, "float32")
    greedy = engine.generate(PROMPTS[:2], SamplingParams(max_tokens=6, temperature=0, n=3))
    assert [c.prompt_index for c in greedy] == [0, 0, 0, 1, 1, 1]
    assert greedy[0].token_ids == greedy[1].token_ids == greedy[2].token_ids != greedy[3].token_ids
    sampled = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=6, temperature=1.0, n=4, seed=0))
    assert len({tuple(c.token_ids) for c in sampled}) > 1
    again = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=6, temperature=1.0, n=4, seed=0))
    assert [c.token_ids for c in again] == [c.token_ids for c in sampled]


def test_bad_params_and_prompts_are_named():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    model, tok = opinionated("tiny-random-llama")
    with pytest.raises(TypeError, match="list of messages"):
        Engine(model, tok).generate(["a plain string"])


# ----------------------------------------------------------------------------- the training rollout


@torch.no_grad()
def pre_engine_sample(model, query_ids, query_mask, max_new_tokens, temperature, eos_id, pad_id, compact_fraction,
                      generator):
    """The rollout sampler as it was before the engine (rollout.sample at commit 7b766b9, fp32 path), kept as the
    reference the engine must reproduce draw for draw."""
    device = query_ids.device
    B, R = query_ids.shape[0], max_new_tokens
    out_ids = torch.full((B, R), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros((B, R), device=device)
    live = torch.arange(B, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    mask = query_mask.clone()
    pos = position_ids(mask)[:, -1]
    out = prefill(model, query_ids, mask, shared_prompts(query_ids, mask), logits_to_keep=1)
    cache, logits = out.cache, out.logits[:, -1]
    for t in range(R):
        logp = torch.log_softmax(logits.float() / temperature, -1)
        token = draw(logp, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        keep = ~done
        out_ids[live[keep], t] = token[keep]
        out_lp[live[keep], t] = logp.gather(1, token[:, None]).squeeze(1)[keep]
        done = done | (token == eos_id)
        if t == R - 1 or bool(done.all()):
            break
        if int(done.sum()) >= max(1, compact_fraction * len(live)):
            idx = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(idx)
            live, done, mask, pos, token = live[idx], done[idx], mask[idx], pos[idx], token[idx]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos[:, None], cache=cache,
                    use_cache=True)
        logits = out.logits[:, -1]
    return out_ids, reply_mask(out_ids, eos_id), out_lp


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
@pytest.mark.parametrize("compact", [0.25, 2.0])
def test_rollout_tensors_are_bit_for_bit_those_of_the_pre_engine_sampler(name, compact):
    model, tok = opinionated(name, varied=True)
    q, qm = encode_prompts(tok, [p for p in PROMPTS for _ in range(2)], 64, "cpu")   # shared prompts too
    want = pre_engine_sample(model, q, qm, 16, 0.7, tok.eos_token_id, tok.pad_token_id, compact,
                             torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    got = Engine(model, tok, "float32", compact_fraction=compact).sample_tensors(q, qm, SamplingParams(16, 0.7), gen)
    assert len(set(want[1].sum(1).tolist())) > 2   # rows ended at different lengths
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and torch.equal(w, g)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(5).get_state()) is False
    after = torch.Generator().manual_seed(5)
    pre_engine_sample(model, q, qm, 16, 0.7, tok.eos_token_id, tok.pad_token_id, compact, after)
    assert torch.equal(gen.get_state(), after.get_state())   # the stream moved by exactly as many draws


def test_a_failing_step_reaches_every_waiting_caller():
    model, tok = opinionated("tiny-random-llama")
    engine = Engine(model, tok, "float32").start()
    try:
        engine._forward = lambda **kw: (_ for _ in ()).throw(ValueError("out of memory, say"))
        with pytest.raises(RuntimeError, match="step loop failed: out of memory, say"):
            engine.submit(PROMPTS[0], GREEDY).wait(timeout=60)
        assert engine.running == 0
    finally:
        engine.stop()


def test_ignore_eos_keeps_going_to_max_tokens():
    model, tok = opinionated("tiny-random-llama", varied=True)
    params = SamplingParams(max_tokens=8, temperature=0)
    ended = Engine(model, tok, "float32").generate(PROMPTS, params)
    assert any(c.finish_reason == "stop" and c.token_ids[-1] == tok.eos_token_id for c in ended)
    params.ignore_eos = True
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length"
               for c in Engine(model, tok, "float32").generate(PROMPTS, params))


def test_a_batch_that_never_empties_does_not_keep_growing():
    """Requests joining and leaving a running batch: once the first rows have left, the columns only they used
    leave the cache too, and the later requests still decode as alone."""
    model, tok = opinionated("tiny-random-llama")
    short, long = SamplingParams(max_tokens=3, temperature=0), SamplingParams(max_tokens=12, temperature=0)
    alone = Engine(model, tok, "float32").generate(PROMPTS[3:4], long)[0].token_ids
    engine = Engine(model, tok, "float32", compact_fraction=0.5)
    first = engine.submit(PROMPTS[1], short)    # the longest prompt
    engine.step()
    later = engine.submit(PROMPTS[3], long)
    while len(first.token_ids) < 2:
        engine.step()
    width = engine._batch.mask.shape[1]
    engine.step()                                # first ends and leaves the batch: its prompt's columns with it
    assert first.finished and engine.running == 1 and engine._batch.mask.shape[1] < width
    assert engine._batch.mask.shape[1] == engine._batch.cache.layers[0].keys.shape[2]
    while not later.finished:
        engine.step()
    assert later.token_ids == alone


# --------------------------------------------------------------------------- what the server needs (serve/)


def test_on_token_sees_every_token_then_the_finish():
    model, tok = opinionated("tiny-random-llama")
    engine = Engine(model, tok, "float32")
    seen = []
    r = engine.submit(PROMPTS[1], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                      on_token=lambda req: seen.append((len(req.token_ids), req.finish_reason)))
    while not r.finished:
        engine.step()
    assert seen == [(1, None), (2, None), (3, None), (4, None), (5, "length")]


def test_cancel_ends_a_running_and_a_waiting_request():
    model, tok = opinionated("tiny-random-llama")
    engine = Engine(model, tok, "float32", max_batch=1)
    long = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    running, queued, other = (engine.submit(PROMPTS[i], long) for i in range(3))
    engine.step()
    engine.step()
    engine.cancel(queued)
    assert queued.finish_reason == "cancelled" and engine.waiting == 1   # off the queue at once
    engine.cancel(running)
    engine.step()   # the cancelled row gets no more tokens and leaves: the next request takes its place
    assert running.finish_reason == "cancelled" and len(running.token_ids) == 2 and running.wait().text == running.text
    engine.step()
    assert engine.running == 1 and len(other.token_ids) == 1 and engine.waiting == 0


def test_a_request_with_its_own_generator_samples_the_same_reply_in_any_batch():
    model, tok = opinionated("tiny-random-llama")
    hot = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)

    def reply(neighbours: int) -> list[int]:
        engine = Engine(model, tok, "float32")
        others = [engine.submit(PROMPTS[2 + i], hot) for i in range(neighbours)]
        r = engine.submit(PROMPTS[0], hot, generator=torch.Generator().manual_seed(7))
        engine._finish([r, *others], None)
        return r.token_ids

    alone = reply(0)
    assert reply(3) == alone and reply(1) == alone
    engine = Engine(model, tok, "float32")
    r = engine.submit(PROMPTS[0], hot, generator=torch.Generator().manual_seed(8))
    engine._finish([r], None)
    assert r.token_ids != alone
