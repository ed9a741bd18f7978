"""Training rollouts: the one :class:`Rollout` dataclass every RL trainer passes around, and the training-side
forward passes over it (log-probs at the sampling temperature, values).

The replies are sampled by the engine (engine.py, ``Engine.sample_tensors``) following RL_DETAILS items 1–5:
prompts left-padded with position ids taken from the attention mask, pure sampling at temperature T (top-k 0,
top-p 1), each row stops at its own EOS. Log-probs of policy and reference are recomputed here in separate forward
passes with the logits divided by the same T; the sampler's own log-probs are kept only to log the mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from chatrlhf.data.template import render
from chatrlhf.engine import position_ids, prefill, shared_prompts
from chatrlhf.losses import entropy_from_logits
from chatrlhf.models import save_model, unwrap


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
