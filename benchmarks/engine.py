"""The generation engine against `model.generate` and against the hardware, in one run on the same prompts.

    .venv/bin/python benchmarks/engine.py [--tokens 32] [--batches 1,8,64] [--requests 32] [--repeats 2] [--threads 1]

For each batch size: `model.generate` (pure sampling, temperature 1, top-k 0, top-p 1, every reply ``--tokens``
long: min_new_tokens there, ignore_eos here, so both make the same number of tokens), then `Engine.generate`,
each `--repeats` times, alternating; the best of each and the spread of the ratio are printed.

The hardware limit is the lesser of a matmul rate measured in the same run (bf16 where the CPU has a bf16 fast
path, else fp32; printed) over the model's FLOPs per token (2 × parameters + attention over the mean context; the
prompt's tokens count as work) and the copy bandwidth measured in the same run over the weight bytes read once per
decoding step of B rows (batch 1 is memory-bound); the fraction of it shows what is left.

Continuous batching: ``--requests`` requests arrive over the run (one every quarter of a batch-1 request's time)
at an engine running its step loop in the background; throughput and mean latency (arrival → last token) are set
against the same requests served one at a time by `model.generate` (its batch-1 service time measured above, the
queue computed). The model is the embedded SmolLM2-135M-Instruct. About 4 minutes on 2 cores. Writes
benchmarks/results/engine.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

from chatrlhf.config import ModelArgs
from chatrlhf.data import load_prompts
from chatrlhf.data.template import render
from chatrlhf.engine import Engine, SamplingParams
from chatrlhf.models import autocast, count_parameters, cpu_has_bf16, load_model, use_bf16

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from sft import machine  # noqa: E402


def matmul_flops(dtype: torch.dtype, n: int = 1024, seconds: float = 2.0) -> float:
    """FLOP/s of an n × n matmul in ``dtype`` (best of as many as fit in ``seconds``)."""
    a = torch.randn(n, n).to(dtype)
    a @ a
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def memory_bandwidth(mb: int = 256, seconds: float = 1.0) -> float:
    """Bytes/s of a large copy (read + write), best of as many as fit in ``seconds``."""
    a = torch.empty(mb * 2 ** 18)
    b = torch.empty_like(a)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best


def limit(model, a, B: int, prompt_len: float, peak: float, bandwidth: float, bytes_per_param: int) -> float:
    """Tokens/s the hardware allows at batch B: the lesser of compute (prompt and reply tokens through every weight,
    at the measured matmul rate) and memory (every weight read once per decoding step of B rows)."""
    compute = peak * a.tokens / ((prompt_len + a.tokens) * flops_per_token(model, prompt_len + a.tokens / 2))
    memory = B * bandwidth / (count_parameters(model)[0] * bytes_per_param)
    return min(compute, memory)


def flops_per_token(model, context: float) -> float:
    """2 × parameters (every weight one multiply-add) + attention: QKᵀ and AV over ``context`` keys per layer."""
    c = model.config
    return 2 * count_parameters(model)[0] + 4 * c.num_hidden_layers * c.hidden_size * context


def hf_generate(model, tok, prompts, tokens: int, dtype: str) -> tuple[int, float]:
    tok.padding_side = "left"
    enc = tok([render(tok, p, add_generation_prompt=True) for p in prompts], return_tensors="pt", padding=True,
              add_special_tokens=False)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(dtype, torch.device("cpu")):
        ids = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=tokens,
                             min_new_tokens=tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    seconds = time.perf_counter() - t0
    return ids[:, enc["input_ids"].shape[1]:].numel(), seconds


def engine_generate(model, tok, prompts, tokens: int, dtype: str) -> tuple[int, float]:
    engine = Engine(model, tok, dtype)
    t0 = time.perf_counter()
    out = engine.generate(prompts, SamplingParams(max_tokens=tokens, temperature=1.0, ignore_eos=True),
                          generator=torch.Generator().manual_seed(0))
    return sum(len(c.token_ids) for c in out), time.perf_counter() - t0


def run_batches(model, tok, prompts, a) -> dict:
    rows = {}
    for B in a.batches:
        batch = [prompts[i % len(prompts)] for i in range(B)]
        runs = {"generate": [], "engine": []}
        for _ in range(a.repeats):
            for name, fn in (("generate", hf_generate), ("engine", engine_generate)):
                n, s = fn(model, tok, batch, a.tokens, a.dtype)
                runs[name].append(n / s)
                print(f"  batch {B:>3} {name:9} {n:>5} tokens {s:7.1f} s {n / s:7.1f} tok/s", flush=True)
        ratios = [e / g for e, g in zip(runs["engine"], runs["generate"])]
        rows[B] = {"generate": max(runs["generate"]), "engine": max(runs["engine"]), "ratio_min": min(ratios),
                   "ratio_max": max(ratios), "runs": runs}
    return rows


def continuous(model, tok, prompts, a, gap: float) -> dict:
    """``a.requests`` requests, one every ``gap`` seconds, at an engine stepping in the background."""
    engine = Engine(model, tok, a.dtype).start()
    engine.generator = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=a.tokens, temperature=1.0, ignore_eos=True)
    done, lock = [], threading.Lock()

    def ask(prompt, arrival):
        r = engine.submit(prompt, params).wait()
        with lock:
            done.append((arrival, time.perf_counter(), len(r.token_ids)))

    t0 = time.perf_counter()
    threads = []
    for i in range(a.requests):
        time.sleep(max(0.0, t0 + i * gap - time.perf_counter()))
        threads.append(threading.Thread(target=ask, args=(prompts[i % len(prompts)], time.perf_counter())))
        threads[-1].start()
    for t in threads:
        t.join()
    engine.stop()
    wall = max(f for _, f, _ in done) - t0
    return {"tokens_per_s": sum(n for *_, n in done) / wall, "mean_latency_s": sum(f - s for s, f, _ in done) / len(done),
            "wall_s": wall, "gap_s": gap}


def one_at_a_time(service_s: float, tokens_per_request: float, n: int, gap: float) -> dict:
    """The same arrivals served one at a time, each taking ``service_s`` (a FIFO queue, computed)."""
    free, latencies = 0.0, []
    for i in range(n):
        start = max(i * gap, free)
        free = start + service_s
        latencies.append(free - i * gap)
    return {"tokens_per_s": n * tokens_per_request / free, "mean_latency_s": sum(latencies) / n, "wall_s": free}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32, help="max new tokens per reply")
    p.add_argument("--batches", default="1,8,64", help="batch sizes")
    p.add_argument("--requests", type=int, default=32, help="staggered requests for continuous batching")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side per batch size (best kept, spread shown)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    a = p.parse_args()
    a.batches = [int(x) for x in a.batches.split(",")]
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(ModelArgs(dtype=a.dtype))
    model.eval()
    prompts = load_prompts(str(ROOT / "examples" / "prompts.txt"), "auto")
    bf16 = use_bf16(a.dtype, torch.device("cpu"))
    kind = "bf16" if bf16 else "fp32"
    peak = matmul_flops(torch.bfloat16 if bf16 else torch.float32)
    bandwidth = memory_bandwidth()
    prompt_len = sum(len(Engine(model, tok).encode(x)) for x in prompts) / len(prompts)
    limits = {B: limit(model, a, B, prompt_len, peak, bandwidth, 2 if bf16 else 4) for B in a.batches + [a.requests]}
    print(f"{machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; CPU bf16 fast path: "
          f"{cpu_has_bf16()} → decoding in {kind}; {kind} matmul {peak / 1e9:.0f} GFLOP/s, copy "
          f"{bandwidth / 1e9:.1f} GB/s; prompts {prompt_len:.0f} tokens on average", flush=True)
    rows = run_batches(model, tok, prompts, a)
    b1 = rows.get(1) or next(iter(rows.values()))
    service = a.tokens / b1["generate"]        # seconds per request for model.generate at batch 1
    gap = a.tokens / b1["engine"] / 4          # arrivals overlap: four requests per engine batch-1 request time
    cont = continuous(model, tok, prompts, a, gap)
    seq = one_at_a_time(service, cont["tokens_per_s"] * cont["wall_s"] / a.requests, a.requests, gap)
    print(f"\n{'':22}{'generate':>10}{'engine':>10}{'ratio':>8}{'spread':>14}{'limit':>8}{'of limit':>10}   (tokens/s)")
    for B, r in rows.items():
        r["limit"] = limits[B]
        print(f"{'batch ' + str(B):22}{r['generate']:>10.1f}{r['engine']:>10.1f}{r['engine'] / r['generate']:>7.2f}×"
              f"{r['ratio_min']:>8.2f}–{r['ratio_max']:.2f}{limits[B]:>8.0f}{r['engine'] / limits[B]:>9.1%}")
    cont["limit"] = limits[a.requests]   # all requests in one batch: an upper bound for staggered arrivals
    print(f"{'continuous, ' + str(a.requests) + ' req':22}{seq['tokens_per_s']:>10.1f}{cont['tokens_per_s']:>10.1f}"
          f"{cont['tokens_per_s'] / seq['tokens_per_s']:>7.2f}×{'':14}{cont['limit']:>8.0f}"
          f"{cont['tokens_per_s'] / cont['limit']:>9.1%}")
    print(f"mean latency: engine {cont['mean_latency_s']:.1f} s, generate one at a time {seq['mean_latency_s']:.1f} s "
          f"(a request every {gap:.2f} s; the one-at-a-time queue computed from generate's batch-1 time)")
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
              "decoding_dtype": kind, "matmul_flops": peak, "copy_bytes_per_s": bandwidth, "prompt_tokens": prompt_len,
              "tokens": a.tokens,
              "batches": rows, "continuous": cont, "one_at_a_time": seq}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
