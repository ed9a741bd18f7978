"""`chatrlhf sft` and `chatrlhf ppo`: run the trainer, print what moved."""

from __future__ import annotations

from chatrlhf.config import PPOConfig, SFTConfig
from chatrlhf.trainers import ppo, sft


def run(name: str, cfg) -> int:
    return train_sft(cfg) if name == "sft" else train_ppo(cfg)


def train_sft(cfg: SFTConfig) -> int:
    summary = sft.train(cfg)
    if summary.interrupted:
        return 130
    print(f"chatrlhf sft: eval loss {summary['eval_loss_start']:.4f} -> {summary['eval_loss_end']:.4f}; "
          f"model saved to {cfg.output_dir}")
    return 0


def train_ppo(cfg: PPOConfig) -> int:
    summary = ppo.train(cfg)
    if summary.interrupted:
        return 130
    start, end = summary["eval_start"] or {}, summary["eval_end"] or {}
    moved = [f"{k[5:-5]} {start[k]:+.3f} -> {end[k]:+.3f}" for k in end if k.endswith("_mean") and k in start]
    if moved:  # raw source means: comparable across steps
        print(f"chatrlhf ppo: held-out reward by source: {', '.join(moved)}; KL to reference "
              f"{end['eval/kl']:.3f} nats/reply")
    print(f"chatrlhf ppo: policy saved to {cfg.output_dir}")
    return 0
