"""`chatrlhf eval`: the independent evaluator (evaluate/report.py), its figures printed."""

from __future__ import annotations

from chatrlhf.config import EvalConfig
from chatrlhf.evaluate.report import run_eval


def run(name: str, cfg: EvalConfig) -> int:
    rep = run_eval(cfg)
    for metric, d in rep["metrics"].items():
        print(f"chatrlhf eval: {metric}: " + ", ".join(f"{k} {v:.3f}" for k, v in d.items()))
    for source, c in rep.get("rewards", {}).items():
        g, w = c["gain"], c["win_rate"]
        print(f"chatrlhf eval: {source}: baseline {c['baseline']['mean']:.3f} -> model {c['model']['mean']:.3f}, gain "
              f"{g['mean']:+.3f} (95% CI {g['ci95'][0]:+.3f} to {g['ci95'][1]:+.3f}), win rate {w['mean']:.3f} "
              f"({w['ci95'][0]:.3f}-{w['ci95'][1]:.3f})")
    if "kl_to_baseline" in rep:
        k = rep["kl_to_baseline"]
        print(f"chatrlhf eval: KL to baseline {k['mean']:.3f} nats/reply (95% CI {k['ci95'][0]:.3f}-{k['ci95'][1]:.3f})")
    print(f"chatrlhf eval: report in {cfg.output_dir}/report.html")
    return 0
