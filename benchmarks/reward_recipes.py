"""Which reward-model recipe wins with a few thousand labels (issue 21)? One run, one prompt-disjoint split of the
HH-RLHF pairs in ../shared/data (or of its OpenAssistant pairs: --train-domain oasst), every row trained on the
same pairs and scored on the same held-out pairs of both domains (in-domain and cross-domain accuracy):

  trl                TRL RewardTrainer, full fine-tune, its defaults (lr 1e-4, 3 epochs, batch 8), stopped at
                     --budget-minutes if given; TRL does not cut inputs, it drops the pairs over its max_length, so
                     it keeps its default 1024 (at --max-length it would train on 1,226 of 1,803 HH pairs, 334 of 997
                     OASST ones); the row says how many it kept
  old-default        `reward train` as it ships: full fine-tune, 1 epoch, lr 1e-5 (stopped at --budget-minutes)
  top8               the top 8 blocks + head, 1 epoch, lr 1e-5 (stopped at --budget-minutes)
  lora               LoRA r 16 (alpha 16) on every linear layer of the trunk + the whole head, 1 epoch, lr 1e-4
                     (stopped at --budget-minutes)
  frozen             frozen trunk + linear head at --layer/--pooling, lr 1e-3, weight decay 0.01, 10 epochs
  frozen-es          the same, up to 30 epochs, early stopping on the validation pairs (--patience 3)
  frozen-es-smooth   frozen-es + --label-smoothing 0.1
  frozen-es-ens5     frozen-es + --ensemble 5 (bootstrap heads: a spread, the confident half's accuracy)
  frozen-es-smooth-ens5   both: label smoothing and 5 bootstrap heads
  probe              the frozen probe: sklearn logistic regression on the same features, standardised, no
                     intercept, C chosen by 5-fold cross-validation on the training pairs (benchmarks/reward_probe.py)

    .venv/bin/python benchmarks/reward_recipes.py --train-pairs 2000 --eval-pairs 600 --max-length 256
    .venv/bin/python benchmarks/reward_recipes.py --train-pairs 300 --eval-pairs 150 --max-length 128 \
        --rows old-default,frozen,frozen-es-ens5,probe          # a few minutes: proves the script
    .venv/bin/python benchmarks/reward_recipes.py --train-domain oasst ...     # train on OASST, test on both
    .venv/bin/python benchmarks/reward_recipes.py --model tiny-random-llama --layer 1 --train-pairs 40 \
        --eval-pairs 30 --max-length 64 --rows frozen,probe      # seconds, random weights: proves the plumbing

Split: hh_split of reward_quality.py (base splits only, whole prompts held out) or its oasst_split (the oasst1
validation export's ranked sibling replies + the en-100 rank pairs, deduplicated: 1,718 pairs of 282 opening
prompts, whole prompts held out the same way), --train-pairs of the rest; --eval-pairs of each domain are held out,
the other domain's being the cross-domain test pairs (the same pairs whichever domain trains); then
--val-fraction of the training prompts are set aside by `reward train`'s own prompt-disjoint split for early
stopping and the temperature (every row: the test pairs choose nothing). All rows train on the remaining pairs.
The frozen-trunk rows and the probe share one extraction of the trunk's features, kept under
out/reward-recipes/features (keyed by model, layer, pooling, dtype and token ids); its time is added to each of
those rows' time, as a user running one recipe pays it once (the cross-domain test pairs' extraction is not: it is
evaluation only). Per row: held-out accuracy with a 95% bootstrap CI on each domain, ECE (in-domain) before and
after the temperature (fitted on the validation pairs), seconds; for the ensemble the accuracy on the half of the
pairs its heads agree on most vs the rest. Writes benchmarks/results/reward_recipes.json
(reward_recipes_oasst.json for --train-domain oasst), with the domains.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reward_quality import HH, OASST, ROOT, hh_split, oasst_split  # noqa: E402
from sft import machine  # noqa: E402

from chatrlhf.errors import ChatRLHFError, UsageError  # noqa: E402

OUT = ROOT / "out" / "reward-recipes"
# --train-domain -> its prompt-disjoint (train, held-out test, held-out keys) split; every row is scored on the
# held-out pairs of both domains, the same --eval-pairs of each
DOMAINS = {"hh": lambda n: hh_split(n, extra=False), "oasst": oasst_split}
FROZEN = {"recipe": "frozen", "lr": 1e-3, "weight_decay": 0.01, "patience": 0, "label_smoothing": 0.0}
EARLY = {**FROZEN, "epochs": 30, "patience": 3}
RECIPES = {  # row name -> fields of RewardTrainConfig on top of the shared ones; trl and probe are not ours
    "trl": None,
    "default": {"layer": None, "pooling": None},  # `reward train` with no recipe flag: --recipe auto
    "old-default": {"recipe": "full"},  # `reward train`'s default until 2026-11-30
    "top8": {"recipe": "full", "train_layers": 8},
    "lora": {"recipe": "full", "lora_r": 16, "lr": 1e-4},
    "frozen": {**FROZEN, "epochs": 10},
    "frozen-es": EARLY,
    "frozen-es-smooth": {**EARLY, "label_smoothing": 0.1},  # = --recipe frozen, the default since 2026-11-30
    "frozen-es-ens5": {**EARLY, "ensemble": 5},
    "frozen-es-smooth-ens5": {**EARLY, "label_smoothing": 0.1, "ensemble": 5},
    "frozen-es-smooth-ens25": {**EARLY, "label_smoothing": 0.1, "ensemble": 25},
    "probe": None,
}


def on_frozen_features(row: str) -> bool:
    """Whether a row reads the frozen trunk's features: the probe and our rows but TRL's and the full fine-tunes."""
    return row == "probe" or (RECIPES[row] is not None and RECIPES[row].get("recipe") != "full")


def cross_domain(domain: str) -> str:
    return next(d for d in DOMAINS if d != domain)


def split(a) -> tuple[Path, list, list, list]:
    """(training file, its pairs, held-out test pairs of --train-domain, held-out test pairs of the other domain):
    the test pairs are whole prompts never trained on."""
    train_pairs, test_pairs, _ = DOMAINS[a.train_domain](a.eval_pairs)
    _, cross_pairs, _ = DOMAINS[cross_domain(a.train_domain)](a.cross_pairs or a.eval_pairs)
    train_pairs = [r for r in train_pairs if r.chosen != r.rejected]
    random.Random(0).shuffle(train_pairs)
    train_pairs = train_pairs[:a.train_pairs]
    rows = "".join(json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}) + "\n"
                   for r in train_pairs)
    path = OUT / f"train-{hashlib.sha256(rows.encode()).hexdigest()[:12]}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rows)
    return path, train_pairs, test_pairs, cross_pairs


def right(margins) -> list[float]:
    """Per pair: 1 when the chosen reply scores higher, ½ on an exact tie, else 0."""
    return [float(x > 0) + 0.5 * (x == 0) for x in margins]


def scored(name: str, test_margins, cross_margins, test_logits, val_logits, seconds: float, **extra) -> dict:
    """One row: accuracy with its 95% bootstrap CI on the in-domain and on the cross-domain test pairs, ECE (in
    domain) at T = 1 and at the temperature fitted on the validation pairs' logits, time."""
    from chatrlhf.evaluate.metrics import bootstrap_ci, fit_temperature, pairwise_ece

    acc, lo, hi = bootstrap_ci(right(test_margins))
    cross, cross_lo, cross_hi = bootstrap_ci(right(cross_margins))
    t = fit_temperature(np.asarray(val_logits)) if len(val_logits) else 1.0
    return {"row": name, "accuracy": acc, "accuracy_ci95": [lo, hi], "cross_domain_accuracy": cross,
            "cross_domain_accuracy_ci95": [cross_lo, cross_hi], "ece_uncalibrated": pairwise_ece(test_logits),
            "ece": pairwise_ece(np.asarray(test_logits) / t), "temperature": t, "seconds": seconds, **extra}


