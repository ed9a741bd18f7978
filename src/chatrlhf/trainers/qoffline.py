"""Offline Q-learning from logged feedback — QLEARN.md §2.5, tier A (frozen features): no environment stepping, no ε.

The logged transitions (h, a, r, h′, terminated):
  ratings       one terminal reply each, r = (stars − 3) / 2 or thumbs ±1
  corrections   two terminal replies each, the corrected one r = +1, the original r = −1
  conversations every assistant turn is a logged action, scored by the reward flags (as `qlearn` scores replies);
                h′ = the history after it up to the next assistant turn, terminated after the last one
φ(h, a) of each logged reply and φ(h), φ(h′) of the histories come once from the frozen trunk (qnet.reply_features,
history_features). One run step is one IQL update on a batch drawn with replacement (qnet.iql_update):
    Q_i(h, a) → r + γ(1 − terminated)·V(h′),   V(h) → expectile τ of min_i Q̂_i(h, a) over the logged replies,
then a Polyak step of the target Q-heads. With ``--candidates N --cql-alpha α`` each training state also gets N
policy samples (generated once, at training states only), and α·CQL(H) over {samples} ∪ {a} pushes Q down on
replies the data never chose, with log π_β(c|h) subtracted (importance weights; the logged reply's log π_β is its
likelihood under the policy).

Departures from IQL/ILQL: the Q loss is Huber (as our DQN), not squared; V(h′) is read from the online V head (ILQL)
and V has no target copy; ratings and corrections are single replies whose continuation was not logged, so they
are terminal (Q = r there, γ matters only on conversations); no policy extraction — the heads rerank candidates
(`--rerank q:DIR`), argmax Q_1.

Evaluation (at the start, every ``--eval-steps`` and at the end): on held-out logged prompts that have two or more
distinct replies, how Q_1 ranks them against the logged reward (qeval.set_statistics: capture, its bootstrap CI
over prompts, pairwise accuracy, Kendall τ, length of the Q pick vs random, Spearman(Q, length)).

Exact resume: the transitions and features are rebuilt the same way from the same files and frozen trunk; the
heads, their targets, the optimizer and the batch stream are in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chatrlhf.config import QOfflineConfig
from chatrlhf.data import Conversation, Correction, Rating, load_records, split_by_prompt
from chatrlhf.data.records import Message, prompt_key
from chatrlhf.engine import Engine, SamplingParams
from chatrlhf.env import dedupe, merge_prefixes
from chatrlhf.errors import UsageError
from chatrlhf.models import unwrap
from chatrlhf.qeval import ScoredSet, set_statistics
from chatrlhf.qnet import HISTORY, FeatureCache, QHeads, iql_update, load_policy_and_trunk, reply_logprobs, save_qheads
from chatrlhf.rewards import reward_mix
from chatrlhf.rollout import generator
from chatrlhf.trainers.common import file_hashes
from chatrlhf.trainers.run import Run, Summary

CANDIDATE_SEED = 7919  # the CQL candidates of training state j are sampled from seed + this + j


# --------------------------------------------------------------------------- logged transitions


@dataclass
class Logged:
    """One logged transition. ``next_history`` None = terminated (the last reply, or a reply whose continuation
    was not logged); ``reward`` None until the reward sources score a conversation's reply."""
    history: list[Message]
    reply: str
    reward: float | None
    next_history: list[Message] | None
    where: str = ""
    source: str = "conversation"  # rating | correction | conversation


def rating_reward(score: float, scale: str) -> float:
    """A rating as a reward in [−1, 1] (QLEARN §2.6): stars 1–5 → (s − 3) / 2; thumbs are already ±1."""
    return float(score) if scale == "thumbs" else (float(score) - 3.0) / 2.0


def feedback_transitions(records: list) -> list[Logged]:
    """Ratings and corrections as terminal transitions: a rating's reply with its reward, a correction as the
    corrected reply (+1) and the original (−1)."""
    out = []
    for r in records:
        if isinstance(r, Rating):
            out.append(Logged(r.prompt, r.response, rating_reward(r.score, r.scale), None, r.where, "rating"))
        elif isinstance(r, Correction):
            out += [Logged(r.prompt, r.corrected, 1.0, None, r.where, "correction"),
                    Logged(r.prompt, r.response, -1.0, None, r.where, "correction")]
    return out


