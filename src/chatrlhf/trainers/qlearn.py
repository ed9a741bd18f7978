"""Online DQN over candidate replies on replayed dialogues — QLEARN.md §2.2–2.4, tier A (frozen features).

One run step is one episode (a training dialogue). At each state the policy proposes ``--candidates`` replies
(plus the data's human reply with --human-candidate), the heads' input x(h, c) of each is built by --features (the
text features ψ of qfeatures.py, φ from a frozen trunk through the FeatureCache, or both), the reply is
chosen ε-greedy by Q_1, the environment scores it and moves to the next replayed user turn, and the transition
(x(h, a), r, terminated, truncated, x of the next state's candidates) goes into the replay buffer. After
``--learning-starts`` transitions every reply is followed by ``--updates-per-step`` q_update batches (double
DQN, clipped double Q, Huber) and a Polyak step of the target heads. Only the small MLP heads train. With
``--solver fqi`` the heads are linear, Q = V(h) + A(h, c) (dueling), and after every episode they are set to the
ridge solution of the TD targets over the whole buffer (fitted Q iteration, qnet.fqi_update) instead.
With ``--user-model`` the user reacts: once the chosen reply differs from the data's, a chat model playing the
user (env.UserSimulator, seeded by each reset) writes the next user turns, in training and evaluation alike —
where γ > 0 has something to credit (QLEARN §2.6).

Exact resume: checkpoints fall between episodes; the dialogue of episode e and the seed of its candidate
sampling are pure functions of e, and the heads, their targets, the optimizer, the buffer, the feature cache
and the exploration / replay streams are all in the checkpoint (Run.begin's parts, generators and objects).

Evaluation (every ``--eval-steps`` episodes and at the end) walks held-out dialogues with a fixed seed and, per
state, scores every policy candidate (the human reply left out of the choice, QLEARN §2.7): the mean reward of
the Q-argmax pick, of a random pick (the candidates' mean), of the oracle best, and capture = (Q − random) /
(oracle − random).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from chatrlhf import episodes
from chatrlhf.config import ModelArgs, QLearnConfig
from chatrlhf.engine import Engine, SamplingParams
from chatrlhf.env import STOP_MARKER, CandidateWrapper, DialogueEnv, UserSimulator, mixed_reward, \
    reference_key, turn_references
from chatrlhf.errors import UsageError
from chatrlhf.models import load_model, unwrap
from chatrlhf.qeval import ScoredSet, set_statistics
from chatrlhf.qfeatures import text_features
from chatrlhf.qnet import FeatureCache, QHeads, ReplayBuffer, feature_dims, fqi_update, load_policy_and_trunk, \
    make_heads, q_inputs, q_update, reply_logprobs, save_qheads
from chatrlhf.rewards import RewardMix, reward_mix
from chatrlhf.rollout import generator
from chatrlhf.trainers.common import file_hashes
from chatrlhf.trainers.run import Run, Summary

EVAL_SEED = 104729  # held-out candidates are sampled from a stream of their own, the same at every evaluation
USER_MAX_TURNS = 4  # --max-turns 0 with --user-model: the seed CSV's dialogues have up to 3 replies, one more reacts

# --------------------------------------------------------------------------- set-up


def split_dialogues(cfg: QLearnConfig) -> tuple[list, list]:
    """Train and held-out dialogues: --eval-data, else a split by first prompt with the run's seed."""
    if not cfg.data:
        raise UsageError("qlearn needs dialogues", "give --data, e.g. --data examples/dialogue_history.csv")
    return episodes.split_dialogues(cfg.data, cfg.eval_data, cfg.format, cfg.eval_fraction, cfg.seed)


def build_rewards(cfg: QLearnConfig, log=print) -> RewardMix:
    """The reward mix, as PPO builds it; similarity is to the data's human reply at that turn (env.reference_key: by
    the user turns on replayed data, by the whole history with --user-model, so that a conversation that left the
    data gets None, not another history's reference), and candidates are scored as whole replies (no missing-EOS
    penalty: that is PPO's, for its cut-off rollouts)."""
    key = reference_key(bool(cfg.user_model))
    return reward_mix(cfg, "qlearn", lambda paths: turn_references(episodes.load_dialogues(paths, cfg.format), key), key,
                      missing_eos_penalty=0.0, hint=" (e.g. the --data file)", log=log)


