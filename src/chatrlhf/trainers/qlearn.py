"""Online DQN over candidate replies on replayed dialogues — QLEARN.md §2.2–2.4, tier A (frozen features).

One run step is one episode (a training dialogue). At each state the policy proposes ``--candidates`` replies
(plus the data's human reply), φ(h, c) of each comes from a frozen trunk through the FeatureCache, the reply is
chosen ε-greedy by Q_1, the environment scores it and moves to the next replayed user turn, and the transition
(φ(h, a), r, terminated, truncated, φ of the next state's candidates) goes into the replay buffer. After
``--learning-starts`` transitions every reply is followed by ``--updates-per-step`` q_update batches (double
DQN, clipped double Q, Huber) and a Polyak step of the target heads. Only the small MLP heads train.

Exact resume: checkpoints fall between episodes; the dialogue of episode e and the seed of its candidate
sampling are pure functions of e, and the heads, their targets, the optimizer, the buffer, the feature cache
and the exploration / replay streams are all in the checkpoint (Run.begin's parts, generators and objects).

Evaluation (every ``--eval-steps`` episodes and at the end) walks held-out dialogues with a fixed seed and, per
state, scores every policy candidate (the human reply left out of the choice, QLEARN §2.7): the mean reward of
the Q-argmax pick, of a random pick (the candidates' mean), of the oracle best, and capture = (Q − random) /
(oracle − random).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from chatrlhf.config import ModelArgs, QLearnConfig
from chatrlhf.data import as_conversations, load_records, split_by_prompt
from chatrlhf.data.records import Conversation
from chatrlhf.engine import Engine, SamplingParams
from chatrlhf.env import CandidateWrapper, DialogueEnv, merge_prefixes, mixed_reward, turn_references, \
    user_turns_key
from chatrlhf.errors import UsageError
from chatrlhf.models import load_model, unwrap
from chatrlhf.qnet import FeatureCache, QHeads, ReplayBuffer, q_update, save_qheads
from chatrlhf.rewards import RewardMix, reward_mix
from chatrlhf.rollout import generator
from chatrlhf.trainers.common import file_hashes
from chatrlhf.trainers.run import Run, Summary

EVAL_SEED = 104729  # held-out candidates are sampled from a stream of their own, the same at every evaluation

# --------------------------------------------------------------------------- set-up


def load_dialogues(paths: list[str], fmt: str) -> list[list[dict]]:
    """Whole dialogues from conversation files (the seed CSV's per-turn rows merged)."""
    return merge_prefixes([c for path in paths for c in as_conversations(load_records(path, fmt))])


def split_dialogues(cfg: QLearnConfig) -> tuple[list, list]:
    """Train and held-out dialogues: --eval-data, else a split by first prompt with the run's seed."""
    if not cfg.data:
        raise UsageError("qlearn needs dialogues", "give --data, e.g. --data examples/dialogue_history.csv")
    dialogues = load_dialogues(cfg.data, cfg.format)
    if cfg.eval_data:
        train_part, held = dialogues, load_dialogues(cfg.eval_data, cfg.format)
    else:
        a, b = split_by_prompt([Conversation(d) for d in dialogues], cfg.eval_fraction, cfg.seed)
        train_part, held = [c.messages for c in a], [c.messages for c in b]
    if not train_part:
        raise UsageError(f"--data {','.join(cfg.data)}: no training dialogues left", "give more dialogues or a lower "
                         "--eval-fraction")
    return train_part, held


def build_rewards(cfg: QLearnConfig, log=print) -> RewardMix:
    """The reward mix, as PPO builds it; similarity is to the data's human reply at that turn (user_turns_key), and
    candidates are scored as whole replies (no missing-EOS penalty: that is PPO's, for its cut-off rollouts)."""
    return reward_mix(cfg, "qlearn", lambda paths: turn_references(load_dialogues(paths, cfg.format)), user_turns_key,
                      missing_eos_penalty=0.0, hint=" (e.g. the --data file)", log=log)


def check(cfg: QLearnConfig) -> None:
    """Settings that cannot work, refused before anything is loaded."""
    for name, value in (("--candidates", cfg.candidates), ("--max-turns", cfg.max_turns),
                        ("--learning-starts", cfg.learning_starts), ("--updates-per-step", cfg.updates_per_step)):
        if value < 0:
            raise UsageError(f"{name} {value}: must be ≥ 0", f"e.g. {name} 1")
    if cfg.batch_size < 1 or cfg.buffer_size < 1 or cfg.heads < 1 or cfg.hidden < 1:
        raise UsageError("--batch-size, --buffer-size, --heads and --hidden must be ≥ 1", "e.g. the defaults")
    if not 0 <= cfg.gamma < 1 or not 0 <= cfg.tau <= 1:
        raise UsageError(f"--gamma {cfg.gamma} must be in [0, 1) and --tau {cfg.tau} in [0, 1]", "e.g. 0.9 and 0.005")


@dataclass
class Parts:
    """What a step needs: the candidate environment, the frozen trunk for φ and its cache, heads, buffer."""
    env: CandidateWrapper
    trunk: torch.nn.Module
    tok: object
    cache: FeatureCache
    heads: QHeads
    buffer: ReplayBuffer
    score: object = None  # --all-candidates: (prompts, replies) -> reward or None (no opinion) per reply


def load_networks(cfg: QLearnConfig):
    """(policy, its tokenizer, φ trunk, its tokenizer, trunk name): the policy proposes, the trunk embeds."""
    policy, tok = load_model(cfg, chat_template=cfg.chat_template)
    policy.eval().requires_grad_(False)
    if not cfg.q_model or cfg.q_model == cfg.model:
        return policy, tok, policy, tok, cfg.model
    trunk, qtok = load_model(ModelArgs(model=cfg.q_model, dtype=cfg.dtype, device=cfg.device),
                             chat_template=cfg.chat_template)
    return policy, tok, trunk.eval().requires_grad_(False), qtok, cfg.q_model


def candidate_env(dialogues, reward, engine: Engine, cfg: QLearnConfig) -> CandidateWrapper:
    params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0)
    return CandidateWrapper(DialogueEnv(dialogues, reward, max_turns=cfg.max_turns or None), engine,
                            n=cfg.candidates, params=params)


