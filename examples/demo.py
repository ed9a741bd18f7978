"""`make demo`: the whole pipeline on the embedded SmolLM2-135M-Instruct and the example data:
SFT → reward model (with its gate) → PPO with the reward model + human ratings on a decaying
schedule → evaluation report. About 13 minutes on 2 CPU cores.

    .venv/bin/python examples/demo.py [--sft-steps 30] [--ppo-steps 10] [--out out/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sft-steps", type=int, default=30)
    p.add_argument("--ppo-steps", type=int, default=10)
    p.add_argument("--out", default="out/demo")
    p.add_argument("--model", default="smollm2-135m")
    a = p.parse_args()

    from rich.console import Console

    from chatrlhf.config import EvalConfig, PPOConfig, RewardTrainConfig, SFTConfig
    from chatrlhf.data import load_prompts, split_by_prompt
    from chatrlhf.data.records import Conversation, prompt_key
    from chatrlhf.evaluate.report import run_eval
    from chatrlhf.trainers import ppo, reward, sft

    console = Console()
    t0 = time.time()
    out = Path(a.out)
    feedback = ",".join(str(HERE / f) for f in ("preferences.jsonl", "ratings.jsonl", "corrections.jsonl"))

    console.rule(f"[bold]1/4 SFT: {a.sft_steps} steps on dialogue_history.csv")
    s = sft.train(SFTConfig(model=a.model, data=str(HERE / "dialogue_history.csv"), output_dir=str(out / "sft"),
                            max_steps=a.sft_steps, lr=5e-5, eval_steps=10, save_steps=10**9), log=console.print)
    console.print(f"held-out loss {s['eval_loss_start']:.3f} → {s['eval_loss_end']:.3f}")

    console.rule("[bold]2/4 reward model from preferences, ratings and corrections")
    rm = reward.train(RewardTrainConfig(model=a.model, data=feedback, output_dir=str(out / "reward"), epochs=2,
                                        lr=3e-5, eval_fraction=0.2), log=console.print)
    gate = rm["gate"]
    console.print(f"held-out accuracy {rm['accuracy']:.3f}, ECE {rm['ece']:.3f}; gate "
                  + ("[green]PASSED" if gate["passed"] else "[red]FAILED: " + "; ".join(gate["reasons"])))

    console.rule(f"[bold]3/4 PPO: {a.ppo_steps} steps, reward = reward model + human ratings (human weight decaying)")
    cfg = PPOConfig(model=str(out / "sft"), data=str(HERE / "prompts.txt"), output_dir=str(out / "ppo"),
                    reward_model=str(out / "reward"), force=not gate["passed"], human_feedback=feedback,
                    human_threshold=0.3, reward_weights=f"rm=1,human=cosine:1:0.2:{a.ppo_steps}",
                    max_steps=a.ppo_steps, batch_size=8, samples_per_prompt=2, minibatch_size=8, max_new_tokens=32,
                    ppo_epochs=2, lr=1e-5, eval_steps=5, save_steps=10**9)
    summary = ppo.train(cfg, log=console.print)
    start, end = summary["eval_start"], summary["eval_end"]
    console.print("held-out prompts: " + ", ".join(f"{k[5:-5]} {start[k]:+.3f} → {end[k]:+.3f}" for k in end
                                                    if k.endswith("_mean") and k in start and end[k] == end[k])
                  + f"; KL to the SFT policy {end['eval/kl']:.3f} nats/reply")

    console.rule("[bold]4/4 evaluation: PPO policy against the SFT model on the prompts PPO held out")
    prompts = load_prompts(cfg.data)
    _, held = split_by_prompt([Conversation(q) for q in prompts], cfg.eval_fraction, cfg.seed)
    keys = {prompt_key(c.messages) for c in held}
    refs = [json.loads(x) for x in (HERE / "preferences.jsonl").read_text().splitlines() if x.strip()]
    heldout = out / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in refs
                               if prompt_key([{"role": "user", "content": r["prompt"]}]) in keys))
    rep = run_eval(EvalConfig(model=str(out / "ppo"), baseline=str(out / "sft"), data=str(heldout),
                              reward_model=str(out / "reward"), run=str(out / "ppo"), output_dir=str(out / "eval"),
                              max_new_tokens=32))
    m = rep["metrics"]
    console.print(f"reward-model score: SFT {m['baseline']['rm_score']:+.3f} → PPO {m['model']['rm_score']:+.3f}; "
                  f"win rate {rep['win_rate']['mean']:.2f} (95% CI {rep['win_rate']['ci95'][0]:.2f}–"
                  f"{rep['win_rate']['ci95'][1]:.2f}); KL {rep['kl_to_baseline']['mean']:.2f} nats/reply; "
                  f"ROUGE-L to human replies {m['baseline']['rouge_l']:.3f} → {m['model']['rouge_l']:.3f}")
    console.print(f"[bold]report: {out / 'eval' / 'report.html'}[/] · {time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
