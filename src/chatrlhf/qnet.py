"""The Q-network over candidate replies, tier A of QLEARN.md §2.2: Q_i(h, y) = head_i(φ(h, y)) with φ the frozen
trunk's hidden state at the reply's last token (or mean-pooled over the reply), plus the replay buffer and one DQN
update (§2.4). Training touches only the small MLP heads (CHAI's recipe), so it runs on 2 CPU cores.

    phi = reply_features(model, tok, histories, replies)        # (N, d), no grad
    heads = QHeads(phi.shape[1])                                 # H = 2 heads + their target copies
    buffer.add(phi[taken], reward, terminated, next_phi)         # features, not text: what tier A needs
    metrics = q_update(heads, optimizer, buffer.sample(512, g), gamma=0.9)
    heads.soft_update(0.005)                                     # θ̂ ← (1−τ)θ̂ + τθ

The heads need not read φ: ``--features text|both`` gives them the text features ψ(h, y, C) of qfeatures.py, or
[φ, ψ] (feature_dims, q_inputs, make_heads below); the standardiser and fqi treat any columns alike.

A top-level module, not trainers/value.py: reranking (`generate|chat --rerank q:DIR`) and the server load the
heads and embed candidates without any trainer, and trainers/value.py is the PPO critic's.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch

from chatrlhf.config import ModelArgs
from chatrlhf.data.template import render
from chatrlhf.losses import cql_loss, double_q_next_value, huber_td_loss, iql_loss, td_target
from chatrlhf.models import load_model
from chatrlhf.qfeatures import TEXT_FEATURES
from chatrlhf.rollout import encode_prompts, logprobs_from_hidden, reply_hidden, trunk_and_head

POOLINGS = ("last", "mean")
FEATURE_SETS = ("phi", "text", "both")  # what the heads read: φ(h, y), ψ(h, y, C) (qfeatures), or [φ, ψ]
TEXT_SCALE = 10.0  # with "both": ψ's standardised columns ×10 against φ's 576 (the same ridge λ is λ/100 on ψ)
HISTORY = "history"  # φ(h) for V(h): the trunk state at the history's last token (the generation prompt's end)


# ----------------------------------------------------------------------------- φ(h, y): frozen trunk features


def encode_replies(tok, replies: list[str], max_reply_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, R + 1) right-padded reply ids and mask, each reply as the engine generates it: its tokens, then EOS
    (the end of a finished reply). One pad column more than the longest reply, so that reply_hidden — which
    returns the states that *predict* each token — also returns the state *at* the last reply token."""
    eos = tok.eos_token_id
    seqs = [tok(y, add_special_tokens=False)["input_ids"][:max_reply_length - 1] + [eos] for y in replies]
    width = max(len(s) for s in seqs) + 1
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _features_batch(trunk, tok, histories, replies, pooling, max_prompt_length, max_reply_length, device):
    query_ids, query_mask = encode_prompts(tok, histories, max_prompt_length, device)
    response_ids, response_mask = encode_replies(tok, replies, max_reply_length, device)
    hidden = reply_hidden(trunk, query_ids, query_mask, response_ids, response_mask)  # (B, R+1, d)
    # hidden[:, t] is the state at reply token t − 1 (hidden[:, 0] is the prompt's last token's)
    if pooling == HISTORY:
        return hidden[:, 0].float()
    at_reply = hidden[:, 1:].float()
    lengths = response_mask.sum(1)
    if pooling == "last":
        return at_reply[torch.arange(len(replies), device=device), lengths - 1]
    m = response_mask[:, :-1].unsqueeze(-1).to(at_reply.dtype)
    return (at_reply * m).sum(1) / m.sum(1)