def dialogue_transitions(dialogues: list[list[Message]]) -> list[Logged]:
    """Every assistant turn of whole dialogues: h = the turns before it, h′ = h + reply + the turns up to the next
    assistant turn, None after the last one (terminated). Rewards are left to the reward sources."""
    out = []
    for messages in dialogues:
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for k, i in enumerate(turns):
            nxt = messages[:turns[k + 1]] if k + 1 < len(turns) else None
            out.append(Logged(messages[:i], messages[i]["content"], None, nxt))
    return out


def load_logged(paths: list[str], fmt: str) -> tuple[list[Logged], list[list[Message]]]:
    """(rating and correction transitions, whole dialogues of the conversation files) of ``paths``."""
    feedback, conversations = [], []
    for path in paths:
        loaded = load_records(path, fmt)
        if loaded.kind == "preference" and "conversation" not in loaded.views:
            raise UsageError(f"{path}: preference pairs carry no reward of their own for offline Q-learning",
                             "give the export's ratings.jsonl and corrections.jsonl (corrections are in "
                             "preferences.jsonl too, as pairs), or conversations with reward flags")
        records = loaded.of("conversation")  # OpenAssistant trees: their dialogues
        feedback += feedback_transitions(records)
        conversations += [r for r in records if isinstance(r, Conversation)]
    return feedback, merge_prefixes(conversations)


def logged_data(cfg: QOfflineConfig, paths: list[str], log=print) -> list[Logged]:
    """Every transition of ``paths``, the conversations' replies scored by the reward flags (once, here)."""
    feedback, dialogues = load_logged(paths, cfg.format)
    steps = dialogue_transitions(dialogues)
    if steps:
        mix = reward_mix(cfg, "qlearn-offline: scoring the replies of conversation files", log=log,
                         hint=" (similarity to the human replies of another file)")
        rewards, _ = mix([t.history for t in steps], [t.reply for t in steps], [True] * len(steps), 0)
        for t, r in zip(steps, rewards):
            t.reward = float(r)
    return feedback + steps


def split_logged(cfg: QOfflineConfig, log=print) -> tuple[list[Logged], list[Logged]]:
    """Train and held-out transitions: --eval-data, else a prompt-disjoint split (by first user turn)."""
    if not cfg.data:
        raise UsageError("qlearn-offline needs logged feedback", "give --data, e.g. --data out/export/ratings.jsonl,"
                         "out/export/corrections.jsonl (from `chatrlhf feedback export`)")
    data = logged_data(cfg, cfg.data, log)
    held = logged_data(cfg, cfg.eval_data, log) if cfg.eval_data else []
    given = [f for f, v in (("--reward-model", cfg.reward_model), ("--human-feedback", cfg.human_feedback),
                            ("--references", cfg.references), ("--reward-fn", cfg.reward_fn)) if v]
    if given and not any(t.source == "conversation" for t in data + held):
        raise UsageError(f"{', '.join(given)} score the replies of conversation files, and --data has none: the flag "
                         "would do nothing", "drop it (ratings and corrections carry their reward), or add conversations")
    if cfg.eval_data:
        return data, held
    convs = [Conversation(t.history, t.where) for t in data]
    train, held = split_by_prompt(convs, cfg.eval_fraction, cfg.seed)
    held_ids = {id(c) for c in held}
    return ([t for t, c in zip(data, convs) if id(c) not in held_ids],
            [t for t, c in zip(data, convs) if id(c) in held_ids])


def check(cfg: QOfflineConfig) -> None:
    """Settings that cannot work, or that would do nothing, refused before anything is loaded."""
    if cfg.batch_size < 1 or cfg.heads < 1 or cfg.hidden < 1 or cfg.candidates < 0:
        raise UsageError("--batch-size, --heads and --hidden must be ≥ 1 and --candidates ≥ 0", "e.g. the defaults")
    if not 0 <= cfg.gamma < 1 or not 0 <= cfg.tau <= 1 or not 0 < cfg.expectile < 1:
        raise UsageError(f"--gamma {cfg.gamma} must be in [0, 1), --tau {cfg.tau} in [0, 1] and --expectile "
                         f"{cfg.expectile} in (0, 1)", "e.g. 0.9, 0.005 and 0.7")
    if (cfg.candidates > 0) != (cfg.cql_alpha > 0):
        raise UsageError(f"--candidates {cfg.candidates} with --cql-alpha {cfg.cql_alpha}: the candidates serve only "
                         "the CQL term, and the CQL term needs candidates", "give both (e.g. --candidates 5 --cql-alpha "
                         "0.1) or neither (IQL alone)")


# --------------------------------------------------------------------------- features and candidate sets


