"""The reward model in one place: load it, encode a (prompt, reply) with its own chat template, score replies,
its normalisation (gain, bias stored in the model's config), and the gate that RL checks (held-out accuracy,
calibration and length correlation in ``eval.json``).

The reward *sources* that use it, and their scheduled mix, are in rewards.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from chatrlhf.config import ModelArgs
from chatrlhf.data.pairs import HELD_OUT, source_of
from chatrlhf.data.template import render
from chatrlhf.errors import UsageError
from chatrlhf.evaluate.metrics import pairwise_ece, pearson
from chatrlhf.models import TINY, config_without_dropout, distinct_pad, load_tokenizer, no_dropout, no_library_bars, \
    quiet_transformers, resolve_device, resolve_model, tiny_model

# --------------------------------------------------------------------------- load


def load_reward_model(args: ModelArgs, trainable: bool = False):
    """(model, tokenizer): an AutoModelForSequenceClassification with one output, read at the last
    non-pad token. From a reward-model folder it loads as saved; from any causal LM (embedded, folder,
    GGUF, tiny) it takes the trunk and a fresh head, initialised N(0, 1/√(d+1)) (RL_DETAILS item 9).
    Normalisation (gain, bias) lives in ``config.chatrlhf_reward_norm`` and is applied by
    :func:`reward_scores`, not by the raw model."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    no_library_bars()
    device = resolve_device(args.device)
    where = resolve_model(args.model)
    tok = load_tokenizer(args.model)
    if where in TINY:
        causal = tiny_model(where, tok)
        cfg = causal.config
        cfg.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(cfg)
        model.load_state_dict(causal.state_dict(), strict=False)
        fresh = True
    else:
        cfg = AutoConfig.from_pretrained(where)  # nosec B615
        fresh = not any(a.endswith("ForSequenceClassification") for a in cfg.architectures or [])
        try:
            with quiet_transformers():  # a causal LM has no `score` head yet: its load report is expected
                model = AutoModelForSequenceClassification.from_pretrained(  # nosec B615
                    where, config=config_without_dropout(where, num_labels=1), dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise UsageError(f"--model {args.model}: cannot load as a reward model ({e})",
                             "use a causal LM or a chatrlhf reward model folder") from None
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        distinct_pad(tok, model)
    model.config.pad_token_id = tok.pad_token_id
    if fresh:
        head = model.score  # the head of every *ForSequenceClassification causal LM in transformers
        d = head.weight.shape[1]
        with torch.random.fork_rng():
            torch.manual_seed(0)
            torch.nn.init.normal_(head.weight, std=1 / (d + 1) ** 0.5)
        if getattr(head, "bias", None) is not None:
            torch.nn.init.zeros_(head.bias)
        model.config.chatrlhf_reward_norm = {"gain": 1.0, "bias": 0.0}
    no_dropout(model)
    model.to(device).train(trainable)
    return model, tok


def reward_norm(model) -> tuple[float, float]:
    """(gain, bias) that put the raw head's scores on the normalised scale: score = gain · raw + bias. The
    reward trainer fits them after training (``config.chatrlhf_reward_norm``); (1, 0) for a fresh head."""
    norm = getattr(model.config, "chatrlhf_reward_norm", None) or {"gain": 1.0, "bias": 0.0}
    return float(norm["gain"]), float(norm["bias"])


# --------------------------------------------------------------------------- encode and score


def encode_reply(tok, prompt: list[dict], response: str, max_length: int, ended: bool = True) -> list[int]:
    """Prompt + reply through the reward model's own chat template (it may differ from the policy's:
    text is re-tokenised). A reply that did not end (cut at the token limit) is scored as generated: the
    text stops where the reply stops, without the end-of-turn tokens the template would append. Over-long
    inputs lose the start of the prompt; the reply is kept."""
    text = render(tok, prompt + [{"role": "assistant", "content": response}])
    if not ended:
        cut = text.rfind(response) if response else -1
        text = text[:cut + len(response)] if cut >= 0 else render(tok, prompt, add_generation_prompt=True) + response
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[-max_length:]


def pad_right(seqs: list[list[int]], pad_id: int, device) -> dict:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def raw_scores(model, batch: dict) -> torch.Tensor:
    """(B,) scores at the last non-pad token (right padding)."""
    hidden = model.base_model(**batch, use_cache=False).last_hidden_state
    last = batch["attention_mask"].sum(1) - 1
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return model.score(h).squeeze(-1).float()


@torch.no_grad()
def reward_scores(model, tok, prompts: list[list[dict]], responses: list[str], batch_size: int = 16,
                  max_length: int = 512, normalise: bool = True, ended: list[bool] | None = None) -> list[float]:
    """Scores of complete replies (``ended``: which replies ended; the others are scored without an end of turn),
    normalised with the model's stored gain and bias unless ``normalise=False``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ended = ended if ended is not None else [True] * len(responses)
    seqs = [encode_reply(tok, p, r, max_length, e) for p, r, e in zip(prompts, responses, ended)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding
    out = [0.0] * len(seqs)
    gain, bias = reward_norm(model) if normalise else (1.0, 0.0)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        s = raw_scores(model, pad_right([seqs[i] for i in idx], tok.pad_token_id, device))
        for i, v in zip(idx, s.tolist()):
            out[i] = gain * v + bias
    model.train(was_training)
    return out


# --------------------------------------------------------------------------- the gate: held-out evaluation

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