def run_ours(name: str, cfg, test_pairs, cross_pairs, feats: dict, extraction_s: float) -> dict:
    """Train one recipe through `reward train` and score both domains' test pairs (from the cached features when
    frozen)."""
    import torch

    from chatrlhf.config import ModelArgs
    from chatrlhf.reward_model import evaluate_pairs, head_scores, load_reward_model, measure
    from chatrlhf.trainers.reward import train

    t0 = time.perf_counter()
    summary = train(cfg, log=lambda *x: None, feature_cache=OUT / "features")
    frozen = (summary.results or {}).get("recipe") == "frozen"
    seconds = time.perf_counter() - t0 + (extraction_s if frozen else 0.0)
    model, tok = load_reward_model(ModelArgs(model=cfg.output_dir))
    if frozen:
        with torch.no_grad():
            m, cross = (measure(model, tok, pairs, *(head_scores(model, f).numpy() for f in feats[k]))
                        for k, pairs in (("test", test_pairs), ("cross", cross_pairs)))
    else:
        m, cross = (evaluate_pairs(model, tok, pairs, 16, cfg.max_length) for pairs in (test_pairs, cross_pairs))
    t = m["temperature"]  # measure's ECEs: at T = 1 and at the temperature `reward train` fitted
    row = scored(name, m["_margins"], cross["_margins"], m["_logits"], [], seconds, ensemble=m.get("ensemble"),
                 epochs=(summary.results or {}).get("epochs"),
                 stopped_by_time=bool((summary.results or {}).get("stopped_by_time")))
    row.update(ece=m["ece"], ece_uncalibrated=m["ece_uncalibrated"], temperature=t)
    return row


