"""The closed loop, round after round, with simulated annotators (issue 23): does the SERVED model get better?

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/loop.py [--rounds 3] [--labels-per-round 96] [--dpo-steps 48]
    .venv/bin/python benchmarks/loop.py --quick        # tiny-random-llama, a smoke run of the script (< 2 min)

Every piece is the real thing, each in its own process, wired as in tests/test_loop_e2e.py:

  `chatrlhf serve --model smollm2-135m --feedback-db DB --admin-key …` (fp32) answers users (the openai client,
  n = --replies sampled replies per prompt, every reply logged in the store) → items to label (round 1: `feedback
  queue --strategy random`; later rounds: the previous round's queue stage, --queue-strategy, by default
  `random` as well: DPO trains on the labelled pairs, and `uncertainty` hands it near-ties — docs/loop.md)
  → `feedback simulate --oracle examples/reward.py:concise_on_topic [--noise]` answers them through a running
  `feedback serve` → `chatrlhf loop --rounds 1` (reward: frozen-trunk linear head; policy: DPO with LoRA for
  --dpo-steps steps; eval: the candidate vs the current policy on --eval-prompts held-out prompts, judged by the
  round's reward model; check: win_rate's CI lower end above --min-win-lower) → on a promotion the loop hot-swaps the
  server. Then the benchmark scores THE SERVED MODEL: the --heldout held-out prompts sent to the server (the openai
  client, --samples replies each, temperature 1, fixed seeds, the same every round), each reply scored by the oracle;
  per round the mean with a 95% bootstrap CI over prompts (round 0 = before any round).

Prompts: examples/prompts.txt, every 5th held out (as benchmarks/methods.py); users of round R chat on the R-th slice
of --prompts-per-round train prompts. The held-out scoring replies are logged by the server like any other; the
benchmark deletes them from the store right after scoring so that no held-out prompt is ever labelled or trained on.
Prints a table and writes benchmarks/results/loop.json (not for --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
from sqlalchemy import delete, func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's chatrlhf, as the children use
from chatrlhf.evaluate.metrics import bootstrap_ci  # noqa: E402
from chatrlhf.feedback.tables import Reply  # noqa: E402
from chatrlhf.feedback.store import Store  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from methods import split  # noqa: E402
from reward import concise_on_topic  # noqa: E402
from serve import free_port, start, stop  # noqa: E402
from sft import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ORACLE = f"{ROOT / 'examples' / 'reward.py'}:concise_on_topic"
ADMIN, PASSWORD = "bench-loop-admin-key-0123456789", "bench loop annotator"
CLIENTS = 4  # users chatting at once (serve's default --max-concurrent per API key)
STAGES = ("export", "reward", "gate", "policy", "eval", "decide", "promote", "queue")
QUICK = dict(model="tiny-random-llama", rounds=2, prompts_per_round=10, labels_per_round=8, heldout=4, samples=2,
             max_tokens=8, eval_prompts=3, eval_tokens=4, dpo_steps=2,
             min_win_lower=-1.0)  # every round promoted: the hot swap is exercised too


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CHATRLHF_PASSWORD": PASSWORD,
            "CHATRLHF_ADMIN_KEY": ADMIN, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                                        os.environ.get("PYTHONPATH", "")])}


def cli(*args) -> tuple[float, str]:
    """`python -m chatrlhf ARGS` in a child process: (wall seconds, stdout); exits with its output on failure."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "chatrlhf", *map(str, args)], capture_output=True, text=True, env=env(),
                       cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"chatrlhf {' '.join(map(str, args[:2]))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}")
    return time.perf_counter() - t0, r.stdout