@dataclass
class Parts:
    """The frozen trunk that gives φ, its tokenizer, and the feature caches of (h, y) pairs and of histories."""
    trunk: torch.nn.Module
    tok: object
    pairs: FeatureCache
    histories: FeatureCache
    d: int


def pair_features(p: Parts, histories: list, replies: list[str], cfg: QOfflineConfig) -> torch.Tensor:
    return p.pairs.features(p.trunk, p.tok, histories, replies, max_prompt_length=cfg.max_prompt_length,
                            max_reply_length=cfg.max_new_tokens + 1)


def state_features(p: Parts, histories: list, cfg: QOfflineConfig) -> torch.Tensor:
    return p.histories.features(p.trunk, p.tok, histories, [""] * len(histories),
                                max_prompt_length=cfg.max_prompt_length)


def transition_tensors(p: Parts, data: list[Logged], cfg: QOfflineConfig) -> dict[str, torch.Tensor]:
    """The logged transitions as (N, …) tensors: phi φ(h, a), phi_h φ(h), next_phi_h φ(h′) (zeros where
    terminated), reward, terminated."""
    nxt = [i for i, t in enumerate(data) if t.next_history is not None]
    phi = pair_features(p, [t.history for t in data], [t.reply for t in data], cfg)
    next_phi_h = torch.zeros_like(phi)
    if nxt:
        next_phi_h[nxt] = state_features(p, [data[i].next_history for i in nxt], cfg)
    return {"phi": phi, "phi_h": state_features(p, [t.history for t in data], cfg), "next_phi_h": next_phi_h,
            "reward": torch.tensor([t.reward for t in data], dtype=torch.float32),
            "terminated": torch.tensor([t.next_history is None for t in data])}


def candidate_tensors(p: Parts, policy, tok, data: list[Logged], cfg: QOfflineConfig) -> dict[str, torch.Tensor]:
    """CQL's candidate set per transition: --candidates policy samples at its state (generated once per distinct
    history, seeded by its index) and the logged reply, deduplicated, with log π_β of each (the samples' from the
    engine, the logged reply's likelihood under the policy). (N, K, d) cand_phi, (N, K) cand_valid and
    log_behavior, (N,) taken, K = --candidates + 1."""
    engine = Engine(policy, tok, cfg.dtype)
    params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, n=cfg.candidates)
    samples: dict[str, tuple[list[str], list[float]]] = {}
    for t in data:
        key = prompt_key(t.history)
        if key not in samples:
            gen = generator(cfg.seed + CANDIDATE_SEED + len(samples), engine.device)
            done = engine.generate([t.history], params, generator=gen)
            samples[key] = ([c.text for c in done], [float(sum(c.logprobs)) for c in done])
    logged_lp = reply_logprobs(policy, tok, [t.history for t in data], [t.reply for t in data], cfg.max_prompt_length,
                               cfg.max_new_tokens + 1)
    K, d = cfg.candidates + 1, p.d
    out = {"cand_phi": torch.zeros(len(data), K, d), "cand_valid": torch.zeros(len(data), K, dtype=torch.bool),
           "log_behavior": torch.zeros(len(data), K), "taken": torch.zeros(len(data), dtype=torch.long)}
    for i, t in enumerate(data):
        texts, lps = samples[prompt_key(t.history)]
        keep = dedupe([t.reply, *texts])  # the logged reply first: index 0 is the one taken
        texts, lps = [([t.reply, *texts])[j] for j in keep], [([float(logged_lp[i]), *lps])[j] for j in keep]
        out["cand_phi"][i, :len(texts)] = pair_features(p, [t.history] * len(texts), texts, cfg)
        out["cand_valid"][i, :len(texts)] = True
        out["log_behavior"][i, :len(texts)] = torch.tensor(lps)
    return out


# --------------------------------------------------------------------------- held-out evaluation


def held_out_sets(data: list[Logged]) -> list[tuple[list[Message], list[str], list[float]]]:
    """(history, distinct replies, mean logged reward of each) of every held-out state with two or more distinct
    replies (several annotators' ratings of one reply are averaged), in order of first appearance."""
    states: dict[str, tuple[list[Message], dict[str, list[float]]]] = {}
    for t in data:
        _, replies = states.setdefault(prompt_key(t.history), (t.history, {}))
        replies.setdefault(" ".join(t.reply.split()), []).append(t.reward)
    out = []
    for history, replies in states.values():
        if len(replies) >= 2:
            out.append((history, list(replies), [sum(v) / len(v) for v in replies.values()]))
    return out


