"""`make demo`: fine-tune the embedded SmolLM2-135M-Instruct on the example customer-service
dialogues and show replies to held-out prompts before and after.

    .venv/bin/python examples/demo.py [--steps 30] [--out out/demo]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="out/demo")
    p.add_argument("--model", default="smollm2-135m")
    a = p.parse_args()

    from rich.console import Console
    from rich.table import Table

    from chatrlhf.config import GenerateArgs, ModelArgs, SFTConfig
    from chatrlhf.data import load_records, split_by_prompt
    from chatrlhf.generation import generate_replies
    from chatrlhf.models import load_model
    from chatrlhf.trainers.sft import train

    console = Console()
    t0 = time.time()
    data = HERE / "dialogue_history.csv"
    cfg = SFTConfig(model=a.model, data=str(data), output_dir=f"{a.out}/sft", max_steps=a.steps, lr=5e-5,
                    eval_steps=10, save_steps=10**9, tensorboard=True)
    # the same prompt-disjoint split the trainer makes: show held-out prompts only
    _, held = split_by_prompt(load_records(data).records, cfg.eval_fraction, cfg.seed)
    prompts = [r.prompt for r in held if len(r.prompt) == 1][:3] or [r.prompt for r in held][:3]
    greedy = GenerateArgs(max_new_tokens=60, no_sample=True)

    console.rule("[bold]1/3 the embedded model before fine-tuning")
    base, tok = load_model(ModelArgs(model=a.model))
    before = generate_replies(base.eval(), tok, prompts, greedy)
    del base

    console.rule(f"[bold]2/3 SFT: {a.steps} steps on {data.name}")
    summary = train(cfg, log=console.print)

    console.rule("[bold]3/3 after")
    tuned, tok = load_model(ModelArgs(model=cfg.output_dir))
    after = generate_replies(tuned.eval(), tok, prompts, greedy)
    table = Table(title="held-out prompts (greedy decoding)", show_lines=True)
    for col in ("prompt", "before", "after SFT"):
        table.add_column(col, ratio=1)
    for p, b, af in zip(prompts, before, after):
        table.add_row(p[-1]["content"], b, af)
    console.print(table)
    console.print(f"held-out loss {summary['eval_loss_start']:.3f} → {summary['eval_loss_end']:.3f}; "
                  f"model in {cfg.output_dir} (loads with transformers' from_pretrained); "
                  f"metrics in {cfg.output_dir}/metrics.jsonl and TensorBoard {cfg.output_dir}/tb; "
                  f"{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
