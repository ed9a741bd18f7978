"""Training rollouts: batched sampling with a KV cache, log-probs at the sampling temperature, values,
and the one :class:`Rollout` dataclass every RL trainer passes around.

Sampling follows RL_DETAILS items 1–5: prompts left-padded with position ids taken from the
attention mask, pure sampling at temperature T (top-k 0, top-p 1), each row stops at its own EOS
and is dropped from the batch (and its KV cache) once enough rows have finished for the copy to
pay. Log-probs of policy and reference are recomputed in separate forward passes with the logits
divided by the same T; the sampler's own log-probs are kept only to log the mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from chatrlhf.data.template import render
from chatrlhf.losses import entropy_from_logits
from chatrlhf.models import autocast, save_model, unwrap, use_bf16


@dataclass
class Rollout:
    """One batch of B prompt/reply pairs. Q = prompt width, R = reply width."""
    query_ids: torch.Tensor        # (B, Q) prompt tokens, left-padded
    query_mask: torch.Tensor       # (B, Q) 1 on prompt tokens
    response_ids: torch.Tensor     # (B, R) reply tokens, right-padded after the first EOS
    response_mask: torch.Tensor    # (B, R) 1 on reply tokens, EOS included
    logprobs: torch.Tensor         # (B, R) log π_old(a_t|s_t) at the sampling temperature
    ref_logprobs: torch.Tensor     # (B, R) log π_ref(a_t|s_t) at the sampling temperature
    values: torch.Tensor           # (B, R) V(s_t), 0 without a critic
    scores: torch.Tensor           # (B,) sequence reward (sources combined, EOS penalty applied)
    rewards: torch.Tensor          # (B, R) per-token reward: −β·KL, score at the last reply token
    advantages: torch.Tensor       # (B, R)
    returns: torch.Tensor          # (B, R) critic targets
    prompts: list = field(default_factory=list)   # B message lists
    texts: list = field(default_factory=list)     # B decoded replies
    ended: torch.Tensor | None = None              # (B,) reply ended with EOS

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def select(self, idx: torch.Tensor) -> "Rollout":
        """A minibatch (``mb_``) of the rows ``idx``; tensors sliced, lists picked."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx.tolist()] if v else v
        return Rollout(**out)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded prompt starts at position 0."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def encode_prompts(tok, prompts: list[list[dict]], max_prompt_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Q) left-padded prompt ids and mask, rendered with the tokenizer's template and its generation prompt
    (the plain-text template of --no-chat-template renders the text itself); over-long prompts lose their start."""
    seqs = [tok(render(tok, p, add_generation_prompt=True), add_special_tokens=False)["input_ids"][-max_prompt_length:]
            for p in prompts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def generator(seed: int, device="cpu") -> torch.Generator:
    """A random stream of one's own (a trainer's sampling or shuffling, an evaluation's sampling), seeded and
    checkpointed apart from the global one, so that nothing else — an evaluation, a library — can move it."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def sampling_cdf(logp: torch.Tensor) -> torch.Tensor:
    """(B, V) cumulative probabilities that :func:`draw` searches, summed in float64: in float32 a probability below
    half a unit in the last place of the running sum (3e-8 near 1) adds nothing or a whole unit, so on a peaked 49k
    distribution thousands of tokens get no width (never drawn) or a wrong one — and the recorded log-probs would
    not be those of the distribution sampled from. exp stays float32 (exact to 1e-7 relative); the float64 sum
    costs ~4 ms per step for 64 rows of 49k here."""
    return logp.exp().double().cumsum(-1)


