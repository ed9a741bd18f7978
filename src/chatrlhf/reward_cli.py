"""`chatrlhf reward train|eval|score`: wiring between the CLI and the reward-model pieces."""

from __future__ import annotations

import json
from pathlib import Path

from chatrlhf.config import RewardEvalConfig, RewardScoreConfig
from chatrlhf.data import load_records
from chatrlhf.data.formats import parse_turns
from chatrlhf.data.pairs import build_pairs
from chatrlhf.data.readers import read_rows
from chatrlhf.errors import DataError, UsageError


def run(sub: str, cfg) -> int:
    if sub == "train":
        from chatrlhf.trainers.reward import train

        s = train(cfg)
        _print_verdict(s["accuracy"], s["ece"], s["gate"], cfg.output_dir)
        return 0
    return evaluate(cfg) if sub == "eval" else score(cfg)


def _print_verdict(acc, ece, gate, where) -> None:
    print(f"chatrlhf reward: held-out accuracy {acc:.3f}, ECE {ece:.3f}; model, eval.json and eval.png in {where}")
    if gate["passed"]:
        print("gate: PASSED — this reward model may be used for RL")
    else:
        print("gate: FAILED — RL will refuse this reward model unless --force:")
        for r in gate["reasons"]:
            print(f"  - {r}")


def evaluate(cfg: RewardEvalConfig) -> int:
    from chatrlhf.evaluate.reward_eval import evaluate_pairs, verdict, write_report
    from chatrlhf.models import load_reward_model

    records = [r for p in cfg.data.split(",") if p.strip() for r in load_records(p.strip(), cfg.format).records]
    pairs, _ = build_pairs(records)
    if not pairs:
        raise UsageError(f"--data {cfg.data}: no preference pairs to evaluate on", "")
    model, tok = load_reward_model(cfg)
    metrics = evaluate_pairs(model, tok, pairs, cfg.batch_size, cfg.max_length)
    gate = verdict(metrics, cfg.min_accuracy, cfg.max_length_corr)
    out = Path(cfg.model) if Path(cfg.model).is_dir() else Path(".")
    write_report(out, metrics, gate)
    _print_verdict(metrics["accuracy"], metrics["ece"], gate, out)
    return 0


def score(cfg: RewardScoreConfig) -> int:
    from chatrlhf.models import load_reward_model
    from chatrlhf.rewards import reward_scores

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
    scores = reward_scores(model, tok, prompts, replies, cfg.batch_size, cfg.max_length)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps({**r, "score": s}, ensure_ascii=False, default=str) + "\n"
                           for r, s in zip(rows, scores)), encoding="utf-8")
    tmp.replace(out)
    print(f"chatrlhf reward score: {len(scores)} scores written to {out}")
    return 0
