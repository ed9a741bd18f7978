"""PPO for a chat policy with a value network, against a scheduled mix of reward sources.

One step: sample replies for a batch of prompts (KV cache, temperature T) → recompute log-probs of
the policy and the frozen reference at T, and values → score the replies (reward model, human
feedback, similarity to human replies, Python functions; rewards.py) → per-token rewards with the
k1 KL penalty and the score on the last reply token → GAE (γ 1, λ 0.95), whitened advantages →
``ppo_epochs`` passes over shuffled minibatches with the clipped policy and value losses. Every
loss and estimator is a pure function in losses.py.

Departures from the N+ recipe (Huang et al. 2024), and why:
  * the critic is a separate network initialised from the reward model by default (as N+), but can
    be a zero-initialised head on the policy trunk (``--critic shared``) when memory is tight;
  * with LoRA the reference is the base model with the adapters switched off: no second copy;
  * the LM head runs only at reply positions, in the sampler's prefill only at the last position;
  * β can be fixed (0.05) or adaptive (Ziegler et al. 2019);
  * a critic from the reward model is put on the scale of the mixed reward before its first use
    (N+ builds it from the normalised reward model; our rewards are normalised again, per source);
  * the failure signs of RL_DETAILS are checked every step and reported as warnings.
"""

from __future__ import annotations

import time

import torch

from chatrlhf import episodes, losses
from chatrlhf.config import LoraArgs, ModelArgs, PPOConfig
from chatrlhf.data.template import is_plain, prompt_format
from chatrlhf.engine import SamplingParams
from chatrlhf.env import turn_references, user_turns_key
from chatrlhf.errors import UsageError
from chatrlhf.models import add_lora, autocast, count_parameters, enable_checkpointing, load_model, load_tokenizer, \
    resolve_device, resolve_model, unwrap
from chatrlhf.reward_model import classic_head, load_reward_model, reward_norm
from chatrlhf.rewards import RewardMix, reward_mix
from chatrlhf.rollout import TRAIN_STREAM, Critic, Rollout, deadline_of, end_of_step, eval_collect, eval_summary, \
    evaluate, forward_passes, generate, generator, local_minibatches, micro_batches, missing_eos_penalty, \
    policy_forward, prompt_indices, reference_context, rollout_metrics, row_seeds, split_prompts, step_metrics, \
    step_prompts, whole_batch_spread
from chatrlhf.trainers.common import file_hashes, make_optimizer
from chatrlhf.trainers.run import Run, Summary
from chatrlhf.trainers.value import SeparateCritic, SharedHead
from chatrlhf.vllm_backend import VLLMSampler, check_available

# --------------------------------------------------------------------------- set-up


DEFAULT_TURN_GAMMA = 0.9  # qlearn's --gamma: both trainers maximise the same Σ_t γ^t r_t by default


def build_rewards(cfg: PPOConfig, log=print, shard=None) -> RewardMix:
    """The reward mix of the reward flags (its missing-EOS penalty is set once the tokenizer is known). With --env
    dialogue, as qlearn: similarity is to the data's human reply at that turn of that dialogue (user_turns_key)."""
    if cfg.env == "dialogue":
        return reward_mix(cfg, "ppo", lambda paths: turn_references(episodes.load_dialogues(paths, cfg.format)),
                          user_turns_key, hint=" (e.g. the --data file)", log=log)
    return reward_mix(cfg, "ppo", log=log, shard=shard)


def turn_gamma(cfg: PPOConfig) -> float:
    """--turn-gamma, by default qlearn's γ."""
    return DEFAULT_TURN_GAMMA if cfg.turn_gamma is None else cfg.turn_gamma


