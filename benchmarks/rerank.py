"""The cost of reranking at generation time: scoring N candidates vs generating them (issue 19: goal ≤ 1.5×).

    .venv/bin/python benchmarks/rerank.py [--prompts 16] [--candidates 8] [--tokens 64] [--repeats 2] [--threads 1]
                                          [--q DIR] [--rm DIR] [--dtype auto]

On the embedded SmolLM2-135M-Instruct: ``--candidates`` replies of ``--tokens`` new tokens each (the deployment
decoding of `chatrlhf generate`: T 0.7, top-k 100, repetition penalty 1.2; EOS ignored so that every reply is
``--tokens`` long, unless --stop-at-eos) for the first ``--prompts`` histories of examples/dialogue_history.csv, through
the one engine (SamplingParams.n: one prefill per history). Then the same candidates are scored

  * q:DIR — Q_1 on φ from the policy itself (the served model reused as the φ trunk: rerank.load_reranker); without
    --q, heads are saved under out/bench-rerank/q (random weights: the cost does not depend on them);
  * rm:DIR — a SmolLM2-135M reward model; without --rm one is trained for a few steps under out/bench-rerank/rm with
    `chatrlhf reward train` on examples/ data (its quality does not matter here, only its size).

Each measurement is repeated ``--repeats`` times, alternating, and the best is kept. Prints seconds and the ratios
(generate + rerank) / generate and rerank / generate; writes benchmarks/results/rerank.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from chatrlhf.config import GenerateArgs, ModelArgs
from chatrlhf.data import load_prompts
from chatrlhf.engine import Engine
from chatrlhf.generation import sampling_params
from chatrlhf.models import load_model, unwrap, use_bf16
from chatrlhf.qnet import QHeads, save_qheads
from chatrlhf.rerank import load_reranker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from sft import machine  # noqa: E402

MODEL = "smollm2-135m"
WORK = ROOT / "out" / "bench-rerank"


def q_folder(model, given: str) -> Path:
    if given:
        return Path(given)
    out = WORK / "q"
    if not (out / "qheads.safetensors").is_file():
        torch.manual_seed(0)
        save_qheads(QHeads(unwrap(model).config.hidden_size), out, MODEL, "last")
    return out


def rm_folder(given: str) -> Path:
    if given:
        return Path(given)
    out = WORK / "rm"
    if not (out / "config.json").is_file():
        print(f"training a throw-away SmolLM2-135M reward model under {out} (2 steps on 24 pairs) ...", flush=True)
        pairs = WORK / "pairs.jsonl"
        pairs.parent.mkdir(parents=True, exist_ok=True)
        lines = (ROOT / "examples" / "preferences.jsonl").read_text().splitlines()
        pairs.write_text("\n".join(lines[::len(lines) // 24][:24]) + "\n")  # spread over the prompts
        subprocess.run([sys.executable, "-m", "chatrlhf.cli", "reward", "train", "--model", MODEL, "--output-dir",
                        str(out), "--data", str(pairs), "--max-steps", "2", "--batch-size", "2", "--train-layers", "1",
                        "--eval-fraction", "0.25", "--quiet", "--no-tensorboard"], check=True, cwd=ROOT)
    return out


def best_time(fn, repeats: int):
    """(best seconds, the last result) of ``repeats`` calls."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--stop-at-eos", action="store_true", help="let replies end at EOS (shorter, as in use)")
    ap.add_argument("--q", default="", help="a `chatrlhf qlearn` output folder (default: random heads)")
    ap.add_argument("--rm", default="", help="a `chatrlhf reward train` folder (default: train a throw-away one)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    histories = load_prompts(str(ROOT / "examples" / "dialogue_history.csv"), "auto")[:a.prompts]
    model, tok = load_model(ModelArgs(model=MODEL, dtype=a.dtype))
    model.eval()
    engine = Engine(model, tok, a.dtype)
    params = dataclasses.replace(sampling_params(GenerateArgs(max_new_tokens=a.tokens)), n=a.candidates,
                                 ignore_eos=not a.stop_at_eos)
    rerankers = {"q": load_reranker(f"q:{q_folder(model, a.q)}", model, tok, policy_name=MODEL, dtype=a.dtype,
                                    max_reply_length=a.tokens + 1),
                 "rm": load_reranker(f"rm:{rm_folder(a.rm)}", dtype=a.dtype, device="cpu")}
    for name, r in rerankers.items():
        print(f"{name}: {r.describe}")

    def generate():
        torch.manual_seed(0)
        texts = [c.text.strip() for c in engine.generate(histories, params)]
        return [texts[i * a.candidates:(i + 1) * a.candidates] for i in range(len(histories))]

    times = {"generate": float("inf"), "q": float("inf"), "rm": float("inf")}
    groups = None
    for _ in range(a.repeats):  # alternate, so that a slow spell of the shared machine hits all alike
        t, groups = best_time(generate, 1)
        times["generate"] = min(times["generate"], t)
        for name, r in rerankers.items():
            times[name] = min(times[name], best_time(lambda: r.pick_each(histories, groups), 1)[0])
    n_tokens = sum(len(tok(y, add_special_tokens=False)["input_ids"]) for g in groups for y in g)
    result = {"machine": machine(), "threads": a.threads, "bf16": use_bf16(a.dtype, torch.device("cpu")),
              "prompts": len(histories), "candidates": a.candidates, "max_new_tokens": a.tokens,
              "stop_at_eos": a.stop_at_eos, "reply_tokens_mean": n_tokens / (len(histories) * a.candidates),
              "seconds": times,
              "ratio_total": {k: (times["generate"] + times[k]) / times["generate"] for k in ("q", "rm")},
              "ratio_scoring": {k: times[k] / times["generate"] for k in ("q", "rm")}}
    print(f"{len(histories)} histories × {a.candidates} candidates × {a.tokens} tokens "
          f"(mean reply {result['reply_tokens_mean']:.1f} tokens), {a.threads} thread(s), bf16 {result['bf16']}")
    print(f"generate      {times['generate']:7.2f} s")
    for k in ("q", "rm"):
        print(f"rerank {k:<6} {times[k]:7.2f} s   scoring / generating {result['ratio_scoring'][k]:.3f}   "
              f"(generate + rerank) / generate {result['ratio_total'][k]:.3f}")
    out = ROOT / "benchmarks" / "results" / "rerank.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
