"""`make demo`: the whole pipeline on the embedded SmolLM2-135M-Instruct and the example data (a fictional
shop's customer service, written for this project):

  1. SFT on 36 dialogues;
  2. a reward model from preference pairs, star ratings and corrections of replies to 120 prompts, with its gate
     measured on prompts it never saw;
  3. PPO from the SFT model (LoRA; the critic starts from the reward model, put on the reward's scale) against
     the reward model plus the human ratings, the human weight decaying;
  4. the PPO policy against the SFT model on the prompts PPO held out: reward-model win rate with a 95% CI, the
     human ratings' score, similarity to the human replies, KL.

About 12 minutes on 2 CPU cores; README "What `make demo` shows" has the figures and what they mean.

    .venv/bin/python examples/demo.py [--out out/demo] [--ppo-steps 10] [--eval-samples 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
HERE = Path(__file__).resolve().parent
FEEDBACK = [str(HERE / f) for f in ("preferences.jsonl", "ratings.jsonl", "corrections.jsonl")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/demo")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sft-steps", type=int, default=12)
    p.add_argument("--ppo-steps", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=2, help="replies per held-out prompt in the final evaluation")
    a = p.parse_args()

    from rich.console import Console

    from chatrlhf.config import EvalConfig, PPOConfig, RewardTrainConfig, SFTConfig
    from chatrlhf.evaluate.report import run_eval
    from chatrlhf.models import quiet_transformers
    from chatrlhf.trainers import ppo, reward, sft

    console = Console()
    t0 = time.time()
    out = Path(a.out)

    console.rule(f"[bold]1/4 SFT: {a.sft_steps} steps on dialogue_history.csv")
    s = sft.train(SFTConfig(model=a.model, data=[str(HERE / "dialogue_history.csv")], output_dir=str(out / "sft"),
                            max_steps=a.sft_steps, lr=5e-5, eval_steps=10**9, save_steps=10**9,
                            gradient_checkpointing=False), log=console.print)
    console.print(f"held-out loss {s['eval_loss_start']:.3f} → {s['eval_loss_end']:.3f}")

    console.rule("[bold]2/4 reward model from preferences, ratings and corrections")
    with quiet_transformers():
        rm = reward.train(RewardTrainConfig(model=a.model, data=FEEDBACK, output_dir=str(out / "reward"), max_steps=20,
                                            lr=1e-4, train_layers=2, eval_fraction=0.15), log=console.print)
    gate = rm["gate"]
    console.print(f"held-out accuracy {rm['accuracy']:.3f}, ECE {rm['ece']:.3f}; gate "
                  + ("[green]PASSED" if gate["passed"] else "[red]FAILED: " + "; ".join(gate["reasons"])))

    console.rule(f"[bold]3/4 PPO: {a.ppo_steps} steps, reward = reward model + human ratings (human weight decaying)")
    cfg = PPOConfig(model=str(out / "sft"), data=[str(HERE / "prompts.txt")], output_dir=str(out / "ppo"),
                    reward_model=str(out / "reward"), force=not gate["passed"], human_feedback=FEEDBACK[1:],
                    human_threshold=0.15, reward_weights={"rm": "1", "human": f"cosine:1:0.2:{a.ppo_steps}"},
                    max_steps=a.ppo_steps, batch_size=8, samples_per_prompt=2, minibatch_size=8, max_new_tokens=40,
                    ppo_epochs=1, lora_r=16, lr=1e-3, critic="reward-model", critic_lr=1e-4, eval_fraction=0.25,
                    eval_steps=10**9, save_steps=10**9)
    with quiet_transformers():
        summary = ppo.train(cfg, log=console.print)
    start, end = summary["eval_start"], summary["eval_end"]
    console.print("held-out prompts: " + ", ".join(f"{k[5:-5]} {start[k]:+.3f} → {end[k]:+.3f}" for k in end
                                                    if k.endswith("_mean") and k in start)
                  + f"; KL to the SFT policy {end['eval/kl']:.3f} nats/reply")

    console.rule("[bold]4/4 evaluation: PPO policy against the SFT model on the prompts PPO held out")
    heldout = held_out_references(cfg, out / "heldout.jsonl")
    with quiet_transformers():
        rep = run_eval(EvalConfig(model=str(out / "ppo"), baseline=str(out / "sft"), data=[str(heldout)],
                                  reward_model=str(out / "reward"), run=str(out / "ppo"), output_dir=str(out / "eval"),
                                  max_new_tokens=40, max_prompts=1000, samples_per_prompt=a.eval_samples),
                       log=console.print)
    m, w = rep["metrics"], rep["win_rate"]
    console.print(f"reward-model score: SFT {m['baseline']['rm_score']:+.3f} → PPO {m['model']['rm_score']:+.3f}; "
                  f"win rate {w['mean']:.2f} (95% CI {w['ci95'][0]:.2f}–{w['ci95'][1]:.2f}) on {rep['prompts']} "
                  f"prompts × {a.eval_samples} replies; KL {rep['kl_to_baseline']['mean']:.2f} nats/reply; ROUGE-L to human replies "
                  f"{m['baseline']['rouge_l']:.3f} → {m['model']['rouge_l']:.3f}")
    if w["ci95"][0] > 0.5:
        console.print("[green]the PPO policy beats the SFT model on held-out prompts (the 95% CI is above 0.5)")
    else:
        console.print("[yellow]on this budget the win is not significant (the 95% CI reaches 0.5); README "
                      "'What make demo shows' says why")
    console.print(f"[bold]report: {out / 'eval' / 'report.html'}[/] · {time.time() - t0:.0f} s in all")


def held_out_references(cfg, path: Path) -> Path:
    """The human replies (the chosen reply of each preference) to the prompts PPO held out, as an eval data file."""
    from chatrlhf.trainers.ppo import split_prompts

    keys = {json.dumps(p) for p in split_prompts(cfg)[1]}
    rows = [json.loads(x) for x in Path(FEEDBACK[0]).read_text().splitlines() if x.strip()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows
                            if json.dumps([{"role": "user", "content": r["prompt"]}]) in keys))
    return path


if __name__ == "__main__":
    main()