def build_value_function(cfg: PPOConfig, tok, hidden_size: int, log=print):
    """(value function, kind): a head on the policy's trunk or a separate critic network. See --critic."""
    kind = cfg.critic
    if kind == "auto":
        kind = "reward-model" if cfg.reward_model and _same_vocab(cfg.reward_model, tok) and \
            classic_head(cfg.reward_model) else "policy"
    if kind == "shared":
        return SharedHead(hidden_size, cfg.vf_coef), kind
    if kind == "reward-model":
        if not cfg.reward_model:
            raise UsageError("--critic reward-model needs --reward-model", "or use --critic policy / shared")
        if not _same_vocab(cfg.reward_model, tok):
            raise UsageError(f"--critic reward-model: {cfg.reward_model} has another tokenizer than the policy, so it "
                             "cannot value the policy's tokens", "use --critic policy or --critic shared")
        if not classic_head(cfg.reward_model):
            raise UsageError(f"--critic reward-model: {cfg.reward_model} reads its score from another layer, pooling or "
                             "several heads, not one head at the last token, so it cannot value each reply token",
                             "use --critic policy or --critic shared")
    source = cfg.reward_model if kind == "reward-model" else cfg.model
    model, _ = load_reward_model(ModelArgs(model=source, device=cfg.device, dtype=cfg.dtype), trainable=True)
    if kind == "policy":  # zero head: values start at 0
        torch.nn.init.zeros_(model.score.weight)
    if cfg.lora_r > 0:  # LoRA on the critic too: its trunk's weights stay frozen, its head trains in full
        model = add_lora(model, LoraArgs(cfg.lora_r, cfg.lora_alpha, lora_dropout=0.0), modules_to_save=["score"])
    log(f"chatrlhf ppo: critic = separate network from {source}" + (" (LoRA)" if cfg.lora_r > 0 else ""))
    return SeparateCritic(Critic(model), cfg.critic_lr, cfg.dtype), kind


def _same_vocab(path: str, tok) -> bool:

    return load_tokenizer(path).get_vocab() == tok.get_vocab()


# --------------------------------------------------------------------------- rollout and rewards


@torch.no_grad()
def rollout(policy, ref_ctx, vf, tok, prompts, cfg: PPOConfig, mix: RewardMix, step: int,
            seeds: list[int], sampler: VLLMSampler | None = None) -> tuple[Rollout, dict]:
    """Sample (each row from a stream of its own: ``seeds``; on vLLM with a ``sampler``), recompute log-probs and
    values, score with the reward mix (its running moments updated)."""
    r, sample_lp, gen_s = generate(policy, tok, prompts, cfg, None, seeds=seeds, sampler=sampler)
    return r, score(policy, ref_ctx, vf, r, sample_lp, gen_s, cfg, mix, step)


@torch.no_grad()
def score(policy, ref_ctx, vf, r: Rollout, sample_lp: torch.Tensor, gen_s: float, cfg: PPOConfig, mix: RewardMix,
          step: int) -> dict:
    """Fill in a sampled rollout's log-probs, values and scores (the mix's running moments updated); its metrics."""
    prompts = r.prompts
    trunk_values = forward_passes(policy, ref_ctx, r, cfg, vf.head)
    with autocast(cfg.dtype, r.query_ids.device):
        r.values = vf.values(r, trunk_values) * r.response_mask
    scores, metrics = mix(prompts, r.texts, r.ended.tolist(), step)
    r.scores = torch.tensor(scores, dtype=torch.float32, device=r.query_ids.device)
    metrics.update(rollout_metrics(r, gen_s))
    metrics["rollout/logprob_mismatch"] = float(losses.masked_mean((sample_lp - r.logprobs).abs(), r.response_mask))
    if cfg.rollout_engine == "vllm":  # replies of another engine: each token's loss weighed by min(π/π_vLLM, C)
        r.is_weights, m = losses.truncated_importance_weights(r.logprobs, sample_lp, r.response_mask, cfg.tis_cap)
        metrics.update(m)
    return metrics


