"""Does active selection get the reward model more accuracy per human label (issue 23)? Pool-based simulation on
the HH-RLHF pairs in ../shared/data: the human label of each pair is the oracle.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/active.py                  # the docs/active.md table
    .venv/bin/python benchmarks/active.py --model tiny-random-llama --layer 1 --pool-pairs 60 --test-pairs 30 \\
        --budgets 10,20,40 --seeds 2                                                     # seconds: proves the plumbing

Split: reward_recipes.py's (hh_split: whole prompts of the HH base splits held out until --test-pairs pairs are,
the pool = --pool-pairs of the rest, shuffled with seed 0, in `reward train`'s own train/validation order), so the
frozen trunk's features of the pool and of the held-out pairs come from the cache that reward_recipes.py fills
(out/reward-recipes/features: one extraction for both benchmarks).

Recipe: the frozen-trunk reward model of `reward train --freeze-trunk --ensemble K` on those cached features —
K linear heads from zero, each on its own bootstrap resample of the labels so far (trainers.reward.bootstrap_counts),
the Bradley–Terry loss (losses.bradley_terry_loss), AdamW with the linear decay of make_optimizer, lr 1e-3, weight
decay 0.01, batch 8, --epochs epochs; the score is the heads' mean. Every strategy trains the same model.

Rounds, per seed: the first --budgets entry is labelled at random (the same pairs for every strategy of that seed: a
cold start); then, until the last budget, train on the labels so far, score the unlabelled pool and label the next
budget's worth chosen by feedback.active.select — random, uncertainty (smallest |mean margin|) or disagreement
(largest std over the heads of the margin) — exactly what `chatrlhf feedback queue` runs. After each budget the
model trained on its labels is scored on the held-out pairs (accuracy: chosen scored above rejected).

Reported: held-out accuracy, mean ± std over --seeds, per strategy and budget; and the labels uncertainty (and
disagreement) need to reach random's mean accuracy at the largest budget, by linear interpolation of their mean
curve (the goal of issue 23: ≤ 70 % of that budget). Writes benchmarks/results/active_pool<N>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reward_quality import HH, OASST, ROOT  # noqa: E402
from reward_recipes import extract, split  # noqa: E402
from sft import machine  # noqa: E402

from chatrlhf import losses  # noqa: E402
from chatrlhf.config import RewardTrainConfig  # noqa: E402
from chatrlhf.data.pairs import split_pairs  # noqa: E402
from chatrlhf.errors import ChatRLHFError  # noqa: E402
from chatrlhf.feedback.active import STRATEGIES, margins_and_spreads, select  # noqa: E402
from chatrlhf.trainers.common import make_optimizer  # noqa: E402
from chatrlhf.trainers.reward import bootstrap_counts  # noqa: E402

LR, WEIGHT_DECAY, BATCH = 1e-3, 0.01, 8  # reward_recipes.py's frozen recipe


def fit_heads(chosen: torch.Tensor, rejected: torch.Tensor, heads: int, epochs: int, seed: int) -> torch.Tensor:
    """(K, d) linear heads from zero on (n, d) features of labelled pairs, head k on bootstrap resample k."""
    n, d = chosen.shape
    torch.manual_seed(seed)
    boot = bootstrap_counts(n, heads, seed)
    w = torch.zeros(heads, d, requires_grad=True)
    steps = epochs * -(-n // BATCH)
    opt, sched = make_optimizer([w], LR, WEIGHT_DECAY, total_steps=steps)
    for _ in range(epochs):
        for idx in torch.randperm(n).split(BATCH):
            sc, sr = chosen[idx] @ w.T, rejected[idx] @ w.T  # (B, K)
            loss = sum(losses.bradley_terry_loss(sc[:, k], sr[:, k], weight=boot[idx, k])[0]
                       for k in range(heads) if boot[idx, k].sum() > 0)
            if torch.is_tensor(loss):
                loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    return w.detach()


def head_margins(w: torch.Tensor, feats: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    """(N, K) chosen − rejected score of every head."""
    return ((feats[0] - feats[1]) @ w.T).numpy()


def run_seed(strategy: str, seed: int, pool: tuple, test: tuple, budgets: list[int], a) -> list[float]:
    """Held-out accuracy at each budget for one strategy and seed; labels are added in rounds of --round-size (0:
    one round per budget), the model retrained after each."""
    n = len(pool[0])
    labelled = select("random", budgets[0], n, seed=seed)
    accuracies = []
    while True:
        w = fit_heads(pool[0][labelled], pool[1][labelled], a.heads, a.epochs, seed)
        if len(labelled) in budgets:
            accuracies.append(float((head_margins(w, test).mean(1) > 0).mean()))
        if len(labelled) >= budgets[-1]:
            return accuracies
        goal = next(b for b in budgets if b > len(labelled))
        rest = np.setdiff1d(np.arange(n), labelled)
        if len(rest) < goal - len(labelled):
            sys.exit(f"--budgets: {goal} labels asked for, the pool has {n} pairs")
        margins, spreads = margins_and_spreads(head_margins(w, (pool[0][rest], pool[1][rest])))
        take = min(goal, len(labelled) + a.round_size) - len(labelled) if a.round_size else goal - len(labelled)
        chosen = select(strategy, take, len(rest), margins, spreads, seed=seed + 1000 * len(labelled))
        labelled = labelled + rest[chosen].tolist()


def needed(budgets: list[int], curve: list[float], target: float) -> float | None:
    """The labels at which ``curve`` (mean accuracy per budget) first reaches ``target``, interpolated linearly
    between budgets; None if it never does."""
    for i, acc in enumerate(curve):
        if acc >= target:
            if i == 0:
                return float(budgets[0])
            lo, hi = curve[i - 1], acc
            return budgets[i - 1] + (budgets[i] - budgets[i - 1]) * (target - lo) / (hi - lo)
    return None


def data(a) -> tuple[tuple, tuple, int]:
    """(pool features, held-out features, d): the frozen trunk's (chosen, rejected) features. The first
    --cached-pairs of the pool are reward_recipes.py's split of that many pairs (its training then validation pairs:
    the features its run cached); the rest of the pool, the next pairs of the same shuffled list, are extracted once
    (and cached) as one more list."""
    a.train_domain, a.eval_pairs = "hh", a.test_pairs
    a.train_pairs = min(a.cached_pairs, a.pool_pairs)
    path, _, test_pairs, _ = split(a)
    base = RewardTrainConfig(model=a.model, data=[str(path)], eval_fraction=0.1, max_length=a.max_length,
                             dtype="auto", seed=0, quiet=True, tensorboard=False, layer=a.layer, pooling=a.pooling,
                             batch_size=8)
    train_pairs, val_pairs, _, _ = split_pairs(base, "reward", lambda *x: None)
    splits = {"train": train_pairs, "val": val_pairs, "test": test_pairs}
    if a.pool_pairs > a.cached_pairs:
        a.train_pairs = a.pool_pairs
        _, more, _, _ = split(a)  # the same shuffle: its first --cached-pairs are the ones above
        splits["more"] = [r for r in more[a.cached_pairs:] if r.chosen != r.rejected]
    feats, _ = extract(base, splits)
    parts = [k for k in ("train", "val", "more") if k in feats]
    pool = tuple(torch.cat([feats[k][j] for k in parts]).float() for j in (0, 1))
    return pool, tuple(f.float() for f in feats["test"]), pool[0].shape[1]


def probe_oracle(pool: tuple, test: tuple, epochs: int) -> tuple[tuple, tuple]:
    """--oracle probe: a control where the labels are learnable. One head trained on every pool pair's human label
    becomes the oracle: each pair (pool and held-out) is reordered so that the reply it scores higher is "chosen".
    The task is then realisable by the model being trained, with no label noise."""
    w = fit_heads(pool[0], pool[1], 1, epochs, seed=12345)

    def relabel(feats):
        keep = torch.from_numpy(head_margins(w, feats)[:, 0] >= 0)[:, None]
        return torch.where(keep, feats[0], feats[1]), torch.where(keep, feats[1], feats[0])

    return relabel(pool), relabel(test)


def paired(curves: dict, strategy: str) -> list[tuple[float, float]]:
    """(mean, standard error) over seeds of strategy − random, per budget: the seeds share the first labels and the
    held-out pairs, so the difference is less noisy than either curve."""
    d = curves[strategy] - curves["random"]
    return [(float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")) for x in d.T]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pool-pairs", type=int, default=400, help="unlabelled pool (before `reward train`'s tie filter)")
    p.add_argument("--cached-pairs", type=int, default=400,
                   help="the pool's first pairs: reward_recipes.py's split of this many (--train-pairs), whose features "
                        "its run cached")
    p.add_argument("--test-pairs", type=int, default=200, help="held-out pairs (whole prompts)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--layer", type=int, default=16)
    p.add_argument("--pooling", choices=("last", "mean", "both"), default="mean")
    p.add_argument("--budgets", default="20,40,80,160", help="labels after each round, increasing")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--round-size", type=int, default=0,
                   help="labels added per round between budgets, the model retrained after each (0: one round per "
                        "budget)")
    p.add_argument("--heads", type=int, default=5, help="bootstrap heads of every strategy's reward model")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--oracle", choices=("human", "probe"), default="human",
                   help="human: the HH label; probe: a control with learnable labels (see probe_oracle)")
    a = p.parse_args()
    a.budgets = [int(x) for x in a.budgets.split(",")]
    a.strategies = a.strategies.split(",")
    missing = [path for path in (HH, *OASST) if not path.exists()]
    if missing:
        sys.exit(f"{missing[0]} not found: this benchmark needs ../shared/data (skipped)")
    if a.budgets != sorted(set(a.budgets)) or a.budgets[0] < 2 or a.budgets[-1] > a.pool_pairs:
        sys.exit(f"--budgets {a.budgets}: increasing, from ≥ 2 to ≤ --pool-pairs")
    return a


def main() -> None:
    a = parse_args()
    t0 = time.perf_counter()
    pool, test, d = data(a)
    if a.oracle == "probe":
        pool, test = probe_oracle(pool, test, a.epochs)
    print(f"pool {len(pool[0])} pairs, held-out {len(test[0])} pairs, {d} features; {time.perf_counter() - t0:.0f} s "
          "to load or extract them", flush=True)
    curves = {s: np.array([run_seed(s, seed, pool, test, a.budgets, a) for seed in range(a.seeds)])
              for s in a.strategies}
    print(f"\nheld-out accuracy, mean ± std over {a.seeds} seeds\n{'labels':>8}" +
          "".join(f"{s:>22}" for s in a.strategies))
    for j, b in enumerate(a.budgets):
        print(f"{b:>8}" + "".join(f"{curves[s][:, j].mean():>15.3f} ± {curves[s][:, j].std():.3f}"
                                  for s in a.strategies))
    if "random" in curves:
        for s in a.strategies:
            if s != "random":
                print(f"{s} − random (paired, mean ± s.e.): " +
                      ", ".join(f"{b}: {m:+.3f} ± {e:.3f}" for b, (m, e) in zip(a.budgets, paired(curves, s))))
    target = float(curves["random"][:, -1].mean()) if "random" in curves else None
    reach = {s: needed(a.budgets, curves[s].mean(0).tolist(), target) for s in a.strategies if target is not None}
    for s, labels in reach.items():
        if s != "random":
            print(f"{s}: reaches random's {target:.3f} at {a.budgets[-1]} labels with "
                  + (f"{labels:.0f} labels ({labels / a.budgets[-1]:.0%})" if labels is not None else "— never, "
                     f"within {a.budgets[-1]}"))
    print(f"{time.perf_counter() - t0:.0f} s in all")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"active_pool{a.pool_pairs}{'_probe' if a.oracle == 'probe' else ''}"
     f"{f'_rounds{a.round_size}' if a.round_size else ''}.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
         "settings": {k: v for k, v in vars(a).items() if k not in ("train_domain", "train_pairs", "eval_pairs")},
         "pool_pairs": len(pool[0]), "test_pairs": len(test[0]), "random_at_largest_budget": target,
         "labels_to_reach_it": reach, "accuracy": {s: c.tolist() for s, c in curves.items()},
         "seconds": time.perf_counter() - t0}, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except ChatRLHFError as e:
        sys.exit(f"error: {e}")
