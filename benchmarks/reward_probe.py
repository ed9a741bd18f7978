"""How much preference signal is in the frozen trunk? A linear probe on SmolLM2-135M's hidden states for the
HH-RLHF pairs, on the same prompt-disjoint split as reward_quality.py — the ceiling a reward head can reach
without changing the trunk, to set against fine-tuning.

    .venv/bin/python benchmarks/reward_probe.py [--layers 8,16,24,30] [--max-length 192] [--extra]

For each pair and layer: (chosen − rejected) of the last token's hidden state and of the mean over tokens;
a logistic regression without intercept on those differences (and their negations), features scaled to unit
variance. The layer, pooling and regularisation C are chosen by 5-fold cross-validation on the training
pairs; the held-out pairs are scored once, with that choice. ~20 min on 2 cores (base pairs only).
Writes benchmarks/results/reward_probe.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reward_quality import HH, ROOT, hh_split  # noqa: E402
from sft import machine  # noqa: E402


def features(model, tok, pairs, layers: list[int], max_length: int, batch_size: int = 16) -> np.ndarray:
    """(pairs, layers, 2·hidden): chosen − rejected of [last-token state, mean state] per layer."""
    import torch
    from rich.progress import track

    from chatrlhf.models import autocast
    from chatrlhf.reward_model import pad_right
    from chatrlhf.trainers.reward import encode_pairs

    enc = encode_pairs(tok, pairs, max_length)
    seqs = [c[0] for c, _ in enc] + [r[0] for _, r in enc]  # token ids (each reply's start is not needed here)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # length-sorted batches: little padding
    d = model.config.hidden_size
    out = np.zeros((len(seqs), len(layers), 2 * d), np.float32)
    for s in track(range(0, len(order), batch_size), description=f"{len(seqs)} replies", transient=True):
        idx = order[s:s + batch_size]
        inputs = pad_right([seqs[i] for i in idx], tok.pad_token_id, "cpu")
        mask = inputs["attention_mask"]
        with torch.no_grad(), autocast("auto", torch.device("cpu")):
            hidden = model.model(**inputs, output_hidden_states=True).hidden_states
        last = mask.sum(1) - 1
        for li, layer in enumerate(layers):
            h = hidden[layer].float()
            out[idx, li, :d] = h[torch.arange(len(idx)), last].numpy()
            out[idx, li, d:] = ((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()
    return out[:len(pairs)] - out[len(pairs):]


def probe_accuracy(train: np.ndarray, test: np.ndarray, c: float) -> float:
    """Accuracy of a logistic regression (no intercept: a pair and its mirror are symmetric) on differences."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([train, -train])
    scale = x.std(0) + 1e-6
    clf = LogisticRegression(C=c, fit_intercept=False, max_iter=3000)
    clf.fit(x / scale, np.r_[np.ones(len(train)), np.zeros(len(train))])
    return float((clf.decision_function(test / scale) > 0).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="8,16,24,30", help="hidden-state layers to probe (0 = embeddings)")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--eval-pairs", type=int, default=600)
    p.add_argument("--extra", action="store_true", help="also train on hh-rlhf/extra/* (twice the time)")
    a = p.parse_args()
    if not HH.is_dir():
        sys.exit(f"{HH} not found: this benchmark needs ../shared/data")
    from chatrlhf.config import ModelArgs
    from chatrlhf.models import load_model

    layers = [int(x) for x in a.layers.split(",")]
    train_pairs, eval_pairs, held = hh_split(a.eval_pairs, extra=a.extra)
    train_pairs = [r for r in train_pairs if r.chosen != r.rejected]
    print(f"{len(train_pairs)} train pairs, {len(eval_pairs)} held-out pairs ({len(held)} prompts)", flush=True)
    model, tok = load_model(ModelArgs(model="smollm2-135m"))
    model.eval()
    t0 = time.perf_counter()
    x_train = features(model, tok, train_pairs, layers, a.max_length)
    x_eval = features(model, tok, eval_pairs, layers, a.max_length)
    d = model.config.hidden_size
    folds = np.arange(len(x_train)) % 5
    cv = {}
    for li, layer in enumerate(layers):
        for pool, cols in (("last", slice(0, d)), ("mean", slice(d, None)), ("both", slice(None))):
            for c in (1e-4, 1e-3, 1e-2):
                x = x_train[:, li, cols]
                cv[(layer, pool, c)] = float(np.mean([probe_accuracy(x[folds != f], x[folds == f], c)
                                                      for f in range(5)]))
                print(f"layer {layer:2d} {pool:4s} C={c:g}: cross-validated {cv[(layer, pool, c)]:.3f}", flush=True)
    layer, pool, c = max(cv, key=cv.get)
    cols = {"last": slice(0, d), "mean": slice(d, None), "both": slice(None)}[pool]
    li = layers.index(layer)
    acc = probe_accuracy(x_train[:, li, cols], x_eval[:, li, cols], c)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "settings": vars(a),
              "train_pairs": len(train_pairs), "held_out_pairs": len(eval_pairs),
              "chosen": {"layer": layer, "pooling": pool, "C": c, "cross_validated": cv[(layer, pool, c)]},
              "held_out_accuracy": acc, "minutes": (time.perf_counter() - t0) / 60,
              "cross_validated": {f"{k[0]}/{k[1]}/{k[2]:g}": v for k, v in cv.items()}}
    print(f"chosen by cross-validation: layer {layer}, {pool} pooling, C={c:g} (cv {cv[(layer, pool, c)]:.3f}); "
          f"held-out accuracy {acc:.3f} on {len(eval_pairs)} pairs (the reward-model goal is ≥ 0.63)")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward_probe.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
