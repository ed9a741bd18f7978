"""GRPO and RLOO step time, memory and held-out reward: chatrlhf grpo vs TRL's GRPOTrainer and RLOOTrainer.

    .venv/bin/pip install -e '.[bench]'        # TRL 1.16
    .venv/bin/python benchmarks/grpo.py [--steps 3] [--only ours|trl] [--skip-rloo] [--no-exact]

Work per step (TOOLING.md's reference runs): SmolLM2-135M, 16 prompts × 4 generations, 32 new tokens,
temperature 1, lr 1e-6 (TRL's default) annealed linearly to 0, seed 0; prompts: the first single-turn HH-RLHF
helpful-base prompts (benchmarks/ppo.py), reward: benchmarks/ppo.py's Python function on both sides, raw (our
running normalisation and missing-EOS penalty off, as TRL).
  * GRPO — TRL GRPOTrainer: batch 16 × accumulation 4, β 0 (no reference), `dapo` loss, HF generate, fp32.
    chatrlhf: `--advantage grpo --loss-type dapo --beta 0`, one optimizer step per batch.
  * RLOO — TRL RLOOTrainer: the same with β 0.05 (a k1 KL penalty in the reward against a separate fp32 reference).
    chatrlhf: `--advantage rloo --kl-in-reward --beta 0.05`.
Rows for chatrlhf: with TRL's settings (full fine-tuning, fp32; RLOO with a frozen fp32 reference copy), and
recommended for a 2-core CPU: bf16 autocast (`--dtype auto`, fp32 master weights and loss) and LoRA r 16 on all
linear layers at lr 1e-4 (the reference is the base with the adapters off: no second copy).
Each row runs in its own child process, one after the other in this one run, so each peak RSS is its own; step time
is the mean over the steps after the first. The held-out reward is computed by one more child with the same code
for every saved folder (and the start model): 4 replies of 32 tokens to each of --eval-prompts held-out prompts
(after the training prompts), sampled by chatrlhf's engine at temperature 1 with a fixed seed, scored by the same
function. Prints the table and the ratios; writes benchmarks/results/grpo.json (grpo-ours.json / grpo-trl.json with
--only). On a quiet 2-core machine the default run is estimated at 12–14 minutes (TRL: 3 × 57 s GRPO, 3 × 83 s
RLOO, plus loading); --skip-rloo roughly halves it, --no-exact drops the two full-fp32 chatrlhf rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo import HH, N_PROMPTS, N_SAMPLES, NEW_TOKENS, prompts, reward  # noqa: E402
from sft import comparison_args, hf_model, machine, peak_gb, peak_memory, run_side, train_trl, use_cpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RLOO_BETA = 0.05


def ours_reward(prompts, responses):
    return reward(responses)


def run_ours(a, algo: str, exact: bool) -> dict:
    from chatrlhf.config import GRPOConfig
    from chatrlhf.logger import read_metrics
    from chatrlhf.trainers.grpo import train

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{algo}-"))
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(N_PROMPTS * a.steps)))
    algo_settings = dict(advantage="grpo", loss_type="dapo", beta=0.0) if algo == "grpo" else \
        dict(advantage="rloo", loss_type="dapo", beta=RLOO_BETA, kl_in_reward=True)
    settings = dict(dtype="float32", lora_r=0, lr=1e-6) if exact else dict(dtype="auto", lora_r=a.lora_r, lr=a.lora_lr)
    cfg = GRPOConfig(model=a.model, device=a.device, data=[str(data)], output_dir=str(tmp / "out"),
                     reward_fn=f"{__file__}:ours_reward", reward_norm=False, missing_eos_penalty=0.0,
                     max_steps=a.steps, batch_size=N_PROMPTS, num_generations=N_SAMPLES, max_new_tokens=NEW_TOKENS,
                     temperature=1.0, micro_batch_size=a.micro_batch_size, warmup_ratio=0.0, eval_fraction=0.0,
                     quiet=True, tensorboard=False, save_steps=10**9, eval_steps=10**9, seed=0,
                     **algo_settings, **settings)
    t0 = time.perf_counter()
    train(cfg, log=lambda *x: None)
    wall = time.perf_counter() - t0
    steps = [m for m in read_metrics(cfg.output_dir) if "time/step_s" in m][1:]
    mean = lambda k: sum(m[k] for m in steps) / len(steps)  # noqa: E731
    return {"step_s": mean("time/step_s"), "generate_s": mean("rollout/generate_s"), **peak_memory(),
            "wall_s": wall, "folder": cfg.output_dir, "scratch": str(tmp), "settings": {**algo_settings, **settings}}


def run_trl(a, algo: str) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    torch.manual_seed(0)
    model, tok = hf_model(a.model)
    ds = Dataset.from_list([{"prompt": p} for p in prompts(N_PROMPTS * a.steps)])
    out = tempfile.mkdtemp(prefix=f"bench-{algo}-trl-")
    Config, Trainer = (GRPOConfig, GRPOTrainer) if algo == "grpo" else (RLOOConfig, RLOOTrainer)
    extra = dict(beta=0.0, loss_type="dapo") if algo == "grpo" else dict(beta=RLOO_BETA)
    args = Config(output_dir=out, per_device_train_batch_size=16, gradient_accumulation_steps=4,
                  num_generations=N_SAMPLES, max_completion_length=NEW_TOKENS, learning_rate=1e-6,
                  lr_scheduler_type="linear", max_steps=a.steps, logging_steps=1, save_strategy="no", report_to=[],
                  use_cpu=use_cpu(a.device), seed=0, temperature=1.0, disable_tqdm=True, **extra)
    trainer = Trainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)
    times, wall, peak = train_trl(trainer, tok, out)
    return {"step_s": sum(times[1:]) / len(times[1:]), **peak_memory(), "peak_rss_gb": peak, "wall_s": wall,
            "folder": out,
            "scratch": out, "settings": {"dtype": "float32", **extra}}


def held_out(a, folders: list[str]) -> list[dict]:
    """Mean reward of 4 sampled replies to each held-out prompt, for the start model and then each folder."""
    import torch

    from chatrlhf.config import ModelArgs
    from chatrlhf.engine import Engine, SamplingParams
    from chatrlhf.models import load_model

    held = prompts(N_PROMPTS * a.steps + a.eval_prompts)[N_PROMPTS * a.steps:]
    out = []
    for folder in [a.model, *folders]:
        model, tok = load_model(ModelArgs(model=folder, dtype="auto", device=a.device))
        model.eval()
        where = next(model.parameters()).device  # the draws' stream lives where the model does (CPU: as before)
        done = Engine(model, tok, "auto").generate(held, SamplingParams(NEW_TOKENS, 1.0, n=N_SAMPLES),
                                                    generator=torch.Generator(where).manual_seed(1))
        scores = reward([c.text for c in done])
        out.append({"held_out_reward": sum(scores) / len(scores)})
    return out


def child(side: str, a, folders: list[str] = ()) -> dict:
    return run_side(__file__, side, ["--steps", str(a.steps), "--eval-prompts", str(a.eval_prompts), "--lora-r",
                                     str(a.lora_r), "--lora-lr", str(a.lora_lr), "--micro-batch-size",
                                     str(a.micro_batch_size), "--model", a.model, "--device", a.device, *folders])


# row name → (algorithm, tool, label)
ROWS = {"grpo-ours": ("grpo", "ours", "chatrlhf GRPO, recommended"), "grpo-exact": ("grpo", "exact",
        "chatrlhf GRPO, TRL's settings"), "grpo-trl": ("grpo", "trl", "TRL GRPOTrainer"),
        "rloo-ours": ("rloo", "ours", "chatrlhf RLOO, recommended"), "rloo-exact": ("rloo", "exact",
        "chatrlhf RLOO, TRL's settings"), "rloo-trl": ("rloo", "trl", "TRL RLOOTrainer")}


def selected(a) -> list[str]:
    keep = []
    for name, (algo, tool, _) in ROWS.items():
        if (algo == "rloo" and a.skip_rloo) or (tool == "exact" and not a.exact):
            continue
        if a.only is None or (a.only == "trl") == (tool == "trl"):
            keep.append(name)
    return keep


def report(a, rows: dict) -> dict:
    start = rows.pop("start")
    mem = "peak GPU GB" if any("peak_gpu_gb" in r for r in rows.values()) else "peak RSS GB"
    print(f"{'':32}{'s/step':>8}{'generate s':>12}{mem:>13}{'held-out reward':>17}")
    print(f"{'start model':32}{'':>8}{'':>12}{'':>13}{start['held_out_reward']:>17.3f}")
    for name, r in rows.items():
        gen = f"{r['generate_s']:.1f}" if "generate_s" in r else "—"
        print(f"{ROWS[name][2]:32}{r['step_s']:>8.1f}{gen:>12}{peak_gb(r):>13.2f}{r['held_out_reward']:>17.3f}")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "settings": vars(a), "prompts": str(HH),
              "load_average": os.getloadavg(), "start_held_out_reward": start["held_out_reward"], "rows": rows}
    for name, r in rows.items():
        algo, tool, label = ROWS[name]
        trl = rows.get(f"{algo}-trl")
        if tool != "trl" and trl:
            ratio = r["step_s"] / trl["step_s"]
            result[f"{name}_time_ratio"] = ratio
            print(f"{label}: {ratio:.2f}× TRL's step time at {peak_gb(r):.2f} GB {mem[:-3]} "
                  f"({peak_gb(r) / peak_gb(trl):.2f}× TRL's)"
                  + (" — goal ≤ 0.33× at ≤ 2.5 GB" if tool == "ours" else ""))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="steps per row; the first is not timed")
    p.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts (× 4 replies) for the reward")
    p.add_argument("--lora-r", type=int, default=16, help="chatrlhf recommended rows: LoRA rank (0 = full)")
    p.add_argument("--lora-lr", type=float, default=1e-4, help="chatrlhf recommended rows: learning rate")
    p.add_argument("--micro-batch-size", type=int, default=8, help="chatrlhf: replies per forward/backward")
    p.add_argument("--skip-rloo", action="store_true", help="GRPO rows only")
    p.add_argument("--model", default="smollm2-135m", help="every row (tiny-random-llama: a quick smoke run)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="every row: auto = CUDA when present (peak memory is then the GPU's), else CPU")
    comparison_args(p)
    p.add_argument("--side", help=argparse.SUPPRESS)
    a = p.parse_args()
    if not HH.is_file():
        sys.exit(f"{HH} not found: this benchmark needs ../shared/data")
    if a.side:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        if a.side == "eval":
            print(json.dumps(held_out(a, a.folders)))
        else:
            algo, tool, _ = ROWS[a.side]
            print(json.dumps(run_trl(a, algo) if tool == "trl" else run_ours(a, algo, tool == "exact")))
        return
    rows = {name: child(name, a) for name in selected(a)}
    start, *evals = child("eval", a, [r["folder"] for r in rows.values()])
    for r, ev in zip(rows.values(), evals):
        r.update(ev)
        if not a.keep:
            shutil.rmtree(r.pop("scratch"), ignore_errors=True)
    result = report(a, {"start": start, **rows})
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"grpo{'' if a.only is None else '-' + a.only}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
