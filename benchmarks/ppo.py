"""PPO step time and memory: chatrlhf PPO (critic included) vs TRL's GRPOTrainer on the same work,
plus our rollout sampler against `model.generate`.

    .venv/bin/pip install -e '.[bench]'        # TRL 1.16
    .venv/bin/python benchmarks/ppo.py [--steps 3] [--dtype auto] [--lora-r 0] [--critic auto]

Work per step (TOOLING.md): SmolLM2-135M, 16 prompts × 4 samples, 32 new tokens, one pass over the
64 replies (TRL: batch 16 × accumulation 4, β 0, `dapo` loss, HF generate; chatrlhf: 1 PPO epoch
over minibatches of 16 with the clipped value loss on a separate critic, KL penalty against a frozen
reference — more work than GRPO with β 0). Prompts: the first single-turn HH-RLHF helpful-base
prompts; reward: the same Python function on both sides. Each side runs in its own child process,
one after the other in this one run; step time is the mean over the steps after the first. Writes
benchmarks/results/ppo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft import hf_model, machine, peak_gb, peak_memory, step_times, use_cpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# BENCH_PROMPTS: another prompts file where ../shared/data is absent (a GPU machine: benchmarks/gpu/run.py)
HH = Path(os.environ.get("BENCH_PROMPTS")
          or ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz")
N_PROMPTS, N_SAMPLES, NEW_TOKENS = 16, 4, 32


def reward(completions, **_) -> list[float]:
    """Same on both sides: a cheap lexical score (politeness words, minus rambling)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(w in t.lower() for w in ("please", "thank", "sorry", "happy", "help")) - len(t.split()) / 50
            for t in texts]


def ours_reward(prompts, responses):
    return reward(responses)


def prompts(n: int) -> list[list[dict]]:
    from chatrlhf.data import load_records

    out = [r.prompt for r in load_records(HH).records if len(r.prompt) == 1 and len(r.prompt[0]["content"]) < 200]
    return out[:n]


def bf16_on(dtype: str, device: str = "cpu") -> bool:
    from chatrlhf.models import resolve_device, use_bf16

    return use_bf16(dtype, resolve_device(device))


def run_ours(a) -> dict:
    from chatrlhf.config import PPOConfig
    from chatrlhf.logger import read_metrics
    from chatrlhf.trainers.ppo import train

    tmp = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(N_PROMPTS * a.steps)))
    cfg = PPOConfig(model=a.model, device=a.device, data=[str(data)], output_dir=str(tmp / "ppo"),
                    reward_fn=f"{__file__}:ours_reward",
                    max_steps=a.steps, batch_size=N_PROMPTS, samples_per_prompt=N_SAMPLES, minibatch_size=16,
                    ppo_epochs=1, max_new_tokens=NEW_TOKENS, temperature=1.0, eval_fraction=0.0, dtype=a.dtype,
                    lora_r=a.lora_r, lr=1e-4 if a.lora_r else 1e-6, critic=a.critic, quiet=True, tensorboard=False,
                    save_steps=10**9, eval_steps=10**9, seed=0)
    train(cfg, log=lambda *x: None)
    steps = [m for m in read_metrics(cfg.output_dir) if "time/step_s" in m][1:]
    return {"step_s": sum(m["time/step_s"] for m in steps) / len(steps),
            "generate_s": sum(m["rollout/generate_s"] for m in steps) / len(steps),
            "rollout_tokens_per_s": sum(m["rollout/tokens_per_s"] for m in steps) / len(steps),
            **peak_memory()}