def resolve_features(cfg: QLearnConfig, log=print) -> QLearnConfig:
    """--features auto → `text` when every reward source is similarity to --references (ψ's consensus columns
    estimate exactly that), `phi` otherwise: a reward model, a function or human ratings score what the trunk's
    states carry (benchmarks/qlearn.py, docs/qlearn.md). A given --features is kept as it is."""
    if cfg.features != "auto":
        return cfg
    sources = [name for name, on in (("rm", cfg.reward_model), ("fn", cfg.reward_fn), ("human", cfg.human_feedback),
                                     ("similarity", cfg.references)) if on]
    features = "text" if sources == ["similarity"] else "phi"
    why = "the reward is similarity to --references alone" if features == "text" else \
        f"the reward has {', '.join(s for s in sources if s != 'similarity')} sources"
    log(f"chatrlhf qlearn: --features auto → {features} ({why})")
    return replace(cfg, features=features)


def check(cfg: QLearnConfig) -> None:
    """Settings that cannot work, refused before anything is loaded."""
    for name, value in (("--candidates", cfg.candidates), ("--max-turns", cfg.max_turns),
                        ("--learning-starts", cfg.learning_starts), ("--updates-per-step", cfg.updates_per_step)):
        if value < 0:
            raise UsageError(f"{name} {value}: must be ≥ 0", f"e.g. {name} 1")
    if cfg.batch_size < 1 or cfg.buffer_size < 1 or cfg.heads < 1 or cfg.hidden < 1:
        raise UsageError("--batch-size, --buffer-size, --heads and --hidden must be ≥ 1", "e.g. the defaults")
    if cfg.user_model and cfg.candidates < 1:
        raise UsageError(f"--user-model {cfg.user_model} with --candidates 0: once the simulated user takes over there "
                         "is no human reply, so no candidate to choose", "give --candidates 1 or more")
    if cfg.solver == "fqi" and (cfg.cql_alpha > 0 or cfg.phi_norm):
        raise UsageError(f"--solver fqi with {'--cql-alpha' if cfg.cql_alpha > 0 else '--phi-norm'}: fitted Q "
                         "iteration has no CQL term and always standardises φ with the buffer's moments",
                         "drop the flag, or use --solver dqn")
    if cfg.solver == "fqi" and not cfg.all_candidates:
        raise UsageError("--solver fqi with --no-all-candidates: fitted Q iteration learns which reply of a state is "
                         "better from the scored candidates of that state, one taken reply per state teaches it nothing",
                         "drop --no-all-candidates, or use --solver dqn")
    if cfg.solver == "dqn" and cfg.features == "both" and not cfg.phi_norm:
        raise UsageError("--features both with --solver dqn and --no-phi-norm: unstandardised, the trunk's outlier "
                         "dimensions swamp the 9 text features", "add --phi-norm, or use --features text or phi")
    if not cfg.human_candidate and cfg.candidates < 1:
        raise UsageError("--no-human-candidate with --candidates 0 leaves no candidate to choose",
                         "give --candidates 1 or more")
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


def load_user(cfg: QLearnConfig, policy, tok, log=print) -> UserSimulator | None:
    """The user simulator of --user-model (the policy's own weights when it names --model), None without one."""
    if not cfg.user_model:
        log("chatrlhf qlearn: user turns replayed from the data (they do not react to the replies)")
        return None
    if cfg.user_model == cfg.model and cfg.chat_template:
        model, utok = policy, tok
    else:  # a chat template always: the simulator reads the conversation with the roles swapped
        model, utok = load_model(ModelArgs(model=cfg.user_model, dtype=cfg.dtype, device=cfg.device))
        model.eval().requires_grad_(False)
    log(f"chatrlhf qlearn: user turns after the data's by the simulator {cfg.user_model} (ends a dialogue with "
        f"{STOP_MARKER}, or at {cfg.max_turns or USER_MAX_TURNS} turns); similarity scores only the data's histories")
    params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=0.7, top_k=0, top_p=1.0)
    return UserSimulator(Engine(model, utok, cfg.dtype), params, name=cfg.user_model)