@torch.no_grad()
def dialogue_rollout(policy, ref_ctx, vf, tok, envs: list, cfg: PPOConfig, mix: RewardMix, step: int,
                     gen: torch.Generator) -> tuple[Rollout, episodes.Episodes, dict]:
    """--env dialogue: whole episodes of the step's dialogues (--samples-per-prompt each, in lockstep), one row per
    assistant turn, each turn scored by the mix; the episodes' returns in the metrics."""
    t0 = time.perf_counter()
    picks = prompt_indices(len(envs[0].dialogues), cfg.batch_size, cfg.seed, step)
    starts = [(i, cfg.seed + step * len(envs) + k)
              for k, i in enumerate(i for i in picks for _ in range(cfg.samples_per_prompt))]
    turns = episodes.play(policy, tok, envs[:len(starts)], starts, SamplingParams(cfg.max_new_tokens, cfg.temperature),
                          cfg.max_prompt_length, cfg.dtype, gen)
    r, links, sample_lp = episodes.to_rollout(turns, tok, cfg.max_prompt_length, next(policy.parameters()).device)
    metrics = score(policy, ref_ctx, vf, r, sample_lp, time.perf_counter() - t0, cfg, mix, step)
    metrics.update({"train/return": float(episodes.episode_sums(r.scores, links).mean()),
                    "train/discounted_return": float(episodes.episode_sums(r.scores, links, turn_gamma(cfg)).mean()),
                    "train/turns": len(r) / links.n, "train/episodes": links.n})
    return r, links, metrics


@torch.no_grad()
def turn_values(policy, vf, tok, r: Rollout, links: episodes.Episodes, cfg: PPOConfig) -> torch.Tensor:
    """(B,) γ_turn·V(s_{t+1}) of each turn row (losses.turn_bootstrap): V at the next turn's first reply token, 0
    after a terminal turn, and for an episode cut at --max-turns V of the state it was cut in (one more pass)."""
    device = r.query_ids.device
    end = torch.zeros(len(r), device=device)
    if links.cut_states:
        cut = episodes.state_rollout(tok, links.cut_states, cfg.max_prompt_length, device)
        with autocast(cfg.dtype, device):
            trunk_values = policy_forward(policy, cut, cfg.temperature, value_head=vf.head)[2] if vf.reads_trunk else None
            end[links.truncated.to(device)] = vf.values(cut, trunk_values)[:, 0].float()
    return losses.turn_bootstrap(r.values[:, 0], links.next_row.to(device), end, turn_gamma(cfg))


def advantages(r: Rollout, cfg: PPOConfig, beta: float, bootstrap: torch.Tensor | None = None, total=None) -> dict:
    """Per-token rewards with the k1 KL penalty and the score at the last reply token, GAE, whitened advantages.
    ``bootstrap`` (B,), multi-turn rows only: γ_turn·V(s_{t+1}) added at the turn's last token after any whitening
    (it is on the values' scale already), so the turn's returns carry the rest of the episode. ``total``: several
    processes whiten with the whole batch's moments (Run.total; None in one process)."""
    mask = r.response_mask
    kl = losses.kl_estimates(r.logprobs, r.ref_logprobs)
    r.rewards = losses.token_rewards(r.scores, kl["k1"], mask, beta)
    if cfg.whiten_rewards:
        r.rewards = losses.masked_whiten(r.rewards, mask, shift_mean=False, total=total)
    if bootstrap is not None:
        r.rewards = losses.at_last_token(r.rewards, mask, bootstrap)
    adv, r.returns = losses.gae(r.rewards, r.values, mask, cfg.gamma, cfg.lam)
    r.advantages = losses.masked_whiten(adv, mask, total=total)
    n = total([float(mask.sum())])[0] if total else None  # the whole batch's tokens: the means below are shares
    return {"objective/kl": float((kl["k1"] * mask).sum(1).mean()), "objective/kl_k3": float((kl["k3"] * mask).sum(1).mean()),
            "objective/beta": beta, "ppo/value_mean": float(losses.masked_mean(r.values, mask, total=n)),
            "ppo/return_mean": float(losses.masked_mean(r.returns, mask, total=n))}