# --------------------------------------------------------------------------- acting


def embed(p: Parts, info: dict, cfg: QLearnConfig, keep: list[int] | None = None) -> torch.Tensor:
    """(K, d) φ of the state's candidates (those in ``keep``), cached."""
    texts = [info["candidates"][i] for i in keep] if keep is not None else info["candidates"]
    if not texts:
        return torch.zeros(0, p.buffer.d)
    return p.cache.features(p.trunk, p.tok, [info["messages"]] * len(texts), texts,
                            max_prompt_length=cfg.max_prompt_length, max_reply_length=cfg.max_new_tokens + 1)


def observed(p: Parts, phi: torch.Tensor, cfg: QLearnConfig) -> torch.Tensor:
    """``phi``, its rows folded into the heads' φ standardiser first (--phi-norm): each training state's
    candidates once, as they are embedded, until the first update (--learning-starts); then the standardiser
    stays fixed, so the heads do not chase moving inputs. Held-out candidates are never observed."""
    if cfg.phi_norm and len(p.buffer) < max(cfg.learning_starts, 1):
        p.heads.observe(phi)
    return phi


@torch.no_grad()
def q1(heads: QHeads, phi: torch.Tensor) -> torch.Tensor:
    """Q_1(h, c) per candidate (the online head that acts, QLEARN §2.4)."""
    return heads(phi.to(next(heads.parameters()).device))[0].cpu()


def epsilon(cfg: QLearnConfig, episode: int, total: int) -> float:
    """ε of episode ``episode``: linear from --epsilon-start to --epsilon-end over --epsilon-fraction of the run."""
    frac = min(1.0, episode / max(1.0, cfg.epsilon_fraction * total))
    return cfg.epsilon_start + frac * (cfg.epsilon_end - cfg.epsilon_start)


def dialogue_index(episode: int, n: int, seed: int) -> int:
    """The dialogue of episode ``episode``: epochs of seeded permutations, a pure function of the episode."""
    epoch, k = divmod(episode, n)
    return int(np.random.default_rng(seed + epoch).permutation(n)[k])


def other_rewards(p: Parts, info: dict, taken: int) -> list[tuple[int, float]]:
    """(index, reward) of every candidate but the taken one that the reward sources have an opinion on
    (--all-candidates; none without it): the same history, the same next state."""
    if p.score is None:
        return []
    others = [c for c in range(len(info["candidates"])) if c != taken]
    got = p.score([info["messages"]] * len(others), [info["candidates"][c] for c in others]) if others else []
    return [(c, float(r)) for c, r in zip(others, got) if r is not None]


