"""The reward model in one place: load it, encode a (prompt, reply) with its own chat template, score replies,
its normalisation (gain, bias stored in the model's config), and the gate that RL checks (held-out accuracy,
calibration and length correlation in ``eval.json``).

How a model reads its score is stored in ``config.chatrlhf_reward_head`` = {layer, pooling, heads}: the hidden state
after block ``layer`` (-1: the last, after the final norm), pooled at the last token, as the mean over the reply's
tokens, or both concatenated, read by ``heads`` linear heads (an ensemble: the score is their mean, the spread their
std). The heads are the rows of the model's ``score`` layer, so the folder stays a plain transformers
``*ForSequenceClassification`` model: with ``both`` pooling ``score`` has 2 × heads rows, the first ``heads`` reading
the last token's state and the next ``heads`` the mean, a head's score being the sum of its two rows' outputs. A
folder saved without the key reads the last layer's last token with one head, as every reward model did before.
A temperature fitted on held-out pairs (``config.chatrlhf_reward_calibration``) calibrates the probability
σ((raw_a − raw_b) / T) that a reply is preferred; it changes no score.

The reward *sources* that use it, and their scheduled mix, are in rewards.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chatrlhf.config import ModelArgs
from chatrlhf.data.pairs import HELD_OUT, source_of
from chatrlhf.data.template import render
from chatrlhf.errors import UsageError
from chatrlhf.evaluate.metrics import confident_half, pairwise_ece, pearson
from chatrlhf.models import TINY, TINY_BLOCKS, config_without_dropout, distinct_pad, in_forward, load_tokenizer, \
    no_dropout, no_library_bars, quiet_transformers, resolve_device, resolve_model, tiny_model

# --------------------------------------------------------------------------- load


HEAD_KEY = "chatrlhf_reward_head"
DEFAULT_HEAD = {"layer": -1, "pooling": "last", "heads": 1}


def reward_head(config) -> dict:
    """How a reward model reads its score: {layer, pooling, heads} (see the module docstring); the classic last-layer,
    last-token, one-head reading for a folder saved before the key existed."""
    return {**DEFAULT_HEAD, **(getattr(config, HEAD_KEY, None) or {})}


def head_rows(head: dict) -> int:
    """Rows of the ``score`` layer: one per head, twice that with ``both`` pooling."""
    return head["heads"] * (2 if head["pooling"] == "both" else 1)


def load_reward_model(args: ModelArgs, trainable: bool = False, head: dict | None = None, head_init: str = "normal"):
    """(model, tokenizer): an AutoModelForSequenceClassification whose head reads the score as its config says
    (:func:`reward_head`). From a reward-model folder it loads as saved; from any causal LM (embedded, folder,
    GGUF, tiny) it takes the trunk and a fresh head reading as ``head`` says (default: the last layer's last
    token), initialised N(0, 1/√(d+1)) for d input features (RL_DETAILS item 9), or zeros (``head_init="zero"``:
    a head trained alone on a frozen trunk, see :func:`_fresh_head`).
    Normalisation (gain, bias) lives in ``config.chatrlhf_reward_norm`` and is applied by
    :func:`reward_scores`, not by the raw model."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    no_library_bars()
    device = resolve_device(args.device)
    where = resolve_model(args.model)
    tok = load_tokenizer(args.model)
    wanted = {**DEFAULT_HEAD, **(head or {})}
    if where in TINY:
        causal = tiny_model(where, tok)
        cfg = causal.config
        cfg.num_labels = head_rows(wanted)
        model = AutoModelForSequenceClassification.from_config(cfg)
        model.load_state_dict(causal.state_dict(), strict=False)
        fresh = True
    else:
        cfg = AutoConfig.from_pretrained(where)  # nosec B615
        fresh = not is_reward_config(cfg)
        rows = head_rows(wanted if fresh else reward_head(cfg))
        try:
            with quiet_transformers():  # a causal LM has no `score` head yet: its load report is expected
                model = AutoModelForSequenceClassification.from_pretrained(  # nosec B615
                    where, config=config_without_dropout(where, num_labels=rows), dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise UsageError(f"--model {args.model}: cannot load as a reward model ({e})",
                             "use a causal LM or a chatrlhf reward model folder") from None
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        distinct_pad(tok, model)
    model.config.pad_token_id = tok.pad_token_id
    if fresh:
        _fresh_head(model, wanted, args.model, head_init)
    elif head is not None and reward_head(model.config) != wanted:
        raise UsageError(f"--model {args.model} is a reward model reading {reward_head(model.config)}, not {wanted}",
                         "train from a causal LM to change --layer, --pooling or --ensemble, or drop those flags")
    no_dropout(model)
    model.to(device).train(trainable)
    return model, tok


def is_reward_config(config) -> bool:
    """Whether a model's config is a reward model's (a sequence classifier), not a causal LM's."""
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


def trunk_of(name: str) -> tuple[int, dict | None]:
    """(transformer blocks of model ``name``, the head it reads when it is a reward-model folder, else None), from
    its config alone: what `reward train --recipe` needs before the model is loaded."""
    from transformers import AutoConfig

    where = resolve_model(name)
    if where in TINY:
        return TINY_BLOCKS, None
    try:
        cfg = AutoConfig.from_pretrained(where)  # nosec B615
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {name}: cannot read its config ({e})",
                         "use a causal LM or a chatrlhf reward model folder") from None
    return cfg.num_hidden_layers, reward_head(cfg) if is_reward_config(cfg) else None


