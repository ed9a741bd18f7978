"""`chatrlhf eval`: the independent evaluator (evaluate/report.py), its figures printed."""

from __future__ import annotations

from chatrlhf.config import EvalConfig
from chatrlhf.evaluate.report import run_eval


def run(name: str, cfg: EvalConfig) -> int:
    rep = run_eval(cfg)
    print_figures(rep)
    if "bias" in rep:
        print_bias(rep["bias"])
    print(f"chatrlhf eval: report in {cfg.output_dir}/report.html")
    return 0


def print_bias(bias: dict) -> None:
    for dim, d in bias["dimensions"].items():
        gaps = ", ".join(f"{m} {g['pair']} {g['mean']:+.3f} ({g['ci95'][0]:+.3f} to {g['ci95'][1]:+.3f})"
                         + (" FLAGGED" if g["flagged"] else "")
                         for m, g in ((m, x["max_gap"]) for m, x in d["measures"].items()))
        print(f"chatrlhf eval: bias {dim} ({d['sets']} sets): max gaps {gaps or 'none (no sets)'}")
    for note in bias["notes"]:
        print(f"chatrlhf eval: bias: {note}")
    print("chatrlhf eval: bias check " + ("passed" if bias["ok"] else "FLAGGED: " + "; ".join(bias["flagged"])))


def print_figures(rep: dict) -> None:
    for metric, d in rep.get("metrics", {}).items():
        print(f"chatrlhf eval: {metric}: " + ", ".join(f"{k} {v:.3f}" for k, v in d.items()))
    for source, c in rep.get("rewards", {}).items():
        g, w = c["gain"], c["win_rate"]
        print(f"chatrlhf eval: {source}: baseline {c['baseline']['mean']:.3f} -> model {c['model']['mean']:.3f}, gain "
              f"{g['mean']:+.3f} (95% CI {g['ci95'][0]:+.3f} to {g['ci95'][1]:+.3f}), win rate {w['mean']:.3f} "
              f"({w['ci95'][0]:.3f}-{w['ci95'][1]:.3f})")
    if "kl_to_baseline" in rep:
        k = rep["kl_to_baseline"]
        print(f"chatrlhf eval: KL to baseline {k['mean']:.3f} nats/reply (95% CI {k['ci95'][0]:.3f}-{k['ci95'][1]:.3f})")