def chat(url: str, prompts: list[str], n: int, max_tokens: int, seed: int) -> list:
    """``n`` sampled replies to each prompt from the server (one request per prompt, seed ``seed + i``)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)

    def ask(i: int):
        return client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompts[i]}], n=n,
                                              temperature=1.0, max_tokens=max_tokens, seed=seed + i)

    with ThreadPoolExecutor(CLIENTS) as pool:  # concurrent users: the server batches them
        return list(pool.map(ask, range(len(prompts))))


def score_served(url: str, db: str, held: list[str], a) -> dict:
    """The oracle's score of the served model on the held-out prompts (mean over --samples replies per prompt, 95%
    bootstrap CI over prompts); then those replies are deleted from the store (they are not for labelling)."""
    t0 = time.perf_counter()
    done = chat(url, held, a.samples, a.max_tokens, seed=10_000)
    texts = [c.message.content or "" for d in done for c in d.choices]
    scores = np.array(concise_on_topic([p for p in held for _ in range(a.samples)], texts)).reshape(len(held), -1)
    mean, lo, hi = bootstrap_ci(scores.mean(1), seed=0)
    forget(Store(db), [d.id for d in done], len(texts))
    words = float(np.mean([len(t.split()) for t in texts]))
    return {"model": done[0].model, "oracle": {"mean": mean, "ci95": [lo, hi]}, "words": words, "example": texts[0],
            "seconds": time.perf_counter() - t0}


def forget(store: Store, completion_ids: list[str], replies: int) -> None:
    """Delete the replies of these completions (the server writes them in the background: wait for all)."""
    where = Reply.completion_id.in_(completion_ids)
    for _ in range(600):
        with store.reading() as s:
            if s.scalar(select(func.count()).select_from(Reply).where(where)) >= replies:
                break
        time.sleep(0.1)
    else:
        sys.exit("the server did not store the scoring replies within 60 s")
    with store.transaction(), store.session() as s:
        s.execute(delete(Reply).where(where))


def label(app_url: str, a) -> dict:
    """`feedback simulate` answers every queued item; its summary line and seconds."""
    seconds, out = cli("feedback", "simulate", "--url", app_url, "--user", "sim", "--oracle", ORACLE, "--noise",
                       a.noise, "--seed", a.seed)
    return {"seconds": seconds, "summary": out.strip().splitlines()[-1] if out.strip() else ""}


def loop_yaml(a, work: Path, db: Path, url: str, eval_prompts: Path) -> Path:
    cfg = {"work_dir": str(work / "loop"), "db": str(db), "model": a.model, "checks": ["win_rate"],
           "min_win_lower": a.min_win_lower, "serve": {"url": url, "admin_key_env": "CHATRLHF_ADMIN_KEY"},
           "queue": {"strategy": a.queue_strategy, "count": a.labels_per_round, "seed": a.seed},
           "reward": {"model": a.model, "eval_fraction": 0.2,  # the default recipe: a head on the frozen trunk
                      "min_accuracy": 0.0, "max_length_corr": 1.0, "quiet": True, "tensorboard": False},
           "policy": {"method": "dpo", "lora_r": 16, "lr": a.dpo_lr, "beta": 0.1, "max_steps": a.dpo_steps,
                      "batch_size": 4, "warmup_ratio": 0.0, "eval_fraction": 0.0, "max_length": 256,
                      "save_steps": 10**6, "quiet": True, "tensorboard": False},
           "eval": {"data": [str(eval_prompts)], "max_prompts": a.eval_prompts, "samples_per_prompt": 2,
                    "max_new_tokens": a.eval_tokens, "seed": 0}}
    path = work / "loop.yaml"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def round_figures(work: Path, number: int, loop_s: float) -> dict:
    """The round's decision, reasons, stage times (done.json "seconds"), labels and reward-model accuracy."""
    rdir = work / "loop" / f"round-{number}"
    if not (rdir / "round.json").exists():  # no new feedback: the loop keeps no round
        return {"decision": "no new feedback", "reasons": [], "stages": {}, "labels": 0, "loop_s": loop_s,
                "rm_accuracy": None, "win_rate": None, "kl": None, "queue": None}
    line = json.loads((rdir / "round.json").read_text())
    stages = {}
    for s in STAGES:
        done = rdir / s / "done.json"
        if done.exists():
            stages[s] = json.loads(done.read_text()).get("seconds")
    counts = line.get("data", {}).get("new", {}).get("counts", {})
    return {"decision": line.get("decision"), "reasons": line.get("reasons", []), "stages": stages,
            "labels": counts.get("preferences", 0), "loop_s": loop_s,
            "rm_accuracy": line.get("reward", {}).get("accuracy"), "win_rate": line.get("metrics", {}).get("win_rate"),
            "kl": (line.get("metrics", {}).get("kl") or {}).get("mean"), "queue": line.get("queue")}