@torch.no_grad()
def evaluate(p: Parts, heads: QHeads, sets: list, cfg: QOfflineConfig) -> dict:
    """How Q_1 ranks the logged replies of each held-out state against their logged reward (qeval.set_statistics,
    the bootstrap over states), and the mean V(h) of those states."""
    if not sets:
        return {}
    scored, states = [], []
    for g, (history, replies, rewards) in enumerate(sets):
        q = heads(pair_features(p, [history] * len(replies), replies, cfg).to(next(heads.parameters()).device))[0]
        scored.append(ScoredSet(q.cpu().tolist(), rewards, [len(r.split()) for r in replies], group=g))
        states.append(history)
    v = heads.v(state_features(p, states, cfg).to(next(heads.parameters()).device))
    return {**set_statistics(scored, seed=cfg.seed), "eval/value_mean": float(v.mean())}


# --------------------------------------------------------------------------- the loop


def build(cfg: QOfflineConfig, train_data: list[Logged], log=print):
    """(Parts, the training tensors, the φ trunk's name): features of every transition, CQL candidate sets."""
    policy, tok, trunk, qtok, q_model = load_policy_and_trunk(cfg)
    d = unwrap(trunk).config.hidden_size
    p = Parts(trunk, qtok, FeatureCache(q_model, cfg.pooling), FeatureCache(q_model, HISTORY), d)
    tensors = transition_tensors(p, train_data, cfg)
    if cfg.candidates:
        log(f"chatrlhf qlearn-offline: sampling {cfg.candidates} candidates at each training state for CQL")
        tensors.update(candidate_tensors(p, policy, tok, train_data, cfg))
    return p, tensors, q_model


def describe(train_data: list[Logged], held_sets: list) -> str:
    by = {}
    for t in train_data:
        by[t.source] = by.get(t.source, 0) + 1
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(by.items()))
    return f"{len(train_data)} logged transitions ({kinds}), {len(held_sets)} held-out states with ≥ 2 replies"


def train(cfg: QOfflineConfig, log=print) -> Summary:
    check(cfg)
    run = Run("qlearn-offline", cfg, log)
    train_data, held = split_logged(cfg, log)
    if not train_data:
        raise UsageError(f"--data {','.join(cfg.data)}: no training transitions left", "give more logged feedback "
                         "or a lower --eval-fraction")
    held_sets = held_out_sets(held)
    p, data, q_model = build(cfg, train_data, log)
    heads = QHeads(p.d, cfg.heads, cfg.hidden, value=True).to(run.device)
    optimizer = torch.optim.AdamW(heads.trainable_parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    n_steps = run.total_steps(-(-len(train_data) // cfg.batch_size))
    log(f"chatrlhf qlearn-offline: {describe(train_data, held_sets)}; {n_steps} IQL updates (τ {cfg.expectile:g}, "
        f"γ {cfg.gamma:g}{f', CQL α {cfg.cql_alpha:g}' if cfg.cql_alpha else ''}), φ from {q_model} "
        f"({cfg.pooling}, d = {p.d}), device {run.device}")
    gens = {"batches": generator(cfg.seed + 2)}
    state = run.begin({"q": (heads, optimizer, scheduler)}, gens, {"eval_start": None},
                      objects={"q_targets": heads.targets})
    step = run.step
    if step == 0:
        state["eval_start"] = evaluate(p, heads, held_sets, cfg)
        run.log(0, state["eval_start"])
    with run.loop(n_steps):
        while run.running(step, n_steps):
            idx = torch.randint(len(train_data), (cfg.batch_size,), generator=gens["batches"])
            metrics = iql_update(heads, optimizer, {k: v[idx] for k, v in data.items()}, cfg.gamma, cfg.expectile,
                                 cfg.cql_alpha, cfg.max_grad_norm)
            heads.soft_update(cfg.tau)
            step += 1
            if step % cfg.eval_steps == 0 or step == n_steps:
                metrics.update(evaluate(p, heads, held_sets, cfg))
            run.log(step, metrics)
            run.end_step(step, n_steps, info=f"loss {metrics['loss/total']:.4f}")
    if step < n_steps:
        return run.stopped()
    save_qheads(heads, run.out, q_model, cfg.pooling)
    return run.finish({"eval_start": state["eval_start"], "transitions": len(train_data), "q_model": q_model,
                       "pooling": cfg.pooling, "held_out_states": len(held_sets),
                       "eval_end": run.last_eval("eval/q"),
                       "data": file_hashes(cfg.data)})
