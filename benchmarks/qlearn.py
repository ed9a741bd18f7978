"""Q-reranking on held-out human dialogues (issue 19, "Done when" item 2): the reply chosen by Q among N = 8
policy samples vs a random sample vs the oracle best vs the human reply, capture = (Q − random) / (oracle −
random) with a bootstrap 95% CI over dialogues, and the cost of scoring the N candidates vs generating them.

    .venv/bin/python benchmarks/qlearn.py [--train-dialogues 80] [--eval-dialogues 40] [--candidates 8]
                                          [--reward-model DIR] [--quick]

Data: OpenAssistant top-1 paths, prompt-disjoint split by opening prompt (seed 0): oasst_en100_top1_messages
(95 conversations) + the oasst1 English validation flat export (191 trees, rebuilt from parent_id by
chatrlhf.data.oasst, top-1 reply at every step; the 6 trees in both are kept once). A state is a dialogue's
history up to one of its first --max-turns assistant turns (the data's own history: replayed turns, QLEARN
§2.6); its human reply is the reference. Policy = trunk = the embedded SmolLM2-135M; candidates are sampled
once (T = 1, top-k 0, top-p 1, --max-new-tokens) with a per-state seed and cached under out/bench-qlearn/, with φ
(last and mean pooling).

Rewards, each reported: `rouge` = ROUGE-L F1 to the human reply of that turn (source `similarity`); `rm` = a
reward model's normalised score (--reward-model DIR, e.g. `chatrlhf reward train` on HH-RLHF pairs; skipped
without one). Learners, each trained on the train states' candidates with that reward:
  - dqn  : the `chatrlhf qlearn` update loop (trainers.qlearn: ε-greedy by Q_1 over the policy samples + the
           human reply, ReplayBuffer, q_update = double DQN + clipped double Q + Huber, Polyak targets) replayed
           over the cached candidate sets, with the trainer's defaults ("dqn-default") and with the settings the
           benchmark recommends (standardised φ, every candidate's reward stored, more updates: "dqn"); γ = 0
           (the replayed-data baseline) and γ = 0.9.
  - text / both: `chatrlhf qlearn --features text|both` — the same fqi (and one DQN) rows with the heads on the text
           features ψ of qfeatures.py (computed from the cached texts at load time, the policy samples the
           consensus pool) or on [φ_mean, ψ], the heads built by the trainer's qnet.make_heads. The cost block adds
           ψ's time for the N candidates (text_s) beside φ's.
  - ridge: closed-form ridge regression of the reward on standardised φ (λ by 3-fold CV over train states) —
           the reference for what a head on these features can reach.
  - rm-bon (rouge only): best-of-N by the reward model; longest: the longest candidate (a trivial heuristic).
  - sibling-human (rouge only): the candidate closest to the OTHER human replies to the same user message, where
           the OASST tree has them — the noise ceiling of the ROUGE reward (what knowing good human replies to this
           very message captures, short of the reference itself); each learner's capture on those states beside it.
  - ppo (--ppo-steps N): single-turn `chatrlhf ppo` and multi-turn `chatrlhf ppo --env dialogue` from the same
           policy for N steps each, reward ROUGE-L; each policy's mean reward on the held-out states (ppo_rows).

Writes benchmarks/results/qlearn.json. CHATRLHF_BENCH_CACHE=DIR reads (and writes) the cached states in DIR instead of
out/bench-qlearn/ (e.g. the main checkout's, from a worktree).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT.parent / "shared" / "data" / "sft"
TOP1 = SFT / "oasst_en100_top1_messages.jsonl.gz"
FLAT = SFT / "oasst1_en_validation_messages.jsonl.gz"
CACHE = Path(os.environ.get("CHATRLHF_BENCH_CACHE", ROOT / "out" / "bench-qlearn"))  # e.g. another checkout's cache


# --------------------------------------------------------------------------- data


def load_dialogues() -> list[dict]:
    """The OASST top-1 dialogues of both files, each tree once (the flat export's trees rebuilt by data.oasst)."""
    from chatrlhf.data import oasst
    from chatrlhf.data.readers import read_rows

    read = lambda p: [json.loads(line) for line in gzip.open(p, "rt", encoding="utf-8")]  # noqa: E731
    flat = [{"id": root.tree, "messages": m}
            for root, m in oasst.top1_paths(oasst.read_forest(FLAT, read_rows(FLAT), nested=False).roots)]
    seen, out = set(), []
    for d in read(TOP1) + flat:
        if d["id"] not in seen:
            seen.add(d["id"])
            out.append({"id": d["id"], "messages": d["messages"]})
    return out


def sibling_replies() -> dict[str, list[str]]:
    """Every usable human reply of the flat export, by the text of the user message it answers: the other humans'
    replies to a state's last user turn (OASST asks several people to answer each message; the state's reference
    is the top-ranked one)."""
    from chatrlhf.data import oasst
    from chatrlhf.data.readers import read_rows

    out: dict[str, list[str]] = {}
    todo = list(oasst.read_forest(FLAT, read_rows(FLAT), nested=False).roots)
    while todo:
        node = todo.pop()
        todo += node.children
        if node.role == "user":
            out.setdefault(node.text.strip(), []).extend(c.text for c in node.children if c.usable)
    return out


def add_siblings(sts: list[dict]) -> None:
    """st["siblings"]: the other human replies to the state's last user turn (not its reference); [] for most states
    of the top-1 file, which keeps one reply a turn."""
    by_user = sibling_replies()
    for st in sts:
        st["siblings"] = [t for t in by_user.get(st["history"][-1]["content"].strip(), [])
                          if t.strip() != st["human"].strip()]


def split(dialogues: list[dict], n_train: int, n_eval: int, seed: int = 0) -> tuple[list, list]:
    """Prompt-disjoint (data.split_by_prompt on the opening prompt), then the first n of each side."""
    from chatrlhf.data.records import Conversation
    from chatrlhf.data.split import split_by_prompt

    convs = [Conversation(d["messages"], where=d["id"]) for d in dialogues]
    train, held = split_by_prompt(convs, n_eval / len(convs), seed)
    keep = lambda cs, n: [{"id": c.where, "messages": c.messages} for c in cs[:n]]  # noqa: E731
    return keep(train, n_train), keep(held, n_eval)


def states(dialogues: list[dict], max_turns: int) -> list[dict]:
    """One state per assistant turn among each dialogue's first ``max_turns``: the history before it (the data's
    own turns) and the human reply. ``dialogue`` indexes ``dialogues``, ``last`` marks its final state."""
    out = []
    for i, d in enumerate(dialogues):
        turns = [k for k, m in enumerate(d["messages"]) if m["role"] == "assistant"][:max_turns]
        for j, k in enumerate(turns):
            out.append({"dialogue": i, "history": d["messages"][:k], "human": d["messages"][k]["content"],
                        "last": j == len(turns) - 1})
    return out


# --------------------------------------------------------------------------- candidates, features, rewards


def sample_candidates(model, tok, sts: list[dict], a, seed: int, log) -> None:
    """st["candidates"] (st["n"] policy samples, a seeded stream per state) and st["gen_s"] (wall time), in place."""
    from chatrlhf.engine import Engine, SamplingParams

    engine = Engine(model, tok, "auto")
    params = {n: SamplingParams(max_tokens=a.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, n=n)
              for n in (a.candidates, a.train_candidates)}
    engine.generate([sts[0]["history"]], params[a.candidates], generator=torch.Generator().manual_seed(0))  # warm-up
    for i, st in enumerate(sts):
        t = time.perf_counter()
        outs = engine.generate([st["history"]], params[st["n"]], generator=torch.Generator().manual_seed(seed + i))
        st["gen_s"] = time.perf_counter() - t
        st["candidates"] = [c.text for c in outs]
        if i % 20 == 0:
            log(f"  candidates {i + 1}/{len(sts)} ({st['gen_s']:.1f} s)")


def embed(model, tok, sts: list[dict], a) -> None:
    """st["phi_last"], st["phi_mean"]: (N + 1, d) φ of the candidates then the human reply; st["phi_s"]: the
    wall time of φ (last pooling) for the N candidates alone — the reranking cost; st["logp"], st["ntok"]: (N + 1,)
    log π(y|h) at T = 1 and the token count of each (the policy's own likelihood, a feature to try)."""
    from chatrlhf.qnet import reply_features, reply_logprobs

    kw = {"max_prompt_length": a.max_prompt_length, "max_reply_length": a.max_new_tokens + 1}
    for st in sts:
        texts = st["candidates"] + [st["human"]]
        t = time.perf_counter()
        reply_features(model, tok, [st["history"]] * len(st["candidates"]), st["candidates"], "last", **kw)
        st["phi_s"] = time.perf_counter() - t
        for pooling in ("last", "mean"):
            st[f"phi_{pooling}"] = reply_features(model, tok, [st["history"]] * len(texts), texts, pooling,
                                                  **kw).half()
        st["logp"] = reply_logprobs(model, tok, [st["history"]] * len(texts), texts, **kw)
        st["ntok"] = torch.tensor([min(len(tok(t, add_special_tokens=False).input_ids) + 1, kw["max_reply_length"])
                                   for t in texts])


def score(sts: list[dict], reward_model: str, log) -> list[str]:
    """st["r_rouge"] (and st["r_rm"] with a reward model): (N + 1,) rewards of the candidates then the human reply."""
    from chatrlhf.rewards import ModelReward, rouge_l

    for st in sts:
        st["r_rouge"] = [rouge_l(st["human"], y) for y in st["candidates"] + [st["human"]]]
    if not reward_model:
        return ["rouge"]
    rm = ModelReward(reward_model, force=True, log=log)
    for st in sts:
        texts = st["candidates"] + [st["human"]]
        st["r_rm"] = [float(v) for v in rm([st["history"]] * len(texts), texts)]
    return ["rouge", "rm"]


def cache_path(a, **override) -> Path:
    """The cache file of these settings (``override``: settings to replace, e.g. reward_model="")."""
    keys = ("train_dialogues", "eval_dialogues", "candidates", "train_candidates", "max_new_tokens", "max_turns",
            "max_prompt_length", "reward_model", "seed")
    settings = {k: override.get(k, getattr(a, k)) for k in keys}
    return CACHE / f"states-{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]}.pt"


def prepare(a, log) -> tuple[list, list, list, dict]:
    """(train states, held-out states, reward names, meta), from the cache when these settings were run before."""
    path, plain = cache_path(a), cache_path(a, reward_model="")
    if path.is_file():
        log(f"candidates, φ and rewards from {path}")
        return torch.load(path, weights_only=False)
    if a.reward_model and plain.is_file():  # the same candidates were drawn before: score them with the RM only
        log(f"candidates and φ from {plain}; scoring them with {a.reward_model}")
        tr, ev, _, meta = torch.load(plain, weights_only=False)
        t = time.perf_counter()
        rewards = score(tr + ev, a.reward_model, log)
        torch.save((tr, ev, rewards, {**meta, "reward_s": time.perf_counter() - t}), path)
        return tr, ev, rewards, meta
    from chatrlhf.config import ModelArgs
    from chatrlhf.models import load_model

    train_d, held_d = split(load_dialogues(), a.train_dialogues, a.eval_dialogues, a.seed)
    tr, ev = states(train_d, a.max_turns), states(held_d, a.max_turns)
    for st in tr + ev:
        st["n"] = a.train_candidates if st in tr else a.candidates
    log(f"{len(train_d)} train dialogues ({len(tr)} states), {len(held_d)} held-out ({len(ev)} states)")
    model, tok = load_model(ModelArgs(model="smollm2-135m"))
    model.eval().requires_grad_(False)
    t0 = time.perf_counter()
    sample_candidates(model, tok, tr + ev, a, a.seed, log)
    t1 = time.perf_counter()
    embed(model, tok, tr + ev, a)
    t2 = time.perf_counter()
    rewards = score(tr + ev, a.reward_model, log)
    meta = {"sample_s": t1 - t0, "embed_s": t2 - t1, "reward_s": time.perf_counter() - t2,
            "train_ids": [d["id"] for d in train_d], "eval_ids": [d["id"] for d in held_d]}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save((tr, ev, rewards, meta), path)
    return tr, ev, rewards, meta


def add_text_features(sts: list[dict]) -> None:
    """st["phi_text"]: (N + 1, 9) text features ψ (qfeatures.text_features) of the candidates then the human reply,
    the policy samples the consensus pool (as `chatrlhf qlearn` computes them); st["phi_both"]: [φ_mean, ψ];
    st["text_s"]: the wall time of ψ for the N candidates alone — its reranking cost. From the cached texts: the
    cache (and its key) stay as they are."""
    from chatrlhf.qfeatures import text_features

    for st in sts:
        n = len(st["candidates"])
        t = time.perf_counter()
        text_features(st["history"], st["candidates"])
        st["text_s"] = time.perf_counter() - t
        st["phi_text"] = text_features(st["history"], st["candidates"] + [st["human"]], pool=range(n))
        st["phi_both"] = torch.cat([st["phi_mean"].float(), st["phi_text"]], 1)


# --------------------------------------------------------------------------- learners


def standardiser(sts: list[dict], pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of φ over every train candidate (and human reply): LM states have huge outlier dims."""
    x = torch.cat([st[f"phi_{pooling}"].float() for st in sts])
    return x.mean(0), x.std(0).clamp_min(1e-4)


def ridge(train: list[dict], reward: str, pooling: str, lams=(1.0, 10.0, 100.0, 1000.0, 10000.0)):
    """w, b of ridge regression of the reward on standardised φ of the policy candidates, λ by 3-fold CV over
    states (mean within-state rank correlation of the held-in fold); returns a scorer φ → value."""
    mu, sd = standardiser(train, pooling)
    xs = [(st[f"phi_{pooling}"].float()[:-1] - mu) / sd for st in train]
    ys = [torch.tensor(st[f"r_{reward}"][:-1]) for st in train]

    def fit(idx, lam):
        x, y = torch.cat([xs[i] for i in idx]).double(), torch.cat([ys[i] for i in idx]).double()
        xm, ym = x.mean(0), y.mean()
        w = torch.linalg.solve((x - xm).T @ (x - xm) + lam * torch.eye(x.shape[1], dtype=x.dtype), (x - xm).T @ (y - ym))
        return w.float(), float(ym - xm @ w)

    def cv(lam):
        folds = [list(range(k, len(xs), 3)) for k in range(3)]
        got = []
        for f in folds:
            w, b = fit([i for i in range(len(xs)) if i not in set(f)], lam)
            got += [capture_terms(xs[i] @ w + b, ys[i]) for i in f]
        return capture_of(got)

    best = max(lams, key=cv)
    w, b = fit(range(len(xs)), best)
    return (lambda phi: ((phi.float() - mu) / sd) @ w + b), {"lambda": best}


def capture_terms(q: torch.Tensor, r: torch.Tensor) -> tuple[float, float, float]:
    """(reward of the argmax pick, mean reward, best reward) of one state."""
    r = torch.as_tensor(r, dtype=torch.float32)
    return float(r[int(torch.as_tensor(q).argmax())]), float(r.mean()), float(r.max())


def capture_of(terms: list[tuple]) -> float:
    q, rnd, best = np.mean(np.array(terms), 0)
    return float((q - rnd) / (best - rnd)) if best - rnd > 1e-12 else 0.0


def dqn(train: list[dict], reward: str, pooling: str, gamma: float, a, recipe: dict, seed: int = 0):
    """The trainer's update loop (trainers/qlearn.run_episode) over the cached candidate sets; returns a scorer.
    recipe: normalise (standardised φ), all (store every candidate's transition, not only the taken one's),
    updates (q_update calls per reply), epochs (passes over the train dialogues), hidden (head width; optional),
    human (False: leave the human reply out of the candidate sets; it scores ROUGE 1 against itself), solver
    ("fqi": linear heads set by qnet.fqi_update after every episode, as `chatrlhf qlearn --solver fqi`).
    pooling "text" / "both": the heads read the text features ψ / [φ_mean, ψ] (`chatrlhf qlearn --features`, the
    heads built by the trainer's qnet.make_heads)."""
    from chatrlhf.config import QLearnConfig
    from chatrlhf.qnet import ReplayBuffer, fqi_update, make_heads, q_update
    from chatrlhf.trainers.qlearn import dialogue_index, epsilon

    cfg = QLearnConfig()
    torch.manual_seed(seed)
    mu, sd = standardiser(train, pooling) if recipe["normalise"] else (0.0, 1.0)
    cut = None if recipe.get("human", True) else -1  # the human reply is the trainer's extra candidate
    phi = lambda st: ((st[f"phi_{pooling}"].float() - mu) / sd)[:cut]  # noqa: E731  policy samples (+ the human reply)
    d, k = train[0][f"phi_{pooling}"].shape[1], max(len(st["candidates"]) for st in train) + 1
    fqi = recipe.get("solver") == "fqi"
    features = pooling if pooling in ("text", "both") else "phi"
    d_phi = train[0]["phi_mean"].shape[1] if features == "both" else d
    heads = make_heads(features, d_phi, cfg.heads, 0 if fqi else recipe.get("hidden", cfg.hidden), value=fqi)
    opt = torch.optim.AdamW(heads.online.parameters(), lr=cfg.lr)
    buf = ReplayBuffer(cfg.buffer_size, d, k)
    by_dialogue: dict[int, list[dict]] = {}
    for st in train:
        by_dialogue.setdefault(st["dialogue"], []).append(st)
    dialogues = list(by_dialogue.values())
    total = len(dialogues) * recipe["epochs"]
    g_explore, g_replay = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2)
    for episode in range(total):
        sts = dialogues[dialogue_index(episode, len(dialogues), seed)]
        eps = epsilon(cfg, episode, total)
        for t, st in enumerate(sts):
            x, r = phi(st), st[f"r_{reward}"][:cut]
            nxt = phi(sts[t + 1]) if t + 1 < len(sts) else None
            with torch.no_grad():
                q = heads(x)[0]
            explore = float(torch.rand(1, generator=g_explore)) < eps
            act = int(torch.randint(len(q), (1,), generator=g_explore)) if explore else int(q.argmax())
            for c in (range(len(r)) if recipe["all"] else [act]):
                buf.add(x[c], r[c], nxt is None, nxt, state=id(st))
            if not fqi and len(buf) >= max(cfg.learning_starts, 1):
                for _ in range(recipe["updates"]):
                    q_update(heads, opt, buf.sample(cfg.batch_size, g_replay), gamma, 0.0, cfg.max_grad_norm)
                    heads.soft_update(cfg.tau)
        if fqi and len(buf) >= max(cfg.learning_starts, 1):
            fqi_update(heads, buf, gamma)
    heads.eval()
    return (lambda p: heads(((p.float() - mu) / sd))[0].detach()), {"updates": recipe["updates"], "episodes": total}


# --------------------------------------------------------------------------- evaluation


def evaluate(held: list[dict], reward: str, scorer) -> dict:
    """Per held-out state: the reward of the scorer's argmax among the N policy samples, their mean (random), their
    max (oracle), the human reply's; dialogue ids for the bootstrap."""
    out = {"q": [], "random": [], "oracle": [], "human": [], "dialogue": []}
    for st in held:
        r = st[f"r_{reward}"]
        with torch.no_grad():
            q = scorer(st)
        pick, rnd, best = capture_terms(q, r[:-1])
        for name, v in (("q", pick), ("random", rnd), ("oracle", best), ("human", r[-1]), ("dialogue", st["dialogue"])):
            out[name].append(v)
    return out


def summarise(got: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """Means, capture and its bootstrap 95% CI over dialogues (whole dialogues resampled)."""
    arr = {k: np.array(v, dtype=float) for k, v in got.items()}
    ids = np.unique(arr["dialogue"])
    rows = {i: np.flatnonzero(arr["dialogue"] == i) for i in ids}
    cap = lambda idx: (arr["q"][idx].mean() - arr["random"][idx].mean()) / max(  # noqa: E731
        arr["oracle"][idx].mean() - arr["random"][idx].mean(), 1e-12)
    rng = np.random.default_rng(seed)
    boots = [cap(np.concatenate([rows[i] for i in rng.choice(ids, len(ids))])) for _ in range(n_boot)]
    return {"q": float(arr["q"].mean()), "random": float(arr["random"].mean()), "oracle": float(arr["oracle"].mean()),
            "human": float(arr["human"].mean()), "capture": float(cap(np.arange(len(arr["q"])))),
            "capture_ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "states": int(len(arr["q"])), "dialogues": int(len(ids))}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def train_ppo(name: str, data: Path, extra: list[str], a, log) -> Path:
    """`chatrlhf ppo` on the embedded model (LoRA r 16, value head on the policy's trunk, as benchmarks/ppo.py) with
    reward = ROUGE-L to the data's human reply for --ppo-steps steps;
    the output folder is reused when a finished run with these settings is there."""
    import subprocess

    out = CACHE / f"ppo-{name}-lora16-{a.ppo_steps}steps-{a.train_dialogues}"
    if (out / "chatrlhf.json").is_file():
        log(f"  {name} PPO policy from {out}")
        return out
    cmd = [sys.executable, "-m", "chatrlhf.cli", "ppo", "--model", "smollm2-135m", "--data", str(data),
           "--references", str(data), "--similarity", "rouge", "--output-dir", str(out), "--max-steps", str(a.ppo_steps),
           "--max-new-tokens", str(a.max_new_tokens), "--batch-size", "8", "--eval-steps", str(a.ppo_steps),
           "--save-steps", str(a.ppo_steps), "--missing-eos-penalty", "0", "--lora-r", "16", "--lr", "1e-4",
           "--critic", "shared", "--quiet", "--no-tensorboard", *extra]
    log(f"  {name} PPO: {' '.join(cmd[3:])}")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    (out / "bench_wall.json").write_text(json.dumps({"train_s": time.perf_counter() - t}) + "\n")
    return out


def policy_reward(folder: Path, held: list[dict], a) -> list[float]:
    """Per held-out state: the mean ROUGE-L to the human reply of --ppo-samples replies of the policy in ``folder``
    (sampled as the candidates are: T = 1, a seeded stream per state) — the policy's expected reward there."""
    from chatrlhf.config import ModelArgs
    from chatrlhf.engine import Engine, SamplingParams
    from chatrlhf.models import load_model
    from chatrlhf.rewards import rouge_l

    model, tok = load_model(ModelArgs(model=str(folder)))
    model.eval().requires_grad_(False)
    engine = Engine(model, tok, "auto")
    params = SamplingParams(max_tokens=a.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, n=a.ppo_samples)
    out = []
    for i, st in enumerate(held):
        outs = engine.generate([st["history"]], params, generator=torch.Generator().manual_seed(a.seed + 7919 + i))
        out.append(float(np.mean([rouge_l(st["human"], c.text) for c in outs])))
    return out


def ppo_rows(train_ids: list[str], held: list[dict], a, log) -> dict:
    """Single-turn PPO (`chatrlhf ppo`, each train state's history as a prompt) and multi-turn PPO (`--env dialogue`
    on the train dialogues, --turn-gamma 0.9) from the same policy for the same number of steps, reward = ROUGE-L to the
    human reply; each policy's mean reward on the held-out states, beside the base policy's (the candidates' mean)."""
    by_id = {d["id"]: d for d in load_dialogues()}
    dialogues = [by_id[i] for i in train_ids]
    convs, cut = [], []
    for d in dialogues:
        turns = [k for k, m in enumerate(d["messages"]) if m["role"] == "assistant"][:a.max_turns]
        cut.append({"messages": d["messages"][:turns[-1] + 1]})
        convs += [{"messages": d["messages"][:k + 1]} for k in turns]
    CACHE.mkdir(parents=True, exist_ok=True)
    single = write_jsonl(CACHE / "ppo-single-turn.jsonl", convs)
    multi = write_jsonl(CACHE / "ppo-dialogues.jsonl", cut)
    rows = {}
    for name, data, extra in (("single-turn", single, []),
                              ("multi-turn", multi, ["--env", "dialogue", "--turn-gamma", "0.9", "--max-turns",
                                                     str(a.max_turns)])):
        folder = train_ppo(name, data, extra, a, log)
        got = policy_reward(folder, held, a)
        summary = json.loads((folder / "chatrlhf.json").read_text())
        rows[f"ppo-{name}"] = {"reward": float(np.mean(got)), "per_state": got, "steps": summary.get("steps"),
                               "train_minutes": json.loads((folder / "bench_wall.json").read_text())["train_s"] / 60}
        log(f"  rouge  ppo-{name:13} mean reward {np.mean(got):.4f} after {summary.get('steps')} steps")
    return rows


# --------------------------------------------------------------------------- main


RECIPES = {"dqn-default": {"normalise": False, "all": False, "updates": 1, "epochs": 1},  # the trainer's defaults
           "dqn+norm": {"normalise": True, "all": False, "updates": 1, "epochs": 1},
           "dqn+all": {"normalise": False, "all": True, "updates": 1, "epochs": 1},
           "dqn+updates": {"normalise": False, "all": False, "updates": 8, "epochs": 3},
           "dqn+all+updates": {"normalise": False, "all": True, "updates": 8, "epochs": 3},
           "dqn+norm+all+updates": {"normalise": True, "all": True, "updates": 8, "epochs": 3},
           # `chatrlhf qlearn --solver fqi --all-candidates` (FQI standardises φ itself), with / without the human reply
           "fqi+all": {"normalise": False, "all": True, "updates": 0, "epochs": 1, "solver": "fqi"},
           "fqi+all-human": {"normalise": False, "all": True, "updates": 0, "epochs": 1, "solver": "fqi",
                             "human": False}}


def learners(a) -> list[tuple[str, str, float | None, dict | None]]:
    """(row name, pooling, γ, DQN recipe | None for ridge) of every learner reported."""
    rows = [(f"ridge/{p}", p, None, None) for p in ("last", "mean")]
    for name, recipe in RECIPES.items():
        rows.append((f"{name}/mean/γ=0", "mean", 0.0, recipe))
    rows += [("fqi+all-human/mean/γ=0.9", "mean", 0.9, RECIPES["fqi+all-human"]),
             ("fqi+all-human/last/γ=0", "last", 0.0, RECIPES["fqi+all-human"]),
             ("dqn-default/mean/γ=0.9", "mean", 0.9, RECIPES["dqn-default"]),
             ("dqn-default/last/γ=0", "last", 0.0, RECIPES["dqn-default"]),
             ("dqn-default/last/γ=0.9", "last", 0.9, RECIPES["dqn-default"]),
             # `chatrlhf qlearn --features text|both` (the default solver, fqi, without the human reply)
             ("fqi+all-human/text/γ=0", "text", 0.0, RECIPES["fqi+all-human"]),
             ("fqi+all-human/both/γ=0", "both", 0.0, RECIPES["fqi+all-human"]),
             ("fqi+all-human/text/γ=0.9", "text", 0.9, RECIPES["fqi+all-human"]),
             ("dqn+norm+all+updates/text/γ=0", "text", 0.0, {**RECIPES["dqn+norm+all+updates"], "human": False})]
    return rows


def run_learners(train, held, reward, a, log) -> dict:
    results = {}
    with_siblings = [st for st in held if st["siblings"]] if reward == "rouge" else []  # the ceiling's states
    for name, pooling, gamma, recipe in learners(a):
        if a.only not in name:
            continue
        t = time.perf_counter()
        seeds = [a.seed] if recipe is None else [a.seed + k for k in range(a.seeds)]
        runs = []
        for seed in seeds:  # ridge is deterministic; the DQN's init, exploration and replay depend on the seed
            scorer, info = ridge(train, reward, pooling) if recipe is None else \
                dqn(train, reward, pooling, gamma, a, recipe, seed)
            runs.append(summarise(evaluate(held, reward, lambda st, s=scorer, p=pooling: s(st[f"phi_{p}"][:-1]))))
        res = {**runs[0], **info, "train_s": time.perf_counter() - t}
        if with_siblings:  # the same learner on the ceiling's states
            res["sibling_states"] = summarise(evaluate(with_siblings, reward,
                                                       lambda st, s=scorer, p=pooling: s(st[f"phi_{p}"][:-1])))
        caps = [r["capture"] for r in runs]
        res.update(seed_captures=caps, capture_seed_mean=float(np.mean(caps)), capture_seed_sd=float(np.std(caps)))
        results[name] = res
        log(f"  {reward:6} {name:30} Q {res['q']:.4f}  random {res['random']:.4f}  oracle {res['oracle']:.4f}  "
            f"capture {res['capture']:+.2f} [{res['capture_ci95'][0]:+.2f}, {res['capture_ci95'][1]:+.2f}]  "
            f"over {len(seeds)} seeds {np.mean(caps):+.2f} ± {np.std(caps):.2f}"
            + (f"; {res['sibling_states']['capture']:+.2f} on the sibling states" if "sibling_states" in res else ""))
    lengths = lambda st: torch.tensor([float(len(c)) for c in st["candidates"]])  # noqa: E731
    results["longest"] = summarise(evaluate(held, reward, lengths))  # a trivial heuristic, for honesty
    log(f"  {reward:6} {'longest':26} capture {results['longest']['capture']:+.2f}")
    if with_siblings:
        results["sibling-human"] = sibling_ceiling(with_siblings)
        log(f"  {reward:6} {'sibling-human':26} capture {results['sibling-human']['capture']:+.2f} on the "
            f"{results['sibling-human']['states']} states with another human reply (the noise ceiling)")
    if reward == "rouge" and "r_rm" in held[0]:
        results["rm-bon"] = summarise(evaluate(held, reward, lambda st: torch.tensor(st["r_rm"][:-1])))
    return results


def sibling_ceiling(sub: list[dict]) -> dict:
    """The noise ceiling of the ROUGE reward: on held-out states where other people answered the same user turn,
    choose the candidate with the highest mean ROUGE-L to THEIR replies — a chooser that knows what good human
    replies to this very message say, everything a reranker could hope to learn, short of the reference itself.
    What it captures is the share of the oracle's gain that is not the luck of matching one particular reference."""
    from chatrlhf.rewards import rouge_l

    near = lambda st: torch.tensor([float(np.mean([rouge_l(b, y) for b in st["siblings"]]))  # noqa: E731
                                    for y in st["candidates"]])
    return summarise(evaluate(sub, "rouge", near))


def cost(held: list[dict], a) -> dict:
    """Seconds per held-out state: generating N, φ of the N, the heads on them; scoring/generation ratio."""
    from chatrlhf.qnet import QHeads

    heads = QHeads(held[0]["phi_last"].shape[1])
    t = time.perf_counter()
    for st in held:
        with torch.no_grad():
            heads(st["phi_last"][:-1].float())
    heads_s = (time.perf_counter() - t) / len(held)
    gen, phi = float(np.mean([st["gen_s"] for st in held])), float(np.mean([st["phi_s"] for st in held]))
    text = float(np.mean([st["text_s"] for st in held]))
    return {"generate_s": gen, "phi_s": phi, "heads_s": heads_s, "score_over_generate": (phi + heads_s) / gen,
            "total_over_generate": (gen + phi + heads_s) / gen, "text_s": text, "text_over_generate": text / gen,
            "both_over_generate": (phi + text + heads_s) / gen}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-dialogues", type=int, default=120)
    p.add_argument("--eval-dialogues", type=int, default=60)
    p.add_argument("--candidates", type=int, default=8, help="policy samples per held-out state (N)")
    p.add_argument("--train-candidates", type=int, default=4, help="policy samples per train state (+ the human reply)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: far faster on a shared, loaded CPU)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-turns", type=int, default=2, help="assistant turns per dialogue used as states")
    p.add_argument("--max-prompt-length", type=int, default=512)
    p.add_argument("--reward-model", default="", help="reward-model folder for the `rm` reward (skipped if empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=3, help="DQN learners: seeds per row (capture mean ± sd)")
    p.add_argument("--quick", action="store_true", help="8 + 6 dialogues, N = 4: a smoke run")
    p.add_argument("--ppo-steps", type=int, default=0,
                   help="> 0: also train single-turn and multi-turn PPO for this many steps each and compare")
    p.add_argument("--ppo-samples", type=int, default=4, help="replies per held-out state to score each PPO policy")
    p.add_argument("--only", default="", help="run only the learner rows whose name contains this (e.g. fqi)")
    a = p.parse_args()
    if not (TOP1.is_file() and FLAT.is_file()):
        sys.exit(f"{SFT} (OpenAssistant files) not found: this benchmark needs ../shared/data — skipped")
    if a.quick:
        a.train_dialogues, a.eval_dialogues, a.candidates, a.train_candidates = 6, 4, 4, 2
    torch.set_num_threads(a.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    train, held, rewards, meta = prepare(a, log)
    add_text_features(train + held)
    add_siblings(held)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "settings": vars(a),
              "train_states": len(train), "held_out_states": len(held), "prepare": meta, "cost": cost(held, a)}
    for reward in rewards:
        result[reward] = run_learners(train, held, reward, a, log)
        if reward == "rouge" and a.ppo_steps > 0:
            result[reward].update(ppo_rows(meta["train_ids"], held, a, log))
    result["wall_s"] = time.perf_counter() - t0
    c = result["cost"]
    log(f"cost per state: generate {c['generate_s']:.2f} s, φ {c['phi_s']:.2f} s, heads {c['heads_s'] * 1e3:.2f} ms → "
        f"scoring = {c['score_over_generate']:.2f}× generation (goal ≤ 0.5×), total {c['total_over_generate']:.2f}×; "
        f"text features {c['text_s'] * 1e3:.1f} ms = {c['text_over_generate']:.3f}× generation")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    only = "".join(ch if ch.isalnum() or ch in "+-" else "_" for ch in a.only)
    name = "qlearn-quick.json" if a.quick else f"qlearn-{only}.json" if a.only else "qlearn.json"
    (out / name).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    log(f"wrote {out / name} ({result['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