@torch.no_grad()
def calibrate_critic(critic: Critic, r: Rollout, mix: RewardMix, step: int, total=lambda v: v) -> None:
    """Put a critic initialised from the reward model on the scale of the rewards PPO trains on, before its first
    use: the mix turns the model's raw score x into w·(gain·x + bias − μ)/σ (its stored normalisation, then the
    running moments), so the head is multiplied by a = w·gain/σ, and the offset makes the mean value the mean
    score. Without this, step-0 values sit on the raw head's scale, off from the returns, and GAE pushes reply
    length up or down in the first steps. ``r.values`` are rescaled to match. ``total``: sums a list over the
    processes (Run.total), so every process rescales by the whole batch's means."""
    gain, _ = reward_norm(unwrap(critic.model))
    a = gain * mix.scale("rm", step)
    mask = r.response_mask
    s, n, vs, vn = total([float(r.scores.sum()), float(len(r)), float((r.values * mask).sum()), float(mask.sum())])
    b = s / n - a * vs / max(vn, 1.0)
    critic.rescale(a, b)
    r.values = (a * r.values + b) * mask


# --------------------------------------------------------------------------- the PPO update


def ppo_update(policy, vf, optimizer, r: Rollout, cfg: PPOConfig, train_policy: bool, shuffle: torch.Generator,
               run: Run, rows: list[int]) -> dict:
    """``ppo_epochs`` passes over shuffled minibatches: on each, the clipped policy loss (plus the value loss of a
    head on the policy's trunk) and the policy's step, then the value function's own update, if it has one.
    Several processes: ``rows`` are the places of this process's rollout rows in the whole batch; the minibatches
    are drawn over the whole batch (the same on every process) and each process trains on its rows of them, its
    losses divided by the minibatch's tokens over every process — so the step is one process's with the whole batch."""
    device = r.query_ids.device
    sums: dict[str, float] = {}
    n_mb = 0
    policy.train()
    vf.train()
    policy_params = [p for g in optimizer.param_groups for p in g["params"]]
    group = 1 if cfg.env == "dialogue" else cfg.samples_per_prompt  # turn rows share no prompt
    for _ in range(cfg.ppo_epochs):
        for local, _ in local_minibatches(run, rows, group, cfg.minibatch_size, shuffle):
            # one pass over this process's rows, or none; under FSDP an idle one (weighted 0) where others have rows
            passes = micro_batches(run, local, max(len(local), 1))
            mb, idle = (r.select(passes[0][0].to(device)), passes[0][1]) if passes else (None, False)
            tokens = run.total(float(mb.response_mask.sum()) if mb and not idle else 0.0) \
                if run.world_size > 1 else None
            m: dict[str, float] = {}
            if train_policy or vf.reads_trunk:  # in a critic warm-up only a head on the trunk needs this pass
                if mb is not None:
                    lm = policy_backward(policy, vf, mb, cfg, train_policy, tokens, weight=0.0 if idle else 1.0)
                    m.update({} if idle else lm)
                m["policy/grad_norm"] = run.optimizer_step(optimizer, None, policy_params, cfg.max_grad_norm)
            m.update(vf.update(mb, cfg.cliprange_value, cfg.max_grad_norm, tokens, run.optimizer_step, idle))
            for k, val in m.items():
                sums[k] = sums.get(k, 0.0) + float(val)
            n_mb += 1
    out = {k: v / n_mb for k, v in sums.items()}
    values, returns = (torch.tensor(run.gather(x[r.response_mask.bool()].tolist())) for x in (r.values, r.returns))
    out["ppo/explained_variance"] = float(losses.explained_variance(values, returns, torch.ones_like(values)))
    return out


