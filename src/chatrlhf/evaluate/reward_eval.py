"""Reward-model evaluation on held-out pairs, the plot, and the gate that RL checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from chatrlhf.data.pairs import source_of
from chatrlhf.evaluate.metrics import pairwise_ece, pearson
from chatrlhf.models import reward_norm
from chatrlhf.rewards import reward_scores

GATE_FILE = "eval.json"


def evaluate_pairs(model, tok, pairs, batch_size: int = 16, max_length: int = 512) -> dict:
    """Score both replies of every pair with ``model`` and measure it (see :func:`pair_metrics`)."""
    prompts = [p.prompt for p in pairs]
    chosen = reward_scores(model, tok, prompts, [p.chosen for p in pairs], batch_size, max_length, normalise=False)
    rejected = reward_scores(model, tok, prompts, [p.rejected for p in pairs], batch_size, max_length, normalise=False)
    lengths = [len(tok(p.chosen)["input_ids"]) for p in pairs] + [len(tok(p.rejected)["input_ids"]) for p in pairs]
    norm = getattr(model.config, "chatrlhf_reward_norm", None) or {}
    return pair_metrics(np.array(chosen), np.array(rejected), pairs, lengths, *reward_norm(model),
                        margin_loss=bool(norm.get("margin_loss", False)))


def pair_metrics(raw_chosen: np.ndarray, raw_rejected: np.ndarray, pairs, lengths: list[int], gain: float = 1.0,
                 bias: float = 0.0, margin_loss: bool = False) -> dict:
    """Accuracy (decided pairs; an exact tie of scores counts half), ECE, score distributions, length
    correlation, per-source accuracy. Scores are reported normalised (gain · raw + bias); calibration is
    measured on the probability the model was trained to give, the Bradley–Terry σ(raw difference − margin)
    (the margin only when the model was trained with margins)."""
    decided = np.array([not p.tie for p in pairs])
    raw_d = raw_chosen - raw_rejected
    logits = raw_d - (np.array([p.margin for p in pairs]) if margin_loss else 0.0)
    right = (raw_d > 0) + 0.5 * (raw_d == 0)
    chosen, rejected = gain * raw_chosen + bias, gain * raw_rejected + bias
    d = chosen - rejected
    scores = np.concatenate([chosen, rejected])
    n = len(pairs)
    longer_chosen = np.array(lengths[:n]) > np.array(lengths[n:])
    per_source = {}
    for src in sorted({source_of(p) for p in pairs}):
        sel = np.array([source_of(p) == src for p in pairs]) & decided
        if sel.any():
            per_source[src] = {"pairs": int(sel.sum()), "accuracy": float(right[sel].mean())}
    return {"pairs": n, "decided_pairs": int(decided.sum()),
            "accuracy": float(right[decided].mean()) if decided.any() else float("nan"),
            "ece": pairwise_ece(logits[decided]) if decided.any() else float("nan"),
            "tie_abs_margin": float(np.abs(d[~decided]).mean()) if (~decided).any() else None,
            "chosen_score": {"mean": float(chosen.mean()), "std": float(chosen.std())},
            "rejected_score": {"mean": float(rejected.mean()), "std": float(rejected.std())},
            "length_corr": pearson(scores, lengths),
            "longer_reply_baseline_accuracy": float(longer_chosen[decided].mean()) if decided.any() else None,
            "per_source": per_source,
            "_margins": d.tolist(), "_scores": scores.tolist(), "_lengths": lengths}


HELD_OUT = "held-out"


def verdict(metrics: dict, min_accuracy: float, max_length_corr: float) -> dict:
    """The gate: only a measurement on held-out pairs (``metrics["split"]`` starting with "held-out") can pass."""
    reasons = []
    if not str(metrics.get("split", "")).startswith(HELD_OUT):
        reasons.append("measured on no held-out pairs (give --eval-data, or --eval-fraction > 0): accuracy on "
                       "training pairs says nothing about new replies")
    if not metrics["accuracy"] >= min_accuracy:
        reasons.append(f"accuracy {metrics['accuracy']:.3f} is below {min_accuracy} "
                       "(near 0.5 means it has learned nothing)")
    if abs(metrics["length_corr"]) > max_length_corr:
        reasons.append(f"score correlates with reply length at {metrics['length_corr']:+.2f} "
                       f"(limit ±{max_length_corr}): RL against it would mostly change length")
    return {"passed": not reasons, "reasons": reasons, "min_accuracy": min_accuracy,
            "max_length_corr": max_length_corr, "split": metrics.get("split")}


def write_report(out_dir: str | Path, metrics: dict, gate: dict) -> Path:
    """eval.json (metrics and verdict) and eval.png in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in metrics.items() if not k.startswith("_")}
    (out / GATE_FILE).write_text(json.dumps({**public, "gate": gate}, indent=2) + "\n")
    plot(out / "eval.png", metrics)
    return out / GATE_FILE


def plot(path: Path, m: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = m["pairs"]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].hist(m["_scores"][:n], bins=20, alpha=0.6, label="chosen")
    ax[0].hist(m["_scores"][n:], bins=20, alpha=0.6, label="rejected")
    ax[0].set(title="scores on held-out pairs", xlabel="normalised score")
    ax[0].legend()
    ax[1].hist(m["_margins"], bins=20, color="gray")
    ax[1].axvline(0, color="red")
    ax[1].set(title=f"chosen − rejected (accuracy {m['accuracy']:.2f})", xlabel="margin")
    ax[2].scatter(m["_lengths"], m["_scores"], s=6, alpha=0.5)
    ax[2].set(title=f"score vs reply length (r = {m['length_corr']:+.2f})", xlabel="reply tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def check_gate(model_dir: str | Path) -> list[str]:
    """Why RL must not use this reward model ([] = it may). Used by `chatrlhf ppo` unless --force."""
    path = Path(model_dir) / GATE_FILE
    if not path.is_file():
        return [f"{path} not found: the reward model was never evaluated (run `chatrlhf reward eval`)"]
    gate = json.loads(path.read_text()).get("gate", {})
    return [] if gate.get("passed") else gate.get("reasons", ["the gate did not pass"])
