"""DPO speed, memory and held-out result: chatrlhf dpo vs TRL's DPOTrainer on the same pairs, model and settings.

    .venv/bin/pip install -e '.[bench]'        # TRL 1.16
    .venv/bin/python benchmarks/dpo.py [--train-pairs 64] [--eval-pairs 100] [--only ours|trl] [--no-exact]

Pairs: the short single-turn HH-RLHF helpful-base pairs of benchmarks/reward.py (prompt and replies 8–60 tokens,
one pair per prompt): the first --train-pairs train, the next --eval-pairs (other prompts) are held out.
Settings (TOOLING.md's reference run): SmolLM2-135M, batch 8, one epoch, β 0.1, sigmoid loss, lr 1e-6 (TRL's
default) annealed linearly to 0, no warm-up, seed 0. Rows:
  * TRL DPOTrainer: its defaults — full fine-tuning in fp32, a separate fp32 reference model, gradient checkpointing;
  * chatrlhf, TRL's settings: full fine-tuning in fp32, gradient checkpointing (the reference log-probs computed once
    before training, as chatrlhf always does);
  * chatrlhf, recommended for a 2-core CPU: bf16 autocast (`--dtype auto`, fp32 master weights and loss), the top
    --train-layers blocks trained (default 8), gradient checkpointing on, as `chatrlhf dpo` defaults to (the peak
    RSS: 1.78 GB against 2.27 GB without, for 15% fewer pairs/s; --no-rec-checkpointing to turn it off).
Each row runs in its own child process, one after the other in this one run, so each peak RSS is its own; pairs/s
is over the optimizer steps after the first (warm-up); wall is the whole training call (ours: with its reference pass).
The held-out result is computed by one more child with the same code for every saved folder: log-probs of the
held-out chosen and rejected replies (fp32, chatrlhf's chat-template tokenisation) under the trained model and under
the start model (the reference); margin = β·(Δ log-ratio chosen − Δ log-ratio rejected); accuracy = share of pairs
with margin > 0. Prints the table and the ratios; writes benchmarks/results/dpo.json (dpo-ours.json / dpo-trl.json
with --only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reward import HH, bench_pairs  # noqa: E402
from sft import comparison_args, machine, peak_rss_gb, run_side, train_trl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH, BETA = 8, 0.1


def pair_rows(pairs) -> str:
    return "".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in pairs)


def run_ours(a, exact: bool) -> dict:
    from chatrlhf.config import DPOConfig
    from chatrlhf.logger import read_metrics
    from chatrlhf.trainers.dpo import train

    train_pairs, _ = bench_pairs(a.train_pairs, a.eval_pairs)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    data = tmp / "train.jsonl"
    data.write_text(pair_rows(train_pairs))
    settings = dict(dtype="float32", train_layers=-1, gradient_checkpointing=True) if exact else \
        dict(dtype="auto", train_layers=a.train_layers, gradient_checkpointing=a.rec_checkpointing)
    cfg = DPOConfig(model="smollm2-135m", data=[str(data)], output_dir=str(tmp / "dpo"), batch_size=BATCH, epochs=1,
                    lr=a.lr, warmup_ratio=0.0, beta=BETA, loss_type="sigmoid", eval_fraction=0.0, quiet=True,
                    tensorboard=False, save_steps=10**9, eval_steps=10**9, seed=0, **settings)
    lines: list[str] = []
    t0 = time.perf_counter()
    train(cfg, log=lambda *x: lines.append(" ".join(map(str, x))))
    wall = time.perf_counter() - t0
    steps = [m for m in read_metrics(cfg.output_dir) if "train/pairs_per_s" in m][1:]
    step_s = sum(BATCH / m["train/pairs_per_s"] for m in steps)
    ref_s = float(re.search(r"reference log-probs ready in ([0-9.]+) s", "\n".join(lines))[1])
    # the reference pass is work TRL does inside its steps: the second figure charges its share to the timed steps
    return {"pairs_per_s": len(steps) * BATCH / step_s, "reference_s": ref_s,
            "pairs_per_s_with_reference": len(steps) * BATCH / (step_s + ref_s * len(steps) / (len(steps) + 1)),
            "peak_rss_gb": peak_rss_gb(), "wall_s": wall, "folder": cfg.output_dir, "scratch": str(tmp),
            "settings": settings}


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from chatrlhf.models import resolve_model

    train_pairs, _ = bench_pairs(a.train_pairs, a.eval_pairs)
    torch.manual_seed(0)
    path = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ds = Dataset.from_list([{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in train_pairs])
    out = tempfile.mkdtemp(prefix="bench-dpo-trl-")
    args = DPOConfig(output_dir=out, per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=a.lr,
                     lr_scheduler_type="linear", warmup_steps=0, beta=BETA, loss_type=["sigmoid"], logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    times, wall, peak = train_trl(trainer, tok, out)
    return {"pairs_per_s": BATCH * len(times[1:]) / sum(times[1:]), "peak_rss_gb": peak, "wall_s": wall,
            "folder": out, "scratch": out, "settings": {"dtype": "float32", "reference": "separate fp32 model"}}


def held_out(a, folders: list[str]) -> list[dict]:
    """Margin accuracy and mean margin of each folder on the held-out pairs, against the start model, all in fp32."""
    import torch

    from chatrlhf.config import ModelArgs
    from chatrlhf.models import load_model
    from chatrlhf.preference import all_logps, encode_reply

    _, eval_pairs = bench_pairs(a.train_pairs, a.eval_pairs)

    def logps(name: str) -> torch.Tensor:
        model, tok = load_model(ModelArgs(model=name, dtype="float32"))
        items = [encode_reply(tok, p.prompt, p.chosen, 512)[0] for p in eval_pairs] + \
            [encode_reply(tok, p.prompt, p.rejected, 512)[0] for p in eval_pairs]
        return all_logps(model, items, 16, tok.pad_token_id, "cpu", "float32").view(2, -1)  # (2, N)

    start = logps("smollm2-135m")
    out = []
    for folder in folders:
        ratio = logps(folder) - start
        margin = BETA * (ratio[0] - ratio[1])
        out.append({"held_out_accuracy": float((margin > 0).float().mean()), "held_out_margin": float(margin.mean())})
    return out


def child(side: str, a, folders: list[str] = ()) -> dict:
    return run_side(__file__, side, ["--train-pairs", str(a.train_pairs), "--eval-pairs", str(a.eval_pairs),
                                     "--train-layers", str(a.train_layers), "--lr", str(a.lr),
                                     "--rec-checkpointing" if a.rec_checkpointing else "--no-rec-checkpointing",
                                     *folders])


ROWS = {"ours": "chatrlhf, recommended", "exact": "chatrlhf, TRL's settings", "trl": "TRL DPOTrainer"}


def report(a, rows: dict) -> dict:
    print(f"{'':27}{'pairs/s':>9}{'incl. ref':>11}{'peak RSS GB':>13}{'wall s':>8}{'held-out acc':>14}{'margin':>10}")
    for key, r in rows.items():
        with_ref = f"{r['pairs_per_s_with_reference']:.2f}" if "reference_s" in r else "—"
        print(f"{ROWS[key]:27}{r['pairs_per_s']:>9.2f}{with_ref:>11}{r['peak_rss_gb']:>13.2f}{r['wall_s']:>8.0f}"
              f"{r['held_out_accuracy']:>14.3f}{r['held_out_margin']:>10.4f}")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "settings": vars(a), "load_average":
              os.getloadavg(), **{f"chatrlhf_{k}" if k != "trl" else "trl": v for k, v in rows.items()}}
    if "trl" in rows:
        trl = rows["trl"]
        for key in ("ours", "exact"):
            if key in rows:
                speed, mem = rows[key]["pairs_per_s"] / trl["pairs_per_s"], rows[key]["peak_rss_gb"] / trl["peak_rss_gb"]
                result[f"{key}_speed_ratio"], result[f"{key}_memory_ratio"] = speed, mem
                print(f"{ROWS[key]}: {speed:.2f}× TRL's pairs/s at {rows[key]['peak_rss_gb']:.2f} GB peak RSS "
                      f"({mem:.2f}× TRL's)" + (" — goal ≥ 3× at ≤ 2 GB" if key == "ours" else ""))
    print(f"held-out: {a.eval_pairs} pairs; on {a.train_pairs} training pairs at lr {a.lr:g} every model stays near "
          f"the start (accuracy ±{1 / a.eval_pairs ** 0.5:.2f} is noise)")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-pairs", type=int, default=64)
    p.add_argument("--eval-pairs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-6, help="both sides (TRL's default)")
    p.add_argument("--train-layers", type=int, default=8, help="chatrlhf recommended row: train the top N blocks")
    p.add_argument("--rec-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="chatrlhf recommended row: gradient checkpointing (chatrlhf dpo's default)")
    comparison_args(p)
    p.add_argument("--side", choices=("ours", "exact", "trl", "eval"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if not HH.is_file():
        sys.exit(f"{HH} not found: this benchmark needs ../shared/data")
    if a.side:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        out = {"ours": lambda: run_ours(a, False), "exact": lambda: run_ours(a, True), "trl": lambda: run_trl(a),
               "eval": lambda: held_out(a, a.folders)}[a.side]()
        print(json.dumps(out))
        return
    sides = [s for s in ("ours", "exact", "trl") if (a.only in (None, "ours") or s == "trl") and
             (a.only in (None, "trl") or s != "trl") and (a.exact or s != "exact")]
    rows = {s: child(s, a) for s in sides}
    for r, ev in zip(rows.values(), child("eval", a, [r["folder"] for r in rows.values()])):
        r.update(ev)
        if not a.keep:
            shutil.rmtree(r.pop("scratch"), ignore_errors=True)
    result = report(a, rows)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"dpo{'' if a.only is None else '-' + a.only}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
