"""`chatrlhf sft`, `chatrlhf ppo`, `chatrlhf grpo`, `chatrlhf dpo`, `chatrlhf kto`, `chatrlhf bestofn`, `chatrlhf qlearn` and `chatrlhf qlearn-offline`: run the trainer, print what moved."""

from __future__ import annotations

from chatrlhf.config import BestOfNConfig, DPOConfig, GRPOConfig, KTOConfig, PPOConfig, QLearnConfig, QOfflineConfig, SFTConfig
from chatrlhf.trainers import bestofn, dpo, grpo, kto, ppo, qlearn, qoffline, sft


def run(name: str, cfg) -> int:
    return {"sft": train_sft, "ppo": train_ppo, "grpo": train_grpo, "dpo": train_dpo, "kto": train_kto, "bestofn": train_bestofn, "qlearn": train_qlearn, "qlearn-offline": train_qoffline}[name](cfg)


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
    print_heldout_reward("ppo", start, end)
    if "eval/return" in end and "eval/return" in start:  # --env dialogue
        print(f"chatrlhf ppo: held-out return per episode {start['eval/return']:+.3f} -> {end['eval/return']:+.3f} "
              f"({end['eval/turns']:.1f} turns)")
    print(f"chatrlhf ppo: policy saved to {cfg.output_dir}")
    return 0


def train_grpo(cfg: GRPOConfig) -> int:
    summary = grpo.train(cfg)
    if summary.interrupted:
        return 130
    print_heldout_reward("grpo", summary["eval_start"] or {}, summary["eval_end"] or {})
    print(f"chatrlhf grpo: policy saved to {cfg.output_dir}")
    return 0


def train_bestofn(cfg: BestOfNConfig) -> int:
    """Sample, select, write (and with --sft fine-tune through `chatrlhf sft`); then what each round kept and the
    selection's gain: the kept replies' mean raw value per source against the mean of every sample."""
    summary = bestofn.train(cfg, fine_tune=sft.train)
    if summary.interrupted:
        return 130
    for r in summary["rounds"]:
        moved = [f"{name} {g['all']:+.3f} -> {g['kept']:+.3f} ({g['gain']:+.3f})"
                 for name, g in r["by_source"].items() if g["gain"] is not None]
        print(f"chatrlhf bestofn: round {r['round']}: kept {r['kept']} replies of {r['prompts']} prompts × "
              f"{cfg.num_samples} samples, {r['pairs']} pairs" + (f", {r['gap_too_small']} prompts under --min-gap"
                                                                  if r["gap_too_small"] else ""))
        if moved:
            print(f"chatrlhf bestofn: round {r['round']}: mean raw reward, all samples -> kept (gain): {', '.join(moved)}")
    last = f"{cfg.output_dir}/round-{len(summary['rounds'])}"
    print(f"chatrlhf bestofn: SFT rows in {last}/best.jsonl, DPO pairs in {last}/pairs.jsonl"
          + (f"; fine-tuned model saved to {cfg.output_dir}" if summary["final_model"] else ""))
    return 0


def print_heldout_reward(command: str, start: dict, end: dict) -> None:
    """The raw mean of each reward source on the held-out prompts (comparable across steps), first and last
    evaluation, and the final KL to the reference (none without one)."""
    moved = [f"{k[5:-5]} {start[k]:+.3f} -> {end[k]:+.3f}" for k in end if k.endswith("_mean") and k in start]
    if moved:
        kl = f"; KL to reference {end['eval/kl']:.3f} nats/reply" if "eval/kl" in end else ""
        print(f"chatrlhf {command}: held-out reward by source: {', '.join(moved)}{kl}")


def train_qlearn(cfg: QLearnConfig) -> int:
    summary = qlearn.train(cfg)
    if summary.interrupted:
        return 130
    end = summary["eval_end"] or {}
    if "eval/q" in end:
        capture = f"; capture {end['eval/capture']:.2f}" if "eval/capture" in end else ""
        print(f"chatrlhf qlearn: held-out reward per state: Q-argmax {end['eval/q']:+.3f}, random "
              f"{end['eval/random']:+.3f}, oracle {end['eval/oracle']:+.3f}, human {end['eval/human']:+.3f}{capture}")
    print(f"chatrlhf qlearn: Q-heads and qlearn.json saved to {cfg.output_dir}")
    return 0


def train_qoffline(cfg: QOfflineConfig) -> int:
    summary = qoffline.train(cfg)
    if summary.interrupted:
        return 130
    start, end = summary["eval_start"] or {}, summary["eval_end"] or {}
    if "eval/pair_accuracy" in end:
        ci = f" [{end['eval/capture_lo']:.2f}, {end['eval/capture_hi']:.2f}]" if "eval/capture_lo" in end else ""
        capture = f"; capture {end['eval/capture']:.2f}{ci}" if "eval/capture" in end else ""
        print(f"chatrlhf qlearn-offline: held-out logged replies ranked by Q: pairwise accuracy "
              f"{start.get('eval/pair_accuracy', float('nan')):.2f} -> {end['eval/pair_accuracy']:.2f}, Kendall τ "
              f"{end.get('eval/kendall_tau', float('nan')):+.2f}{capture} ({int(end['eval/states'])} states)")
    print(f"chatrlhf qlearn-offline: Q- and V-heads and qlearn.json saved to {cfg.output_dir}")
    return 0


def train_dpo(cfg: DPOConfig) -> int:
    return _preference("dpo", dpo.train(cfg), "eval/accuracy", "margin accuracy", "held_out_pairs", cfg.output_dir)


def train_kto(cfg: KTOConfig) -> int:
    return _preference("kto", kto.train(cfg), "eval/auc", "AUC of the implicit reward (desirable above undesirable)",
                       "held_out_replies", cfg.output_dir)


def _preference(name: str, summary, key: str, what: str, count: str, output_dir: str) -> int:
    """What `dpo` or `kto` moved on the held-out data: ``key`` and the mean margin of implicit rewards."""
    if summary.interrupted:
        return 130
    start, end = summary["eval_start"] or {}, summary["eval_end"] or {}
    if key in end:
        print(f"chatrlhf {name}: held-out {what} {start.get(key, float('nan')):.3f} -> {end[key]:.3f}, mean margin "
              f"{start.get('eval/margin', float('nan')):+.3f} -> {end['eval/margin']:+.3f} ({summary[count]} "
              f"{count.split('_')[-1]})")
    print(f"chatrlhf {name}: policy saved to {output_dir}")
    return 0