def _fresh_head(model, head: dict, name: str, init: str = "normal") -> None:
    """Record how the new head reads, and initialise it N(0, 1/√(d+1)) for its d input features, or zeros. Zeros
    for a head trained alone on a frozen trunk: that is logistic regression, convex, with nothing to break by
    randomness, and a random start is not neutral there: middle-layer states of SmolLM2 have a few huge
    dimensions (|x| ≈ 300 where the median std is ≈ 1), so a random head's first scores are large and
    systematically wrong (0.45 accuracy on held-out HH pairs) and a few epochs of Adam do not forget them (0.52
    against 0.55 from zeros, the sklearn probe's 0.55–0.56: benchmarks/reward_recipes.py, docs/benchmarks.md)."""
    blocks = model.config.num_hidden_layers
    if not -1 <= head["layer"] <= blocks:
        raise UsageError(f"--layer {head['layer']}: {name} has {blocks} transformer blocks",
                         f"give 0…{blocks} (0 = the embeddings), or -1 for the last block")
    score = model.score  # the head of every *ForSequenceClassification causal LM in transformers
    d = score.weight.shape[1] * (2 if head["pooling"] == "both" else 1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if init == "zero":
            torch.nn.init.zeros_(score.weight)
        else:
            torch.nn.init.normal_(score.weight, std=1 / (d + 1) ** 0.5)
    if getattr(score, "bias", None) is not None:
        torch.nn.init.zeros_(score.bias)
    model.config.chatrlhf_reward_norm = {"gain": 1.0, "bias": 0.0}
    setattr(model.config, HEAD_KEY, dict(head))


def classic_head(path: str) -> bool:
    """Whether the reward model in folder ``path`` reads one head at the last layer's last token, the reading that a
    critic initialised from it repeats at every reply token (trainers/ppo.py)."""
    from transformers import AutoConfig

    return reward_head(AutoConfig.from_pretrained(resolve_model(path))) == DEFAULT_HEAD  # nosec B615


def reward_norm(model) -> tuple[float, float]:
    """(gain, bias) that put the raw head's scores on the normalised scale: score = gain · raw + bias. The
    reward trainer fits them after training (``config.chatrlhf_reward_norm``); (1, 0) for a fresh head."""
    norm = getattr(model.config, "chatrlhf_reward_norm", None) or {"gain": 1.0, "bias": 0.0}
    return float(norm["gain"]), float(norm["bias"])


def reward_temperature(model) -> float:
    """T of the calibrated preference probability σ((raw_a − raw_b) / T), fitted by the reward trainer on held-out
    pairs (``config.chatrlhf_reward_calibration``); 1 for a model never calibrated."""
    return float((getattr(model.config, "chatrlhf_reward_calibration", None) or {}).get("temperature", 1.0))


# --------------------------------------------------------------------------- encode and score


def encode_reply(tok, prompt: list[dict], response: str, max_length: int, ended: bool = True) -> tuple[list[int], int]:
    """(token ids, index of the reply's first token) of prompt + reply through the reward model's own chat template
    (it may differ from the policy's: text is re-tokenised). A reply that did not end (cut at the token limit) is
    scored as generated: the text stops where the reply stops, without the end-of-turn tokens the template would
    append. Over-long inputs lose the start of the prompt; the reply is kept."""
    text = render(tok, prompt + [{"role": "assistant", "content": response}])
    cut = text.rfind(response) if response else -1
    if not ended:
        text = text[:cut + len(response)] if cut >= 0 else render(tok, prompt, add_generation_prompt=True) + response
        cut = text.rfind(response) if response else -1
    char = cut if cut >= 0 else len(render(tok, prompt, add_generation_prompt=True))
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        start = next((i for i, (_, e) in enumerate(enc["offset_mapping"]) if e > char), len(ids) - 1)
    except NotImplementedError:  # a slow tokenizer has no offsets: count the tokens of the text before the reply
        ids = tok(text, add_special_tokens=False)["input_ids"]
        start = min(len(tok(text[:char], add_special_tokens=False)["input_ids"]), len(ids) - 1)
    drop = max(0, len(ids) - max_length)
    return ids[drop:], max(0, start - drop)


def pad_right(seqs: list[list[int]], pad_id: int, device, starts: list[int] | None = None) -> dict:
    """Right-padded ``input_ids`` and ``attention_mask``; with ``starts`` (where each reply begins) also the
    ``reply_mask`` that mean pooling reads."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if starts is not None:
        reply = mask.clone()
        for i, start in enumerate(starts):
            reply[i, :start] = 0
        batch["reply_mask"] = reply.to(device)
    return batch


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, reply_mask: torch.Tensor | None,
         pooling: str) -> torch.Tensor:
    """(B, d) or (B, 2d) features from (B, T, d) hidden states: the state at the last real token (found from the
    mask, so left or right padding alike), the mean over the reply's tokens (``reply_mask`` 1, padding excluded), or
    both concatenated [last, mean]."""
    width = attention_mask.shape[1]
    last = width - 1 - attention_mask.flip(1).float().argmax(1)
    h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "last":
        return h_last
    if reply_mask is None:
        raise ValueError(f"{pooling} pooling needs the batch's reply_mask (pad_right(..., starts=...))")
    m = (reply_mask * attention_mask).to(hidden.dtype).unsqueeze(-1)
    h_mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return h_mean if pooling == "mean" else torch.cat([h_last, h_mean], -1)


def features(model, batch: dict) -> torch.Tensor:
    """(B, d or 2d): what the model's head reads (:func:`reward_head`: layer and pooling) for a padded batch."""
    head = reward_head(model.config)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if head["layer"] == -1:
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    else:
        hidden = model.base_model(**inputs, use_cache=False, output_hidden_states=True).hidden_states[head["layer"]]
    return pool(hidden, batch["attention_mask"], batch.get("reply_mask"), head["pooling"])


def head_scores(model, feats: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """(B, K) raw scores of the K heads on (B, d) features (dropout on the features while training). The head is
    called as a module (so that sharding's hooks gather its weights); with pooling "both" its rows [0, K) read the
    last token and rows [K, 2K) the mean: score_k = w_k · last + w_{K+k} · mean + b_k + b_{K+k}."""
    if dropout > 0:
        feats = F.dropout(feats, dropout, training=True)
    head = reward_head(model.config)
    if head["pooling"] != "both":
        return model.score(feats).float()
    k = head["heads"]
    out = model.score(feats.view(len(feats), 2, -1))  # (B, 2, 2K): every row on the last token's and the mean's
    return (out[:, 0, :k] + out[:, 1, k:]).float()


def batch_head_scores(model, batch: dict, dropout: float = 0.0) -> torch.Tensor:
    """(B, K) raw scores of the K heads for a padded batch: features then heads, in one forward of the model (so
    that under FSDP its head's weights are gathered for it: models.in_forward)."""
    return in_forward(model, lambda: head_scores(model, features(model, batch), dropout))


def raw_scores(model, batch: dict) -> torch.Tensor:
    """(B,) raw scores: the mean of the heads' (one head: its score)."""
    return batch_head_scores(model, batch).mean(1)


def ensemble_scores(raw: np.ndarray, gain: float, bias: float) -> tuple[np.ndarray, np.ndarray]:
    """(scores, spreads) of (N, K) raw head scores: gain · mean + bias, and |gain| · std over the heads (population
    std: the heads are the whole ensemble, not a sample of it)."""
    raw = np.asarray(raw, dtype=float)
    return gain * raw.mean(1) + bias, abs(gain) * raw.std(1)


@torch.no_grad()
def raw_head_scores(model, tok, prompts: list[list[dict]], responses: list[str], batch_size: int = 16,
                    max_length: int = 512, ended: list[bool] | None = None) -> np.ndarray:
    """(N, K) raw scores of every head for complete replies (``ended``: which replies ended; the others are scored
    without an end of turn), batched by length."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ended = ended if ended is not None else [True] * len(responses)
    encoded = [encode_reply(tok, p, r, max_length, e) for p, r, e in zip(prompts, responses, ended)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # little padding
    out = np.zeros((len(encoded), reward_head(model.config)["heads"]))
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        batch = pad_right([encoded[i][0] for i in idx], tok.pad_token_id, device, [encoded[i][1] for i in idx])
        out[idx] = np.array(batch_head_scores(model, batch).tolist())
    model.train(was_training)
    return out


def reward_scores(model, tok, prompts: list[list[dict]], responses: list[str], batch_size: int = 16,
                  max_length: int = 512, normalise: bool = True, ended: list[bool] | None = None) -> list[float]:
    """Scores of complete replies (``ended``: which replies ended; the others are scored without an end of turn),
    normalised with the model's stored gain and bias unless ``normalise=False``; an ensemble's mean."""
    return reward_scores_with_spread(model, tok, prompts, responses, batch_size, max_length, normalise, ended)[0]


def reward_scores_with_spread(model, tok, prompts: list[list[dict]], responses: list[str], batch_size: int = 16,
                              max_length: int = 512, normalise: bool = True,
                              ended: list[bool] | None = None) -> tuple[list[float], list[float]]:
    """(scores, spreads): as :func:`reward_scores`, plus the std of an ensemble's heads on the same scale (0 for a
    single head) — how unsure the model is of each score."""
    gain, bias = reward_norm(model) if normalise else (1.0, 0.0)
    scores, spreads = ensemble_scores(raw_head_scores(model, tok, prompts, responses, batch_size, max_length, ended),
                                      gain, bias)
    return scores.tolist(), spreads.tolist()


def scored_heads(model, tok, prompts: list[list[dict]], responses: list[str], batch_size: int = 16,
                 max_length: int = 512) -> np.ndarray:
    """(N, K) every head's score on the normalised scale (gain · raw + bias): what active selection ranks replies
    and pairs by (feedback/active.py: the heads' mean margin, and its spread over the heads)."""
    gain, bias = reward_norm(model)
    return gain * raw_head_scores(model, tok, prompts, responses, batch_size, max_length) + bias


# --------------------------------------------------------------------------- the gate: held-out evaluation

GATE_FILE = "eval.json"


def pair_raw_scores(model, tok, pairs, batch_size: int = 16, max_length: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) raw head scores of the chosen and of the rejected reply of every pair."""
    prompts = [p.prompt for p in pairs]
    return (raw_head_scores(model, tok, prompts, [p.chosen for p in pairs], batch_size, max_length),
            raw_head_scores(model, tok, prompts, [p.rejected for p in pairs], batch_size, max_length))


def evaluate_pairs(model, tok, pairs, batch_size: int = 16, max_length: int = 512) -> dict:
    """Score both replies of every pair with ``model`` and measure it (see :func:`pair_metrics`)."""
    chosen, rejected = pair_raw_scores(model, tok, pairs, batch_size, max_length)
    return measure(model, tok, pairs, chosen, rejected)


def measure(model, tok, pairs, chosen: np.ndarray, rejected: np.ndarray) -> dict:
    """:func:`pair_metrics` of (N, K) raw head scores with the model's normalisation, temperature and margin use."""
    lengths = [len(tok(p.chosen)["input_ids"]) for p in pairs] + [len(tok(p.rejected)["input_ids"]) for p in pairs]
    norm = getattr(model.config, "chatrlhf_reward_norm", None) or {}
    return pair_metrics(chosen.mean(1), rejected.mean(1), pairs, lengths, *reward_norm(model),
                        margin_loss=bool(norm.get("margin_loss", False)), temperature=reward_temperature(model),
                        head_margins=chosen - rejected if chosen.shape[1] > 1 else None)


def pair_metrics(raw_chosen: np.ndarray, raw_rejected: np.ndarray, pairs, lengths: list[int], gain: float = 1.0,
                 bias: float = 0.0, margin_loss: bool = False, temperature: float = 1.0,
                 head_margins: np.ndarray | None = None) -> dict:
    """Accuracy (decided pairs; an exact tie of scores counts half), ECE, score distributions, length
    correlation, per-source accuracy. Scores are reported normalised (gain · raw + bias); calibration is
    measured on the probability the model was trained to give, the Bradley–Terry σ((raw difference − margin) / T)
    (the margin only when the model was trained with margins; T the stored temperature, 1 if none): ``ece``, and
    ``ece_uncalibrated`` at T = 1. With an ensemble's (N, K) ``head_margins``, accuracy on the pairs its heads agree
    on most against the rest (``ensemble``)."""
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
    out = {"pairs": n, "decided_pairs": int(decided.sum()),
           "accuracy": float(right[decided].mean()) if decided.any() else float("nan"),
           "ece": pairwise_ece(logits[decided] / temperature) if decided.any() else float("nan"),
           "ece_uncalibrated": pairwise_ece(logits[decided]) if decided.any() else float("nan"),
           "temperature": temperature,
           "tie_abs_margin": float(np.abs(d[~decided]).mean()) if (~decided).any() else None,
           "chosen_score": {"mean": float(chosen.mean()), "std": float(chosen.std())},
           "rejected_score": {"mean": float(rejected.mean()), "std": float(rejected.std())},
           "length_corr": pearson(scores, lengths),
           "longer_reply_baseline_accuracy": float(longer_chosen[decided].mean()) if decided.any() else None,
           "per_source": per_source,
           "_margins": d.tolist(), "_scores": scores.tolist(), "_lengths": lengths, "_logits": logits[decided]}
    if head_margins is not None and decided.any():
        out["ensemble"] = confident_half(right[decided], np.asarray(head_margins)[decided])
    return out


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
