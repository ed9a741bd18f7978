"""SFT, PPO and GRPO on a GPU, chatrlhf vs TRL in the same run (issue 24): one prepared script.

    bash benchmarks/gpu/run.sh            # on the GPU machine (sets up carried wheels, then runs this)
    python benchmarks/gpu/run.py --tiny   # CPU smoke run: tiny-random-llama, 2 steps, about 2 minutes

Prints the device, runs benchmarks/sft.py, ppo.py and grpo.py one after the other (each under its own time limit and
all under --budget seconds; one that fails or runs out of time is recorded and the next one runs), records whether
vLLM imports (`ppo --rollout-engine vllm` needs it; availability and version only), then writes every result into
benchmarks/gpu/results-<date>-<gpu>.json (and $OUT where that is set) and prints markdown rows for the README table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "benchmarks" / "gpu"
RESULTS = ROOT / "benchmarks" / "results"
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"

# name → (script, arguments, seconds allowed, result file); GPU sizes fit ~8 minutes on an H200, model loads included
GPU = {"sft": ("sft.py", ["--steps", "20", "--batch-size", "16", "--dtype", "bfloat16"], 150, "sft.json"),
       "ppo": ("ppo.py", ["--steps", "5", "--dtype", "auto"], 180, "ppo.json"),
       "grpo": ("grpo.py", ["--steps", "5", "--skip-rloo"], 210, "grpo.json")}
TINY = {"sft": ("sft.py", ["--steps", "2", "--batch-size", "2", "--max-length", "128"], 90, "sft.json"),
        "ppo": ("ppo.py", ["--steps", "2"], 120, "ppo.json"),
        "grpo": ("grpo.py", ["--steps", "2", "--skip-rloo", "--no-exact", "--eval-prompts", "2"], 120, "grpo.json")}


def sh(cmd: list[str], timeout: float = 30) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def device_info(py: str) -> dict:
    smi = sh(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'cuda_available': c, 'gpu': torch.cuda.get_device_name(0) if c else None, "
            "'bf16': c and torch.cuda.is_bf16_supported()}))")
    try:
        info = json.loads(sh([py, "-c", code], timeout=120).splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        info = {"torch": None, "cuda_available": False, "gpu": None}
    return {**info, "nvidia_smi": smi or None}


def run_one(py: str, name: str, script: str, args: list[str], limit: float, env: dict, log: Path) -> dict:
    """One benchmark in its own process group (so a timeout ends its children too); its output goes to ``log``."""
    cmd = [py, str(ROOT / "benchmarks" / script), *args]
    print(f"\n=== {name}: {' '.join(cmd[1:])}  (limit {limit:.0f} s)", flush=True)
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    wall = time.time() - t0
    text = log.read_text(errors="replace")
    print(text[-3000:], end="" if text.endswith("\n") else "\n", flush=True)
    status = "ok" if rc == 0 else ("timeout" if rc is None else f"exit {rc}")
    return {"command": " ".join(cmd[1:]), "status": status, "wall_s": round(wall, 1),
            **({} if rc == 0 else {"log_tail": text[-2000:]})}


def vllm_check(py: str, limit: float, try_install: bool) -> dict:
    """Whether vLLM imports here (and its version); with ``try_install``, first a quick pip install into a folder of
    its own (a venv's torch must not be replaced by vLLM's pin)."""
    code = "import vllm; print(vllm.__version__)"
    version = sh([py, "-c", code], timeout=max(limit / 2, 5)).splitlines()
    if version:
        return {"importable": True, "version": version[-1], "installed_by_script": False}
    if not try_install or limit < 20:
        return {"importable": False, "version": None, "installed_by_script": False}
    target = Path("/tmp/bench-vllm")
    try:
        r = subprocess.run([py, "-m", "pip", "install", "-q", "--retries", "0", "--timeout", "10", "--target",
                            str(target), "vllm"], capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        r = None
    env = {**os.environ, "PYTHONPATH": f"{target}:{os.environ.get('PYTHONPATH', '')}"}
    try:
        out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=120, env=env).stdout.split()
    except subprocess.TimeoutExpired:
        out = []
    return {"importable": bool(out), "version": out[-1] if out else None, "installed_by_script": True,
            "pip": "timeout" if r is None else ((r.stderr or r.stdout)[-500:] if r.returncode else "ok")}


def fmt(x, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def table(date: str, where: str, res: dict) -> list[str]:
    """Markdown rows: date, device, benchmark, tool, s/step, tokens/s, peak memory, against TRL."""
    rows = []

    def row(bench, tool, r, tps=None, ratio=None):
        mem = r.get("peak_gpu_gb", r.get("peak_rss_gb"))
        kind = "GPU" if "peak_gpu_gb" in r else "RSS"
        rows.append(f"| {date} | {where} | {bench} | {tool} | {fmt(r.get('step_s'), '.3f')} | {fmt(tps, '.0f')} | "
                    f"{fmt(mem)} {kind} | {ratio or ''} |")

    if (s := res.get("sft")) and "chatrlhf" in s:
        row("SFT", "chatrlhf", s["chatrlhf"], s["chatrlhf"]["tokens_per_s"], f"{s['speed_ratio']:.2f}× tokens/s")
        row("SFT", "TRL SFTTrainer", s["trl"], s["trl"]["tokens_per_s"])
    if (p := res.get("ppo")) and "chatrlhf_ppo" in p:
        ours = p["chatrlhf_ppo"]
        row("PPO", "chatrlhf PPO (tokens/s: rollout)", ours, ours.get("rollout_tokens_per_s"),
            f"{p['time_ratio']:.2f}× s/step")
        row("PPO", "TRL GRPOTrainer", p["trl_grpo"])
        smp = p["sampler_tokens_per_s"]
        rows.append(f"| {date} | {where} | rollout sampling | chatrlhf engine vs model.generate | — | "
                    f"{smp['chatrlhf']:.0f} vs {smp['generate']:.0f} | — | "
                    f"{smp['chatrlhf'] / smp['generate']:.2f}× |")
    if (g := res.get("grpo")) and "rows" in g:
        labels = {"grpo-ours": "chatrlhf GRPO (LoRA, dtype auto)", "grpo-exact": "chatrlhf GRPO (TRL's settings)",
                  "grpo-trl": "TRL GRPOTrainer", "rloo-ours": "chatrlhf RLOO (LoRA, dtype auto)",
                  "rloo-exact": "chatrlhf RLOO (TRL's settings)", "rloo-trl": "TRL RLOOTrainer"}
        for key, r in g["rows"].items():
            ratio = g.get(f"{key}_time_ratio")
            row(key.split("-")[0].upper(), labels.get(key, key), r, None, ratio and f"{ratio:.2f}× s/step")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", default=os.environ.get("CPU_SMOKE") == "1",
                   help="CPU smoke run (also CPU_SMOKE=1): tiny-random-llama, 2 steps, tiny batches, --device cpu")
    p.add_argument("--only", default="sft,ppo,grpo", help="comma-separated benchmarks to run")
    p.add_argument("--budget", type=float, default=520, help="seconds for everything (each benchmark also has its own)")
    p.add_argument("--vllm", choices=("check", "install", "skip"), default="check",
                   help="check: does vllm import; install: also try `pip install vllm` first (needs PyPI)")
    a = p.parse_args()
    t_end = time.time() + a.budget
    py = sys.executable
    dev = device_info(py)
    print(f"nvidia-smi: {dev['nvidia_smi'] or 'not found'}")
    print(f"torch {dev['torch']} (CUDA {dev.get('cuda')}), cuda available: {dev['cuda_available']}, GPU: {dev['gpu']}")
    if not a.tiny and not dev["cuda_available"]:
        print("warning: no CUDA device — the figures below are CPU figures (use --tiny for a quick smoke run)")
    plan = TINY if a.tiny else GPU
    extra = ["--model", "tiny-random-llama", "--device", "cpu"] if a.tiny else ["--model", "smollm2-135m"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if not HH.is_file():  # a GPU machine has no ../shared: a carried copy, else the repository's example prompts
        carried = HERE / "carry" / "a" / "hh-helpful-base-test.jsonl.gz"
        env["BENCH_PROMPTS"] = str(carried if carried.is_file() else ROOT / "examples" / "prompts.txt")
    prompts = env.get("BENCH_PROMPTS", str(HH))
    print(f"RL prompts: {prompts}")
    date = time.strftime("%Y-%m-%d")
    where = "cpu-tiny" if a.tiny else re.sub(r"[^A-Za-z0-9]+", "-", dev["gpu"] or "cpu").strip("-").lower()
    out_dirs = [HERE] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "tiny": a.tiny, "device": dev, "rl_prompts": prompts,
              "runs": {}, "results": {}}
    for name in [n.strip() for n in a.only.split(",") if n.strip()]:
        script, args, limit, result_file = plan[name]
        left = t_end - time.time()
        if left < 30:
            report["runs"][name] = {"status": "skipped: out of time"}
            print(f"\n=== {name}: skipped, {left:.0f} s left")
            continue
        before = (RESULTS / result_file).stat().st_mtime if (RESULTS / result_file).exists() else 0
        log = out_dirs[-1] / f"{name}.log" if len(out_dirs) > 1 else Path(f"/tmp/bench-gpu-{name}.log")
        run = run_one(py, name, script, args + extra, min(limit, left), env, log)
        fresh = (RESULTS / result_file).exists() and (RESULTS / result_file).stat().st_mtime > before
        if run["status"] == "ok" and fresh:
            report["results"][name] = json.loads((RESULTS / result_file).read_text())
        elif run["status"] == "ok":
            run["status"] = f"ok, but no new benchmarks/results/{result_file}"
        report["runs"][name] = run
    if a.vllm != "skip":
        report["vllm"] = vllm_check(py, max(min(90, t_end - time.time()), 10), a.vllm == "install")
        print(f"\nvLLM: {report['vllm']}")
    rows = table(date, where if a.tiny else f"{dev['gpu']}", report["results"])
    failed = {n: r["status"] for n, r in report["runs"].items() if r["status"] != "ok"}
    report["readme_rows"] = rows
    name = f"results-{date}-{where}.json"
    for d in out_dirs:
        (d / name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {', '.join(str(d / name) for d in out_dirs)}")
    print("\n| date | device | benchmark | tool | s/step | tokens/s | peak memory GB | vs TRL |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if failed:
        print(f"\nnot done: {failed}")
    sys.exit(1 if len(failed) == len(report["runs"]) else 0)


if __name__ == "__main__":
    main()
