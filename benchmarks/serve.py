"""`chatrlhf serve` against `transformers serve --continuous-batching`: streaming clients, side by side, one run.

    .venv/bin/python benchmarks/serve.py [--clients 1,4,16] [--requests 4] [--max-tokens 64] [--only ours|peer]
                                         [--port 0] [--dtype bfloat16] [--cb-num-blocks 128]

Each server is started as a real process (a free port unless --port; offline; waited for on /health), loaded with
the embedded SmolLM2-135M-Instruct folder (`chatrlhf.models.resolve_model("smollm2-135m")`), measured, and stopped
before the next starts, so each is alone on the machine:
- ours:  `chatrlhf serve --model DIR --dtype D --max-concurrent C --max-batch C` (C = the most clients);
- peer:  `transformers serve DIR --continuous-batching --cb-num-blocks N --device cpu --dtype D`.
For each count of clients (threads, each with the official `openai` client, no retries), every client sends
``--requests`` streaming requests one after another, prompts from examples/prompts.txt in turn, every request with
the same pinned settings: temperature (default 0: greedy, see below), top_p 1, max_tokens, seed 0. The peer
refuses fields outside OpenAI's set, so ours alone also gets `top_k` / `repetition_penalty` set to the peer's
defaults (transformers' GenerationConfig: 50 and 1.0; ours would otherwise use `chat`'s 100 and 1.2).
Measured: aggregate generated tokens/s (each reply's text re-tokenised with the model's tokenizer, the same way for
both sides; over the wall time from the first request to the last reply), time to first content token p50/p99,
per-token latency (the gaps between content chunks) p50/p99, errors.

Why greedy by default: the peer applies `temperature` without setting `do_sample`, and this model folder's
generation_config leaves `do_sample` False, so the peer decodes greedily whatever a request asks; both sides doing
the same work means greedy. `--temperature T` measures ours sampling against that.

Checks, after each side's load: **settings** — a greedy request alone twice (its reference reply), then a greedy
and a temperature-1.5 request at once: honoured when the greedy one in the pair equals the reference and the hot one
differs from it (the peer's continuous batching gives every request the first request's settings).
**Retry-After** (ours only) — a server with two API keys, --max-concurrent 1, --max-batch 1, --max-queue 0: a
second request on a busy key must get 429, one on the other key 503, both with Retry-After; then two concurrent
requests with the `openai` client's default retries must both succeed.
Prints the table, the ratios (goals of issue 22: ours at 16 clients ≥ 4× ours at 1; ours ≥ the peer at 16) and
writes benchmarks/results/serve.json. A side that cannot start or crashes is reported as its row, with its log tail.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from openai import OpenAI
from transformers import AutoTokenizer

from chatrlhf.data import load_prompts
from chatrlhf.models import resolve_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from sft import machine  # noqa: E402

PEER_DEFAULTS = {"top_k": 50, "repetition_penalty": 1.0}   # transformers GenerationConfig's, sent to ours only


class ServerFailed(Exception):
    """A server did not come up or died: the message says why, with the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path, timeout: float = 300.0) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (offline) and wait until GET /health answers 200."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise ServerFailed(f"exited with status {proc.returncode} before answering /health:\n{tail(log)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise ServerFailed(f"no 200 from /health within {timeout:.0f} s:\n{tail(log)}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def stream_one(client: OpenAI, model: str, messages: list[dict], settings: dict, extra: dict) -> dict:
    """One streaming request: its text, time to the first content chunk, the gaps between content chunks."""
    t0 = time.perf_counter()
    times, text = [], []
    try:
        for chunk in client.chat.completions.create(model=model, messages=messages, stream=True, extra_body=extra or None,
                                                    **settings):
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                times.append(time.perf_counter())
                text.append(piece)
    except Exception as e:  # any failure is a counted error, named in the results
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    if not times:
        return {"error": "no content in the stream"}
    return {"text": "".join(text), "ttft": times[0] - t0, "gaps": [b - a for a, b in zip(times, times[1:])]}


def load(base: str, model: str, prompts: list, clients: int, a, extra: dict, tok) -> dict:
    """``clients`` threads, each sending ``a.requests`` streaming requests in turn; the aggregate figures."""
    settings = {"temperature": a.temperature, "top_p": 1.0, "max_tokens": a.max_tokens, "seed": 0}
    results, lock = [], threading.Lock()

    def client_loop(i: int) -> None:
        client = OpenAI(base_url=base, api_key="bench", max_retries=0, timeout=600)
        for j in range(a.requests):
            messages = prompts[(i * a.requests + j) % len(prompts)]
            r = stream_one(client, model, messages, settings, extra)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    tokens = sum(len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in ok)
    gaps = [g for r in ok for g in r["gaps"]]
    errors = [r["error"] for r in results if "error" in r]
    return {"clients": clients, "requests": len(results), "errors": len(errors), "first_errors": errors[:3],
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50": pct([r["ttft"] for r in ok], 50), "ttft_p99": pct([r["ttft"] for r in ok], 99),
            "token_p50": pct(gaps, 50), "token_p99": pct(gaps, 99)}


def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile by nearest rank (the smallest value with at least q % of the values at or below it);
    None for no values."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]


def settings_check(base: str, model: str, prompt: list, max_tokens: int, extra: dict) -> dict:
    """Greedy alone twice (the reference), then two temperature-1.5 requests and a greedy one at once (unseeded):
    honoured when the greedy reply in the group equals the reference and the two hot replies differ from it and
    from each other (a server that decodes them greedily gives the same reply twice)."""
    client = OpenAI(base_url=base, api_key="bench", max_retries=0, timeout=600)

    def ask(temperature: float) -> str:
        r = stream_one(client, model, prompt, {"temperature": temperature, "max_tokens": max_tokens}, extra)
        return r.get("text", "ERROR " + r.get("error", ""))

    ref = [ask(0.0), ask(0.0)]
    group: list[str] = ["", "", ""]
    temps = (1.5, 1.5, 0.0)   # the hot ones first: a server that keeps the first request's settings shows it
    threads = [threading.Thread(target=lambda i=i: group.__setitem__(i, ask(temps[i]))) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    hot, greedy = group[:2], group[2]
    return {"honoured": honoured(ref, hot, greedy), "greedy_alone": ref, "greedy_in_group": greedy,
            "hot_in_group": hot}


def honoured(ref: list[str], hot: list[str], greedy: str) -> bool:
    """Greedy is deterministic and unchanged by its neighbours; the hot replies were sampled (differ from the greedy
    reply and from each other)."""
    return ref[0] == ref[1] == greedy and ref[0] not in hot and hot[0] != hot[1]


def run_side(name: str, cmd: list[str], port: int, prompts: list, a, extra: dict, tok, log: Path) -> dict:
    """Start one server, run every client count and the settings check, stop it; a failure becomes the row."""
    base = f"http://127.0.0.1:{port}/v1"
    try:
        proc = start(cmd, port, log)
    except ServerFailed as e:
        return {"failed": f"{name} did not start: {e}"}
    try:
        model = OpenAI(base_url=base, api_key="bench").models.list().data[0].id
        rows = {}
        for c in a.clients:
            rows[c] = load(base, model, prompts, c, a, extra, tok)
            print(f"  {name} {c:>2} clients: {fmt_row(rows[c])}", flush=True)
            if proc.poll() is not None:
                raise ServerFailed(f"died during the load (status {proc.returncode}):\n{tail(log)}")
        check = settings_check(base, model, prompts[0], a.max_tokens, extra)
        return {"command": " ".join(cmd), "rows": rows, "settings_check": check}
    except Exception as e:  # noqa: BLE001 - a server failing mid-run is a result (its row), not a crash
        return {"failed": f"{name}: {type(e).__name__}: {e}\n{tail(log)}"[-4000:]}
    finally:
        stop(proc)


def fmt_row(r: dict) -> str:
    ms = lambda x: "-" if x is None else f"{1000 * x:.0f}"  # noqa: E731
    return (f"{r['tokens_per_s']:7.1f} tok/s  ttft p50/p99 {ms(r['ttft_p50'])}/{ms(r['ttft_p99'])} ms  "
            f"token p50/p99 {ms(r['token_p50'])}/{ms(r['token_p99'])} ms  errors {r['errors']}/{r['requests']}")


def retry_after_check(model_dir: str, a, tmp: Path) -> dict:
    """429 (busy key) and 503 (full server) carry Retry-After; the openai client's own retries then succeed."""
    keys = ["bench-key-a-0123456789", "bench-key-b-0123456789"]
    (tmp / "keys").write_text("\n".join(keys) + "\n")
    port = a.port + 1 if a.port else free_port()
    cmd = [sys.executable, "-m", "chatrlhf.cli", "serve", "--model", model_dir, "--port", str(port), "--dtype", a.dtype,
           "--api-keys", str(tmp / "keys"), "--max-concurrent", "1", "--max-batch", "1", "--max-queue", "0"]
    try:
        proc = start(cmd, port, tmp / "retry.log")
    except ServerFailed as e:
        return {"failed": str(e)}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {"model": model_dir, "messages": [{"role": "user", "content": "Where is my order?"}], "max_tokens": 24,
            "temperature": 0, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(timeout=60) as http, http.stream("POST", url, json=body,
                                                           headers={"Authorization": f"Bearer {keys[0]}"}) as busy:
            lines = busy.iter_lines()   # kept: a dropped iterator closes the stream (and cancels the request)
            next(lines)                 # the first request is in flight
            same = http.post(url, json=body, headers={"Authorization": f"Bearer {keys[0]}"})
            other = http.post(url, json=body, headers={"Authorization": f"Bearer {keys[1]}"})
        out = {"same_key": [same.status_code, same.headers.get("retry-after")],
               "other_key": [other.status_code, other.headers.get("retry-after")]}
        # the client's own retries, waiting Retry-After (2 by default; 5 here, for a loaded machine)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=keys[0], max_retries=5)
        done, failed = [], []

        def ask() -> None:
            try:
                done.append(client.chat.completions.create(model=model_dir, messages=body["messages"], max_tokens=4,
                                                           temperature=0).choices[0].message.content)
            except Exception as e:  # reported, not raised: the check's answer is the count
                failed.append(f"{type(e).__name__}: {e}"[:200])

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["openai_failed"] = failed
        out["openai_retried_ok"] = f"{len(done)}/2"
        out["ok"] = (same.status_code == 429 and other.status_code == 503 and bool(out["same_key"][1])
                     and bool(out["other_key"][1]) and len(done) == 2)
        return out
    finally:
        stop(proc)


def commands(model_dir: str, port: int, a) -> dict[str, list[str]]:
    most = str(max(a.clients))
    return {"ours": [sys.executable, "-m", "chatrlhf.cli", "serve", "--model", model_dir, "--port", str(port),
                     "--dtype", a.dtype, "--max-concurrent", most, "--max-batch", most],
            "peer": [str(Path(sys.executable).with_name("transformers")), "serve", model_dir, "--continuous-batching",
                     "--cb-num-blocks", str(a.cb_num_blocks), "--device", "cpu", "--dtype", a.dtype,
                     "--host", "127.0.0.1", "--port", str(port)]}


def report(sides: dict, a) -> dict:
    """Print the side-by-side table and the ratios; return the ratios."""
    print(f"\n{'':6}{'clients':>8}{'tok/s':>9}{'ttft p50':>10}{'ttft p99':>10}{'tok p50':>9}{'tok p99':>9}"
          f"{'errors':>8}  settings honoured   (latencies in ms)")
    for name, side in sides.items():
        if "failed" in side:
            print(f"{name:6}  FAILED: {side['failed'].splitlines()[0]}")
            continue
        honoured = "yes" if side["settings_check"]["honoured"] else "NO"
        for c, r in side["rows"].items():
            ms = [("-" if r[k] is None else f"{1000 * r[k]:.0f}") for k in ("ttft_p50", "ttft_p99", "token_p50",
                                                                               "token_p99")]
            print(f"{name:6}{c:>8}{r['tokens_per_s']:>9.1f}{ms[0]:>10}{ms[1]:>10}{ms[2]:>9}{ms[3]:>9}"
                  f"{str(r['errors']) + '/' + str(r['requests']):>8}  {honoured}")
    ratios = {}
    ours, peer = sides.get("ours", {}).get("rows"), sides.get("peer", {}).get("rows")
    lo, hi = min(a.clients), max(a.clients)
    if ours and lo != hi:
        ratios["ours_most_vs_ours_1"] = ours[hi]["tokens_per_s"] / ours[lo]["tokens_per_s"]
        print(f"ours {hi} clients / ours {lo}: {ratios['ours_most_vs_ours_1']:.2f}× (goal ≥ 4× for 16 vs 1)")
    if ours and peer:
        ratios["ours_vs_peer_most"] = ours[hi]["tokens_per_s"] / peer[hi]["tokens_per_s"]
        print(f"ours / peer at {hi} clients: {ratios['ours_vs_peer_most']:.2f}× (goal ≥ 1× at 16, settings honoured)")
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,4,16", help="counts of concurrent streaming clients")
    p.add_argument("--requests", type=int, default=4, help="requests each client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    p.add_argument("--temperature", type=float, default=0.0, help="temperature of every request (0 = greedy)")
    p.add_argument("--only", choices=("ours", "peer"), help="run one server only")
    p.add_argument("--port", type=int, default=0, help="the servers' port (0 = a free one)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="both servers' dtype")
    p.add_argument("--cb-num-blocks", type=int, default=128, help="the peer's paged KV cache blocks")
    a = p.parse_args()
    a.clients = [int(x) for x in a.clients.split(",")]
    model_dir = str(resolve_model("smollm2-135m"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = load_prompts(str(ROOT / "examples" / "prompts.txt"), "auto")
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    print(f"{machine()}; model {model_dir}, {a.dtype}; clients {a.clients} × {a.requests} requests, max_tokens "
          f"{a.max_tokens}, temperature {a.temperature}; logs in {tmp}", flush=True)
    sides = {}
    for name in ("ours", "peer"):
        if a.only in (None, name):
            port = a.port or free_port()
            extra = PEER_DEFAULTS if name == "ours" else {}
            sides[name] = run_side(name, commands(model_dir, port, a)[name], port, prompts, a, extra, tok,
                                   tmp / f"{name}.log")
    if a.only in (None, "ours"):
        sides["retry_after"] = retry_after_check(model_dir, a, tmp)
        print(f"Retry-After check (ours): {sides['retry_after']}")
    for name in ("ours", "peer"):
        if name in sides and "settings_check" in sides[name]:
            print(f"settings check ({name}): {json.dumps(sides[name]['settings_check'])[:600]}")
    ratios = report({k: v for k, v in sides.items() if k in ("ours", "peer")}, a)
    for name, side in sides.items():
        if "failed" in side:
            print(f"\n{name} failed:\n{side['failed']}")
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "settings": vars(a), **sides, **ratios}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