def policy_backward(policy, vf, mb: Rollout, cfg: PPOConfig, train_policy: bool, tokens: float | None,
                    weight: float = 1.0) -> dict:
    """The clipped policy loss (and a trunk head's value loss) of a minibatch, backward; its metrics. ``tokens``:
    the minibatch's tokens over every process (None: this one's). ``weight`` 0: an idle pass under FSDP."""
    with autocast(cfg.dtype, mb.query_ids.device):
        lp, ent, v = policy_forward(policy, mb, cfg.temperature, with_entropy=True, value_head=vf.head)
    loss, m = losses.ppo_policy_loss(lp, mb.logprobs, mb.advantages, mb.response_mask, cfg.cliprange, tokens,
                                     mb.is_weights)
    vl, vm = vf.trunk_loss(v, mb, cfg.cliprange_value, tokens)
    ((loss * float(train_policy) + vl) * weight).backward()  # warm-up: the trunk learns values alone
    m.update(vm)
    m["policy/entropy"] = losses.masked_mean(ent.detach(), mb.response_mask, total=tokens)
    return m


# --------------------------------------------------------------------------- held-out evaluation


@torch.no_grad()
def evaluate_dialogues(policy, ref_ctx, tok, envs: list, cfg: PPOConfig, mix: RewardMix, state: dict,
                       total: int) -> dict:
    """:func:`evaluate` on held-out dialogues (--env dialogue): whole episodes, --samples-per-prompt per dialogue, as
    many in lockstep as there are ``envs``, on the fixed evaluation stream; every turn's reply counts as one reply.
    ``eval/return`` = eval/reward × eval/turns, the mean undiscounted return of an episode on that scale."""
    if not envs:
        return {}
    device = next(policy.parameters()).device
    gen = generator(cfg.seed + 7919, device)
    got = {"raw": {name: [] for name in mix.sources}, "kl": [], "lengths": [], "ended": []}
    picks = [i for i in range(len(envs[0].dialogues)) for _ in range(cfg.samples_per_prompt)]
    for i in range(0, len(picks), len(envs)):
        starts = [(d, cfg.seed + 7919 + i + k) for k, d in enumerate(picks[i:i + len(envs)])]
        turns = episodes.play(policy, tok, envs[:len(starts)], starts,
                              SamplingParams(cfg.max_new_tokens, cfg.temperature), cfg.max_prompt_length, cfg.dtype, gen)
        r, _, _ = episodes.to_rollout(turns, tok, cfg.max_prompt_length, device)
        forward_passes(policy, ref_ctx, r, cfg)
        eval_collect(got, r, mix)
    out = eval_summary(got, mix, state, total)
    out["eval/turns"] = len(got["ended"]) / len(picks)
    out["eval/return"] = out["eval/reward"] * out["eval/turns"]
    return out


# --------------------------------------------------------------------------- the loop


def split_data(cfg: PPOConfig) -> tuple[list, list]:
    """Train and held-out prompts, or with --env dialogue whole dialogues (split by first prompt)."""
    if cfg.env == "dialogue":
        return episodes.split_dialogues(cfg.data, cfg.eval_data, cfg.format, cfg.eval_fraction, cfg.seed)
    return split_prompts(cfg)


def load_networks(cfg: PPOConfig, log=print, run: Run | None = None):
    """(policy, tokenizer, reference context, value function, critic kind); under the FSDP of ``run`` the policy, the
    reference and a separate critic each sharded."""
    policy, tok = load_model(cfg, trainable=True, chat_template=cfg.chat_template, lora=cfg)
    device = next(policy.parameters()).device
    ref_ctx = reference_context(cfg, policy, shard=run.shard_frozen if run else None)
    vf, kind = build_value_function(cfg, tok, unwrap(policy).config.hidden_size, log)
    vf.to(device)
    if cfg.gradient_checkpointing:
        for net in (policy, *vf.networks()):
            enable_checkpointing(net)
    for net in (policy, *vf.networks()) if run else ():
        run.shard_weights(net)  # FSDP (in place): before the optimizers, which then hold this rank's shards
    return policy, tok, ref_ctx, vf, kind