def start_app(db: Path, work: Path) -> tuple[subprocess.Popen, str]:
    """`chatrlhf feedback serve` on the store, in its own process group, once GET /login answers."""
    port, log = free_port(), work / "feedback-app.log"
    url = f"http://127.0.0.1:{port}"
    app = subprocess.Popen([sys.executable, "-m", "chatrlhf.cli", "feedback", "serve", "--db", str(db), "--port",
                            str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env(),
                           start_new_session=True)
    for _ in range(600):
        if app.poll() is not None:
            sys.exit(f"feedback serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/login", timeout=2).status_code == 200:
                return app, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop(app)
    sys.exit("feedback serve did not answer within 60 s")


def run_rounds(a, work: Path, db: Path, url: str, app_url: str) -> dict:
    """Round 0's score, then per round: chat → (round 1: random queue) → simulate → loop → score the server."""
    train, held = split()
    held = held[:a.heldout]
    eval_prompts = work / "eval_prompts.txt"
    eval_prompts.write_text("\n".join(held) + "\n")
    config = loop_yaml(a, work, db, url, eval_prompts)
    k = a.prompts_per_round

    def batch(r: int) -> list[str]:  # what round r's users ask: the r-th slice of the train prompts (wrapping)
        return [train[(i + (r - 1) * k) % len(train)] for i in range(k)]

    result = {"rounds": [{"round": 0, "served": score_served(url, str(db), held, a)}]}
    show(result["rounds"][0])
    t0 = time.perf_counter()
    chat(url, batch(1), a.replies, a.max_tokens, seed=1000)
    chat_s = time.perf_counter() - t0
    queue_s = None
    for r in range(1, a.rounds + 1):
        if r == 1 or not (result["rounds"][-1].get("queue") or {}).get("queued"):  # round 1, or after a failed gate
            queue_s, _ = cli("feedback", "queue", "--db", db, "--strategy", "random", "--count", a.labels_per_round,
                             "--kind", "compare", "--round", r, "--seed", a.seed)
        labelled = label(app_url, a)
        t0 = time.perf_counter()
        chat(url, batch(r + 1), a.replies, a.max_tokens, seed=1000 * (r + 1))  # the pool this round's queue stage picks from
        next_chat_s = time.perf_counter() - t0
        loop_s, _ = cli("loop", "--config", config, "--rounds", 1)
        fig = round_figures(work, r, loop_s)
        fig.update(round=r, chat_s=chat_s, simulate=labelled, random_queue_s=queue_s,
                   served=score_served(url, str(db), held, a))
        result["rounds"].append(fig)
        show(fig)
        chat_s, queue_s = next_chat_s, None
    return result


def show(fig: dict) -> None:
    s = fig["served"]
    line = f"round {fig['round']}: served {s['model']}: oracle {s['oracle']['mean']:.3f} " \
           f"(95% CI {s['oracle']['ci95'][0]:.3f}–{s['oracle']['ci95'][1]:.3f}), {s['words']:.1f} words/reply"
    if fig["round"]:
        line += f"; {fig['decision']} ({'; '.join(fig['reasons'])}); stages {fig['stages']}"
    print(line, flush=True)


def table(result: dict, a) -> str:
    cols = ("export", "reward", "policy", "eval", "queue")
    lines = [f"oracle (examples/reward.py, 0–1) of the served model on {a.heldout} held-out prompts × {a.samples} "
             f"replies; users get {a.replies} replies a prompt, {a.labels_per_round} labels a round; DPO "
             f"{a.dpo_steps} steps",
             f"{'round':>5}{'oracle':>8}{'95% CI':>15}{'words':>7}{'labels':>7}{'RM acc':>7}{'win rate (CI)':>22}"
             f"  {'decision':9}" + "".join(f"{c + ' s':>10}" for c in cols) + f"{'loop s':>8}"]
    for f in result["rounds"]:
        o = f["served"]["oracle"]
        row = f"{f['round']:>5}{o['mean']:>8.3f}{o['ci95'][0]:>8.3f}–{o['ci95'][1]:.3f}{f['served']['words']:>7.1f}"
        if f["round"]:
            w = f["win_rate"] or {}
            wr = f"{w['mean']:.3f} ({w['ci95'][0]:.2f}–{w['ci95'][1]:.2f})" if w else "—"
            acc = f"{f['rm_accuracy']:.2f}" if f["rm_accuracy"] is not None else "—"
            row += f"{f['labels']:>7}{acc:>7}{wr:>22}  {f['decision']:9}" + "".join(
                f"{f['stages'].get(c, 0) or 0:>10.0f}" for c in cols) + f"{f['loop_s']:>8.0f}"
        lines.append(row)
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts-per-round", type=int, default=32, help="train prompts users chat on each round")
    p.add_argument("--replies", type=int, default=4, help="replies users get per prompt (n): C(n, 2) pairs to queue")
    p.add_argument("--labels-per-round", type=int, default=96, help="pairs queued (and labelled) per round")
    p.add_argument("--queue-strategy", default="random", choices=("random", "uncertainty", "disagreement"),
                   help="how each round picks the next round's pairs to label (round 1's are random)")
    p.add_argument("--dpo-steps", type=int, default=48, help="DPO steps per round (batch 4, LoRA r 16)")
    p.add_argument("--dpo-lr", type=float, default=5e-4)
    p.add_argument("--min-win-lower", type=float, default=0.5, help="the loop's win_rate check: CI lower end above")
    p.add_argument("--heldout", type=int, default=24, help="held-out prompts the served model is scored on (≤ 24)")
    p.add_argument("--samples", type=int, default=2, help="replies per held-out prompt in the scoring")
    p.add_argument("--max-tokens", type=int, default=48, help="max new tokens of every reply from the server")
    p.add_argument("--eval-prompts", type=int, default=24, help="held-out prompts of the loop's own eval stage")
    p.add_argument("--eval-tokens", type=int, default=48, help="max new tokens in the loop's eval stage")
    p.add_argument("--noise", type=float, default=0.0, help="probability the simulated annotator flips an answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--work", default=str(ROOT / "out" / "bench-loop"), help="scratch folder (emptied first)")
    p.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "loop.json"), help="the result file")
    p.add_argument("--quick", action="store_true", help="tiny-random-llama, 2 tiny rounds: a smoke run (< 2 min)")
    a = p.parse_args()
    if a.quick:
        vars(a).update(QUICK)
    return a


def main() -> None:
    a = parse()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    db = work / "feedback.db"
    Store(str(db)).add_user("sim", PASSWORD)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    server = start([sys.executable, "-m", "chatrlhf.cli", "serve", "--model", a.model, "--model-name", "bench",
                    "--port", str(port), "--dtype", "float32", "--feedback-db", str(db), "--admin-key", ADMIN],
                   port, work / "serve.log")
    app, app_url = start_app(db, work)
    try:
        result = run_rounds(a, work, db, url, app_url)
    finally:
        for proc in (app, server):
            stop(proc)
    text = table(result, a)
    print(text)
    result.update(date=time.strftime("%Y-%m-%d"), machine=machine(), settings=vars(a), total_s=time.perf_counter() - t0,
                  table=text)
    if a.quick:
        return
    Path(a.result).parent.mkdir(parents=True, exist_ok=True)
    Path(a.result).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