def draw(logp: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from log-probabilities (B, V), by the inverse CDF: one uniform draw per row and a
    binary search, where ``torch.multinomial`` draws V exponentials per row (74 ms of every decoding
    step on a 49k vocabulary for 64 rows, here on 2 cores)."""
    cdf = sampling_cdf(logp)
    u = torch.rand(logp.shape[0], 1, device=logp.device, dtype=cdf.dtype, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=logp.shape[1] - 1)


def low_precision_weights(model, dtype: str, device) -> dict | None:
    """bf16 copies of a model's floating-point parameters, for many forward passes without a backward
    (decoding): autocast would otherwise cast every weight again at every step (2 s of 12 s for 64 × 32
    tokens of SmolLM2-135M). Only the weights autocast would cast: norms stay fp32, and so does the input
    embedding (a bf16 one would put the residual stream in bf16: sampled log-probs then differ from the
    recomputed ones by 0.044 instead of 0.031 nats per token). None when bf16 is off."""
    if not use_bf16(dtype, torch.device(device)):
        return None
    embedding = unwrap(model).get_input_embeddings().weight
    weights = {n: p.detach().to(torch.bfloat16) if p.is_floating_point() and p.dim() >= 2 and p is not embedding else p
               for n, p in model.named_parameters()}
    head = unwrap(model).get_output_embeddings()
    if head is not None and head.weight is embedding:  # tied: the LM head still gets its bf16 copy
        name = next(n for n, m in model.named_modules() if m is head)
        weights[f"{name}.weight"] = embedding.detach().to(torch.bfloat16)
    return weights


@torch.no_grad()
def sample(model, query_ids: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int, temperature: float,
           eos_id: int, pad_id: int, dtype: str = "auto", compact_fraction: float = 0.25,
           generator: torch.Generator | None = None):
    """Sample replies with a KV cache. Returns (response_ids, response_mask, sample_logprobs), (B, R).
    ``generator``: the random stream to draw from (each caller owns one, so that evaluation never moves the
    training stream, on CPU or CUDA).

    Rows that have produced EOS stop costing work: once at least ``compact_fraction`` of the live rows
    are finished, they are removed from the batch and from every layer of the cache."""
    device = query_ids.device
    B, R = query_ids.shape[0], max_new_tokens
    out_ids = torch.full((B, R), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros((B, R), device=device)
    live = torch.arange(B, device=device)                   # rows of the full batch still in the cache
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per live row: EOS already sampled
    mask = query_mask.clone()
    pos = position_ids(mask)[:, -1]
    weights = low_precision_weights(model, dtype, device)

    def forward(**kw):  # the model, with bf16 weights where autocast is on
        if weights is None:
            return model(**kw)
        with autocast(dtype, device):
            return torch.func.functional_call(model, weights, args=(), kwargs=kw, tie_weights=False)

    out = prefill(forward, query_ids, mask, shared_prompts(query_ids, mask), logits_to_keep=1)
    cache, logits = out.cache, out.logits[:, -1]  # the cache object is updated in place
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
        if int(done.sum()) >= max(1, compact_fraction * len(live)):  # drop finished rows where it pays
            idx = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(idx)
            live, done, mask, pos, token = live[idx], done[idx], mask[idx], pos[idx], token[idx]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos + 1
        out = forward(input_ids=token[:, None], attention_mask=mask, position_ids=pos[:, None], cache=cache,
                      use_cache=True)
        logits = out.logits[:, -1]
    return out_ids, reply_mask(out_ids, eos_id), out_lp


def reply_mask(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on reply tokens up to and including the first EOS, 0 after it. (A sampled PAD token inside a
    reply is a reply token like any other: the mask never looks at PAD, RL_DETAILS item 1.)"""
    is_eos = (response_ids == eos_id).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


def decode_replies(tok, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """The text of each reply (its masked tokens, special tokens dropped)."""
    return [tok.decode(row[m.bool()], skip_special_tokens=True).strip() for row, m in zip(response_ids, response_mask)]


def ended_with_eos(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    return (response_ids == eos_id).any(1)


def trunk_and_head(model):
    """The transformer trunk and the LM head of a causal LM (through a peft wrapper)."""
    inner = unwrap(model)
    return inner.base_model, inner.get_output_embeddings()


def shared_prompts(query_ids: torch.Tensor, query_mask: torch.Tensor):
    """(unique prompt ids, their mask, row → unique index) when some rows repeat a prompt (several replies
    per prompt), else None. The prompt then goes through the network once and its KV cache is shared."""
    rows, inverse = torch.unique(torch.cat([query_ids, query_mask], 1), dim=0, return_inverse=True)
    if len(rows) == len(query_ids):
        return None
    Q = query_ids.shape[1]
    return rows[:, :Q], rows[:, Q:], inverse


def prefill(model, query_ids: torch.Tensor, query_mask: torch.Tensor, shared, **kw):
    """One forward pass over the prompts with a KV cache, each distinct prompt computed once (``shared``:
    what shared_prompts() found, None if no prompt repeats); the output's tensors and cache are expanded
    back to one row per prompt."""
    ids, mask = (query_ids, query_mask) if shared is None else shared[:2]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, **kw)
    if shared is not None:
        out.cache.batch_select_indices(shared[2])
        for key in ("logits", "last_hidden_state"):
            if out.get(key) is not None:
                out[key] = out[key][shared[2]]
    return out


def reply_hidden(trunk, query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
    """(B, R, d) hidden states at the positions that predict each reply token (Q−1 … Q+R−2). A prompt that
    several rows share is computed once (its KV cache reused), else prompt and reply go in one pass."""
    Q, R = query_ids.shape[1], response_ids.shape[1]
    mask = torch.cat([query_mask, response_mask], 1)
    checkpointing = torch.is_grad_enabled() and getattr(trunk, "is_activation_checkpointing", False)  # no cache then
    shared = None if R == 1 or checkpointing else shared_prompts(query_ids, query_mask)
    if shared is None:
        ids = torch.cat([query_ids, response_ids], 1)
        hidden = trunk(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        return hidden.last_hidden_state[:, Q - 1:Q + R - 1]
    first = prefill(trunk, query_ids, query_mask, shared)
    rest = trunk(input_ids=response_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids(mask)[:, Q:-1],
                 cache=first.cache, use_cache=True)
    return torch.cat([first.last_hidden_state[:, -1:], rest.last_hidden_state], 1)


def logprobs_from_hidden(head, hidden: torch.Tensor, response_ids: torch.Tensor, temperature: float,
                         with_entropy: bool = False, chunk: int = 8):
    """log π(a_t|s_t) at temperature T (logits / T, as when sampling) and optionally the entropy (for
    logging: computed without a graph). Rows go through the LM head ``chunk`` at a time, and log-probs are
    logit − logsumexp, so no full (B, R, V) log-softmax is ever held: on a 49k vocabulary that is 400 MB
    per copy for 64 replies of 32 tokens."""
    lps, ents = [], []
    project = head
    kind = hidden.device.type
    if isinstance(head, torch.nn.Linear) and torch.is_autocast_enabled(kind):  # cast a frozen head once, not per chunk
        low = torch.get_autocast_dtype(kind)
        weight, bias = head.weight.to(low), None if head.bias is None else head.bias.to(low)
        project = lambda h: torch.nn.functional.linear(h, weight, bias)  # noqa: E731
    for h, ids in zip(hidden.split(chunk), response_ids.split(chunk)):
        logits = project(h).float() / temperature
        lse = torch.logsumexp(logits, -1)
        lps.append(logits.gather(2, ids[..., None]).squeeze(-1) - lse)
        if with_entropy:
            with torch.no_grad():
                ents.append(entropy_from_logits(logits))
    return torch.cat(lps), (torch.cat(ents) if with_entropy else None)


def policy_forward(model, r: Rollout, temperature: float, with_entropy: bool = False, value_head=None):
    """(logprobs, entropy or None, values or None) of a policy on a (mini)batch; the LM head runs only
    at reply positions. ``value_head`` (a linear layer) reads values off the same trunk pass."""
    trunk, head = trunk_and_head(model)
    h = reply_hidden(trunk, r.query_ids, r.query_mask, r.response_ids, r.response_mask)
    lp, ent = logprobs_from_hidden(head, h, r.response_ids, temperature, with_entropy)
    values = value_head(h).squeeze(-1).float() if value_head is not None else None
    return lp, ent, values


class Critic(torch.nn.Module):
    """A separate value network: a sequence-classification model (from the reward model or the policy, through a
    peft wrapper with LoRA) whose head reads V(s_t) at every reply position, on the same tokens as the policy,
    plus a learned offset (see trainers/ppo.calibrate_critic)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.offset = torch.nn.Parameter(torch.zeros(()))

    def forward(self, r: Rollout) -> torch.Tensor:
        """(B, R) values."""
        inner = unwrap(self.model)  # LoRA layers sit inside the trunk; the head is trainable
        h = reply_hidden(inner.base_model, r.query_ids, r.query_mask, r.response_ids, r.response_mask)
        return inner.score(h).squeeze(-1).float() + self.offset

    @torch.no_grad()
    def rescale(self, a: float, b: float) -> None:
        """Values become a · head + b."""
        for p in unwrap(self.model).score.parameters():
            p.mul_(a)
        self.offset.fill_(b)

    def save(self, tok, out_dir) -> None:
        unwrap(self.model).config.chatrlhf_value_offset = float(self.offset.detach())
        save_model(self.model, tok, out_dir)