def all_candidates_reward(mix: RewardMix, step):
    """The environment's reward (mixed, at ``step()``) for a batch of replies, None where a source has no opinion."""
    def score(prompts, responses):
        total, metrics = mix(prompts, responses, [True] * len(responses), step())
        raw = [v for k, v in metrics.items() if k.startswith("_raw/")]
        return [t if all(v[i] is not None for v in raw) else None for i, t in enumerate(total)]
    return score


def run_episode(episode: int, total: int, p: Parts, cfg: QLearnConfig, optimizer, gens: dict, state: dict) -> dict:
    """One training dialogue: act ε-greedy by Q_1, store each transition, update after --learning-starts."""
    n = len(p.env.unwrapped.dialogues)
    _, info = p.env.reset(seed=cfg.seed + episode, options={"dialogue_index": dialogue_index(episode, n, cfg.seed)})
    eps = epsilon(cfg, episode, total)
    phi, done = observed(p, embed(p, info, cfg), cfg), False
    rewards, chosen_q, sums, n_updates = [], [], {}, 0
    while not done:
        q = q1(p.heads, phi)
        explore = float(torch.rand(1, generator=gens["explore"])) < eps
        a = int(torch.randint(len(q), (1,), generator=gens["explore"])) if explore else int(q.argmax())
        _, r, terminated, truncated, next_info = p.env.step(info["candidates"][a])
        next_phi = torch.zeros(0, p.buffer.d) if terminated else observed(p, embed(p, next_info, cfg), cfg)
        extra = {"cand_phi": phi, "taken": a} if p.buffer.candidates else {}
        p.buffer.add(phi[a], r, terminated, next_phi, truncated=truncated, **extra)
        for c, rc in other_rewards(p, info, a):
            p.buffer.add(phi[c], rc, terminated, next_phi, truncated=truncated,
                         **({"cand_phi": phi, "taken": c} if p.buffer.candidates else {}))
            state["transitions"] += 1
        state["transitions"] += 1
        rewards.append(r)
        chosen_q.append(float(q[a]))
        if len(p.buffer) >= max(cfg.learning_starts, 1):
            for _ in range(cfg.updates_per_step):
                m = q_update(p.heads, optimizer, p.buffer.sample(cfg.batch_size, gens["replay"]), cfg.gamma,
                             cfg.cql_alpha, cfg.max_grad_norm)
                p.heads.soft_update(cfg.tau)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_updates += 1
        done = terminated or truncated
        phi, info = next_phi, next_info
    state["updates"] += n_updates
    metrics = {k if "/" in k else f"q/{k}": v / n_updates for k, v in sums.items()} if n_updates else {}
    metrics.update({"train/return": float(sum(rewards)), "train/reward_mean": float(np.mean(rewards)),
                    "train/turns": len(rewards), "train/epsilon": eps, "q/chosen_mean": float(np.mean(chosen_q)),
                    "train/transitions": state["transitions"], "train/updates": state["updates"],
                    "train/buffer": len(p.buffer), "train/cached_features": len(p.cache)})
    return metrics


# --------------------------------------------------------------------------- held-out evaluation


def weighted_raw(mix: RewardMix, step: int):
    """A reward for evaluation: Σ weight·raw value at ``step`` (no running moments, so evaluating moves nothing)."""
    def reward(prompts, responses):
        raw = mix.raw(prompts, responses, [True] * len(responses))
        return [sum(mix.schedules[n](step) * float(v[i]) for n, v in raw.items() if v[i] is not None)
                for i in range(len(responses))]
    return reward