def candidate_env(dialogues, reward, engine: Engine, cfg: QLearnConfig, user: UserSimulator | None = None,
                  human: bool = True) -> CandidateWrapper:
    """The candidate environment of training (with the human reply as a candidate unless --no-human-candidate) and
    of evaluation (which leaves the human reply out of the choice itself); the same simulator, seeded by each reset."""
    params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0)
    max_turns = cfg.max_turns or (USER_MAX_TURNS if user is not None else None)
    return CandidateWrapper(DialogueEnv(dialogues, reward, max_turns=max_turns, user=user), engine,
                            n=cfg.candidates, params=params, human=human)


# --------------------------------------------------------------------------- acting


def embed(p: Parts, info: dict, cfg: QLearnConfig, keep: list[int] | None = None) -> torch.Tensor:
    """(K, F) what the heads read for the state's candidates (those in ``keep``) by --features: φ (cached), the text
    features ψ — their consensus pool the policy samples among them, not the data's human reply — or both."""
    keep = list(range(len(info["candidates"]))) if keep is None else keep
    texts = [info["candidates"][i] for i in keep]
    if not texts:
        return torch.zeros(0, p.buffer.d)
    phi = psi = None
    if cfg.features != "text":
        phi = p.cache.features(p.trunk, p.tok, [info["messages"]] * len(texts), texts,
                               max_prompt_length=cfg.max_prompt_length, max_reply_length=cfg.max_new_tokens + 1)
    if cfg.features != "phi":
        pool = [k for k, i in enumerate(keep) if info["candidate_logprobs"][i] is not None]
        psi = text_features(info["messages"], texts, pool)
    return q_inputs(phi, psi)


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


def behavior_logprobs(env: CandidateWrapper, info: dict, cfg: QLearnConfig) -> torch.Tensor:
    """(K,) log π_β(c|h) of the state's candidates for CQL's importance weights (QLEARN §2.5): the engine's sum
    for each policy sample, the policy's likelihood for the data's human reply (which the engine did not sample)."""
    lps = info["candidate_logprobs"]
    out = torch.tensor([0.0 if lp is None else lp for lp in lps])
    missing = [i for i, lp in enumerate(lps) if lp is None]
    if missing:
        out[missing] = reply_logprobs(env.engine.model, env.engine.tok, [info["messages"]] * len(missing),
                                      [info["candidates"][i] for i in missing], cfg.max_prompt_length,
                                      cfg.max_new_tokens + 1)
    return out


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
        cands = {"cand_phi": phi, "log_behavior": behavior_logprobs(p.env, info, cfg)} if p.buffer.candidates else {}
        extra = {**cands, "taken": a} if cands else {}
        sid = state.setdefault("states", 0)  # numbers the state: fqi groups its transitions
        p.buffer.add(phi[a], r, terminated, next_phi, truncated=truncated, state=sid, **extra)
        for c, rc in other_rewards(p, info, a):
            p.buffer.add(phi[c], rc, terminated, next_phi, truncated=truncated, state=sid,
                         **({**cands, "taken": c} if cands else {}))
            state["transitions"] += 1
        state["transitions"] += 1
        state["states"] = sid + 1
        rewards.append(r)
        chosen_q.append(float(q[a]))
        if cfg.solver == "dqn" and len(p.buffer) >= max(cfg.learning_starts, 1):
            for _ in range(cfg.updates_per_step):
                m = q_update(p.heads, optimizer, p.buffer.sample(cfg.batch_size, gens["replay"]), cfg.gamma,
                             cfg.cql_alpha, cfg.max_grad_norm)
                p.heads.soft_update(cfg.tau)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_updates += 1
        done = terminated or truncated
        phi, info = next_phi, next_info
    if cfg.solver == "fqi" and len(p.buffer) >= max(cfg.learning_starts, 1):
        sums, n_updates = fqi_update(p.heads, p.buffer, cfg.gamma), 1  # one iteration per episode
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
    """QLEARN §2.7 on held-out dialogues, per state over the policy candidates: mean reward of the Q-argmax pick, a
    random one (their mean), the best one (oracle) and the human reply; capture = (Q − random) / (oracle − random)
    with its bootstrap 95 % interval over dialogues, pairwise accuracy and Kendall τ of Q against the reward, the
    length (words) of the Q pick vs a random one and Spearman(Q, length) (qeval.set_statistics). The walk follows
    the Q-argmax pick."""
    dialogues = held[:cfg.eval_dialogues]
    if not dialogues:
        return {}
    score = weighted_raw(mix, step)
    env = candidate_env(dialogues, score, engine, cfg, p.env.unwrapped.user)
    sets, human = [], []
    for i in range(len(dialogues)):
        _, info = env.reset(seed=cfg.seed + EVAL_SEED + i, options={"dialogue_index": i})
        done = False
        while not done:
            keep = [j for j, lp in enumerate(info["candidate_logprobs"]) if lp is not None]
            keep = keep or list(range(len(info["candidates"])))  # --candidates 0: only the human reply
            texts = [info["candidates"][j] for j in keep]
            reply = [] if info["human_reply"] is None else [info["human_reply"]]  # none once the user is simulated
            r = score([info["messages"]] * (len(texts) + len(reply)), texts + reply)
            sets.append(ScoredSet(q1(p.heads, embed(p, info, cfg, keep)).tolist(), list(r[:len(texts)]),
                                  [len(t.split()) for t in texts], group=i))
            human += r[len(texts):]
            _, _, terminated, truncated, info = env.step(texts[sets[-1].pick])
            done = terminated or truncated
    return {**set_statistics(sets, seed=cfg.seed), **({"eval/human": float(np.mean(human))} if human else {})}