@torch.no_grad()
def reply_features(model, tok, histories: list[list[dict]], replies: list[str], pooling: str = "last",
                   batch_size: int = 16, max_prompt_length: int = 1024, max_reply_length: int = 256) -> torch.Tensor:
    """(N, d) float32 φ(h_i, y_i): the frozen trunk's last hidden state at the reply's last token (EOS), or the
    mean over the reply's tokens (``pooling="mean"``). The history is rendered as the engine renders prompts
    (the tokenizer's template + generation prompt, keeping its end past ``max_prompt_length`` tokens), the
    reply's tokens appended. Pairs are batched history by history, so that where several replies share one
    history its KV cache is computed once (rollout.reply_hidden). Eval mode, no grad; the model's mode is
    restored after. ``pooling="history"`` gives φ(h) instead, the state at the history's last token, for V(h)
    (see :func:`history_features`)."""
    if pooling not in POOLINGS + (HISTORY,):
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if len(histories) != len(replies):
        raise ValueError(f"{len(histories)} histories but {len(replies)} replies")
    if not replies:
        return torch.zeros(0, model.config.hidden_size)
    trunk, _ = trunk_and_head(model)
    device = next(model.parameters()).device
    keys = [json.dumps(h, sort_keys=True) for h in histories]
    order = sorted(range(len(replies)), key=lambda i: keys[i])  # candidates of one history side by side
    was_training = model.training
    model.eval()
    try:
        out = [None] * len(replies)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            phi = _features_batch(trunk, tok, [histories[i] for i in idx], [replies[i] for i in idx], pooling,
                                  max_prompt_length, max_reply_length, device)
            for i, row in zip(idx, phi.cpu()):
                out[i] = row
    finally:
        model.train(was_training)
    return torch.stack(out)


def history_features(model, tok, histories: list[list[dict]], **kw) -> torch.Tensor:
    """(N, d) φ(h): the frozen trunk's state at the end of the rendered history (where the reply would start),
    what the V head reads; a ``FeatureCache(model_id, pooling="history")`` caches it with reply ""."""
    return reply_features(model, tok, histories, [""] * len(histories), pooling=HISTORY, **kw)


