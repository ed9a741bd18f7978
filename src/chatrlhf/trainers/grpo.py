"""GRPO and RLOO: critic-free policy gradient for a chat policy against a scheduled mix of reward sources.

One step: sample G replies for each of a batch of prompts through the generation engine (KV cache, the prompt
prefilled once per group, temperature T) → score them with the reward mix (reward model, human feedback,
similarity to human replies, Python functions; rewards.py), optionally minus β·KL → one advantage per reply from its
group: (r − mean) / std (GRPO), r − mean (Dr.GRPO) or r − mean of the others (RLOO) → ``num_iterations`` passes of
optimizer steps over the batch with the clipped surrogate (ε low/high), plus β·k3 KL to the reference as a loss term,
aggregated per reply (grpo), per token over a constant (dr_grpo) or per token (dapo). Every loss and estimator is a
pure function in losses.py; sampling, the reference, the evaluation and the warnings are PPO's (rollout.py).

Departures from the papers and from TRL, and why:
  * RLOO is ``--advantage rloo``, not a trainer of its own: it differs from GRPO only in the baseline (and, by
    convention, KL in the reward), so both share one loop; TRL's RLOO also uses a sequence-level ratio, ours is
    per token as GRPO's;
  * log π_old is recomputed after sampling only when it is needed (several optimizer steps per batch, or KL in the
    reward); otherwise the ratio is 1 and the training pass's own detached log-probs serve, as in TRL — the
    sampler's log-probs are kept to log the mismatch either way;
  * the k3 KL term is clamped at 10 nats per token (losses.kl_estimates), so one far-off token cannot swamp a step;
  * rewards are normalised per source by their running moments before mixing (rewards.py), then per group here;
  * with β 0 no reference is loaded (as TRL), so there is no KL to log or to warn about;
  * with LoRA the reference is the base model with the adapters switched off: no second copy;
  * the failure signs of RL_DETAILS are checked every step and reported as warnings, as for PPO.
"""

from __future__ import annotations

import time

import torch

from chatrlhf import losses
from chatrlhf.config import GRPOConfig
from chatrlhf.data.template import is_plain, prompt_format
from chatrlhf.errors import UsageError
from chatrlhf.models import autocast, count_parameters, enable_checkpointing, load_model
from chatrlhf.rewards import RewardMix, reward_mix
from chatrlhf.rollout import TRAIN_STREAM, Rollout, deadline_of, end_of_step, evaluate, generate, generator, \
    local_minibatches, micro_batches, missing_eos_penalty, policy_forward, reference_context, rollout_metrics, \
    row_seeds, split_prompts, step_metrics, step_prompts, whole_batch_spread
from chatrlhf.trainers.common import file_hashes, make_optimizer
from chatrlhf.trainers.run import Run, Summary

DEFAULT_EPSILON = 0.2  # PPO's clip, TRL's epsilon

# --------------------------------------------------------------------------- settings


def epsilons(cfg: GRPOConfig) -> tuple[float, float]:
    """(ε_low, ε_high): --epsilon (auto 0.2) and --epsilon-high (auto = ε_low)."""
    low = DEFAULT_EPSILON if cfg.epsilon is None else cfg.epsilon
    return low, low if cfg.epsilon_high is None else cfg.epsilon_high


def scale_rewards(cfg: GRPOConfig) -> bool:
    """--scale-rewards, by default on for GRPO's advantage and off for RLOO's."""
    return cfg.advantage == "grpo" if cfg.scale_rewards is None else cfg.scale_rewards


def rows_per_step(cfg: GRPOConfig, processes: int = 1) -> int:
    """Replies per optimizer step over every process: --minibatch-size, or the whole rollout batch."""
    batch = cfg.batch_size * processes * cfg.num_generations
    return batch if cfg.minibatch_size is None else min(cfg.minibatch_size, batch)