@torch.no_grad()
def evaluate(p: Parts, engine: Engine, held: list, mix: RewardMix, cfg: QLearnConfig, step: int) -> dict:
    """Mean reward per state of the Q-argmax policy candidate, a random one (their mean), the best one (oracle),
    and of the human reply; capture = (Q − random) / (oracle − random). The walk follows the Q-argmax pick."""
    dialogues = held[:cfg.eval_dialogues]
    if not dialogues:
        return {}
    score = weighted_raw(mix, step)
    env = candidate_env(dialogues, score, engine, cfg)
    got = {"q": [], "random": [], "oracle": [], "human": []}
    for i in range(len(dialogues)):
        _, info = env.reset(seed=cfg.seed + EVAL_SEED + i, options={"dialogue_index": i})
        done = False
        while not done:
            keep = [j for j, lp in enumerate(info["candidate_logprobs"]) if lp is not None]
            keep = keep or list(range(len(info["candidates"])))  # --candidates 0: only the human reply
            texts = [info["candidates"][j] for j in keep]
            r = score([info["messages"]] * (len(texts) + 1), texts + [info["human_reply"]])
            a = int(q1(p.heads, embed(p, info, cfg, keep)).argmax())
            got["q"].append(r[a])
            got["random"].append(float(np.mean(r[:-1])))
            got["oracle"].append(max(r[:-1]))
            got["human"].append(r[-1])
            _, _, terminated, truncated, info = env.step(texts[a])
            done = terminated or truncated
    out = {f"eval/{k}": float(np.mean(v)) for k, v in got.items()}
    out["eval/states"] = len(got["q"])
    gap = out["eval/oracle"] - out["eval/random"]
    if gap > 1e-9:
        out["eval/capture"] = (out["eval/q"] - out["eval/random"]) / gap
    return out


# --------------------------------------------------------------------------- the loop


def train(cfg: QLearnConfig, log=print) -> Summary:
    check(cfg)
    run = Run("qlearn", cfg, log)
    train_dialogues, held = split_dialogues(cfg)
    mix = build_rewards(cfg, log)
    policy, tok, trunk, qtok, q_model = load_networks(cfg)
    engine = Engine(policy, tok, cfg.dtype)
    env = candidate_env(train_dialogues, mixed_reward(mix, lambda: run.step), engine, cfg)
    d = unwrap(trunk).config.hidden_size
    heads = QHeads(d, cfg.heads, cfg.hidden).to(run.device)
    optimizer = torch.optim.AdamW(heads.online.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    p = Parts(env, trunk, qtok, FeatureCache(q_model, cfg.pooling), heads,
              ReplayBuffer(cfg.buffer_size, d, cfg.candidates + 1, candidates=cfg.cql_alpha > 0),
              all_candidates_reward(mix, lambda: run.step) if cfg.all_candidates else None)
    n_steps = run.total_steps(len(train_dialogues))
    log(f"chatrlhf qlearn: {len(train_dialogues)} train / {len(held)} held-out dialogues, {n_steps} episodes, "
        f"{cfg.candidates} candidates + the human reply per state, reward sources {', '.join(mix.sources)}, "
        f"φ from {q_model} ({cfg.pooling}, d = {d}), {cfg.heads} heads, γ {cfg.gamma:g}, device {run.device}")
    gens = {"explore": generator(cfg.seed + 1), "replay": generator(cfg.seed + 2)}
    state = run.begin({"q": (heads, optimizer, scheduler)}, gens,
                      {"transitions": 0, "updates": 0, "moments": {}, "eval_start": None},
                      objects={"q_targets": heads.targets, "buffer": p.buffer, "features": p.cache})
    mix.load_state(state["moments"])
    step = run.step
    if step == 0:
        state["eval_start"] = evaluate(p, engine, held, mix, cfg, 0)
        run.log(0, state["eval_start"])
    with run.loop(n_steps):
        while run.running(step, n_steps):
            metrics = run_episode(step, n_steps, p, cfg, optimizer, gens, state)
            state["moments"] = mix.state()
            step += 1
            if step % cfg.eval_steps == 0 or step == n_steps:
                metrics.update(evaluate(p, engine, held, mix, cfg, step))
            run.log(step, metrics)
            run.end_step(step, n_steps, info=f"return {metrics['train/return']:+.3f}  ε {metrics['train/epsilon']:.2f}")
    if step < n_steps:
        return run.stopped()
    save_qheads(heads, run.out, q_model, cfg.pooling)
    final = run.last_logged("eval/q")
    return run.finish({"eval_start": state["eval_start"], "transitions": state["transitions"],
                       "updates": state["updates"], "q_model": q_model, "pooling": cfg.pooling,
                       "eval_end": {k: v for k, v in final.items() if k.startswith("eval/")} if final else None,
                       "data": file_hashes(cfg.data)})