def run_sampler(a) -> dict:
    """Our KV-cache sampler against model.generate on the same 64 prompts × 32 tokens (tokens/s)."""
    import torch

    from chatrlhf.config import ModelArgs
    from chatrlhf.models import autocast, load_model
    from chatrlhf.engine import Engine, SamplingParams
    from chatrlhf.rollout import encode_prompts

    model, tok = load_model(ModelArgs(model=a.model, dtype=a.dtype, device=a.device))
    model.eval()
    device = next(model.parameters()).device
    batch = [p for p in prompts(N_PROMPTS) for _ in range(N_SAMPLES)]
    q, qm = encode_prompts(tok, batch, 256, device)
    out = {}
    for name in ("warmup", "chatrlhf", "generate", "chatrlhf", "generate"):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        if name == "generate":
            with torch.no_grad(), autocast(a.dtype, device):
                ids = model.generate(input_ids=q, attention_mask=qm, do_sample=True, top_k=0, top_p=1.0,
                                     temperature=1.0, max_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id)
            new = ids[:, q.shape[1]:]
            eos = (new == tok.eos_token_id).long()
            n = int(((eos.cumsum(1) - eos) == 0).sum())
        else:
            _, mask, _ = Engine(model, tok, a.dtype).sample_tensors(q, qm, SamplingParams(NEW_TOKENS, 1.0))
            n = int(mask.sum())
        out.setdefault(name, []).append(n / (time.perf_counter() - t0))
    return {k: max(v) for k, v in out.items() if k != "warmup"}


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    model, tok = hf_model(a.model)
    ds = Dataset.from_list([{"prompt": p} for p in prompts(N_PROMPTS * a.steps)])
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-grpo-"), per_device_train_batch_size=16,
                      gradient_accumulation_steps=4, num_generations=N_SAMPLES, max_completion_length=NEW_TOKENS,
                      beta=0.0, loss_type="dapo", learning_rate=1e-6, max_steps=a.steps, logging_steps=1,
                      save_strategy="no", report_to=[], use_cpu=use_cpu(a.device), seed=0,
                      bf16=bf16_on(a.dtype, a.device),
                      temperature=1.0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)
    times = step_times(trainer)
    trainer.train()
    return {"step_s": sum(times[1:]) / len(times[1:]), **peak_memory()}


def child(side: str, a) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--steps", str(a.steps), "--dtype", a.dtype, "--lora-r",
           str(a.lora_r), "--critic", a.critic, "--model", a.model, "--device", a.device]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{side} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="steps per side; the first is not timed")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="both sides: bf16 autocast where the CPU has it (auto), or fp32")
    p.add_argument("--lora-r", type=int, default=0, help="chatrlhf side: LoRA rank (0 = full fine-tuning)")
    p.add_argument("--critic", default="policy", help="chatrlhf side: policy | shared (see chatrlhf ppo --help)")
    p.add_argument("--model", default="smollm2-135m", help="both sides (tiny-random-llama: a quick smoke run)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="every side: auto = CUDA when present (peak memory is then the GPU's), else CPU")
    p.add_argument("--side", choices=("ours", "trl", "sampler"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if not HH.is_file():
        sys.exit(f"{HH} not found: this benchmark needs ../shared/data")
    if a.side:
        print(json.dumps({"ours": run_ours, "trl": run_trl, "sampler": run_sampler}[a.side](a)))
        return
    sampler, ours, trl = child("sampler", a), child("ours", a), child("trl", a)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "settings": vars(a), "prompts": str(HH),
              "bf16": bf16_on(a.dtype, a.device), "chatrlhf_ppo": ours, "trl_grpo": trl,
              "sampler_tokens_per_s": sampler,
              "time_ratio": ours["step_s"] / trl["step_s"], "memory_gb": peak_gb(ours)}
    mem = "peak GPU GB" if "peak_gpu_gb" in ours else "peak RSS GB"
    print(f"{'':16}{'s/step':>8}{mem:>13}")
    print(f"{'chatrlhf PPO':16}{ours['step_s']:>8.1f}{peak_gb(ours):>13.2f}")
    print(f"{'TRL GRPO':16}{trl['step_s']:>8.1f}{peak_gb(trl):>13.2f}")
    print(f"ratio: our PPO step takes {result['time_ratio']:.2f}× TRL's GRPO step, {mem[:-3]} {peak_gb(ours):.2f} GB "
          f"({peak_gb(ours) / peak_gb(trl):.2f}× TRL's) — goal ≤ 0.5× and ≤ 3 GB")
    print(f"rollout sampling, 64 × {NEW_TOKENS} tokens: chatrlhf {sampler['chatrlhf']:.0f} tok/s vs model.generate "
          f"{sampler['generate']:.0f} tok/s ({sampler['chatrlhf'] / sampler['generate']:.2f}×)")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppo.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