def run_trl(cfg, train_pairs, val_pairs, test_pairs, cross_pairs, budget_s: float) -> dict:
    """TRL's RewardTrainer with its defaults (the pairs over --max-length dropped, as TRL does), stopped at the
    budget. A tiny test model (built in code, no folder to load) comes through load_reward_model's classic
    last-token head."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from chatrlhf.config import ModelArgs
    from chatrlhf.data.template import ensure_chat_template
    from chatrlhf.models import TINY, resolve_model, use_bf16
    from chatrlhf.reward_model import evaluate_pairs, load_reward_model

    class Budget(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = time.perf_counter() - t0 > budget_s > 0

    torch.manual_seed(0)
    path = resolve_model(cfg.model)
    if path in TINY:
        model, tok = load_reward_model(ModelArgs(model=cfg.model))
    else:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    ds = Dataset.from_list([{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in train_pairs])
    args = RewardConfig(output_dir=tempfile.mkdtemp(prefix="rm-trl-"), save_strategy="no", report_to=[], use_cpu=True,
                        seed=0, bf16=use_bf16(cfg.dtype, torch.device("cpu")))
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Budget()])
    kept = len(trainer.train_dataset)  # TRL drops a pair whose chosen or rejected input is over max_length
    if not kept:
        raise UsageError(f"TRL's RewardTrainer drops every pair over {args.max_length} tokens, and none of the "
                         f"{len(train_pairs)} training pairs fits", "leave out trl")
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    model.eval()
    ensure_chat_template(tok)
    m, v, cross = (evaluate_pairs(model, tok, pairs, 16, cfg.max_length) for pairs in (test_pairs, val_pairs,
                                                                                       cross_pairs))
    return scored("trl", m["_margins"], cross["_margins"], m["_logits"], v["_logits"], seconds,
                  steps=trainer.state.global_step, epochs=trainer.state.epoch, kept_pairs=kept,
                  training_pairs=len(train_pairs))


def run_probe(feats: dict, val_pairs, extraction_s: float) -> dict:
    """The sklearn probe on the cached (chosen − rejected) features: standardised, C by 5-fold CV."""
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    x = (feats["train"][0] - feats["train"][1]).numpy()

    def fit(train: np.ndarray, c: float):
        both = np.concatenate([train, -train])  # a pair and its mirror: no intercept, symmetric
        scale = both.std(0) + 1e-6
        clf = LogisticRegression(C=c, fit_intercept=False, max_iter=3000).fit(
            both / scale, np.r_[np.ones(len(train)), np.zeros(len(train))])
        return lambda z: clf.decision_function(z / scale)

    folds = np.arange(len(x)) % 5
    cv = {c: float(np.mean([(fit(x[folds != f], c)(x[folds == f]) > 0).mean() for f in range(5)]))
          for c in (1e-4, 1e-3, 1e-2, 1e-1)}
    c = max(cv, key=cv.get)
    logit = fit(x, c)
    test, val, cross = (logit((feats[k][0] - feats[k][1]).numpy()) for k in ("test", "val", "cross"))
    return scored("probe", test, cross, test, val, time.perf_counter() - t0 + extraction_s, C=c,
                  cross_validated=cv)


def extract(cfg, splits: dict) -> tuple[dict, dict]:
    """The frozen trunk's (chosen, rejected) features of each split at --layer/--pooling, from the on-disk cache
    when an earlier run made them; and the seconds each split took."""
    import torch

    from chatrlhf.reward_model import load_reward_model
    from chatrlhf.trainers.reward import cached_features, encode_pairs

    model, tok = load_reward_model(cfg, head={"layer": cfg.layer, "pooling": cfg.pooling, "heads": 1})
    model.eval()
    feats, seconds = {}, {}
    for k, pairs in splits.items():
        t0 = time.perf_counter()
        feats[k] = cached_features(model, tok, encode_pairs(tok, pairs, cfg.max_length), cfg.batch_size,
                                   torch.device("cpu"), cfg.dtype, OUT / "features")
        seconds[k] = time.perf_counter() - t0
    return feats, seconds


def halves_note(ens: dict) -> str:
    """The ensemble's surer half against the rest, with the 95% CI of the difference (two disjoint halves: the normal
    approximation of a difference of proportions), and the split by the heads' agreement."""
    p, q, n, m = (ens[k] for k in ("confident_half_accuracy", "other_half_accuracy", "confident_pairs", "other_pairs"))
    half = 1.96 * math.sqrt(p * (1 - p) / max(n, 1) + q * (1 - q) / max(m, 1))
    note = f"surer half {p:.3f} vs {q:.3f} (difference CI {p - q - half:+.3f}…{p - q + half:+.3f})"
    if "agreed_half_accuracy" in ens:
        note += f"; by agreement {ens['agreed_half_accuracy']:.3f} vs {ens['other_agreed_accuracy']:.3f}"
    return note