def steps_per_batch(cfg: GRPOConfig, processes: int = 1) -> int:
    """Optimizer steps taken on one rollout batch (of every process); above 1 the policy moves between them, so the
    ratio π/π_old (and its clip) acts and log π_old must be kept from sampling time."""
    batch = cfg.batch_size * processes * cfg.num_generations
    return cfg.num_iterations * -(-batch // rows_per_step(cfg, processes))


def check(cfg: GRPOConfig) -> None:
    """Settings that cannot work, or would do nothing, refused before anything is loaded."""
    if cfg.temperature <= 0:
        raise UsageError(f"--temperature {cfg.temperature}: GRPO samples its replies, so it must be > 0",
                         "use e.g. --temperature 1.0")
    if cfg.num_generations < 2:
        raise UsageError(f"--num-generations {cfg.num_generations}: a group needs at least 2 replies, each the others' "
                         "baseline", "use e.g. --num-generations 4")
    for name, value in (("--num-iterations", cfg.num_iterations), ("--micro-batch-size", cfg.micro_batch_size),
                        ("--minibatch-size", cfg.minibatch_size), ("--batch-size", cfg.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{name} {value}: must be at least 1", f"e.g. {name} 1")
    if cfg.beta < 0:
        raise UsageError(f"--beta {cfg.beta}: must be ≥ 0", "e.g. --beta 0.04, or 0 for no KL")
    if cfg.kl_in_reward and cfg.beta == 0:
        raise UsageError("--kl-in-reward with --beta 0 puts nothing in the reward", "give --beta, e.g. 0.05")
    given = [(f, v) for f, v in (("--epsilon", cfg.epsilon), ("--epsilon-high", cfg.epsilon_high)) if v is not None]
    if given and steps_per_batch(cfg, cfg.num_processes) == 1:
        raise UsageError(f"{given[0][0]} acts only when a batch takes several optimizer steps: with one, π = π_old and "
                         "the ratio is 1 on every token", "add --num-iterations 2 (or a smaller --minibatch-size), or "
                         "drop the flag")
    for flag, value in given:
        if not 0 < value < 10:
            raise UsageError(f"{flag} {value}: must be in (0, 10)", "e.g. --epsilon 0.2 --epsilon-high 0.28")


# --------------------------------------------------------------------------- rollout and advantages


@torch.no_grad()
def rollout(policy, ref_ctx, tok, batch: list, cfg: GRPOConfig, mix: RewardMix, step: int,
            seeds: list[int], processes: int = 1) -> tuple[Rollout, torch.Tensor, dict]:
    """The replies to ``batch`` (each prompt G times in a row), each drawn from a stream of its own (``seeds``),
    scored by the mix (its running moments updated); log π_old and log π_ref recomputed at the sampling temperature
    where the update needs them. Returns the rollout, the sampler's own log-probs and the metrics."""
    r, sample_lp, gen_s = generate(policy, tok, batch, cfg, None, seeds=seeds)
    with autocast(cfg.dtype, r.query_ids.device):
        if needs_old_logprobs(cfg, processes):
            r.logprobs = policy_forward(policy, r, cfg.temperature)[0]
        if ref_ctx is not None:
            with ref_ctx() as ref:
                r.ref_logprobs = policy_forward(ref, r, cfg.temperature)[0]
    scores, metrics = mix(batch, r.texts, r.ended.tolist(), step)
    r.scores = torch.tensor(scores, dtype=torch.float32, device=r.query_ids.device)
    metrics.update(rollout_metrics(r, gen_s))
    return r, sample_lp, metrics


def needs_old_logprobs(cfg: GRPOConfig, processes: int = 1) -> bool:
    """log π_old from a pass right after sampling: for the ratio when the policy moves within a batch, and for the
    KL penalty in the reward. Otherwise the training pass's own (detached) log-probs are log π_old."""
    return steps_per_batch(cfg, processes) > 1 or cfg.kl_in_reward


def advantages(r: Rollout, cfg: GRPOConfig) -> dict:
    """One advantage per reply from its group (stored in ``r.advantages`` (B, R), the same at every token), after
    the KL penalty when it is in the reward; the groups' reward statistics."""
    rewards = r.scores
    metrics = {}
    if cfg.kl_in_reward:  # TRL's RLOO: β · Σ_t (log π_old − log π_ref) on each reply's reward (k1, as PPO)
        kl = ((r.logprobs - r.ref_logprobs) * r.response_mask).sum(1)
        rewards = rewards - cfg.beta * kl
        metrics["reward/with_kl_mean"] = float(rewards.mean())
    G = cfg.num_generations
    adv = (losses.group_advantages if cfg.advantage == "grpo" else losses.rloo_advantages)(rewards, G,
                                                                                            scale_rewards(cfg))
    r.advantages = adv[:, None].expand_as(r.response_mask).contiguous()
    metrics.update({k: float(v) for k, v in losses.group_stats(rewards, G).items()})
    metrics["grpo/advantage_abs_mean"] = float(adv.abs().mean())
    return metrics


# --------------------------------------------------------------------------- the update


def grpo_update(policy, optimizer, r: Rollout, sample_lp: torch.Tensor, run: Run, use_ref: bool,
                shuffle: torch.Generator, row_ids: list[int]) -> dict:
    """``num_iterations`` passes over the rollout batch, each in optimizer steps of --minibatch-size replies
    (whole groups shuffled), each step accumulated over micro-batches with the loss normalised over the whole step.
    The first pass also measures what the batch was sampled with: KL to the reference and the sampler mismatch.
    Several processes: ``row_ids`` are this process's rows' places in the whole batch; the minibatches are drawn over
    the whole batch, each process trains on its rows with the step's replies and tokens over every process."""
    cfg = run.cfg
    device = r.query_ids.device
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums: dict[str, float] = {}
    n_steps = 0
    kl_rows = torch.zeros(len(r), device=device)
    kl3_rows = torch.zeros(len(r), device=device)
    policy.train()
    for it in range(cfg.num_iterations):
        for rows, n_rows in local_minibatches(run, row_ids, cfg.num_generations, rows_per_step(cfg, run.world_size),
                                              shuffle):
            rows = rows.to(device)
            n_tokens = int(run.total(float(r.response_mask[rows].sum())))
            norm = dict(n_sequences=n_rows, n_tokens=max(n_tokens, 1), max_tokens=cfg.max_new_tokens)
            m: dict[str, float] = {}
            for micro, idle in micro_batches(run, rows, cfg.micro_batch_size):  # none if no row of the step is here
                mb = r.select(micro)
                with autocast(cfg.dtype, device):
                    lp, ent, _ = policy_forward(policy, mb, cfg.temperature, with_entropy=True)
                old = mb.logprobs if needs_old_logprobs(cfg, run.world_size) else lp.detach()
                ref = mb.ref_logprobs if use_ref and not cfg.kl_in_reward else None
                loss, lm = losses.grpo_policy_loss(lp, old, mb.advantages[:, 0], mb.response_mask, cfg.loss_type,
                                                   eps_low=epsilons(cfg)[0], eps_high=epsilons(cfg)[1],
                                                   ref_logprobs=ref, beta=cfg.beta, **norm)
                (loss * 0 if idle else loss).backward()  # idle: a pass that FSDP's collectives need, nothing more
                if idle:
                    continue
                lm["policy/entropy"] = losses.masked_mean(ent, mb.response_mask, total=norm["n_tokens"])
                for k, v in lm.items():  # shares of the step's loss and token means: they add up
                    m[k] = m.get(k, 0.0) + float(v)
                if it == 0:
                    _first_pass(micro, old, mb, sample_lp, use_ref, kl_rows, kl3_rows, m, norm["n_tokens"])
            m["policy/grad_norm"] = run.optimizer_step(optimizer, None, params, cfg.max_grad_norm)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            n_steps += 1
    out = {k: v / n_steps for k, v in sums.items()}
    out.pop("mismatch", None)
    out["rollout/logprob_mismatch"] = sums.get("mismatch", 0.0) / max(1, n_steps // cfg.num_iterations)
    if use_ref:  # per reply, as PPO's objective/kl (the failure signs read it)
        out["objective/kl"], out["objective/kl_k3"] = float(kl_rows.mean()), float(kl3_rows.mean())
    out["train/optimizer_steps"] = n_steps
    return out


@torch.no_grad()
def _first_pass(micro, old, mb: Rollout, sample_lp, use_ref: bool, kl_rows, kl3_rows, m: dict, n_tokens: int) -> None:
    """On the first pass over a batch, log π_old is what the batch was sampled with: its KL to the reference per
    reply (k1 and k3 sums) and its mismatch with the sampler's own log-probs."""
    mask = mb.response_mask
    m["mismatch"] = m.get("mismatch", 0.0) + float(  # this micro-batch's share of the step's token mean
        losses.masked_mean((sample_lp[micro] - old).abs(), mask, total=n_tokens))
    if use_ref:
        kl = losses.kl_estimates(old, mb.ref_logprobs)
        kl_rows[micro] = (kl["k1"] * mask).sum(1)
        kl3_rows[micro] = (kl["k3"] * mask).sum(1)


# --------------------------------------------------------------------------- the loop

# metrics summed over processes: a process's share of a mean over the step's replies or tokens, or its part of a rate
SUMMED = ("loss/", "grpo/clip", "grpo/ratio_mean", "policy/entropy", "rollout/logprob_mismatch", "rollout/tokens_per_s")


def load_networks(cfg: GRPOConfig, run: Run):
    """(policy, tokenizer, reference context or None); under FSDP the policy and the reference sharded."""
    policy, tok = load_model(cfg, trainable=True, chat_template=cfg.chat_template, lora=cfg)
    ref_ctx = reference_context(cfg, policy, needed=cfg.beta != 0, shard=run.shard_frozen)
    if cfg.gradient_checkpointing:
        enable_checkpointing(policy)
    return run.shard_weights(policy), tok, ref_ctx  # FSDP: before the optimizer, which then holds this rank's shards


def train(cfg: GRPOConfig, log=print) -> Summary:
    check(cfg)
    run = Run("grpo", cfg, log)
    train_data, eval_data = split_prompts(cfg)
    mix = reward_mix(cfg, "grpo", log=log, shard=run.shard_frozen)  # FSDP: the reward model sharded too
    policy, tok, ref_ctx = load_networks(cfg, run)
    use_ref = cfg.beta != 0
    mix.penalty = missing_eos_penalty(cfg, tok)
    n_steps = run.total_steps(max(1, len(train_data) // (cfg.batch_size * run.world_size)))
    mix.gather = run.gather  # several processes normalise each source with the whole batch's moments
    optimizer, scheduler = make_optimizer([p for p in policy.parameters() if p.requires_grad], cfg.lr,
                                          cfg.weight_decay, eps=1e-5, warmup_steps=int(cfg.warmup_ratio * n_steps),
                                          total_steps=n_steps)
    eps_low, eps_high = epsilons(cfg)
    log(f"chatrlhf grpo: {len(train_data)} train / {len(eval_data)} held-out prompts, {n_steps} steps × "
        f"{cfg.batch_size * run.world_size} prompts × {cfg.num_generations} replies, advantage {cfg.advantage}"
        f"{'' if scale_rewards(cfg) else ' (not scaled)'}, loss {cfg.loss_type}, KL "
        + (f"β {cfg.beta:g} {'in the reward' if cfg.kl_in_reward else 'as a k3 loss term'}" if use_ref else "off")
        + f", {steps_per_batch(cfg, run.world_size)} optimizer step(s) per batch"
        + (f" (ε {eps_low:g}/{eps_high:g})" if steps_per_batch(cfg, run.world_size) > 1 else "")
        + f", reward sources {', '.join(mix.sources)}, {'plain-text' if is_plain(tok) else 'chat'} prompts, "
        f"missing-EOS penalty {mix.penalty:g}, {count_parameters(policy)[1]:,} trainable parameters, device {run.device}")
    gens = {"shuffle": generator(cfg.seed + 1)}  # replies draw from streams of their own (rollout.row_seeds)
    state = run.begin({"policy": (policy, optimizer, scheduler)}, gens,
                      {"moments": {}, "history": [], "eval_start": None, "eval_norm": None})
    mix.load_state(state["moments"])
    held_out = lambda total: evaluate(policy, ref_ctx, tok, eval_data, cfg, mix, state, total,  # noqa: E731
                                      per_prompt=cfg.num_generations)
    step = run.step
    if step == 0:
        state["eval_start"] = held_out(n_steps)
        run.log(0, state["eval_start"])
    samples = run.open_rows("samples.jsonl")
    deadline = deadline_of(cfg)
    with run.loop(n_steps) as bar:
        while run.running(step, n_steps):
            raw = grpo_step(run, step, policy, ref_ctx, tok, train_data, mix, (optimizer, scheduler), gens, log)
            step += 1
            n_steps = end_of_step("grpo", run, step, n_steps, raw, samples, bar, held_out, deadline, log)
    samples.close()
    if step < n_steps:
        return run.stopped()
    return _finish(run, policy, tok, state)


def grpo_step(run: Run, step: int, policy, ref_ctx, tok, prompts: list, mix: RewardMix, opt_sched: tuple,
              gens: dict, log=print) -> dict:
    """One step (``step`` 0-based): rollout, group advantages, the update, warnings. Returns the step's metrics,
    reduced over processes (``_rollout`` holds this process's rollout for the samples file)."""
    cfg, state = run.cfg, run.state
    t0 = time.perf_counter()
    batch, rows = step_prompts(run, prompts, step, cfg.num_generations)
    r, sample_lp, metrics = rollout(policy, ref_ctx, tok, batch, cfg, mix, step,
                                    row_seeds(cfg.seed, TRAIN_STREAM, step, rows=rows), run.world_size)
    metrics.update(advantages(r, cfg))
    metrics.update(whole_batch_spread(run, r))
    optimizer, scheduler = opt_sched
    metrics.update(grpo_update(policy, optimizer, r, sample_lp, run, ref_ctx is not None, gens["shuffle"], rows))
    metrics = run.reduce(metrics, SUMMED)
    metrics["train/lr"] = scheduler.get_last_lr()[0]
    scheduler.step()
    return step_metrics("grpo", step, t0, r, mix, state, metrics, cfg.kl_bound, log)


def _finish(run: Run, policy, tok, state: dict) -> Summary:
    cfg = run.cfg
    run.save_model(policy, tok)
    return run.finish({"eval_start": state.get("eval_start"),
                       "eval_end": run.last_eval("eval/reward"),
                       "stopped_by_time": state.get("stopped_at") == run.step, "chat_template": cfg.chat_template,
                       "prompt_format": prompt_format(tok), "missing_eos_penalty": missing_eos_penalty(cfg, tok),
                       "data": file_hashes(cfg.data)})
