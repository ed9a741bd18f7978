"""`chatrlhf reward train|eval|score`: wiring between the CLI, the reward trainer and reward_model.py."""

from __future__ import annotations

import json
from pathlib import Path

from chatrlhf.config import RewardEvalConfig, RewardScoreConfig, RewardTrainConfig
from chatrlhf.data import load_records
from chatrlhf.data.formats import parse_turns
from chatrlhf.data.pairs import build_pairs
from chatrlhf.data.readers import read_rows
from chatrlhf.data.split import group_hash
from chatrlhf.errors import DataError, UsageError
from chatrlhf.models import autocast
from chatrlhf.reward_model import HELD_OUT, evaluate_pairs, load_reward_model, reward_head, reward_scores_with_spread, \
    verdict, write_report
from chatrlhf.trainers import reward as reward_trainer


def run(sub: str, cfg) -> int:
    return train(cfg) if sub == "train" else evaluate(cfg) if sub == "eval" else score(cfg)


def train(cfg: RewardTrainConfig) -> int:
    s = reward_trainer.train(cfg)
    if s.interrupted:
        return 130
    _print_verdict(s["accuracy"], s["ece"], s["gate"], s["split"])
    _print_uncertainty(s.as_json(), "fitted on the held-out pairs")
    print(f"chatrlhf reward: model, eval.json and eval.png in {cfg.output_dir}")
    return 0


def _print_verdict(acc, ece, gate, on: str) -> None:
    print(f"chatrlhf reward: accuracy {acc:.3f}, ECE {ece:.3f} ({on})")
    if gate["passed"]:
        print("gate: PASSED — this reward model may be used for RL")
    else:
        print("gate: FAILED — RL will refuse this reward model unless --force:")
        for r in gate["reasons"]:
            print(f"  - {r}")


def _print_uncertainty(m: dict, how: str) -> None:
    """The temperature's effect on ECE, and an ensemble's accuracy on its confident half against the rest."""
    if m["temperature"] != 1.0:
        print(f"calibration: temperature {m['temperature']:.3f} {how}, ECE {m['ece_uncalibrated']:.3f} → {m['ece']:.3f}")
    if m.get("ensemble"):
        e = m["ensemble"]
        print(f"ensemble of {e['heads']} heads: accuracy {e['confident_half_accuracy']:.3f} on the half of the held-out "
              f"pairs it is surest of (largest |mean margin|), {e['other_half_accuracy']:.3f} on the rest")


def untrained_pairs(model_dir: str, pairs: list, log=print) -> list:
    """The pairs whose prompt the reward model in ``model_dir`` was not trained on (its chatrlhf.json lists the
    hashes of its training prompts); all of them for a model that records none."""
    record = Path(model_dir) / "chatrlhf.json"
    trained = set(json.loads(record.read_text()).get("training", {}).get("prompt_groups", [])) if record.is_file() else set()
    if not record.is_file():
        log(f"chatrlhf reward eval: warning: {record} not found, so pairs the model was trained on cannot be told apart")
    kept = [p for p in pairs if group_hash(p) not in trained]
    if not kept:
        raise UsageError(f"--data: every pair's prompt was in {model_dir}'s training data, so accuracy here would "
                         "say nothing about new replies", "evaluate on pairs the model has not seen")
    if len(kept) < len(pairs):
        log(f"chatrlhf reward eval: {len(pairs) - len(kept)} of {len(pairs)} pairs have a prompt the model was "
            f"trained on: not used")
    return kept


def evaluate(cfg: RewardEvalConfig) -> int:
    if not cfg.data:
        raise UsageError("reward eval needs --data: held-out feedback files", "pairs the model was not trained on")
    records = [r for p in cfg.data for r in load_records(p, cfg.format).of("preference")]
    pairs, _ = build_pairs(records)
    if not pairs:
        raise UsageError(f"--data {','.join(cfg.data)}: no preference pairs to evaluate on", "")
    pairs = untrained_pairs(cfg.model, pairs)
    model, tok = load_reward_model(cfg)
    with autocast(cfg.dtype, next(model.parameters()).device):
        metrics = evaluate_pairs(model, tok, pairs, cfg.batch_size, cfg.max_length)
    metrics["split"] = f"{HELD_OUT}: {','.join(cfg.data)} ({len(pairs)} pairs not trained on)"
    gate = verdict(metrics, cfg.min_accuracy, cfg.max_length_corr)
    model_dir = Path(cfg.model) if Path(cfg.model).is_dir() else Path(".")
    out = model_dir if cfg.replace_gate else Path(cfg.output_dir) if cfg.output_dir else model_dir / "reward-eval"
    write_report(out, metrics, gate)
    _print_verdict(metrics["accuracy"], metrics["ece"], gate,
                   f"on {len(pairs)} pairs of {','.join(cfg.data)} whose prompts the model was not trained on")
    _print_uncertainty(metrics, "stored with the model")
    print(f"chatrlhf reward eval: eval.json and eval.png in {out}"
          + (" (now the model's gate)" if cfg.replace_gate else " (the gate RL reads is unchanged; --replace-gate "
                                                                "makes this evaluation the gate)"))
    return 0


def score(cfg: RewardScoreConfig) -> int:
    if not cfg.data or not cfg.out:
        raise UsageError("reward score needs --data FILE and --out FILE", "rows need 'prompt' and 'response'")
    rows, prompts, replies = [], [], []
    for loc, row in read_rows(cfg.data):
        key = "prompt" if "prompt" in row else "messages"
        if key not in row or "response" not in row:
            raise DataError(cfg.data, loc, "prompt" if key not in row else "response", "missing column",
                            "each row needs 'prompt' (or 'messages') and 'response'")
        prompts.append(parse_turns(row[key], cfg.data, loc, key))
        replies.append(str(row["response"]))
        rows.append(row)
    model, tok = load_reward_model(cfg)
    with autocast(cfg.dtype, next(model.parameters()).device):
        scores, spreads = reward_scores_with_spread(model, tok, prompts, replies, cfg.batch_size, cfg.max_length)
    heads = reward_head(model.config)["heads"]
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps({**r, "score": s, **({"spread": u} if heads > 1 else {})}, ensure_ascii=False,
                                      default=str) + "\n" for r, s, u in zip(rows, scores, spreads)), encoding="utf-8")
    tmp.replace(out)
    print(f"chatrlhf reward score: {len(scores)} scores written to {out}" +
          (f" with each score's spread over the {heads} heads (mean {sum(spreads) / max(len(spreads), 1):.3f}; a larger "
           "spread = a less certain score)" if heads > 1 else ""))
    return 0