def table(rows: list[dict], domain: str) -> None:
    """The rows so far: accuracy [95% CI] on the --train-domain test pairs and on the other domain's, ECE, time."""
    own, other = f"{domain} acc", f"{cross_domain(domain)} acc"
    print(f"{'row':18}{own:>10}  {'95% CI':15}{other:>10}  {'95% CI':15}{'ECE T=1':>8}{'ECE T':>7}{'min':>7}  note")
    for r in rows:
        ens = r.get("ensemble") or {}
        note = halves_note(ens) if "confident_half_accuracy" in ens else "over budget" if r.get("over_budget") else ""
        if r.get("stopped_by_time"):
            note += f"{'; ' if note else ''}stopped at the budget"
        if r.get("kept_pairs", 0) < r.get("training_pairs", 0):
            note += (f"{'; ' if note else ''}TRL kept {r['kept_pairs']} of {r['training_pairs']} pairs (it drops "
                     "those over its max_length, 1024 tokens)")
        (lo, hi), (cross_lo, cross_hi) = r["accuracy_ci95"], r["cross_domain_accuracy_ci95"]
        print(f"{r['row']:18}{r['accuracy']:>10.3f}  [{lo:.3f}, {hi:.3f}] {r['cross_domain_accuracy']:>10.3f}  "
              f"[{cross_lo:.3f}, {cross_hi:.3f}] {r['ece_uncalibrated']:>7.3f}{r['ece']:>7.3f}"
              f"{r['seconds'] / 60:>7.1f}  {note}", flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-domain", choices=tuple(DOMAINS), default="hh",
                   help="train (and validate) on HH-RLHF's base splits or on the OpenAssistant pairs; every row is "
                        "scored on the held-out pairs of both")
    p.add_argument("--model", default="smollm2-135m",
                   help="the trunk of every row; tiny-random-llama (2 blocks: give --layer 1) makes a seconds-long "
                        "smoke run")
    p.add_argument("--train-pairs", type=int, default=2000)
    p.add_argument("--eval-pairs", type=int, default=600, help="held-out test pairs (whole prompts) of each domain")
    p.add_argument("--cross-pairs", type=int, default=0, help="held-out test pairs of the other domain; 0 = --eval-pairs")
    p.add_argument("--results", default="", help="the results file under benchmarks/results (a run with other "
                   "settings replaces its rows); default reward_recipes.json, or reward_recipes_oasst.json")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training prompts set aside for early stopping and the temperature")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--layer", type=int, default=16, help="read-out block of the frozen rows and the probe")
    p.add_argument("--pooling", choices=("last", "mean", "both"), default="mean")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--budget-minutes", type=float, default=0.0,
                   help="wall-clock budget per row: TRL and our fine-tuned rows stop at it (`reward train --max-minutes`), "
                        "then score; a row still over it (scoring, the frozen rows' extraction) is flagged (0 = none)")
    p.add_argument("--rows", default=",".join(RECIPES), help=f"comma-separated, of: {', '.join(RECIPES)}")
    a = p.parse_args()
    unknown = sorted(set(a.rows.split(",")) - set(RECIPES))
    missing = [path for path in (HH, *OASST) if not path.exists()]
    if missing or unknown:
        sys.exit(f"{missing[0]} not found: this benchmark needs ../shared/data" if missing else
                 f"--rows: unknown {unknown}; choose from {', '.join(RECIPES)}")
    return a