@torch.no_grad()
def reply_logprobs(model, tok, histories: list[list[dict]], replies: list[str], max_prompt_length: int = 1024,
                   max_reply_length: int = 256, batch_size: int = 16) -> torch.Tensor:
    """(N,) log π(y|h) of whole replies (their tokens and EOS, as encode_replies writes them) under ``model`` at
    T = 1: the behaviour log-likelihood of a logged reply, for CQL's importance weights beside sampled candidates."""
    trunk, head = trunk_and_head(model)
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(replies), batch_size):
            query_ids, query_mask = encode_prompts(tok, histories[s:s + batch_size], max_prompt_length, device)
            ids, mask = encode_replies(tok, replies[s:s + batch_size], max_reply_length, device)
            lps, _ = logprobs_from_hidden(head, reply_hidden(trunk, query_ids, query_mask, ids, mask), ids, 1.0)
            out.append((lps.float() * mask).sum(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def load_policy_and_trunk(cfg):
    """(policy, its tokenizer, φ trunk, its tokenizer, the trunk's name), all frozen and in eval mode, from a
    config with ModelArgs, ``chat_template`` and ``q_model``: the policy proposes candidates, the trunk embeds
    them (the policy itself when ``q_model`` is empty or the same)."""
    policy, tok = load_model(cfg, chat_template=cfg.chat_template)
    policy.eval().requires_grad_(False)
    if not cfg.q_model or cfg.q_model == cfg.model:
        return policy, tok, policy, tok, cfg.model
    trunk, qtok = load_model(ModelArgs(model=cfg.q_model, dtype=cfg.dtype, device=cfg.device),
                             chat_template=cfg.chat_template)
    return policy, tok, trunk.eval().requires_grad_(False), qtok, cfg.q_model


class FeatureCache:
    """φ per (rendered history, reply, pooling, model id), keyed by sha256, so that each candidate goes through
    the trunk once however often it is drawn as a candidate, a next-state candidate or a rerank option.
    Re-embed (a new cache) when the trunk changes: ``model_id`` names it."""

    def __init__(self, model_id: str, pooling: str = "last"):
        self.model_id, self.pooling = model_id, pooling
        self.store: dict[str, torch.Tensor] = {}

    def key(self, tok, history: list[dict], reply: str) -> str:
        rendered = render(tok, history, add_generation_prompt=True)
        blob = json.dumps([rendered, reply, self.pooling, self.model_id], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def features(self, model, tok, histories: list[list[dict]], replies: list[str], **kw) -> torch.Tensor:
        """(N, d) φ, embedding only the pairs not seen before (each distinct missing pair once)."""
        keys = [self.key(tok, h, y) for h, y in zip(histories, replies)]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in self.store:
                first.setdefault(k, i)
        missing = list(first.values())
        if missing:
            phi = reply_features(model, tok, [histories[i] for i in missing], [replies[i] for i in missing],
                                 pooling=self.pooling, **kw)
            for i, row in zip(missing, phi):
                self.store[keys[i]] = row.clone()
        return torch.stack([self.store[k] for k in keys])

    def __len__(self) -> int:
        return len(self.store)

    def state_dict(self) -> dict:
        keys = list(self.store)
        return {"model_id": self.model_id, "pooling": self.pooling, "keys": keys,
                "features": torch.stack([self.store[k] for k in keys]) if keys else torch.zeros(0)}

    def load_state_dict(self, state: dict) -> None:
        if (state["model_id"], state["pooling"]) != (self.model_id, self.pooling):
            raise ValueError(f"this feature cache holds {state['model_id']!r} ({state['pooling']}) features, not "
                             f"{self.model_id!r} ({self.pooling}): re-embed with a new cache")
        self.store = {k: row.clone() for k, row in zip(state["keys"], state["features"])}


# ----------------------------------------------------------------------------- what the heads read


def feature_dims(features: str, d_phi: int) -> int:
    """Columns of the heads' input for a feature set: d_phi for φ, 9 for ψ, both for [φ, ψ]."""
    if features not in FEATURE_SETS:
        raise ValueError(f"features must be one of {FEATURE_SETS}, got {features!r}")
    return {"phi": d_phi, "text": len(TEXT_FEATURES), "both": d_phi + len(TEXT_FEATURES)}[features]


def q_inputs(phi: torch.Tensor | None, psi: torch.Tensor | None) -> torch.Tensor:
    """(N, F) the heads' input: φ (N, d), ψ (N, 9) or [φ, ψ] side by side, whichever is given."""
    parts = [x.float() for x in (phi, psi) if x is not None]
    if not parts:
        raise ValueError("q_inputs needs φ, ψ or both")
    return torch.cat(parts, 1)


def make_heads(features: str, d_phi: int, n_heads: int = 2, hidden: int = 256, value: bool = False) -> "QHeads":
    """QHeads on the feature set's columns; with "both" the ψ block is scaled by TEXT_SCALE after standardising, so
    that 9 columns are not drowned by d_phi in one ridge penalty (benchmarks/qlearn.py measured the scale)."""
    heads = QHeads(feature_dims(features, d_phi), n_heads, hidden, value)
    if features == "both":
        heads.feature_scale[d_phi:] = TEXT_SCALE
    return heads


# ----------------------------------------------------------------------------- the heads and their targets


def mlp(d: int, hidden: int) -> torch.nn.Sequential:
    """d → hidden → 1 with a ReLU; hidden = 0: a linear head d → 1 (what fitted Q iteration solves in closed form)."""
    if hidden == 0:
        return torch.nn.Sequential(torch.nn.Linear(d, 1))
    return torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))


NORM_KEYS = ("phi_count", "phi_mean", "phi_m2")  # the φ standardiser's buffers (absent from older saved heads)
SCALE_KEY = "feature_scale"  # per-column scale after standardising (absent from older saved heads: ones)


class QHeads(torch.nn.Module):
    """H MLP heads d → hidden → 1 on φ (clipped double Q, Fujimoto et al. 2018), each initialised apart, and
    their target copies θ̂ (no grad; in the state dict, so a checkpoint restores them); with ``value=True`` also a
    V head on φ(h) (offline IQL, QLEARN §2.5; no target copy: ILQL reads V(h′) from the online head). Give the
    optimizer ``heads.trainable_parameters()``: the targets move only by soft_update / hard_update.

    Online and target Q heads read φ standardised per dimension, (φ − mean) / std, with running moments of the
    features passed to :meth:`observe` (Chan et al.'s parallel update; buffers, so saved with the heads):
    LM hidden states have a few dimensions hundreds of times larger than the rest, which swamp the first
    layer. Before any observe() (or below 2 rows) the standardiser is the identity."""

    def __init__(self, d: int, n_heads: int = 2, hidden: int = 256, value: bool = False):
        super().__init__()
        self.online = torch.nn.ModuleList(mlp(d, hidden) for _ in range(n_heads))
        self.targets = copy.deepcopy(self.online)
        self.targets.requires_grad_(False)
        self.value = mlp(d, hidden) if value else None
        self.register_buffer("phi_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("phi_mean", torch.zeros(d, dtype=torch.float64))
        self.register_buffer("phi_m2", torch.zeros(d, dtype=torch.float64))
        self.register_buffer(SCALE_KEY, torch.ones(d, dtype=torch.float64))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The online Q heads' parameters and the V head's (not the targets')."""
        return [*self.online.parameters(), *(self.value.parameters() if self.value is not None else ())]

    def v(self, phi_h: torch.Tensor) -> torch.Tensor:
        """(N,) V(h) on φ(h) (history_features); only with ``value=True``."""
        if self.value is None:
            raise ValueError("these Q-heads have no V head: build them with value=True")
        return self.value(phi_h).squeeze(-1)

    @torch.no_grad()
    def observe(self, phi: torch.Tensor) -> None:
        """Fold the rows of ``phi`` (N, d) into the running mean and sum of squared deviations."""
        x = phi.detach().to(self.phi_mean.device, torch.float64).reshape(-1, self.phi_mean.shape[0])
        n = x.shape[0]
        if n == 0:
            return
        mean_b, m2_b = x.mean(0), ((x - x.mean(0)) ** 2).sum(0)
        total = self.phi_count + n
        delta = mean_b - self.phi_mean
        self.phi_mean += delta * n / total
        self.phi_m2 += m2_b + delta ** 2 * self.phi_count * n / total
        self.phi_count.fill_(float(total))

    def standardise(self, phi: torch.Tensor) -> torch.Tensor:
        """(φ − mean) / std with the running moments (std floored at 1e-4), times ``feature_scale`` per column (ones
        but for the text block of features="both", make_heads); φ unscaled, unshifted before 2 observed rows."""
        scale = self.feature_scale.to(phi.dtype)
        if self.phi_count < 2:
            return phi * scale
        std = (self.phi_m2 / (self.phi_count - 1)).sqrt().clamp_min(1e-4)
        return (phi - self.phi_mean.to(phi.dtype)) / std.to(phi.dtype) * scale

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        """(H, N) Q_i(h, y) of the online heads; phi (N, d)."""
        x = self.standardise(phi)
        return torch.stack([h(x).squeeze(-1) for h in self.online])

    @torch.no_grad()
    def target(self, phi: torch.Tensor) -> torch.Tensor:
        """(H, N) Q̂_i(h, y) of the target heads, without a graph."""
        x = self.standardise(phi)
        return torch.stack([h(x).squeeze(-1) for h in self.targets])

    def standardiser_state(self) -> "StandardiserState":
        """The φ standardiser's buffers as a checkpoint object (the run scaffold saves trainable parameters only)."""
        return StandardiserState(self)

    @torch.no_grad()
    def soft_update(self, tau: float) -> None:
        """Polyak averaging θ̂ ← (1 − τ)θ̂ + τθ (DDPG, Lillicrap et al. 2015; CHAI τ = 0.005); τ = 1 is a copy."""
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {tau}")
        for t, p in zip(self.targets.parameters(), self.online.parameters()):
            t.mul_(1.0 - tau).add_(p, alpha=tau)

    @torch.no_grad()
    def hard_update(self) -> None:
        """θ̂ ← θ (Nature DQN's periodic target copy)."""
        for t, p in zip(self.targets.parameters(), self.online.parameters()):
            t.copy_(p)


class StandardiserState:
    """state_dict / load_state_dict of a QHeads' φ standardiser (NORM_KEYS), for Run.begin's ``objects``."""

    def __init__(self, heads: QHeads):
        self.heads = heads

    def state_dict(self) -> dict:
        return {k: getattr(self.heads, k).detach().clone() for k in NORM_KEYS}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for k in NORM_KEYS:
            getattr(self.heads, k).copy_(state[k])


# ----------------------------------------------------------------------------- replay buffer


class ReplayBuffer:
    """A fixed-capacity ring of feature transitions (h, a, r, h′): φ(h, a) (d), r, terminated, truncated, the
    next state's candidate features (K, d) zero-padded with a valid mask (K) — none valid at a terminal h′ —
    and, with ``candidates=True``, the current state's candidate set (K, d), its mask, the taken index in it and
    log π_β per candidate, for the CQL term. The oldest transition is overwritten when full. Sampling draws
    with replacement from a caller's torch.Generator (SB3 DQN), so the run scaffold checkpoints the stream and
    a resumed run draws the same batches."""

    def __init__(self, capacity: int, d: int, k: int, candidates: bool = False, dtype=torch.float32):
        if capacity < 1 or k < 1:
            raise ValueError(f"capacity and k must be >= 1, got {capacity}, {k}")
        self.capacity, self.d, self.k, self.candidates = capacity, d, k, candidates
        self.pos = self.size = 0
        self.data = {"phi": torch.zeros(capacity, d, dtype=dtype), "reward": torch.zeros(capacity),
                     "terminated": torch.zeros(capacity, dtype=torch.bool),
                     "truncated": torch.zeros(capacity, dtype=torch.bool),
                     "next_phi": torch.zeros(capacity, k, d, dtype=dtype),
                     "next_valid": torch.zeros(capacity, k, dtype=torch.bool),
                     "state": torch.zeros(capacity, dtype=torch.long)}
        if candidates:
            self.data.update(cand_phi=torch.zeros(capacity, k, d, dtype=dtype),
                             cand_valid=torch.zeros(capacity, k, dtype=torch.bool),
                             taken=torch.zeros(capacity, dtype=torch.long), log_behavior=torch.zeros(capacity, k))

    def _padded(self, rows: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = rows.reshape(-1, self.d)
        if len(rows) > self.k:
            raise ValueError(f"{name}: {len(rows)} candidates, the buffer holds at most k = {self.k}")
        out = torch.zeros(self.k, self.d)
        out[:len(rows)] = rows
        valid = torch.zeros(self.k, dtype=torch.bool)
        valid[:len(rows)] = True
        return out, valid

    def add(self, phi: torch.Tensor, reward: float, terminated: bool, next_phi: torch.Tensor | None = None,
            truncated: bool = False, cand_phi: torch.Tensor | None = None, taken: int | None = None,
            log_behavior: torch.Tensor | None = None, state: int = 0) -> None:
        """Store one transition. next_phi (k′ ≤ K, d): the candidates at h′ (None or empty at a terminal h′);
        ``state`` numbers the state h, so that transitions of one state can be grouped (fqi_update's advantage).
        With candidates=True: cand_phi (k ≤ K, d) the candidate set at h, taken its index of the reply taken,
        log_behavior (k,) log π_β(c|h) (0 when omitted: uniform, the same gradient as plain CQL(H))."""
        i, row = self.pos, self.data
        row["phi"][i] = phi
        row["reward"][i], row["terminated"][i], row["truncated"][i] = float(reward), bool(terminated), bool(truncated)
        row["state"][i] = int(state)
        row["next_phi"][i], row["next_valid"][i] = self._padded(
            torch.zeros(0, self.d) if next_phi is None else next_phi, "next_phi")
        if self.candidates:
            if cand_phi is None or taken is None:
                raise ValueError("this buffer stores candidate sets (for CQL): give cand_phi and taken")
            row["cand_phi"][i], row["cand_valid"][i] = self._padded(cand_phi, "cand_phi")
            row["taken"][i] = int(taken)
            row["log_behavior"][i] = 0.0
            if log_behavior is not None:
                row["log_behavior"][i, :len(log_behavior)] = log_behavior
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def __len__(self) -> int:
        return self.size

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A batch of ``batch_size`` transitions drawn uniformly with replacement: a dict of (B, …) tensors."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = torch.randint(self.size, (batch_size,), generator=generator, device=generator.device).cpu()
        return {name: t[idx] for name, t in self.data.items()}

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "d": self.d, "k": self.k, "candidates": self.candidates,
                "pos": self.pos, "size": self.size, "data": {n: t[:self.size].clone() for n, t in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        mine = (self.capacity, self.d, self.k, self.candidates)
        theirs = (state["capacity"], state["d"], state["k"], state["candidates"])
        if mine != theirs:
            raise ValueError(f"replay buffer (capacity, d, k, candidates) {theirs} in the checkpoint, {mine} here")
        self.pos, self.size = state["pos"], state["size"]
        for name, t in state["data"].items():
            self.data[name][:self.size] = t


# ----------------------------------------------------------------------------- one DQN update


def q_update(heads: QHeads, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], gamma: float,
             cql_alpha: float = 0.0, max_grad_norm: float = 1.0,
             reward_range: tuple[float, float] | None = None) -> dict[str, float]:
    """One gradient step of QLEARN §2.4 on a replay batch:
        a* = argmax_{c valid} Q_1(h′, c);  y = r + γ(1 − terminated)·min_i Q̂_i(h′, a*)  [clipped to the range]
        L  = Σ_i Huber(Q_i(h, a) − y)  + cql_alpha·CQL(H) over C(h) when the batch carries it
    then grad-norm clipping and the optimizer step. The target heads are not moved here: the caller calls
    heads.soft_update(τ) (Polyak) or hard_update() every n steps. Returns float metrics."""
    device = next(heads.parameters()).device
    batch = {name: t.to(device) for name, t in batch.items()}
    B, K, d = batch["next_phi"].shape
    with torch.no_grad():
        next_flat = batch["next_phi"].reshape(B * K, d).float()
        online_next = heads(next_flat)[0].reshape(B, K)
        target_next = heads.target(next_flat).reshape(-1, B, K)
        next_value, _ = double_q_next_value(online_next, target_next, batch["next_valid"])
        y = td_target(batch["reward"], next_value, batch["terminated"], gamma, reward_range)
    loss, metrics = huber_td_loss(heads(batch["phi"].float()), y)
    if cql_alpha > 0 and "cand_phi" in batch:
        q_cand = heads(batch["cand_phi"].reshape(B * K, d).float()).reshape(-1, B, K)
        cql, cql_metrics = cql_loss(q_cand, batch["cand_valid"], batch["taken"], batch.get("log_behavior"))
        loss = loss + cql_alpha * cql
        metrics.update(cql_metrics)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(heads.online.parameters(), max_grad_norm)
    optimizer.step()
    metrics.update({"loss/total": loss.detach(), "q/grad_norm": grad_norm, "q/next_value_mean": next_value.mean()})
    return {k: float(v) for k, v in metrics.items()}


def iql_update(heads: QHeads, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], gamma: float,
               expectile: float = 0.7, cql_alpha: float = 0.0, max_grad_norm: float = 1.0) -> dict[str, float]:
    """One gradient step of offline IQL (QLEARN §2.5, losses.iql_loss) on a batch of logged transitions:
    ``phi`` φ(h, a) (B, d), ``phi_h`` φ(h) and ``next_phi_h`` φ(h′) (B, d), ``reward``, ``terminated`` (B,); with
    cql_alpha > 0 also the candidate sets at h (``cand_phi`` (B, K, d), ``cand_valid``, ``taken``,
    ``log_behavior``) for α·CQL(H) with log π_β subtracted. The caller moves the targets (soft_update)."""
    device = next(heads.parameters()).device
    batch = {name: t.to(device) for name, t in batch.items()}
    with torch.no_grad():
        next_v = heads.v(batch["next_phi_h"].float())
    phi = batch["phi"].float()
    loss, metrics = iql_loss(heads(phi), heads.target(phi), heads.v(batch["phi_h"].float()), next_v,
                             batch["reward"], batch["terminated"], gamma, expectile)
    if cql_alpha > 0:
        B, K, d = batch["cand_phi"].shape
        q_cand = heads(batch["cand_phi"].reshape(B * K, d).float()).reshape(-1, B, K)
        cql, cql_metrics = cql_loss(q_cand, batch["cand_valid"], batch["taken"], batch["log_behavior"])
        loss = loss + cql_alpha * cql
        metrics.update(cql_metrics)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(heads.trainable_parameters(), max_grad_norm)
    optimizer.step()
    metrics.update({"loss/total": loss.detach(), "q/grad_norm": grad_norm})
    return {k: float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- fitted Q iteration (ridge heads)


RIDGE_LAMBDAS = (1.0, 10.0, 100.0, 1000.0, 10000.0)


def ridge_solve(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """(w, b) = argmin ‖x·w + b − y‖² + λ‖w‖² (the bias not penalised: x and y centred first), in float64."""
    x, y = x.double(), y.double()
    xm, ym = x.mean(0), y.mean()
    xc = x - xm
    w = torch.linalg.solve(xc.T @ xc + lam * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ (y - ym))
    return w, float(ym - xm @ w)


def ridge_cv(x: torch.Tensor, y: torch.Tensor, lambdas=RIDGE_LAMBDAS, folds: int = 3) -> tuple[float, dict]:
    """(λ with the lowest held-out mean squared error, {λ: that error}) over ``folds`` contiguous blocks of rows:
    the rows of one state sit side by side (the replay buffer stores a state's transitions in a row), so a block
    holds out whole states, bar the ones at its edges. Fewer rows than folds: the first λ, no errors."""
    n = len(y)
    if n < max(folds, 2):
        return float(lambdas[0]), {}
    edges = [n * k // folds for k in range(folds + 1)]
    errors = {}
    for lam in lambdas:
        se = 0.0
        for a, b in zip(edges, edges[1:]):
            keep = torch.cat([torch.arange(0, a), torch.arange(b, n)])
            w, c = ridge_solve(x[keep], y[keep], lam)
            se += float(((x[a:b].double() @ w + c - y[a:b].double()) ** 2).sum())
        errors[float(lam)] = se / n
    return min(errors, key=errors.get), errors


def group_means(x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-group means (G, …), each row's group index (N,)) of ``x`` (N, …) grouped by the labels ``groups``."""
    labels, index = torch.unique(groups, return_inverse=True)
    sums = torch.zeros((len(labels),) + x.shape[1:], dtype=x.dtype).index_add_(0, index, x)
    counts = torch.zeros(len(labels), dtype=x.dtype).index_add_(0, index, torch.ones(len(x), dtype=x.dtype))
    return sums / counts.reshape(-1, *([1] * (x.dim() - 1))), index


@torch.no_grad()
def dueling_q(heads: QHeads, phi: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, K) Q(h, c) = V(φ̄_h) + A(h, c) − mean_c A(h, c) of candidate sets ``phi`` (B, K, d) with a ``valid`` mask,
    for linear heads fitted by fqi_update: A is online head 1, V the value head on the set's mean φ̄_h."""
    B, K, d = phi.shape
    m = valid.float()
    n = m.sum(1).clamp_min(1.0)
    a = heads(phi.reshape(B * K, d).float())[0].reshape(B, K)
    bar = (phi.float() * m.unsqueeze(-1)).sum(1) / n.unsqueeze(-1)
    return heads.v(heads.standardise(bar)).unsqueeze(1) + a - ((a * m).sum(1) / n).unsqueeze(1)


@torch.no_grad()
def fqi_update(heads: QHeads, buffer: ReplayBuffer, gamma: float, lambdas=RIDGE_LAMBDAS,
               reward_range: tuple[float, float] | None = None) -> dict[str, float]:
    """One iteration of fitted Q iteration (Ernst et al. 2005; Riedmiller's NFQ) with linear dueling heads
    (Wang et al. 2016) solved in closed form by ridge regression over the whole buffer, instead of q_update's
    gradient steps on sampled batches. With z = standardised φ and, per state h (the buffer's ``state``), z̄_h and
    ȳ_h the means over its stored transitions:
        y = r + γ(1 − terminated)·max_c′ Q_k(h′, c′),   Q_k(h, c) = V_k(z̄_h) + A_k(z_c) − mean_c A_k   (dueling_q)
        A: w = ridge(z − z̄_h → y − ȳ_h)           the advantage: what ranks the candidates of one state
        V: (v, b) = ridge(z̄_h → ȳ_h), a row per state
    λ of each by ridge_cv. The split is exact: within-state deviations are orthogonal to per-state means, so the
    least-squares fit of y on [z − z̄_h, z̄_h] is these two fits. The online heads get A (every head the same
    solution: argmax is all reranking needs), the value head V; at γ = 0 A is the within-state ridge regression
    of the reward. Needs QHeads(d, H, hidden=0, value=True)."""
    if any(len(h) != 1 for h in heads.online) or heads.value is None or len(heads.value) != 1:
        raise ValueError("fitted Q iteration solves linear dueling heads: build them with QHeads(d, n_heads, "
                         "hidden=0, value=True)")
    data = {name: t[:len(buffer)] for name, t in buffer.data.items()}
    next_q = dueling_q(heads, data["next_phi"], data["next_valid"]).masked_fill(~data["next_valid"], -torch.inf)
    next_value = next_q.max(1).values.masked_fill(~data["next_valid"].any(1), 0.0)
    y = td_target(data["reward"], next_value, data["terminated"], gamma, reward_range)
    phi = data["phi"].float()
    for name in NORM_KEYS:
        getattr(heads, name).zero_()
    heads.observe(phi)
    z = heads.standardise(phi)
    z_bar, index = group_means(z, data["state"])
    y_bar, _ = group_means(y, data["state"])
    lam_a, err_a = ridge_cv(z - z_bar[index], y - y_bar[index], lambdas)
    w, _ = ridge_solve(z - z_bar[index], y - y_bar[index], lam_a)
    lam_v, err_v = ridge_cv(z_bar, y_bar, lambdas)
    v, b = ridge_solve(z_bar, y_bar, lam_v)
    for h in heads.online:
        h[0].weight.copy_(w.to(h[0].weight.dtype).unsqueeze(0))
        h[0].bias.zero_()
    heads.value[0].weight.copy_(v.to(heads.value[0].weight.dtype).unsqueeze(0))
    heads.value[0].bias.fill_(b)
    heads.hard_update()
    fit = heads.v(z_bar)[index] + heads(phi)[0] - group_means(heads(phi)[0], data["state"])[0][index]
    return {"fqi/lambda": lam_a, "fqi/lambda_v": lam_v, "fqi/cv_mse": err_a.get(lam_a, float("nan")),
            "fqi/rows": float(len(y)), "fqi/states": float(len(z_bar)), "fqi/train_mse": float(((fit - y) ** 2).mean()),
            "q/target_mean": float(y.mean()), "q/next_value_mean": float(next_value.mean())}


# ----------------------------------------------------------------------------- saved heads


QHEADS_FILE, QLEARN_JSON = "qheads.safetensors", "qlearn.json"


def save_qheads(heads: QHeads, out_dir, q_model: str, pooling: str, features: str = "phi") -> None:
    """OUTPUT_DIR/qheads.safetensors (online heads and targets, the standardiser and the column scale) and
    qlearn.json: what :func:`load_qheads` needs, which frozen trunk and pooling φ must be computed with, and the
    feature set the heads read (``features``; absent = φ, as older folders)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, out / QHEADS_FILE)
    first = heads.online[0]
    meta = {"q_model": q_model, "pooling": pooling, "heads": len(heads.online),
            "hidden": 0 if len(first) == 1 else first[0].out_features, "dims": first[0].in_features}
    if heads.value is not None:  # only then: folders without a V head keep their qlearn.json as it was
        meta["value"] = True
    if features != "phi":
        meta["features"] = features
        meta["text_features"] = list(TEXT_FEATURES)
    (out / QLEARN_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def load_qheads(out_dir, device="cpu") -> tuple[QHeads, dict]:
    """(heads in eval mode, qlearn.json) from a `chatrlhf qlearn` output folder: embed candidates with
    ``reply_features(load_model(meta["q_model"]), …, pooling=meta["pooling"])`` and/or qfeatures.text_features as
    ``meta.get("features", "phi")`` says, and rank them by ``heads(q_inputs(φ, ψ))[0]``."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    if not (out / QLEARN_JSON).is_file():
        raise FileNotFoundError(f"{out / QLEARN_JSON} not found: not a `chatrlhf qlearn` output folder")
    meta = json.loads((out / QLEARN_JSON).read_text())
    heads = QHeads(meta["dims"], meta["heads"], meta["hidden"], value=meta.get("value", False))
    missing, unexpected = heads.load_state_dict(load_file(out / QHEADS_FILE), strict=False)
    if unexpected or set(missing) - {*NORM_KEYS, SCALE_KEY}:
        raise ValueError(f"{out / QHEADS_FILE}: missing {missing}, unexpected {unexpected}: not saved by save_qheads")
    return heads.to(device).eval(), meta
