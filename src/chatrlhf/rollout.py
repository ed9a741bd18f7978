"""Training rollouts: the one :class:`Rollout` dataclass every RL trainer passes around, the training-side
forward passes over it (log-probs at the sampling temperature, values), and what the on-policy trainers (ppo.py,
grpo.py) share around it: the prompt plan, sampling through the engine, the reference, minibatches, the held-out
evaluation, sample rows and the failure-sign warnings.

The replies are sampled by the engine (engine.py, ``Engine.sample_tensors``) following RL_DETAILS items 1–5:
prompts left-padded with position ids taken from the attention mask, pure sampling at temperature T (top-k 0,
top-p 1), each row stops at its own EOS. Log-probs of policy and reference are recomputed here in separate forward
passes with the logits divided by the same T; the sampler's own log-probs are kept only to log the mismatch.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from chatrlhf import losses
from chatrlhf.data import load_prompts, split_by_prompt
from chatrlhf.data.records import Conversation, prompt_key
from chatrlhf.data.template import is_plain, render
from chatrlhf.engine import Engine, SamplingParams, position_ids, prefill, shared_prompts
from chatrlhf.errors import UsageError
from chatrlhf.evaluate.metrics import shared_reply_fraction
from chatrlhf.evaluate.watch import failure_signs
from chatrlhf.losses import entropy_from_logits
from chatrlhf.fsdp import reshard, unsharded
from chatrlhf.models import autocast, in_forward, is_sharded, load_model, save_model, unwrap
from chatrlhf.rewards import RewardMix


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
    is_weights: torch.Tensor | None = None         # (B, R) truncated importance weights, replies sampled by vLLM

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


def reply_hidden(trunk, query_ids, query_mask, response_ids, response_mask, share_prompts: bool = True
                 ) -> torch.Tensor:
    """(B, R, d) hidden states at the positions that predict each reply token (Q−1 … Q+R−2). A prompt that
    several rows share is computed once (its KV cache reused), else prompt and reply go in one pass.
    ``share_prompts`` False: always one pass (under FSDP, where the trunk's passes must not depend on the rows:
    each one gathers every block's weights from all ranks)."""
    Q, R = query_ids.shape[1], response_ids.shape[1]
    mask = torch.cat([query_mask, response_mask], 1)
    checkpointing = torch.is_grad_enabled() and getattr(trunk, "is_activation_checkpointing", False)  # no cache then
    shared = None if R == 1 or checkpointing or not share_prompts else shared_prompts(query_ids, query_mask)
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
    at reply positions. ``value_head`` (a linear layer) reads values off the same trunk pass. Under FSDP the whole
    pass is one forward of the sharded model (models.in_forward) and the prompt is never computed apart."""
    lp, ent, values = in_forward(model, _policy_forward, model, r, temperature, with_entropy, value_head)
    return lp, ent, values.squeeze(-1).float() if values is not None else None  # a view: made outside the forward


def _policy_forward(model, r: Rollout, temperature: float, with_entropy: bool, value_head):
    trunk, head = trunk_and_head(model)
    h = reply_hidden(trunk, r.query_ids, r.query_mask, r.response_ids, r.response_mask,
                     share_prompts=not is_sharded(model))
    lp, ent = logprobs_from_hidden(head, h, r.response_ids, temperature, with_entropy)
    return lp, ent, value_head(h) if value_head is not None else None


class Critic(torch.nn.Module):
    """A separate value network: a sequence-classification model (from the reward model or the policy, through a
    peft wrapper with LoRA) whose head reads V(s_t) at every reply position, on the same tokens as the policy,
    plus a learned offset (see trainers/ppo.calibrate_critic)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.offset = torch.nn.Parameter(torch.zeros(()))

    def forward(self, r: Rollout) -> torch.Tensor:
        """(B, R) values (under FSDP one forward of the sharded model: models.in_forward)."""
        # the squeeze (a view) outside the sharded forward, whose outputs FSDP hooks for the backward pass
        return in_forward(self.model, self._head_output, r).squeeze(-1).float() + self.offset

    def _head_output(self, r: Rollout) -> torch.Tensor:
        """(B, R, 1) the head's output at every reply position."""
        inner = unwrap(self.model)  # LoRA layers sit inside the trunk; the head is trainable
        h = reply_hidden(inner.base_model, r.query_ids, r.query_mask, r.response_ids, r.response_mask,
                         share_prompts=not is_sharded(self.model))
        return inner.score(h)

    @torch.no_grad()
    def rescale(self, a: float, b: float) -> None:
        """Values become a · head + b (under FSDP each rank scales its shard of the head; a copy gathered for the last
        forward is dropped first, so the next forward gathers the scaled head)."""
        reshard(self.model)
        for p in unwrap(self.model).score.parameters():
            p.mul_(a)
        self.offset.fill_(b)

    def save(self, tok, out_dir, write=save_model) -> None:
        """The critic as a sequence-classification folder, its offset in the config; ``write(model, tok, out_dir)``
        (the run's save_model under FSDP, which every rank calls)."""
        unwrap(self.model).config.chatrlhf_value_offset = float(self.offset.detach())
        write(self.model, tok, out_dir)


# --------------------------------------------------------------------------- shared by the on-policy trainers
# ``cfg`` below is a PPOConfig or GRPOConfig: the fields read are the ones both have (max_prompt_length,
# max_new_tokens, temperature, dtype, data, format, eval_data, eval_fraction, seed, batch_size, lora_r, ...).


def missing_eos_penalty(cfg, tok) -> float:
    """--missing-eos-penalty, or by default 1 for chat replies and 0 for plain-text continuations (which need
    not end within --max-new-tokens)."""
    if cfg.missing_eos_penalty is not None:
        return cfg.missing_eos_penalty
    return 0.0 if is_plain(tok) else 1.0


def prompt_indices(n: int, batch: int, seed: int, step: int) -> list[int]:
    """The prompts of step ``step`` (0-based): epochs of seeded permutations, a pure function of the step
    so that a resumed run needs only the step number."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng(seed + epoch).permutation(n)
    return [int(i) for i in order[k * batch:(k + 1) * batch]]


def step_prompts(run, data: list, step: int, per_prompt: int) -> tuple[list, list[int]]:
    """This process's prompts of on-policy step ``step``, each ``per_prompt`` times, and their rows' places in the
    whole batch: the step's --batch-size × processes prompts (:func:`prompt_indices`), every ``run.world_size``-th
    from ``run.rank``. One process: the step's prompts, rows 0…B·per_prompt − 1."""
    cfg = run.cfg
    picks = prompt_indices(len(data), cfg.batch_size * run.world_size, cfg.seed, step)
    mine = range(run.rank, len(picks), run.world_size)
    return [data[picks[j]] for j in mine for _ in range(per_prompt)], [j * per_prompt + i for j in mine
                                                                       for i in range(per_prompt)]


def read_prompts(paths: list[str], fmt: str = "auto") -> list:
    """Every prompt (a message list) of every file, in any format that has prompts; an error when there are none."""
    prompts = [p for path in paths for p in load_prompts(path, fmt)]
    if not prompts:
        raise UsageError(f"--data {','.join(paths)}: no prompts", "one prompt per line in a .txt, or any data format")
    return prompts


def split_prompts(cfg) -> tuple[list, list]:
    """Train and held-out prompts: --eval-data, else a prompt-disjoint split with the run's seed."""
    prompts = read_prompts(cfg.data, cfg.format)
    if cfg.eval_data:
        return prompts, [p for path in cfg.eval_data for p in load_prompts(path, cfg.format)]
    train_part, held = split_by_prompt([Conversation(p) for p in prompts], cfg.eval_fraction, cfg.seed)
    return [c.messages for c in train_part], [c.messages for c in held]


def reference_context(cfg, policy, needed: bool = True, shard=None):
    """A callable giving a context manager that yields the frozen reference: with LoRA the policy itself with its
    adapters off (no second copy), else a frozen copy of --model (passed through ``shard``, e.g. the run's
    ``shard_frozen`` under FSDP). None when ``needed`` is False (no copy loaded)."""
    if hasattr(policy, "disable_adapter"):
        return lambda: adapters_off(policy)
    if not needed:
        return None
    ref = load_model(cfg)[0].eval().requires_grad_(False)
    ref = shard(ref) if shard is not None else ref
    return lambda: contextlib.nullcontext(ref)


def adapters_off(policy):
    """The reference under LoRA: the same network with its adapters disabled."""
    @contextlib.contextmanager
    def ctx():
        with policy.disable_adapter():
            yield policy
    return ctx()


@torch.no_grad()
def row_seeds(*key: int, rows) -> list[int]:
    """A seed per rollout row, a pure function of ``key`` (the run's seed, a stream tag, the step) and the row's
    place in the whole batch: a row samples the same reply however the batch is cut into processes or chunks."""
    return [int(np.random.SeedSequence([*key, r]).generate_state(1)[0]) for r in rows]


def generate(policy, tok, prompts, cfg, gen: torch.Generator | None, top_p: float = 1.0,
             seeds: list[int] | None = None, sampler=None) -> tuple[Rollout, torch.Tensor, float]:
    """Sampled replies as a Rollout (log-probs, values and rewards still empty), the sampler's own log-probs
    and the seconds it took. ``top_p`` below 1 (bestofn, which never recomputes log-probs) samples from the nucleus:
    the sampler's log-probs are then those of the filtered distribution. ``seeds`` (one per prompt, see
    :func:`row_seeds`): each row draws from a stream of its own instead of ``gen``. ``sampler``: another engine with
    ``sample_tensors`` (vllm_backend.VLLMSampler) instead of ours. A policy sharded with FSDP is gathered whole once
    for the whole generation (fsdp.unsharded): each rank's replies end at their own lengths, so the engine's
    per-token passes must not gather weights from the other ranks."""
    t0 = time.perf_counter()
    with unsharded(policy):
        device = next(policy.parameters()).device  # the gathered weights': the compute device, even when offloaded
        q, qm = encode_prompts(tok, prompts, cfg.max_prompt_length, device)
        policy.eval()
        rows = [generator(x, device) for x in seeds] if seeds is not None else None
        ids, mask, sample_lp = (sampler or Engine(policy, tok, cfg.dtype)).sample_tensors(
            q, qm, SamplingParams(cfg.max_new_tokens, cfg.temperature, top_p=top_p), gen, row_generators=rows)
    zeros = torch.zeros_like(sample_lp)
    r = Rollout(q, qm, ids, mask, zeros, zeros, zeros, zeros[:, 0], zeros, zeros, zeros, prompts,
                decode_replies(tok, ids, mask), ended_with_eos(ids, tok.eos_token_id))
    return r, sample_lp, time.perf_counter() - t0


@torch.no_grad()
def forward_passes(policy, ref_ctx, r: Rollout, cfg, value_head=None):
    """Fill in log π and log π_ref at the sampling temperature, each in its own forward pass (no reference pass when
    ``ref_ctx`` is None); returns the values that ``value_head`` reads off the policy's trunk pass (None without one)."""
    with autocast(cfg.dtype, r.query_ids.device):
        r.logprobs, _, trunk_values = policy_forward(policy, r, cfg.temperature, value_head=value_head)
        if ref_ctx is not None:
            with ref_ctx() as ref:
                r.ref_logprobs, _, _ = policy_forward(ref, r, cfg.temperature)
    return trunk_values


def rollout_metrics(r: Rollout, gen_s: float) -> dict:
    """A scored rollout's lengths, sampling speed, replies shared across prompts and total reward."""
    n_tokens = int(r.response_mask.sum())
    return {"rollout/length": n_tokens / len(r), "rollout/tokens_per_s": n_tokens / gen_s, "rollout/generate_s": gen_s,
            "rollout/cross_prompt_duplicates": shared_reply_fraction([prompt_key(p) for p in r.prompts], r.texts),
            "reward/total_mean": float(r.scores.mean()), "reward/total_std": float(r.scores.std(unbiased=False))}


def minibatches(n: int, group: int, size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Shuffled minibatches of rollout rows. Rows come in groups of ``group`` replies to one prompt; when a
    minibatch holds whole groups, whole groups are shuffled, so that each prompt is computed once per
    minibatch (rollout.reply_hidden shares its KV cache) — 40% less work for 4 replies per prompt."""
    if group > 1 and size % group == 0 and n % group == 0:
        rows = (torch.randperm(n // group, generator=generator)[:, None] * group + torch.arange(group)).flatten()
    else:
        rows = torch.randperm(n, generator=generator)
    return list(rows.split(size))


def local_minibatches(run, rows: list[int], group: int, size: int, generator: torch.Generator | None = None
                      ) -> list[tuple[torch.Tensor, int]]:
    """:func:`minibatches` drawn over the whole batch (the same on every process: the shuffle stream is shared) and
    cut to this process's rows: (local row indices, the minibatch's rows over every process) for each. ``rows``: the
    places of this process's rollout rows in the whole batch. One process: the minibatches themselves."""
    where = {g: i for i, g in enumerate(rows)}
    out = []
    for idx in minibatches(int(run.total(len(rows))), group, size, generator):
        out.append((torch.tensor([where[g] for g in idx.tolist() if g in where], dtype=torch.long), len(idx)))
    return out


def micro_batches(run, rows: torch.Tensor, size: int) -> list[tuple[torch.Tensor, bool]]:
    """(rows, idle) for each forward/backward pass of this process over its ``rows`` of a minibatch, ``size`` at a
    time (idle False). Under FSDP every process must make as many passes (each pass gathers the weights from all, and
    each backward reduce-scatters the gradients), but a minibatch drawn over the whole batch gives them different
    numbers of rows: one with fewer passes makes idle ones (True) on its first row, whose loss it multiplies by 0 and
    whose metrics it drops — so it adds nothing to the gradients, yet takes part in the collectives."""
    parts = [(part, False) for part in rows.split(size)] if len(rows) else []
    if not run.fsdp:
        return parts
    idle = (torch.zeros(1, dtype=torch.long, device=rows.device), True)
    return parts + [idle] * (run.most(len(parts)) - len(parts))


def whole_batch_spread(run, r: Rollout) -> dict:
    """reward/total_std over every process's replies (several processes; a process's own otherwise)."""
    if run.world_size == 1:
        return {}
    return {"reward/total_std": float(torch.tensor(run.gather(r.scores.tolist())).std(unbiased=False))}


def step_metrics(command: str, step: int, t0: float, r: Rollout, mix: RewardMix, state: dict, metrics: dict,
                 kl_bound: float, log=print) -> dict:
    """Close step ``step``'s metrics: its time since ``t0``, the mix's running moments into the state (a resumed run
    normalises as the uninterrupted one), the failure signs (:func:`watch`), and the rollout under ``_rollout`` for
    the samples file."""
    metrics["time/step_s"] = time.perf_counter() - t0
    state["moments"] = mix.state()
    watch(command, step, state, metrics, kl_bound, log)
    metrics["_rollout"] = r
    return metrics


def watch(command: str, step: int, state: dict, metrics: dict, kl_bound: float, log=print) -> None:
    """RL_DETAILS' failure signs on the run's recent history (kept in ``state``, so a resumed run warns as the
    uninterrupted one): each sign as a ``warning/NAME`` metric, and printed once when it first shows."""
    state["history"] = (state.get("history", []) + [{k: v for k, v in metrics.items() if not k.startswith("_")}])[-12:]
    signs = failure_signs(state["history"], kl_bound=kl_bound)
    for key, msg in signs.items():
        metrics[f"warning/{key}"] = msg
        if key not in state.get("warnings", []):
            log(f"chatrlhf {command}: warning at step {step + 1}: {msg}")
    state["warnings"] = sorted(signs)


# --------------------------------------------------------------------------- held-out evaluation


EVAL_STREAM, TRAIN_STREAM = 1, 0  # row_seeds' stream tags


@torch.no_grad()
def evaluate(policy, ref_ctx, tok, prompts, cfg, mix: RewardMix, state: dict, total: int,
             per_prompt: int | None = None) -> dict:
    """Reward and KL on held-out prompts (``per_prompt`` replies each, by default --samples-per-prompt;
    ``batch_size`` prompts at a time), each reply sampled from a stream of its own with a fixed seed, so evaluations
    compare like with like, the training stream never moves and the batch size changes nothing. Per source the raw
    mean (``eval/NAME_mean``);
    ``eval/reward`` mixes them on one scale from step 0: each source in units of its held-out mean and std at the
    first evaluation, weighted as at the end of the run, minus the missing-EOS penalty — 0 at the start (up to that
    penalty). No ``eval/kl`` without a reference (``ref_ctx`` None)."""
    if not prompts:
        return {}
    per_prompt = cfg.samples_per_prompt if per_prompt is None else per_prompt
    got = {"raw": {name: [] for name in mix.sources}, "kl": [], "lengths": [], "ended": []}
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = [p for p in prompts[i:i + cfg.batch_size] for _ in range(per_prompt)]
        first = i * per_prompt  # a stream per reply: the same replies whatever --batch-size cuts the prompts into
        r, _, _ = generate(policy, tok, chunk, cfg, None, seeds=row_seeds(cfg.seed, EVAL_STREAM,
                                                                         rows=range(first, first + len(chunk))))
        if ref_ctx is not None:
            forward_passes(policy, ref_ctx, r, cfg)
        eval_collect(got, r, mix, with_kl=ref_ctx is not None)
    return eval_summary(got, mix, state, total)


def eval_collect(got: dict, r: Rollout, mix: RewardMix, with_kl: bool = True) -> None:
    """Add an evaluation batch's raw source values, KL, lengths and EOS flags to ``got``."""
    for name, values in mix.raw(r.prompts, r.texts, r.ended.tolist()).items():
        got["raw"][name] += values
    if with_kl:
        got["kl"] += (losses.kl_estimates(r.logprobs, r.ref_logprobs)["k1"] * r.response_mask).sum(1).tolist()
    got["lengths"] += r.response_mask.sum(1).tolist()
    got["ended"] += r.ended.tolist()


def eval_summary(got: dict, mix: RewardMix, state: dict, total: int) -> dict:
    """The evaluation's metrics (see :func:`evaluate`); the first evaluation fixes the scale in ``state``."""
    raw, kl, lengths, ended = got["raw"], got["kl"], got["lengths"], got["ended"]
    seen = {name: [float(x) for x in values if x is not None] for name, values in raw.items()}
    if state.get("eval_norm") is None:  # the first evaluation fixes the scale
        state["eval_norm"] = {n: (float(np.mean(v)), float(np.std(v)) or 1.0) if v else (0.0, 1.0) for n, v in seen.items()}
    eos_rate = sum(ended) / len(ended)
    out = {"eval/length": float(np.mean(lengths)), "eval/eos_rate": eos_rate}
    if kl:
        out["eval/kl"] = float(np.mean(kl))
    total_reward = -mix.penalty * (1 - eos_rate)
    for name, v in seen.items():
        mu, sd = state["eval_norm"][name]
        out[f"eval/{name}_coverage"] = len(v) / len(raw[name])
        if v:  # no mean where the source had no opinion on any reply
            out[f"eval/{name}_mean"] = float(np.mean(v))
            total_reward += mix.schedules[name](total) * (float(np.mean(v)) - mu) / sd
    out["eval/reward"] = total_reward
    return out


# --------------------------------------------------------------------------- the end of a step


def end_of_step(command: str, run, step: int, n_steps: int, raw: dict, samples, bar, held_out, deadline: float,
                log=print) -> int:
    """After on-policy step ``step`` (1-based) of ``n_steps``: past the --max-minutes ``deadline`` this step becomes
    the last one (evaluated and saved as an end; ``run.state["stopped_at"]``); its sample rows go to samples.jsonl;
    every --eval-steps and at the end ``held_out(total)`` runs and the rows are shown; then the metrics, the progress
    bar and the checkpoint (run.end_step). ``raw``: the step's metrics, with ``_rollout``. Returns ``n_steps``."""
    cfg = run.cfg
    n_steps = out_of_time(command, run, step, n_steps, deadline, log)
    rows = sample_rows(step, raw.pop("_rollout"), raw, cfg.sample_rows)
    samples.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
    samples.flush()
    if step % cfg.eval_steps == 0 or step == n_steps:
        raw.update(held_out(n_steps))
        run.table(step, "samples", rows)
        if not cfg.quiet and rows:
            show_samples(bar.console, rows)
    run.log(step, {k: v for k, v in raw.items() if not k.startswith("_")})
    kl = f"  kl {raw['objective/kl']:.3f}" if "objective/kl" in raw else ""
    run.end_step(step, n_steps, info=f"reward {raw['reward/total_mean']:+.3f}{kl}  {raw['time/step_s']:.1f} s/step")
    return n_steps


def deadline_of(cfg) -> float:
    """The perf_counter time at which --max-minutes runs out (inf without a budget)."""
    return time.perf_counter() + 60 * cfg.max_minutes if cfg.max_minutes > 0 else float("inf")


def out_of_time(command: str, run, step: int, n_steps: int, deadline: float, log=print) -> int:
    """After step ``step`` (1-based) of ``n_steps``: past the --max-minutes ``deadline`` this step becomes the last one
    (``run.state["stopped_at"]``, which the summary reports as ``stopped_by_time``). Returns the new ``n_steps``."""
    if run.any(time.perf_counter() > deadline) and step < n_steps:  # every process stops at the same step
        log(f"chatrlhf {command}: --max-minutes {run.cfg.max_minutes:g} reached at step {step} of {n_steps}")
        n_steps = run.state["stopped_at"] = step
    return n_steps


# --------------------------------------------------------------------------- sample replies


def sample_rows(step: int, r: Rollout, metrics: dict, n: int) -> list[dict]:
    """The first ``n`` replies of the batch with their total and per-source rewards."""
    raws = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("_raw/")}
    return [{"step": step, "prompt": r.prompts[i][-1]["content"], "reply": r.texts[i], "reward": round(float(r.scores[i]), 4),
             "ended": bool(r.ended[i]), **{f"reward_{k}": v[i] for k, v in raws.items()}} for i in range(min(n, len(r)))]


def show_samples(console, rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title=f"sample replies, step {rows[0]['step']}", show_lines=True)
    cols = [c for c in rows[0] if c != "step"]
    for c in cols:
        table.add_column(c, ratio=3 if c in ("prompt", "reply") else 1)
    for row in rows:
        table.add_row(*[f"{row[c]:+.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols])
    console.print(table)