def features(a, base, data: Path, splits: dict) -> tuple[dict, float]:
    """The frozen trunk's features of every split, and the seconds of the extraction that filled the cache for the
    training, validation and in-domain test pairs (what a user running one recipe pays; the cross-domain test pairs
    are evaluation only), so that a cached rerun reports the same time."""
    feats, seconds = extract(base, splits)
    key = f"{Path(a.model).name}-{data.stem}-{a.layer}-{a.pooling}-{a.max_length}-{a.dtype}"
    timing = OUT / "features" / f"{key}.seconds"
    if not timing.is_file():
        timing.write_text(f"{sum(t for k, t in seconds.items() if k != 'cross')}\n")
    return feats, float(timing.read_text())


def main() -> None:
    a = parse_args()
    rows = a.rows.split(",")
    from chatrlhf.config import RewardTrainConfig
    from chatrlhf.data.pairs import split_pairs

    data, _, test_pairs, cross_pairs = split(a)
    cross = cross_domain(a.train_domain)
    base = RewardTrainConfig(model=a.model, data=[str(data)], eval_fraction=a.val_fraction,
                             max_length=a.max_length, dtype=a.dtype, seed=0, quiet=True, tensorboard=False,
                             layer=a.layer, pooling=a.pooling, batch_size=8)
    train_pairs, val_pairs, _, _ = split_pairs(base, "reward", lambda *x: None)
    print(f"{len(train_pairs)} {a.train_domain} train, {len(val_pairs)} validation, {len(test_pairs)} held-out test "
          f"pairs; {len(cross_pairs)} held-out {cross} test pairs (cross-domain)", flush=True)
    feats, extraction_s = features(a, base, data, {"train": train_pairs, "val": val_pairs, "test": test_pairs,
                                                   "cross": cross_pairs}) \
        if any(on_frozen_features(r) for r in rows) else ({}, 0.0)
    print(f"frozen trunk features: {extraction_s:.0f} s (added to the frozen rows' and the probe's time)", flush=True)
    name = a.results or f"reward_recipes{'' if a.train_domain == 'hh' else '_' + a.train_domain}.json"
    path = ROOT / "benchmarks" / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(a).items() if k not in ("rows", "budget_minutes")}
    results = []
    for name in rows:
        if name == "trl":
            results.append(run_trl(base, train_pairs, val_pairs, test_pairs, cross_pairs, 60 * a.budget_minutes))
        elif name == "probe":
            results.append(run_probe(feats, val_pairs, extraction_s))
        else:
            fields = RECIPES[name]
            cfg = dataclasses.replace(base, output_dir=str(OUT / name), max_minutes=a.budget_minutes, **fields)
            # frozen rows: the trunk's part of the layer/pooling; full fine-tunes: the classic last-token head
            cfg = cfg if on_frozen_features(name) else dataclasses.replace(cfg, layer=-1, pooling="last")
            results.append(run_ours(name, cfg, test_pairs, cross_pairs, feats, extraction_s))
        results[-1]["over_budget"] = a.budget_minutes > 0 and results[-1]["seconds"] > 60 * a.budget_minutes * 1.05
        table(results[-1:], a.train_domain)
        path.write_text(json.dumps(  # after every row: a stopped run keeps the rows it finished
            {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "settings": settings,
             "budget_minutes": a.budget_minutes, "train_domain": a.train_domain, "cross_domain": cross,
             "train_pairs": len(train_pairs), "validation_pairs": len(val_pairs), "test_pairs": len(test_pairs),
             "cross_domain_test_pairs": len(cross_pairs), "extraction_seconds": extraction_s,
             "rows": merged(path, settings, results[-1:])}, indent=2) + "\n")
        gc.collect()
    print()
    table(results, a.train_domain)


def merged(path: Path, settings: dict, results: list[dict]) -> list[dict]:
    """This run's rows, after the rows of an earlier run on the same split and settings (--rows runs a subset:
    the table grows run by run) that this run did not redo; an earlier file of other settings is replaced."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return results
    if {k: v for k, v in old.get("settings", {}).items() if k not in ("rows", "budget_minutes")} != settings:
        return results
    redone = {r["row"] for r in results}
    return [r for r in old.get("rows", []) if r["row"] not in redone] + results


if __name__ == "__main__":
    try:
        main()
    except ChatRLHFError as e:  # a bad --model or --layer: one line, as the CLI prints it
        sys.exit(f"error: {e}")
