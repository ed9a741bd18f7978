"""SFT speed and memory: chatrlhf vs TRL's SFTTrainer on the same data, model, batch and steps.

    .venv/bin/pip install -e '.[bench]'        # TRL 1.16
    .venv/bin/python benchmarks/sft.py [--steps 10] [--batch-size 8] [--data examples/dialogue_history.csv]

Each side runs in its own child process (one after the other, in this one run) so that its peak RSS
is its own. Both train on the final reply of each dialogue (TRL: conversational prompt-completion,
completion-only loss; chatrlhf: seed-CSV rows learn the `responses` column), fp32 master weights,
AdamW, cosine schedule, lr 2e-5, no eval, no checkpoints. Tokens/s counts non-padding tokens over
the steps after the first (warm-up) step. Prints both figures and the ratios; writes
benchmarks/results/sft.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step_times(trainer) -> list[float]:
    """The wall time of each optimizer step of a transformers Trainer, appended while it trains."""
    from transformers import TrainerCallback

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            cuda_sync()
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            cuda_sync()  # on a GPU the step's kernels are still queued here: time them, not their launch
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Timer())
    return times


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def cuda_used() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()


def cuda_sync() -> None:
    if cuda_used():
        sys.modules["torch"].cuda.synchronize()


def peak_memory() -> dict:
    """Peak RSS; where this process used the GPU, also the peak of its tensors there (torch.cuda.max_memory_allocated),
    the figure that counts on a GPU."""
    out = {"peak_rss_gb": peak_rss_gb()}
    if cuda_used():
        out["peak_gpu_gb"] = sys.modules["torch"].cuda.max_memory_allocated() / 1024**3
    return out


def peak_gb(row: dict) -> float:
    """The memory figure to compare: GPU peak where there is one, else peak RSS."""
    return row.get("peak_gpu_gb", row["peak_rss_gb"])


def use_cpu(device: str) -> bool:
    """TRL's ``use_cpu`` for a benchmark's --device (auto: CUDA when present, as chatrlhf picks)."""
    import torch

    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def hf_model(name: str):
    """(model, tokenizer) for TRL, fp32: from_pretrained for the embedded model or a folder; chatrlhf's builders for a
    tiny random model (it has no folder to read)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatrlhf.models import TINY, load_tokenizer, resolve_model, tiny_model

    path = resolve_model(name)
    if path in TINY:
        tok = load_tokenizer(name)
        return tiny_model(name, tok), tok
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def run_ours(a) -> dict:
    from chatrlhf.config import SFTConfig
    from chatrlhf.logger import read_metrics
    from chatrlhf.trainers.sft import train

    out = tempfile.mkdtemp(prefix="bench-sft-ours-")
    cfg = SFTConfig(model=a.model, data=[a.data], output_dir=out, max_steps=a.steps, batch_size=a.batch_size,
                    lr=2e-5, warmup_ratio=0.0, eval_fraction=0.0, eval_steps=10**9, save_steps=10**9,
                    max_length=a.max_length, quiet=True, tensorboard=False, dtype=a.dtype, seed=0,
                    gradient_checkpointing=a.gradient_checkpointing, device=a.device)
    t0 = time.perf_counter()
    train(cfg, log=lambda *x: None)
    total = time.perf_counter() - t0
    steps = [m for m in read_metrics(out) if "train/loss" in m][1:]  # drop the warm-up step
    tokens, secs = tokens_and_time(steps)
    return {"tokens_per_s": tokens / secs, "step_s": secs / len(steps), **peak_memory(), "wall_s": total,
            "loss_first": steps[0]["train/loss"], "loss_last": steps[-1]["train/loss"]}