# --------------------------------------------------------------------------- the loop


def train(cfg: QLearnConfig, log=print) -> Summary:
    cfg = resolve_features(cfg, log)
    check(cfg)
    run = Run("qlearn", cfg, log)
    train_dialogues, held = split_dialogues(cfg)
    mix = build_rewards(cfg, log)
    policy, tok, trunk, qtok, q_model = load_policy_and_trunk(cfg)
    engine = Engine(policy, tok, cfg.dtype)
    user = load_user(cfg, policy, tok, log)
    env = candidate_env(train_dialogues, mixed_reward(mix, lambda: run.step), engine, cfg, user, cfg.human_candidate)
    d_phi = unwrap(trunk).config.hidden_size
    d = feature_dims(cfg.features, d_phi)
    fqi = cfg.solver == "fqi"  # linear dueling heads: A on x(h, c), V on the candidate set's mean x
    heads = make_heads(cfg.features, d_phi, cfg.heads, 0 if fqi else cfg.hidden, value=fqi).to(run.device)
    optimizer = torch.optim.AdamW(heads.online.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    p = Parts(env, trunk, qtok, FeatureCache(q_model, cfg.pooling), heads,
              ReplayBuffer(cfg.buffer_size, d, cfg.candidates + 1, candidates=cfg.cql_alpha > 0),
              all_candidates_reward(mix, lambda: run.step) if cfg.all_candidates else None)
    n_steps = run.total_steps(len(train_dialogues))
    log(f"chatrlhf qlearn: {len(train_dialogues)} train / {len(held)} held-out dialogues, {n_steps} episodes, "
        f"{cfg.candidates} candidates{' + the human reply' if cfg.human_candidate else ''} per state, reward sources {', '.join(mix.sources)}, "
        f"features {cfg.features} ({d} columns{'' if cfg.features == 'text' else f'; φ from {q_model}, {cfg.pooling}'}), "
        f"{cfg.heads} heads, solver {cfg.solver}, γ {cfg.gamma:g}, "
        f"device {run.device}")
    gens = {"explore": generator(cfg.seed + 1), "replay": generator(cfg.seed + 2)}
    state = run.begin({"q": (heads, optimizer, scheduler)}, gens,
                      {"transitions": 0, "updates": 0, "states": 0, "moments": {}, "eval_start": None},
                      objects={"q_targets": heads.targets, "phi_norm": heads.standardiser_state(), "buffer": p.buffer,
                               "features": p.cache})
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
    save_qheads(heads, run.out, q_model, cfg.pooling, cfg.features)
    return run.finish({"eval_start": state["eval_start"], "transitions": state["transitions"],
                       "updates": state["updates"], "q_model": q_model, "pooling": cfg.pooling, "features": cfg.features,
                       "eval_end": run.last_eval("eval/q"),
                       "data": file_hashes(cfg.data)})