def check(cfg: PPOConfig) -> None:
    """Settings that cannot work, refused before anything is loaded."""
    if cfg.temperature <= 0:
        raise UsageError(f"--temperature {cfg.temperature}: PPO samples its replies, so it must be > 0",
                         "use e.g. --temperature 0.7")
    if cfg.critic_warmup_steps >= max(cfg.max_steps, 1) and cfg.max_steps > 0:
        raise UsageError(f"--critic-warmup-steps {cfg.critic_warmup_steps} leaves no step of --max-steps "
                         f"{cfg.max_steps} to train the policy", "lower --critic-warmup-steps")
    check_env(cfg)
    check_sampler(cfg)


def check_sampler(cfg: PPOConfig) -> None:
    """--rollout-engine vllm: refused where it cannot run (no CUDA, no vllm), before anything loads; its flags refused
    without it."""
    if cfg.rollout_engine == "vllm":
        check_available(resolve_device(cfg.device))
        if cfg.tis_cap < 1 or not 0 < cfg.vllm_gpu_memory < 1:
            raise UsageError(f"--tis-cap {cfg.tis_cap:g} / --vllm-gpu-memory {cfg.vllm_gpu_memory:g}: the cap must be "
                             ">= 1 and the memory share in (0, 1)", "e.g. --tis-cap 2 --vllm-gpu-memory 0.3")
        if cfg.env == "dialogue":
            raise UsageError("--rollout-engine vllm with --env dialogue: the dialogue episodes sample on our engine",
                             "drop --rollout-engine vllm")
        return
    given = [f for f, v, d in (("--tis-cap", cfg.tis_cap, 2.0), ("--vllm-gpu-memory", cfg.vllm_gpu_memory, 0.3))
             if v != d]
    if given:
        raise UsageError(f"{' and '.join(given)} only work with --rollout-engine vllm", "add it (a CUDA GPU), or drop "
                         "the flag")


def rollout_sampler(cfg: PPOConfig, policy, tok) -> VLLMSampler | None:
    """vLLM colocated with the policy's current weights (--rollout-engine vllm), else None (our engine)."""
    if cfg.rollout_engine != "vllm":
        return None
    sampler = VLLMSampler(tok, str(resolve_model(cfg.model)), cfg.dtype, cfg.vllm_gpu_memory,
                          cfg.max_prompt_length + cfg.max_new_tokens)
    sampler.push(policy)  # a resumed run's weights are not the folder's
    return sampler


def check_env(cfg: PPOConfig) -> None:
    """The --env dialogue flags: refused without it, checked with it."""
    if cfg.env == "prompts":
        given = [name for name, v in (("--turn-gamma", cfg.turn_gamma), ("--max-turns", cfg.max_turns)) if v is not None]
        if given:
            verb = "works" if len(given) == 1 else "work"
            raise UsageError(f"{' and '.join(given)} only {verb} with --env dialogue: a prompt gets one reply",
                             "add --env dialogue (with conversations in --data), or drop the flag")
        return
    if cfg.turn_gamma is not None and not 0 <= cfg.turn_gamma <= 1:
        raise UsageError(f"--turn-gamma {cfg.turn_gamma}: must be in [0, 1]", "e.g. --turn-gamma 0.9 (0: each turn "
                         "on its own)")
    if cfg.max_turns is not None and cfg.max_turns < 1:
        raise UsageError(f"--max-turns {cfg.max_turns}: must be at least 1", "e.g. --max-turns 4, or leave it out for "
                         "whole dialogues")
    for path in cfg.data:
        if path.endswith(".txt"):
            raise UsageError(f"--data {path}: --env dialogue plays whole dialogues, and a .txt file holds prompts only",
                             "give conversations, e.g. --data examples/dialogue_history.csv")