def tokens_and_time(steps: list[dict]) -> tuple[float, float]:
    tokens = sum(m["train/tokens"] for m in steps)
    secs = sum(m["train/step_s"] for m in steps)
    return tokens, secs


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from chatrlhf.data import as_conversations, load_records

    torch.manual_seed(0)
    model, tok = hf_model(a.model)
    convs = as_conversations(load_records(a.data))
    ds = Dataset.from_list([{"prompt": c.messages[:-1], "completion": c.messages[-1:]} for c in convs])
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="bench-sft-trl-"), per_device_train_batch_size=a.batch_size,
                     max_steps=a.steps, learning_rate=2e-5, lr_scheduler_type="cosine", warmup_steps=0,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=use_cpu(a.device), seed=0,
                     max_length=a.max_length, bf16=a.dtype == "bfloat16", dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    counted = []
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        counted.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else
                       int((batch["input_ids"] != tok.pad_token_id).sum()))
        return batch

    trainer.data_collator = counting
    times = step_times(trainer)
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": sum(counted[1:a.steps]) / sum(times[1:]), "step_s": sum(times[1:]) / len(times[1:]),
            **peak_memory(), "wall_s": total,
            "loss_first": losses[1], "loss_last": losses[-1]}


def child(side: str, a) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
           "--data", a.data, "--model", a.model, "--max-length", str(a.max_length), "--dtype", a.dtype,
           "--device", a.device,
           "--gradient-checkpointing" if a.gradient_checkpointing else "--no-gradient-checkpointing"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{side} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data", default=str(ROOT / "examples" / "dialogue_history.csv"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="chatrlhf side only (TRL's SFTTrainer turns it on by default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="both sides: auto = CUDA when present (peak memory is then the GPU's), else CPU")
    p.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(run_ours(a) if a.side == "ours" else run_trl(a)))
        return
    ours, trl = child("ours", a), child("trl", a)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "settings": vars(a), "chatrlhf": ours,
              "trl": trl, "speed_ratio": ours["tokens_per_s"] / trl["tokens_per_s"],
              "memory_ratio": peak_gb(ours) / peak_gb(trl)}
    mem = "peak GPU GB" if "peak_gpu_gb" in ours else "peak RSS GB"
    print(f"{'':10}{'tokens/s':>10}{mem:>13}{'loss first→last':>20}")
    for name, r in (("chatrlhf", ours), ("TRL", trl)):
        print(f"{name:10}{r['tokens_per_s']:>10.1f}{peak_gb(r):>13.2f}{r['loss_first']:>12.3f}"
              f" → {r['loss_last']:.3f}")
    print(f"ratio: {result['speed_ratio']:.2f}× TRL's tokens/s at {result['memory_ratio']:.2f}× its {mem[:-3]} "
          f"(goal ≥ 1.5× at ≤ 1.0×)")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft.json").write_text(json.dumps(result, indent=2) + "\n")




def train_trl(trainer, tok, out: str) -> tuple[list[float], float, float]:
    """Train a TRL trainer and save it with its tokenizer to ``out``: (per-step times, wall seconds, peak RSS GB)."""
    times = step_times(trainer)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    peak = peak_rss_gb()
    trainer.save_model(out)
    tok.save_pretrained(out)
    return times, wall, peak

def run_side(script: str, side: str, args: list[str]) -> dict:
    """One row of a side-by-side benchmark: ``script --side SIDE ARGS`` in a child process (so its peak RSS is its
    own), offline; the row is the JSON object on its last line of output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run([sys.executable, script, "--side", side, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{side} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def comparison_args(p: argparse.ArgumentParser) -> None:
    """The options every chatrlhf-vs-TRL benchmark takes (benchmarks/dpo.py, grpo.py)."""
    p.add_argument("--only", choices=("ours", "trl"), help="run one tool's rows only")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                   help="also run chatrlhf with TRL's exact settings (full fp32)")
    p.add_argument("--keep", action="store_true", help="keep the trained folders (in the temporary directory)")
    p.add_argument("folders", nargs="*", help=argparse.SUPPRESS)

def machine() -> str:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} cores{gpu}, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
