"""`chatrlhf loop`: the closed loop (loop.py), one line per finished round."""

from __future__ import annotations

from pathlib import Path

from chatrlhf import loop
from chatrlhf.config import LoopConfig


def run(name: str, cfg: LoopConfig) -> int:
    lines = loop.run(cfg)
    for line in lines:
        win = (line.get("metrics") or {}).get("win_rate")
        figure = f", win rate {win['mean']:.3f} (95% CI {win['ci95'][0]:.3f}–{win['ci95'][1]:.3f})" if win else ""
        print(f"chatrlhf loop: round {line['round']}: {line['decision']}{figure}")
    work = Path(cfg.work_dir)
    promoted = f"the promoted policy in {work / 'current.json'}" if (work / "current.json").is_file() else \
        "nothing promoted yet"
    print(f"chatrlhf loop: lineage in {work / 'lineage.jsonl'}, {promoted}")
    return 0