def train(cfg: PPOConfig, log=print) -> Summary:
    check(cfg)
    run = Run("ppo", cfg, log)
    if cfg.env == "dialogue" and run.world_size > 1:
        raise UsageError(f"--env dialogue runs in one process so far, and {run.world_size} were launched",
                         "drop --num-processes (single-turn PPO runs in several)")
    train_data, eval_data = split_data(cfg)
    mix = build_rewards(cfg, log, shard=run.shard_frozen)  # FSDP: the reward model sharded too
    policy, tok, ref_ctx, vf, critic_kind = load_networks(cfg, log, run)
    mix.penalty = missing_eos_penalty(cfg, tok)
    n_steps = run.total_steps(max(1, len(train_data) // (cfg.batch_size * run.world_size)))
    parts = optimisers(cfg, policy, vf, n_steps)
    dialogue = cfg.env == "dialogue"
    mix.gather = run.gather  # several processes normalise each source with the whole batch's moments
    log(f"chatrlhf ppo: {len(train_data)} train / {len(eval_data)} held-out {'dialogues' if dialogue else 'prompts'}, "
        f"{n_steps} steps × {cfg.batch_size * cfg.samples_per_prompt} {'episodes' if dialogue else 'replies'}"
        + (f" (turn γ {turn_gamma(cfg):g}, max turns {cfg.max_turns or 'all'})" if dialogue else "")
        + f", reward sources {', '.join(mix.sources)}, critic "
        f"{critic_kind}, {'plain-text' if is_plain(tok) else 'chat'} prompts, missing-EOS penalty {mix.penalty:g}, "
        f"{count_parameters(policy)[1]:,} trainable policy parameters, device {run.device}")
    if dialogue:  # the dialogues become environments, one per episode played in lockstep
        n_envs = cfg.batch_size * cfg.samples_per_prompt
        train_data = episodes.make_envs(train_data, n_envs, cfg.max_turns)
        eval_data = episodes.make_envs(eval_data, n_envs, cfg.max_turns) if eval_data else []
    held_out = evaluate_dialogues if dialogue else evaluate
    gens = {"sample": generator(cfg.seed, run.device), "shuffle": generator(cfg.seed + 1)}
    state = run.begin(parts, gens, {"beta": cfg.kl_coef, "moments": {}, "history": [], "eval_start": None,
                                    "eval_norm": None})
    sampler = rollout_sampler(cfg, policy, tok)
    mix.load_state(state["moments"])
    step = run.step
    if step == 0:
        state["eval_start"] = held_out(policy, ref_ctx, tok, eval_data, cfg, mix, state, n_steps)
        run.log(0, state["eval_start"])
    samples = run.open_rows("samples.jsonl")
    deadline = deadline_of(cfg)
    with run.loop(n_steps) as bar:
        while run.running(step, n_steps):
            raw = ppo_step(run, step, policy, ref_ctx, vf, tok, train_data, mix, parts["policy"], gens,
                           calibrate=step == 0 and critic_kind == "reward-model", sampler=sampler, log=log)
            step += 1
            n_steps = end_of_step("ppo", run, step, n_steps, raw, samples, bar, deadline=deadline, log=log,
                                  held_out=lambda total: held_out(policy, ref_ctx, tok, eval_data, cfg, mix, state, total))
    samples.close()
    if step < n_steps:
        return run.stopped()
    return _finish(run, policy, vf, tok, state)


def ppo_step(run: Run, step: int, policy, ref_ctx, vf, tok, train_data: list, mix: RewardMix, policy_part: tuple,
             gens: dict, calibrate: bool, sampler: VLLMSampler | None = None, log=print) -> dict:
    """One PPO step (``step`` 0-based): rollout, advantages, the update, β, warnings. ``train_data``: the prompts,
    or with --env dialogue the environments. Returns the step's metrics, reduced over processes (``_rollout`` holds
    this process's rollout for the samples file)."""
    cfg, state = run.cfg, run.state
    t0 = time.perf_counter()
    links = None
    if cfg.env == "dialogue":
        r, links, metrics = dialogue_rollout(policy, ref_ctx, vf, tok, train_data, cfg, mix, step, gens["sample"])
        rows = list(range(len(r)))
    else:
        batch, rows = step_prompts(run, train_data, step, cfg.samples_per_prompt)
        r, metrics = rollout(policy, ref_ctx, vf, tok, batch, cfg, mix, step,
                             row_seeds(cfg.seed, TRAIN_STREAM, step, rows=rows), sampler)
    metrics.update(whole_batch_spread(run, r))
    if calibrate:
        calibrate_critic(vf.critic, r, mix, step, run.total)
    bootstrap = None if links is None else turn_values(policy, vf, tok, r, links, cfg)
    metrics.update(advantages(r, cfg, state["beta"], bootstrap, run.summer))
    train_policy = step >= cfg.critic_warmup_steps
    _, optimizer, scheduler = policy_part
    metrics.update(ppo_update(policy, vf, optimizer, r, cfg, train_policy, gens["shuffle"], run, rows))
    if sampler is not None:
        sampler.push(policy)  # vLLM samples the next step with the updated weights
    metrics = run.reduce(metrics, SUMMED)
    metrics["train/lr"] = scheduler.get_last_lr()[0]
    if train_policy:  # the policy's schedule starts after the critic's warm-up
        scheduler.step()
    vf.schedule_step()
    if cfg.adaptive_kl:
        state["beta"] = losses.adaptive_kl_coef(state["beta"], metrics["objective/kl"], cfg.target_kl,
                                                cfg.kl_horizon, int(run.total(len(r))))
    return step_metrics("ppo", step, t0, r, mix, state, metrics, cfg.kl_bound, log)


# metrics summed over processes — a process's share of a whole-batch mean (its losses over the minibatch's tokens on
# every process), or its part of a rate; the rest are averaged
SUMMED = ("loss/", "ppo/clipfrac", "ppo/approx_kl", "ppo/ratio_mean", "ppo/vf_clipfrac", "policy/entropy",
          "ppo/value_mean", "ppo/return_mean", "rollout/tokens_per_s")


def optimisers(cfg: PPOConfig, policy, vf, n_steps: int) -> dict:
    """{"policy": (policy + value head, AdamW, schedule), "critic": (...)}: Adam ε 1e-5 (N+), linear decay to 0.
    The policy's schedule spans the steps after the critic's warm-up."""
    holder = torch.nn.ModuleDict({"policy": policy, **vf.policy_modules()})
    parts = {"policy": (holder, *_optimizer([p for p in holder.parameters() if p.requires_grad], cfg.lr, cfg,
                                            max(1, n_steps - cfg.critic_warmup_steps)))}
    return {**parts, **vf.parts(lambda params, lr, n: _optimizer(params, lr, cfg, n), n_steps)}


def _optimizer(params, lr: float, cfg: PPOConfig, n_steps: int):
    return make_optimizer(params, lr, cfg.weight_decay, eps=1e-5,  # Adam ε 1e-5 (N+)
                          warmup_steps=int(cfg.warmup_ratio * n_steps), total_steps=n_steps)


def _finish(run: Run, policy, vf, tok, state: dict) -> Summary:
    cfg = run.cfg
    run.save_model(policy, tok)
    vf.save(tok, run.out, run.save_model)  # every rank: under FSDP each takes part in gathering the critic
    return run.finish({"eval_start": state.get("eval_start"),
                       "eval_end": run.last_eval("eval/reward"),
                       "stopped_by_time": state.get("stopped_at") == run.step, "beta": state["beta"],
                       "chat_template": cfg.chat_template, "prompt_format": prompt_format(tok),
                       "missing_eos_penalty": missing_eos_penalty(cfg, tok), "data": file_hashes(cfg.data)})
